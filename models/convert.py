"""Pretrained weights from PyTorch: torchvision's ResNets and timm's ViTs as zoo models.

    from kernorm.models import convert
    state_dict = convert.read_state_dict("resnet50-11ad3fa6.pth")   # or torchvision's model.state_dict()
    model = convert.from_torchvision("resnet50", state_dict)
    model = convert.from_timm("vit_tiny_patch16_224", timm_model.state_dict())

The zoo's ResNets and ViTs are the reference networks, weight for weight, with
the same padding and epsilons, so the converted model gives the reference's
logits (to float32 rounding) on the same preprocessed images, channels-last:
`(batch, height, width, 3)` where PyTorch takes `(batch, 3, height, width)`.

A state dict maps the reference's parameter names to arrays: torch tensors,
NumPy arrays or anything with `.numpy()`. kernorm never imports torch. The
conversion maps by name (Keras orders weights differently), converts layouts
(OIHW kernels to HWIO, `(out, in)` linear weights to `(in, out)`, timm's packed
`qkv` to Keras's query, key and value), copies batch norm's running statistics
as the moving statistics, and uses every tensor exactly once: a missing, an
unexpected or a mis-shaped tensor is a `ValueError` naming it, and then no
weight is changed.

Weights trained with batch norm are batch norm weights: they do not transfer
to a model built with another norm, so `norm` cannot be overridden.
"""

import pathlib
import re
from collections.abc import Mapping
from typing import Callable, NamedTuple

import keras
import numpy as np

from . import registry, resnet

#: torchvision model name -> zoo name.
TORCHVISION_MODELS = {f"resnet{depth}": f"resnet{depth}" for depth in resnet.IMAGENET_DEPTHS}
#: timm's ViT sizes -> zoo name; any patch size and square image size builds
#: (`vit_base_patch32_384`, ...), with the position embeddings of that size.
TIMM_VIT_SIZES = {"tiny": "vit_tiny", "small": "vit_small", "base": "vit_base"}
_TIMM_VIT = re.compile(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_(?P<image>\d+)")
#: Buffers of a PyTorch state dict that hold no weight of the model.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
#: How many names an error lists of each kind before it counts the rest.
_NAMES_SHOWN = 10


def from_torchvision(name, state_dict, **overrides):
    """Builds the zoo's ResNet for a torchvision model and loads its weights.

    Args:
        name: torchvision's model name: "resnet18", "resnet34", "resnet50",
            "resnet101" or "resnet152".
        state_dict: mapping from torchvision's parameter names (`conv1.weight`,
            `layer1.0.bn1.running_var`, `fc.weight`, ...) to torch tensors or
            arrays, as `model.state_dict()` returns it or `read_state_dict`
            reads it. `num_batches_tracked` buffers are accepted and unused.
        **overrides: builder arguments for `kernorm.models.get` (`input_shape`,
            `name`, `classifier_activation`, `norm_kwargs`, ...). The number
            of classes follows `fc.weight` unless given.

    Returns:
        A functional `keras.Model` with the weights loaded, in inference form
        when called with `training=False`.

    Raises:
        ValueError: for an unknown name, a `norm` override, or a state dict
            with a missing, unexpected or mis-shaped tensor (named).
        TypeError: if `state_dict` is not a mapping or holds a non-array.
    """
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"Unknown torchvision model {name!r}. Known models: {', '.join(TORCHVISION_MODELS)}.")
    arrays = _arrays(state_dict)
    model = _build(TORCHVISION_MODELS[name], arrays, "fc.weight", overrides, "batch")
    load_state_dict(model, arrays, _resnet_plan(model, TORCHVISION_MODELS[name]), f"The state dict for {name}")
    return model


