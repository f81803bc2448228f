"""Train a zoo model on a TensorFlow Datasets dataset and export a SavedModel.

    python scripts/train.py --model convnet --norm batch --dataset fashion_mnist --epochs 1 --out runs/fashion_convnet

The arguments are parsed here; the training is `kernorm.training.run` (the run folder's files are listed
there and in the README). TensorFlow loads only after the arguments parse, so --help and malformed
arguments answer at once. An existing run folder is refused unless --resume (continue it) or --overwrite
(start again) is given; bad names exit with status 2 before any folder is created. Interrupted (Ctrl-C),
the script says how to continue.
"""

import argparse
import json
import os
import sys


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object such as \'{{"epsilon": 1e-5}}\', not {text!r}')
    return value


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default that says something: not for required arguments, nor where the help says it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a kernorm zoo model on a TFDS dataset; write model.keras, saved_model/, "
        "metrics.json and history.csv into the run folder.",
        formatter_class=_DefaultsShown,
    )
    parser.add_argument(
        "--model", required=True, help="zoo model name: mlp, convnet, resnet20, ... (kernorm.models.names())"
    )
    parser.add_argument(
        "--norm",
        default=None,
        help="normalization for every norm layer of the model: batch, layer, rms, group, instance, none "
        "(kernorm.norm_names()); by default the model's own",
    )
    parser.add_argument(
        "--norm-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help='arguments for each norm layer, as a JSON object, e.g. \'{"momentum": 0.9}\'',
    )
    parser.add_argument("--dataset", required=True, help="TFDS name: fashion_mnist, mnist, cifar10, glue/sst2, ...")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data folder (default: $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="examples per training step")
    parser.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training examples")
    parser.add_argument(
        "--max-train-examples", type=_positive_int, default=None, help="train on the first N examples only"
    )
    parser.add_argument(
        "--max-eval-examples", type=_positive_int, default=None, help="validate on the first N examples only"
    )
    parser.add_argument(
        "--optimizer", choices=("adamw", "sgd"), default="adamw", help="sgd: Nesterov momentum 0.9"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak learning rate (default: 1e-3 for adamw, 0.05 for sgd); cosine decay to 0 over the run",
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled weight decay (not on norms, biases)")
    parser.add_argument(
        "--warmup-steps", type=_non_negative_int, default=0, help="linear warm-up steps before the cosine decay"
    )
    parser.add_argument(
        "--mixed-precision",
        nargs="?",
        const="mixed_float16",
        default=None,
        choices=("mixed_float16", "mixed_bfloat16"),
        help="compute in float16 (or bfloat16) with float32 weights; the export still returns float32",
    )
    parser.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--seed", type=int, default=0, help="weights, shuffling and augmentation")
    parser.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, default=None,
        help="random crop with padding and flip for training images (default: on for cifar10 only)",
    )  # fmt: skip
    parser.add_argument(
        "--vocab-size", type=_positive_int, default=20000, help="text: most tokens kept"
    )
    parser.add_argument(
        "--sequence-length",
        type=_positive_int,
        default=64,
        help="text: tokens per example",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="MODEL.keras",
        help="start from the weights of this .keras model of the same architecture (scripts/convert.py makes one "
        "from pretrained weights); a head for another number of classes starts anew",
    )
    parser.add_argument(
        "--fold-batch-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold batch norm into the convolution or Dense layer before it in the exports (default: on)",
    )
    parser.add_argument(
        "--recalibrate-batch-norm",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="before the export, recompute the batch-norm statistics over STEPS training batches (precise BN)",
    )
    parser.add_argument("--tflite", action="store_true", help="also write model.tflite, for TFLite / LiteRT")
    parser.add_argument(
        "--onnx", action="store_true", help="also write model.onnx, for ONNX Runtime (needs tf2onnx: kernorm[onnx])"
    )
    parser.add_argument("--out", required=True, help="the run folder")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    again.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    parser.add_argument(
        "--strategy",
        choices=("auto", "one-device", "mirrored", "multi-worker"),
        default="auto",
        help="tf.distribute strategy: auto takes multi-worker when TF_CONFIG names more than one worker, mirrored "
        "when there is more than one GPU, else one-device; --batch-size is the global batch, split evenly across "
        "the replicas",
    )
    parser.add_argument(
        "--sync-batch-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with more than one replica, batch norm takes the statistics of the global batch, not of each "
        "replica's share (default: on)",
    )
    return parser


def main(argv=None, callbacks=()):
    """Runs train.py with `argv` (default: sys.argv). Returns the metrics dict.

    `callbacks` are extra Keras callbacks for `model.fit`, after the library's own.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import absl.logging

    from kernorm import training

    absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        return training.run(training.Config(**vars(args)), callbacks=callbacks)
    except training.ConfigError as error:
        parser.error(str(error))
    except training.distribute.WorkerLostError as error:
        print(f"\ntrain.py: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(
            "\ntrain.py: interrupted. To continue from the last finished epoch, run the same command with "
            f"--resume (the run folder {args.out} keeps its state).",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
