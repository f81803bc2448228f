"""Norm specifications: `get_norm`, the one way a constructor argument becomes a normalization layer, and
what the zoo and `AddNorm` ask of a specification (its name, whether it normalizes at all, a JSON form for
a layer config, whether the layer takes a mask)."""

import copy
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


def norm_key(spec):
    """The lower-case name of a norm given by name or None; None for any other form.

    Raises a `ValueError` listing the known names for an unknown name.
    """
    if spec is None:
        return "none"
    if not isinstance(spec, str):
        return None
    key = spec.lower()
    if key not in _NORMS:
        raise ValueError(f"Unknown norm {spec!r}. Known norms: {', '.join(norm_names())}.")
    return key


def is_identity(spec):
    """Whether `spec` builds no normalization at all (None, "none" or the Identity class)."""
    if isinstance(spec, functools.partial):
        spec = spec.func
    if isinstance(spec, dict):
        return spec.get("class_name") == "Identity"
    return norm_key(spec) == "none" or spec is keras.layers.Identity


def serializable(spec, layer=None, **kwargs):
    """`spec` in a JSON form for a layer config: a name, None or a config dict stays as given; a class
    or a callable becomes the config of the layer it builds (`layer`, or `get_norm(spec, **kwargs)`)."""
    if spec is None or isinstance(spec, (str, dict)):
        return spec
    return layer_config(layer if layer is not None else get_norm(spec, **kwargs))


def layer_config(layer):
    """The Keras config dict of `layer`, without its name and build state, as a private copy.

    Inside `keras.saving.load_model` an object-sharing scope is active: it
    marks configs of objects with the same `id()` as one shared object. A
    temporary layer's address can be reused by a later temporary, and
    deserializing both configs would then give one layer instance twice. A deep
    copy without the marks avoids that.
    """
    config = _without_sharing(copy.deepcopy(keras.layers.serialize(layer)))
    config["config"].pop("name", None)
    config.pop("build_config", None)
    return config


def _without_sharing(config):
    if isinstance(config, dict):
        return {k: _without_sharing(v) for k, v in config.items() if k != "shared_object_id"}
    if isinstance(config, list):
        return [_without_sharing(v) for v in config]
    return config


def takes_mask(layer):
    """Whether `layer.call` accepts a `mask` argument (kernorm's BatchNormalization does)."""
    try:
        return "mask" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False
