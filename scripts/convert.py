"""Convert pretrained PyTorch weights (torchvision ResNets, timm ViTs) into a kernorm zoo model.

    python scripts/convert.py resnet50 resnet50-11ad3fa6.pth --out resnet50.keras --saved-model resnet50_saved_model
    python scripts/convert.py vit_tiny_patch16_224 model.safetensors --out vit_tiny.keras

The weights file is a state dict: `.pt` / `.pth` / `.bin` (needs torch), `.safetensors` (needs safetensors)
or `.npz`. The `.keras` model takes channels-last images preprocessed as the reference expects them and
returns logits; fine-tune it with `scripts/train.py --init-from MODEL.keras`. The SavedModel
(`--saved-model`) serves the same logits from a process without kernorm (signature `serving_default`).

Exit status 2, with the reason, for an unknown model, an unreadable file or a state dict that does not fit.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402

import absl.logging  # noqa: E402

from kernorm.models import convert  # noqa: E402


def build_parser():
    names = (
        f"{', '.join(convert.TORCHVISION_MODELS)} (torchvision), "
        "vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224, ... (timm)"
    )
    parser = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a torchvision ResNet or timm ViT state dict into a kernorm .keras model "
        "(and optionally a SavedModel).",
    )
    parser.add_argument("name", help=f"the reference's model name: {names}")
    parser.add_argument("weights", help="the state dict: .pt, .pth, .bin, .safetensors or .npz")
    parser.add_argument("--out", required=True, help="the .keras file to write")
    parser.add_argument("--saved-model", default=None, metavar="DIR", help="also export a SavedModel into DIR")
    return parser


def main(argv=None):
    """Runs convert.py with `argv` (default: sys.argv). Returns the converted model."""
    absl.logging.set_verbosity(absl.logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if out.suffix != ".keras":
        parser.error(f"--out must end in .keras, not {out.name!r}")
    try:
        convert.reference(args.name)
    except ValueError as error:
        parser.error(str(error))
    try:
        model = convert.from_state_dict(args.name, convert.read_state_dict(args.weights))
    except (OSError, ImportError, TypeError, ValueError) as error:
        parser.error(f"{args.weights}: {error}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    trainable = sum(math.prod(weight.shape) for weight in model.trainable_weights)
    print(f"{args.name}: {trainable:,} trainable parameters -> {out}", flush=True)
    if args.saved_model:
        model.export(args.saved_model, verbose=False)
        print(f"{args.name}: SavedModel -> {args.saved_model}", flush=True)
    return model


if __name__ == "__main__":
    main()
