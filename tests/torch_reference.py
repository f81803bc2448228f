"""PyTorch references for the conversion tests: torchvision's ResNet and timm's ViT, as state dicts and forwards.

Each reference comes in two forms with the same parameter names and maths:

- "functional": written here with `torch.nn.functional` (conv2d, batch_norm,
  max_pool2d, linear, layer_norm, gelu, softmax), in float64, after
  torchvision's `ResNet` / `BasicBlock` / `Bottleneck` and timm's
  `VisionTransformer` / `Attention` (packed qkv) / `Mlp`. It needs torch only,
  so it runs wherever the test extras are installed.
- "torchvision" / "timm": the libraries' own model code, where they import
  beside the installed torch.

The state dicts have random weights and non-trivial batch norm statistics.
"""

import functools
import importlib
import importlib.util
import math
import signal
import subprocess
import sys

import numpy as np

torch = None
F = None


def load_torch():
    """Imports torch (a test extra) on first use; returns the module."""
    global torch, F
    if torch is None:
        import torch as torch_module
        import torch.nn.functional as functional

        torch, F = torch_module, functional
    return torch


@functools.cache
def library(name):
    """(module, None) if `name` ("torchvision" or "timm") imports beside TensorFlow, else (None, the reason).

    A wheel built for another torch fails to import (RuntimeError), and some builds crash the process
    when imported after TensorFlow, so a fresh process tries first.
    """
    if name in sys.modules:
        return sys.modules[name], None
    if importlib.util.find_spec(name) is None:
        return None, f"{name} is not installed"
    probe = subprocess.run(
        [sys.executable, "-c", f"import tensorflow, {name}"], capture_output=True, text=True, timeout=300
    )
    if probe.returncode < 0:
        return None, f"importing {name} after TensorFlow crashes here ({signal.Signals(-probe.returncode).name})"
    if probe.returncode != 0:
        errors = [line for line in probe.stderr.splitlines() if "Error" in line] or [f"exit status {probe.returncode}"]
        return None, f"{name} does not import beside TensorFlow here ({errors[-1].strip()})"
    return importlib.import_module(name), None


# --- torchvision ResNet -------------------------------------------------------------------------

