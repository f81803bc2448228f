"""`get_norm`: the one way a constructor argument becomes a normalization layer."""

import functools
import inspect

import keras

from kernorm.batch_normalization import BatchNormalization
from kernorm.group_normalization import GroupNormalization
from kernorm.layer_normalization import LayerNormalization
from kernorm.rms_normalization import RMSNormalization

_NORMS = {
    "batch": BatchNormalization,
    "layer": LayerNormalization,
    "rms": RMSNormalization,
    "group": GroupNormalization,
    "instance": functools.partial(GroupNormalization, groups=-1),
    "none": keras.layers.Identity,
}


def norm_names():
    """The names `get_norm` accepts."""
    return tuple(_NORMS)


def get_norm(spec, **kwargs):
    """Turns a norm specification into a new layer.

    Args:
        spec: one of
            - a name from `norm_names()` ("batch", "layer", "rms", "group",
              "instance", "none");
            - `None`, the same as "none": an identity layer;
            - a `keras.layers.Layer` subclass, called with `kwargs`;
            - a callable returning a layer, such as a `functools.partial`;
            - a Keras config dict, `{"class_name": ..., "config": {...}}`, as
              `keras.layers.serialize` writes it; `kwargs` update its config.
        **kwargs: arguments for the layer (`axis`, `epsilon`, `momentum`,
            `groups`, `name`, ...). The identity layer takes only `name`.

    Returns:
        A new `keras.layers.Layer`.

    Example:

    >>> kernorm.get_norm("group", groups=8)
    >>> kernorm.get_norm(functools.partial(kernorm.BatchNormalization, momentum=0.9))
    """
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _NORMS:
            raise ValueError(f"Unknown norm {spec!r}. Known norms: {', '.join(norm_names())}.")
        if key == "none":
            kwargs = {k: v for k, v in kwargs.items() if k in ("name", "dtype")}
        return _NORMS[key](**kwargs)
    if isinstance(spec, dict):
        if "class_name" not in spec:
            raise ValueError(
                "A norm given as a dict must be a Keras layer config with 'class_name' and 'config' keys. "
                f"Received: {spec!r}"
            )
        spec = {**spec, "config": {**spec.get("config", {}), **kwargs}}
        layer = keras.layers.deserialize(spec)
    elif isinstance(spec, keras.layers.Layer):
        raise TypeError(
            "`norm` must create a new layer for each use: pass a layer class, a name or a "
            f"functools.partial, not the layer instance {spec.name!r}."
        )
    elif callable(spec):
        layer = spec(**kwargs)
    else:
        raise TypeError(
            "`norm` must be a name, a Layer class, a callable returning a layer, a Keras config dict "
            f"or None. Received: {spec!r}"
        )
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(f"`norm`={spec!r} returned {type(layer).__name__}, not a keras.layers.Layer.")
    return layer


def accepts(spec, argument):
    """Whether the layer that `spec` builds takes the constructor `argument`."""
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return False
    if isinstance(spec, str):
        spec = _NORMS.get(spec.lower())
    if isinstance(spec, dict) or spec is None:
        return True
    target = spec.func if isinstance(spec, functools.partial) else spec
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True
    return argument in parameters
