"""What each norm name means inside the zoo's CNNs, MLPs and Transformers.

`kernorm.get_norm` turns a name into a layer. A name alone does not say which
axes to normalize over, and the literature means different things by the same
name in different architectures, so the zoo maps names to layers here:

| name | CNNs (batch, H, W, C) | MLPs (batch, features) | Transformers (batch, tokens, features) |
| --- | --- | --- | --- |
| batch | each channel over (batch, H, W) | each feature over the batch | each feature over the real (batch, token) positions |
| layer | each sample over (H, W, C), per-channel weights (= one group) | each sample over its features | each token over its features |
| rms | each position over its channels, no centring | each sample over its features | each token over its features |
| group | groups of channels of each sample, with (H, W) | groups of features of each sample | groups of features of each token |
| instance | each channel of each sample over (H, W) | same as layer | same as layer |
| none | identity | identity | identity |

Anything else (a layer class, a partial, a config dict) goes to
`kernorm.get_norm` unchanged, with `norm_kwargs`.
"""

import copy
import functools
import inspect

import keras
import tensorflow as tf

from kernorm import ops, validation
from kernorm.group_normalization import GroupNormalization
from kernorm.registry import get_norm, norm_names

#: Groups used by "group" unless `norm_kwargs` names `groups`.
DEFAULT_GROUPS = 32
#: Without spatial axes a group is only its features; fewer than this many
#: values make a group's statistics meaningless (two values normalize to +-1).
MIN_FEATURES_PER_GROUP = 8


def norm_key(norm):
    """The lower-case name of a norm given by name or None; None for any other form.

    Raises a `ValueError` listing the known names for an unknown name.
    """
    if norm is None:
        return "none"
    if not isinstance(norm, str):
        return None
    key = norm.lower()
    if key not in norm_names():
        raise ValueError(f"Unknown norm {norm!r}. Known norms: {', '.join(norm_names())}.")
    return key


def is_identity(norm):
    """Whether `norm` builds no normalization at all (None, "none" or the Identity class)."""
    if isinstance(norm, functools.partial):
        norm = norm.func
    if isinstance(norm, dict):
        return norm.get("class_name") == "Identity"
    return norm_key(norm) == "none" or norm is keras.layers.Identity