def from_timm(name, state_dict, **overrides):
    """Builds the zoo's ViT for a timm `VisionTransformer` and loads its weights.

    Args:
        name: timm's model name, `vit_{tiny,small,base}_patch{P}_{S}` such as
            "vit_tiny_patch16_224", "vit_small_patch16_224" or
            "vit_base_patch16_224"; a pretrained tag after a dot
            (".augreg_in21k_ft_in1k") is ignored.
        state_dict: mapping from timm's parameter names (`cls_token`,
            `pos_embed`, `blocks.0.attn.qkv.weight`, `head.weight`, ...) to
            torch tensors or arrays.
        **overrides: builder arguments for `kernorm.models.get`. The number
            of classes follows `head.weight` unless given.

    Returns:
        A functional `keras.Model` with the weights loaded.

    Raises:
        ValueError: for an unknown name, a `norm` override, or a state dict
            with a missing, unexpected or mis-shaped tensor (named).
        TypeError: if `state_dict` is not a mapping or holds a non-array.
    """
    match = _timm_vit(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"Unknown timm model {name!r}. Known models: vit_{{{','.join(TIMM_VIT_SIZES)}}}_patch{{P}}_{{S}}, "
            "such as vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224."
        )
    image = int(match["image"])
    overrides = {"input_shape": (image, image, 3), "patch_size": int(match["patch"]), **overrides}
    arrays = _arrays(state_dict)
    model = _build(TIMM_VIT_SIZES[match["size"]], arrays, "head.weight", overrides, "layer")
    load_state_dict(model, arrays, _vit_plan(model), f"The state dict for {name}")
    return model


def from_state_dict(name, state_dict, **overrides):
    """`from_torchvision` for torchvision's names, `from_timm` for timm's ViT names."""
    if reference(name) == "torchvision":
        return from_torchvision(name, state_dict, **overrides)
    return from_timm(name, state_dict, **overrides)


def reference(name):
    """"torchvision" or "timm": the library whose model `name` is.

    Raises:
        ValueError: for a name of neither, listing the known names.
    """
    if name in TORCHVISION_MODELS:
        return "torchvision"
    if isinstance(name, str) and _timm_vit(name) is not None:
        return "timm"
    raise ValueError(
        f"Unknown model {name!r}. Known models: {', '.join(TORCHVISION_MODELS)} (torchvision); "
        f"vit_{{{','.join(TIMM_VIT_SIZES)}}}_patch{{P}}_{{S}} such as vit_tiny_patch16_224 (timm)."
    )


def _timm_vit(name):
    """The size, patch and image size of a timm ViT name (a pretrained tag after a dot aside), or None."""
    match = _TIMM_VIT.fullmatch(name.split(".", 1)[0])
    return match if match is not None and match["size"] in TIMM_VIT_SIZES else None


class Tensor(NamedTuple):
    """How one tensor of a state dict fills Keras weights.

    Attributes:
        paths: the Keras weights' `variable.path`s it fills.
        shape: the tensor's shape in the reference.
        convert: maps the tensor (a NumPy array of `shape`) to one array per path.
    """

    paths: tuple
    shape: tuple
    convert: Callable