RESNET_LAYERS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def resnet_shapes(depth, num_classes=1000, width=64):
    """torchvision's `resnet{depth}().state_dict()` names and shapes, for a first stage of `width` channels."""
    block, counts = RESNET_LAYERS[depth]
    expansion = 1 if block == "basic" else 4
    shapes = {}

    def conv_bn(conv, bn, out_channels, in_channels, kernel):
        shapes[f"{conv}.weight"] = (out_channels, in_channels, kernel, kernel)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{name}"] = (out_channels,)
        shapes[f"{bn}.num_batches_tracked"] = ()

    conv_bn("conv1", "bn1", width, 3, 7)
    in_channels = width
    for stage, count in enumerate(counts, start=1):
        planes = width * 2 ** (stage - 1)
        for index in range(count):
            prefix = f"layer{stage}.{index}"
            stride = 2 if stage > 1 and index == 0 else 1
            if block == "basic":
                convs = [(planes, in_channels, 3), (planes, planes, 3)]
            else:
                convs = [(planes, in_channels, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            for number, (out_channels, inputs, kernel) in enumerate(convs, start=1):
                conv_bn(f"{prefix}.conv{number}", f"{prefix}.bn{number}", out_channels, inputs, kernel)
            if stride != 1 or in_channels != planes * expansion:
                conv_bn(f"{prefix}.downsample.0", f"{prefix}.downsample.1", planes * expansion, in_channels, 1)
            in_channels = planes * expansion
    shapes["fc.weight"] = (num_classes, in_channels)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def random_state_dict(shapes, seed=0):
    """Random float32 weights of `shapes`: He-scaled kernels, BN with non-trivial statistics."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = np.array(100, np.int64)
        elif name.endswith("running_var"):
            state[name] = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("running_mean"):
            state[name] = rng.normal(0.0, 0.3, shape)
        elif len(shape) >= 2:  # kernels, linear weights, embeddings
            fan_in = int(np.prod(shape[1:])) if len(shape) in (2, 4) else shape[-1]
            state[name] = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
        elif name.endswith("weight"):  # norm scales
            state[name] = rng.normal(1.0, 0.3, shape)
        else:  # biases and norm shifts
            state[name] = rng.normal(0.0, 0.1, shape)
        state[name] = state[name].astype(np.float32) if state[name].dtype == np.float64 else state[name]
    return state


def resnet_forward(state, depth, images):
    """torchvision's `ResNet.forward` in eval mode, float64: `images` NCHW -> logits."""
    load_torch()
    weights = {name: torch.as_tensor(value).double() for name, value in state.items()}
    block, counts = RESNET_LAYERS[depth]

    def bn(x, prefix):
        return F.batch_norm(
            x, weights[f"{prefix}.running_mean"], weights[f"{prefix}.running_var"], weights[f"{prefix}.weight"],
            weights[f"{prefix}.bias"], training=False, eps=1e-5,
        )  # fmt: skip

    def conv(x, name, stride=1):
        kernel = weights[f"{name}.weight"]
        return F.conv2d(x, kernel, stride=stride, padding=kernel.shape[-1] // 2)

    with torch.no_grad():
        x = torch.as_tensor(images).double()
        x = F.relu(bn(conv(x, "conv1", 2), "bn1"))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for stage, count in enumerate(counts, start=1):
            for index in range(count):
                prefix = f"layer{stage}.{index}"
                stride = 2 if stage > 1 and index == 0 else 1
                if block == "basic":
                    out = F.relu(bn(conv(x, f"{prefix}.conv1", stride), f"{prefix}.bn1"))
                    out = bn(conv(out, f"{prefix}.conv2"), f"{prefix}.bn2")
                else:  # torchvision's v1.5 bottleneck: the stride on the 3x3
                    out = F.relu(bn(conv(x, f"{prefix}.conv1"), f"{prefix}.bn1"))
                    out = F.relu(bn(conv(out, f"{prefix}.conv2", stride), f"{prefix}.bn2"))
                    out = bn(conv(out, f"{prefix}.conv3"), f"{prefix}.bn3")
                if f"{prefix}.downsample.0.weight" in weights:
                    x = bn(conv(x, f"{prefix}.downsample.0", stride), f"{prefix}.downsample.1")
                x = F.relu(out + x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, weights["fc.weight"], weights["fc.bias"]).numpy()


def torchvision_resnet(torchvision, depth, seed=0):
    """torchvision's own resnet{depth} with random BN statistics: (state dict of tensors, forward)."""
    load_torch()
    return _with_random_state(getattr(torchvision.models, f"resnet{depth}")(weights=None), random_state_dict, seed)


# --- timm VisionTransformer ---------------------------------------------------------------------

VIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def vit_shapes(d_model, num_layers, num_classes=1000, patch=16, image=224, mlp_ratio=4):
    """timm's `VisionTransformer(class_token=True, qkv_bias=True)` state dict names and shapes."""
    tokens = (image // patch) ** 2 + 1
    hidden = d_model * mlp_ratio
    shapes = {
        "cls_token": (1, 1, d_model),
        "pos_embed": (1, tokens, d_model),
        "patch_embed.proj.weight": (d_model, 3, patch, patch),
        "patch_embed.proj.bias": (d_model,),
    }
    for index in range(num_layers):
        prefix = f"blocks.{index}"
        shapes.update({
            f"{prefix}.norm1.weight": (d_model,), f"{prefix}.norm1.bias": (d_model,),
            f"{prefix}.attn.qkv.weight": (3 * d_model, d_model), f"{prefix}.attn.qkv.bias": (3 * d_model,),
            f"{prefix}.attn.proj.weight": (d_model, d_model), f"{prefix}.attn.proj.bias": (d_model,),
            f"{prefix}.norm2.weight": (d_model,), f"{prefix}.norm2.bias": (d_model,),
            f"{prefix}.mlp.fc1.weight": (hidden, d_model), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (d_model, hidden), f"{prefix}.mlp.fc2.bias": (d_model,),
        })  # fmt: skip
    shapes.update({"norm.weight": (d_model,), "norm.bias": (d_model,)})
    shapes.update({"head.weight": (num_classes, d_model), "head.bias": (num_classes,)})
    return shapes


def vit_state_dict(shapes, seed=0):
    """Random ViT weights; embeddings and the class token at timm's 0.02 scale."""
    state = random_state_dict(shapes, seed)
    rng = np.random.default_rng(seed + 1)
    for name in ("cls_token", "pos_embed"):
        state[name] = rng.normal(0.0, 0.02, shapes[name]).astype(np.float32)
    return state


def vit_forward(state, num_heads, images, patch=16):
    """timm's `VisionTransformer.forward` (global pool "token", pre-norm, eps 1e-6), float64: NCHW -> logits."""
    load_torch()
    weights = {name: torch.as_tensor(value).double() for name, value in state.items()}
    num_layers = len({name.split(".")[1] for name in weights if name.startswith("blocks.")})

    def norm(x, prefix):
        return F.layer_norm(x, x.shape[-1:], weights[f"{prefix}.weight"], weights[f"{prefix}.bias"], eps=1e-6)

    def linear(x, prefix):
        return F.linear(x, weights[f"{prefix}.weight"], weights[f"{prefix}.bias"])

    with torch.no_grad():
        x = torch.as_tensor(images).double()
        x = F.conv2d(x, weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"], stride=patch)
        x = x.flatten(2).transpose(1, 2)  # (batch, patches, d_model), patches in row-major order
        batch, _, d_model = x.shape
        x = torch.cat([weights["cls_token"].expand(batch, -1, -1), x], dim=1) + weights["pos_embed"]
        head_dim = d_model // num_heads
        for index in range(num_layers):
            prefix = f"blocks.{index}"
            # timm's Attention: one packed qkv projection, split into heads.
            h = norm(x, f"{prefix}.norm1")
            qkv = linear(h, f"{prefix}.attn.qkv").reshape(batch, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attention = torch.softmax((q * head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
            h = (attention @ v).transpose(1, 2).reshape(batch, -1, d_model)
            x = x + linear(h, f"{prefix}.attn.proj")
            h = F.gelu(linear(norm(x, f"{prefix}.norm2"), f"{prefix}.mlp.fc1"))  # exact (erf) GELU
            x = x + linear(h, f"{prefix}.mlp.fc2")
        x = norm(x, "norm")[:, 0]
        return linear(x, "head").numpy()


def timm_vit(timm, name, seed=0, **kwargs):
    """timm's own model `name` with random weights: (state dict of tensors, forward)."""
    load_torch()
    return _with_random_state(timm.create_model(name, pretrained=False, **kwargs), vit_state_dict, seed)


def _with_random_state(model, state_dict, seed):
    """`model` (a torch module) loaded with `state_dict(shapes, seed)`, in eval mode: (state dict, forward)."""
    state = state_dict({name: tuple(t.shape) for name, t in model.state_dict().items()}, seed)
    model.load_state_dict({name: torch.as_tensor(value) for name, value in state.items()})
    model.eval()

    def forward(images):
        with torch.no_grad():
            return model(torch.as_tensor(images)).double().numpy()

    return model.state_dict(), forward