def fit_groups(channels, groups=DEFAULT_GROUPS, min_group_size=1):
    """The largest divisor of `channels` that is at most `groups` and leaves
    groups of at least `min_group_size` channels (-1, instance norm, is kept)."""
    if groups == -1:
        return -1
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Expected `groups` to be a positive int or -1. Received: groups={groups!r}")
    limit = max(1, min(groups, channels // max(1, min_group_size)))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def image_norm(norm, channels, norm_kwargs=None, name=None):
    """A norm layer for a channels-last feature map with `channels` channels."""
    kwargs = _kwargs(norm_kwargs, name)
    key = norm_key(norm)
    if key == "layer":
        return get_norm("group", **{"groups": 1, **kwargs})
    if key == "group":
        groups = kwargs.pop("groups", DEFAULT_GROUPS)
        return get_norm("group", groups=fit_groups(channels, groups), **kwargs)
    return get_norm(norm, **kwargs)


def vector_norm(norm, features, norm_kwargs=None, name=None):
    """A norm layer for a (batch, features) tensor, as after a Dense layer."""
    kwargs = _kwargs(norm_kwargs, name)
    key = norm_key(norm)
    if key == "instance":
        # A vector has no spatial axes: one value per (sample, feature) would
        # normalize to a constant, so the whole sample is the instance.
        return get_norm("layer", **kwargs)
    if key == "group":
        return get_norm("group", groups=_vector_groups(features, kwargs), **kwargs)
    return get_norm(norm, **kwargs)


def token_norm(norm, features, norm_kwargs=None):
    """`(norm, norm_kwargs)` for `kernorm.AddNorm` in a Transformer on `features`-wide tokens.

    The result is a name or a Keras config dict, so that the block's config is
    JSON and the model saves to `.keras`, whatever form `norm` was given in.
    """
    kwargs = dict(norm_kwargs or {})
    key = norm_key(norm)
    if key in ("batch", "layer", "rms", "none"):
        return key, kwargs
    if key == "instance":
        # Per feature over the tokens would make the masked mean pool of the
        # last block a constant (beta); the token is the instance.
        return "layer", kwargs
    if key == "group":
        layer = TokenGroupNormalization(groups=_vector_groups(features, kwargs), **kwargs)
    else:
        layer = get_norm(norm, **kwargs)
    return _layer_config(layer), {}


def serializable(norm, norm_kwargs=None):
    """`norm` in a JSON-friendly form for a layer config: a name stays a name;
    a class, a callable or a dict becomes the Keras config dict of the layer it builds."""
    if norm_key(norm) is not None:
        return norm
    return _layer_config(get_norm(norm, **_kwargs(norm_kwargs, None)))


def _layer_config(layer):
    """The Keras config dict of `layer`, without its name, as a private copy.

    Inside `keras.saving.load_model` an object-sharing scope is active: it
    marks configs of objects with the same `id()` as one shared object. The
    layer here is temporary, so a later temporary at the same address would
    be marked as the same object, and deserializing both configs would give
    one layer instance twice. A deep copy without the marks avoids that.
    """
    config = _without_sharing(copy.deepcopy(keras.layers.serialize(layer)))
    config["config"].pop("name", None)
    return config


def _without_sharing(config):
    if isinstance(config, dict):
        return {k: _without_sharing(v) for k, v in config.items() if k != "shared_object_id"}
    if isinstance(config, list):
        return [_without_sharing(v) for v in config]
    return config


def make_token_norm(norm, features, norm_kwargs=None, name=None):
    """A standalone norm layer for tokens, as `token_norm` defines it (the final norm of a pre-norm stack)."""
    spec, kwargs = token_norm(norm, features, norm_kwargs)
    return get_norm(spec, **_kwargs(kwargs, name))


def with_default_epsilon(norm, norm_kwargs, epsilon):
    """`norm_kwargs` with `epsilon` added for a norm given by name, unless it names its own.

    The zoo's builders use it to follow their reference network's epsilon. A
    norm given as a class, a callable or a config dict keeps its own defaults.
    """
    kwargs = _kwargs(norm_kwargs, None)
    if norm_key(norm) not in (None, "none"):
        kwargs.setdefault("epsilon", epsilon)
    return kwargs


def takes_mask(layer):
    """Whether `layer.call` accepts a `mask` argument (kernorm's BatchNormalization does)."""
    try:
        return "mask" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


def _kwargs(norm_kwargs, name):
    if norm_kwargs is not None and not isinstance(norm_kwargs, dict):
        raise TypeError(f"Expected `norm_kwargs` to be a dict or None. Received: {norm_kwargs!r}")
    kwargs = dict(norm_kwargs or {})
    if name is not None:
        kwargs["name"] = name
    return kwargs


def _vector_groups(features, kwargs):
    """Groups for features without spatial axes; pops `groups` from kwargs.

    The default of 32 also keeps at least `MIN_FEATURES_PER_GROUP` features in
    a group; a `groups` given in `norm_kwargs` is only reduced to a divisor.
    """
    if "groups" in kwargs:
        return fit_groups(features, kwargs.pop("groups"))
    return fit_groups(features, DEFAULT_GROUPS, MIN_FEATURES_PER_GROUP)


@keras.saving.register_keras_serializable(package="kernorm")
class TokenGroupNormalization(GroupNormalization):
    """Group normalization of the last axis at every position: each token's features, in groups.

    `kernorm.GroupNormalization` takes its statistics over every non-batch axis,
    so on a (batch, tokens, features) tensor each group would mix tokens (and
    padding). This layer treats every position as its own sample:

        outputs = gamma * (x - mean_group(x)) / sqrt(var_group(x) + epsilon) + beta

    with the mean and variance over one group of one token's features.
    `groups=1` is layer normalization over the features.

    Args:
        groups: number of groups; must divide the features. -1 for one
            feature per group (which normalizes each value to `beta`).
        **kwargs: every other argument of `kernorm.GroupNormalization` except
            `axis`, which is the last axis.

    Call arguments:
        inputs: a float tensor of rank >= 2; the features on the last axis.

    Example:

    >>> layer = TokenGroupNormalization(groups=4)
    >>> y = layer(np.random.rand(2, 5, 16).astype("float32"))

    Reference:
        - [Wu and He, 2018](https://arxiv.org/abs/1803.08494).
    """

    def __init__(self, groups=32, **kwargs):
        axis = kwargs.pop("axis", -1)
        if axis != -1:
            raise ValueError(f"TokenGroupNormalization normalizes the last axis; received axis={axis!r}.")
        super().__init__(groups=groups, axis=-1, **kwargs)

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"TokenGroupNormalization needs inputs of rank >= 2. Received: {tuple(input_shape)}")
        super().build((None, input_shape[-1]))
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_shape[-1]})

    def call(self, inputs):
        validation.float_inputs(inputs, self)
        shape = tf.shape(inputs)
        flat = tf.reshape(inputs, [-1, inputs.shape[-1]])
        outputs = ops.group_norm(flat, self._groups, 1, self.gamma, self.beta, self.epsilon)
        return keras.ops.cast(tf.reshape(outputs, shape), self.compute_dtype)