def load_state_dict(model, state_dict, plan, source="The state dict"):
    """Loads `state_dict` into `model` as `plan` says, each tensor once, all or nothing.

    Args:
        model: a built Keras model.
        state_dict: mapping from reference names to arrays (torch tensors or
            anything with `.numpy()`).
        plan: mapping from reference names to `Tensor`s. Names ending in
            `.num_batches_tracked` may be in `state_dict` and are unused.
        source: what the state dict is, for error messages.

    Raises:
        ValueError: naming every tensor the plan needs and `state_dict` lacks,
            every tensor the plan does not use, every tensor of the wrong
            shape, and every weight of `model` that no tensor fills.
    """
    arrays = _arrays(state_dict)
    variables = {variable.path: variable for variable in model.weights}
    filled = [path for tensor in plan.values() for path in tensor.paths]
    unfilled = sorted(set(variables) - set(filled))
    unknown = sorted(set(filled) - set(variables))
    twice = sorted({path for path in filled if filled.count(path) > 1})
    if unfilled or unknown or twice:
        raise ValueError(
            f"The conversion plan for {model.name} does not match the model: "
            + _listing(("weights no tensor fills", unfilled), ("unknown weights", unknown), ("weights filled twice", twice))
            + ". Did an override change the architecture?"
        )
    names = {key for key in arrays if not key.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(plan) - names, key=_natural)
    unexpected = sorted(names - set(plan), key=_natural)
    mis_shaped = [
        f"{key} {tuple(arrays[key].shape)} (expected {tensor.shape})"
        for key, tensor in sorted(plan.items(), key=lambda item: _natural(item[0]))
        if key in arrays and tuple(arrays[key].shape) != tuple(tensor.shape)
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"{source} does not fit {model.name}: "
            + _listing(("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped))
            + ". No weight was changed."
        )
    values = {}
    for key, tensor in plan.items():
        for path, value in zip(tensor.paths, tensor.convert(arrays[key])):
            if tuple(value.shape) != tuple(variables[path].shape):
                raise ValueError(f"{key} converts to shape {value.shape}; {path} has {variables[path].shape}.")
            values[path] = value
    for path, value in values.items():
        variables[path].assign(value.astype(variables[path].dtype))


def read_state_dict(path):
    """Reads a state dict from `.npz`, `.safetensors`, or `.pt` / `.pth` / `.bin` (PyTorch) files.

    A checkpoint that wraps the weights (`{"state_dict": ...}`, `{"model": ...}`)
    is unwrapped, and a `module.` prefix (DataParallel) is removed.

    Args:
        path: the file.

    Returns:
        A dict from names to NumPy arrays.

    Raises:
        ValueError: for another file type or a file holding no tensors.
        ImportError: if the file's reader (torch, safetensors) is not installed.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as file:
            state_dict = {key: file[key] for key in file.files}
    elif suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError(f"Reading {path} needs the safetensors package: pip install safetensors") from None
        state_dict = load_file(str(path))
    elif suffix in (".pt", ".pth", ".bin"):
        try:
            import torch
        except ImportError:
            raise ImportError(f"Reading {path} needs PyTorch: pip install torch (or convert it to .npz)") from None
        state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"Cannot read {path}: expected a .npz, .safetensors, .pt, .pth or .bin file.")
    for key in ("state_dict", "model"):
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(f"{path} holds no state dict (a mapping from names to tensors).")
    arrays = _arrays(state_dict)
    if all(key.startswith("module.") for key in arrays):
        arrays = {key[len("module."):]: value for key, value in arrays.items()}
    return arrays


def transfer_weights(source, target, reinitialize=("head",)):
    """Copies the weights of `source` into the layers of the same names in `target`.

    For fine-tuning a converted or trained model: `source` may be a zoo model
    or a model that wraps one (as `scripts/train.py` saves it). Layers named
    in `reinitialize` whose weights differ in shape (a head for another number
    of classes) keep their new initial weights; any other difference is an
    error, and then no weight is changed.

    Args:
        source: a Keras model.
        target: a Keras model built by the same builder.
        reinitialize: names of layers that may differ in shape.

    Returns:
        The names of the layers that kept their initial weights.

    Raises:
        ValueError: naming the layers of `target` that `source` lacks or whose
            weights differ, and the layers of `source` with weights that
            `target` lacks.
    """
    layers = {layer.name: layer for layer in _flat_layers(source) if layer.weights}
    pairs, kept, problems = [], [], []
    for layer in target.layers:
        if not layer.weights:
            continue
        match = layers.pop(layer.name, None)
        if match is None:
            problems.append(f"{layer.name} (not in the source)")
            continue
        ours = [(weight.name, tuple(weight.shape)) for weight in layer.weights]
        theirs = [(weight.name, tuple(weight.shape)) for weight in match.weights]
        if ours == theirs:
            pairs.extend(zip(layer.weights, match.weights))
        elif layer.name in reinitialize and [name for name, _ in ours] == [name for name, _ in theirs]:
            kept.append(layer.name)
        else:
            problems.append(f"{layer.name} (weights {theirs}, expected {ours})")
    problems.extend(f"{name} (only in the source)" for name in layers)
    if problems:
        raise ValueError(
            f"The weights of {source.name} do not fit {target.name}: {_listing(('layers', problems))}. "
            "No weight was changed."
        )
    for weight, value in pairs:
        weight.assign(value)
    return kept


def _build(zoo_name, arrays, head, overrides, norm):
    if "norm" in overrides and overrides["norm"] != norm:
        raise ValueError(
            f"Pretrained weights come with their norm: {norm!r}. They do not transfer to "
            f"norm={overrides['norm']!r}; train that model from scratch instead."
        )
    if head in arrays and arrays[head].ndim == 2:
        overrides = {"num_classes": int(arrays[head].shape[0]), **overrides}
    return registry.get(zoo_name, **overrides)


def _resnet_plan(model, zoo_name):
    """torchvision's ResNet names -> the zoo's ResNet weights."""
    shapes = {variable.path: tuple(variable.shape) for variable in model.weights}
    plan = {}

    def conv_norm(torch_prefix, norm_prefix, keras_name):
        plan[f"{torch_prefix}.weight"] = _conv(f"{keras_name}_conv/kernel", shapes)
        for torch_name, keras_weight in (
            ("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"), ("running_var", "moving_variance"),
        ):
            plan[f"{norm_prefix}.{torch_name}"] = _same(f"{keras_name}_norm/{keras_weight}", shapes)

    conv_norm("conv1", "bn1", "stem")
    block, counts = resnet.IMAGENET_DEPTHS[int(zoo_name[len("resnet"):])]
    for stage, count in enumerate(counts, start=1):
        for index in range(count):
            torch_block, keras_block = f"layer{stage}.{index}", f"stage{stage}_block{index + 1}"
            for conv in range(1, (2 if block == "basic" else 3) + 1):
                conv_norm(f"{torch_block}.conv{conv}", f"{torch_block}.bn{conv}", f"{keras_block}_{conv}")
            if f"{keras_block}_shortcut_conv/kernel" in shapes:
                conv_norm(f"{torch_block}.downsample.0", f"{torch_block}.downsample.1", f"{keras_block}_shortcut")
    plan["fc.weight"] = _linear("head/kernel", shapes)
    plan["fc.bias"] = _same("head/bias", shapes)
    return plan


def _vit_plan(model):
    """timm's VisionTransformer names -> the zoo's ViT weights."""
    shapes = {variable.path: tuple(variable.shape) for variable in model.weights}
    plan = {
        "patch_embed.proj.weight": _conv("patch_embedding/projection/kernel", shapes),
        "patch_embed.proj.bias": _same("patch_embedding/projection/bias", shapes),
        "cls_token": _same("class_token/token", shapes),
        "pos_embed": _reshaped("position_embedding/embeddings", (1, *shapes["position_embedding/embeddings"]), shapes),
        "norm.weight": _same("final_norm/gamma", shapes),
        "norm.bias": _same("final_norm/beta", shapes),
        "head.weight": _linear("head/kernel", shapes),
        "head.bias": _same("head/bias", shapes),
    }
    blocks = sorted({int(path.split("/")[0][len("block"):]) for path in shapes if re.match(r"block\d+/", path)})
    for number in blocks:
        torch_block, keras_block = f"blocks.{number - 1}", f"block{number}"
        attention = f"{keras_block}/attention/self_attention/attention"
        feedforward = f"{keras_block}/feedforward/feedforward"
        for norm, sublayer in (("norm1", "attention"), ("norm2", "feedforward")):
            plan[f"{torch_block}.{norm}.weight"] = _same(f"{keras_block}/{sublayer}/norm/gamma", shapes)
            plan[f"{torch_block}.{norm}.bias"] = _same(f"{keras_block}/{sublayer}/norm/beta", shapes)
        plan[f"{torch_block}.attn.qkv.weight"] = _qkv(attention, "kernel", shapes)
        plan[f"{torch_block}.attn.qkv.bias"] = _qkv(attention, "bias", shapes)
        plan[f"{torch_block}.attn.proj.weight"] = _linear(f"{attention}/attention_output/kernel", shapes)
        plan[f"{torch_block}.attn.proj.bias"] = _same(f"{attention}/attention_output/bias", shapes)
        for torch_name, keras_name in (("fc1", "hidden"), ("fc2", "output")):
            plan[f"{torch_block}.mlp.{torch_name}.weight"] = _linear(f"{feedforward}/{keras_name}/kernel", shapes)
            plan[f"{torch_block}.mlp.{torch_name}.bias"] = _same(f"{feedforward}/{keras_name}/bias", shapes)
    return plan


def _same(path, shapes):
    return Tensor((path,), shapes.get(path), lambda array: (array,))


def _reshaped(path, torch_shape, shapes):
    return Tensor((path,), torch_shape, lambda array: (array.reshape(shapes[path]),))


def _conv(path, shapes):
    """An OIHW convolution kernel -> Keras's HWIO."""
    height, width, inputs, outputs = shapes.get(path, (0, 0, 0, 0))
    return Tensor((path,), (outputs, inputs, height, width), lambda array: (array.transpose(2, 3, 1, 0),))


def _linear(path, shapes):
    """A `(out, in)` linear weight -> a Keras kernel `(in, ...)`, e.g. Dense's `(in, out)` or
    the attention output's `(heads, head_dim, out)`, whose leading axes flatten to `in`."""
    shape = shapes.get(path, (0, 0))
    inputs = int(np.prod(shape[:-1]))
    return Tensor((path,), (shape[-1], inputs), lambda array: (array.T.reshape(shape),))


def _qkv(attention, kind, shapes):
    """timm's packed `qkv` (`(3 * d, d)` weight, `(3 * d,)` bias) -> Keras's query, key and value.

    Row `i` of each third is head `i // head_dim`, feature `i % head_dim`.
    """
    paths = tuple(f"{attention}/{part}/{kind}" for part in ("query", "key", "value"))
    shape = shapes.get(paths[0], (0, 0, 0) if kind == "kernel" else (0, 0))
    if kind == "kernel":  # (d, heads, head_dim)
        torch_shape = (3 * shape[1] * shape[2], shape[0])
        return Tensor(paths, torch_shape, lambda array: tuple(part.T.reshape(shape) for part in np.split(array, 3)))
    return Tensor(paths, (3 * shape[0] * shape[1],), lambda array: tuple(p.reshape(shape) for p in np.split(array, 3)))


def _arrays(state_dict):
    """A dict of NumPy arrays from a mapping of torch tensors, arrays or anything with `.numpy()`."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected `state_dict` to be a mapping from names to tensors. Received: {type(state_dict)}")
    arrays = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch tensor: off the graph and the device; bfloat16 has no NumPy dtype
            value = value.detach().cpu()
            value = (value.float() if value.is_floating_point() else value).numpy()
        elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):
            value = value.numpy()
        try:
            arrays[str(key)] = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"State dict entry {key!r} is not an array: {type(value)} ({error})") from None
        if arrays[str(key)].dtype.kind not in "biufc":
            raise TypeError(f"State dict entry {key!r} is not an array of numbers: {type(value)}")
    return arrays


def _flat_layers(model):
    """The layers of `model`, with nested functional models (a zoo model in a wrapper) opened."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
            yield from _flat_layers(layer)
        else:
            yield layer


def _natural(name):
    """Sorts `layer10` after `layer9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _listing(*groups):
    parts = []
    for label, names in groups:
        if names:
            shown = ", ".join(names[:_NAMES_SHOWN])
            more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
            parts.append(f"{label}: {shown}{more}")
    return "; ".join(parts)
