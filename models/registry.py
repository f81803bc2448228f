"""Named model configurations: `get(name, **overrides)` and `names()`, for the scripts."""

import functools
import inspect

from .cnn import convnet, mlp
from .recurrent import rnn_classifier
from .resnet import resnet
from .transformer import transformer_classifier, vit

_IMAGE = {"input_shape": (32, 32, 3), "num_classes": 10}
_IMAGENET = {"input_shape": (224, 224, 3), "num_classes": 1000}
_TEXT = {"vocab_size": 20000, "sequence_length": 128, "num_classes": 2}
_VIT_CONFIGS = {
    "vit_tiny": {"d_model": 192, "num_heads": 3, "num_layers": 12, "ff_dim": 768},
    "vit_small": {"d_model": 384, "num_heads": 6, "num_layers": 12, "ff_dim": 1536},
    "vit_base": {"d_model": 768, "num_heads": 12, "num_layers": 12, "ff_dim": 3072},
}
#: Images smaller than this on a side get 4-pixel patches instead of 16.
SMALL_IMAGE = 128


def _vit(input_shape, num_classes, patch_size=None, **kwargs):
    """A ViT whose patch size follows the image: 16 for ImageNet-sized images, 4 for small ones."""
    if patch_size is None:
        patch_size = 16 if min(input_shape[:2]) >= SMALL_IMAGE else 4
    return vit(input_shape=input_shape, num_classes=num_classes, patch_size=patch_size, **kwargs)


def _entry(builder, defaults, **fixed):
    return builder, {**defaults, **fixed}


_REGISTRY = {
    "mlp": _entry(mlp, {"input_shape": (28, 28, 1), "num_classes": 10}, name="mlp"),
    "convnet": _entry(convnet, {"input_shape": (28, 28, 1), "num_classes": 10}, name="convnet"),
    **{f"resnet{d}": _entry(functools.partial(resnet, d), _IMAGE, name=f"resnet{d}") for d in (20, 32, 44, 56, 110)},
    **{f"resnet{d}": _entry(functools.partial(resnet, d), _IMAGENET, name=f"resnet{d}") for d in (18, 34, 50, 101, 152)},
    "transformer_tiny": _entry(
        transformer_classifier, _TEXT, d_model=64, num_heads=4, num_layers=2, ff_dim=128, dropout=0.1,
        name="transformer_tiny",
    ),
    "transformer_small": _entry(
        transformer_classifier, _TEXT, d_model=256, num_heads=4, num_layers=4, ff_dim=1024, dropout=0.1,
        name="transformer_small",
    ),
    **{key: _entry(_vit, _IMAGENET, **config, name=key) for key, config in _VIT_CONFIGS.items()},
    "lstm_tiny": _entry(rnn_classifier, _TEXT, cell="lstm", units=64, dropout=0.1, name="lstm_tiny"),
    "gru_tiny": _entry(rnn_classifier, _TEXT, cell="gru", units=64, dropout=0.1, name="gru_tiny"),
    "bilstm_tiny": _entry(
        rnn_classifier, _TEXT, cell="lstm", units=64, bidirectional=True, dropout=0.1, name="bilstm_tiny"
    ),
}


def names():
    """The names `get` accepts, in a stable order."""
    return tuple(_REGISTRY)


def defaults(name):
    """The keyword arguments `get(name)` builds with, before overrides."""
    return dict(_lookup(name)[1])


def default_norm(name):
    """The norm `get(name)` builds with when none is given."""
    builder, config = _lookup(name)
    return config.get("norm", inspect.signature(builder).parameters["norm"].default)


def get(name, /, **overrides):
    """Builds the named model configuration.

    Args:
        name: one of `names()`: "mlp", "convnet", "resnet20" ... "resnet110"
            (CIFAR), "resnet18" ... "resnet152" (ImageNet), "transformer_tiny",
            "transformer_small", "vit_tiny", "vit_small", "vit_base", "lstm_tiny",
            "gru_tiny", "bilstm_tiny".
        **overrides: builder arguments replacing the configuration's, e.g.
            `input_shape=(32, 32, 3), num_classes=10, norm="group",
            norm_kwargs={"epsilon": 1e-5}` for image models, or `vocab_size`,
            `sequence_length` and `num_classes` for text models. `name=` names
            the model.

    Returns:
        A new functional `keras.Model`.

    Raises:
        ValueError: for an unknown name; the message lists `names()`.
    """
    builder, config = _lookup(name)
    return builder(**{**config, **overrides})


def _lookup(name):
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(names())}.")
    return _REGISTRY[name]
