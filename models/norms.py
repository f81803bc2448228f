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

from kernorm import registry
from kernorm.registry import get_norm, is_identity, norm_key, takes_mask  # noqa: F401 (the zoo uses them as norms.*)
from kernorm.token_group_normalization import TokenGroupNormalization

#: Groups used by "group" unless `norm_kwargs` names `groups`.
DEFAULT_GROUPS = 32
#: Without spatial axes a group is only its features; fewer than this many
#: values make a group's statistics meaningless (two values normalize to +-1).
MIN_FEATURES_PER_GROUP = 8


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
    return registry.layer_config(layer), {}


def serializable(norm, norm_kwargs=None):
    """`norm` in a JSON form for a layer config (`kernorm.registry.serializable`), built with `norm_kwargs`."""
    return registry.serializable(norm, **_kwargs(norm_kwargs, None))


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
