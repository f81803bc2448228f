"""The weights of kernorm's layers: float32 statistics and weights, and the learned scale and offset."""

from keras import constraints, initializers, regularizers

from kernorm import ops


def add_weight(layer, name, shape, initializer, regularizer=None, constraint=None, trainable=True):
    """`layer.add_weight` in the dtype of the statistics, never autocast.

    Weights and moving statistics stay in float32 (float64 under a float64
    policy) whatever the layer's dtype policy: a float16 moving variance
    overflows for inputs beyond about 256, and the statistics they meet are
    computed in float32 (see `kernorm.ops.stats_dtype`).

    Args:
        layer: the layer that owns the weight.
        name, shape, initializer, regularizer, constraint, trainable: as for
            `keras.layers.Layer.add_weight`.

    Returns:
        The new variable.
    """
    return layer.add_weight(
        shape=shape, name=name, initializer=initializer, regularizer=regularizer, constraint=constraint,
        trainable=trainable, autocast=False, dtype=ops.stats_dtype(layer.variable_dtype),
    )


AFFINE_ARGUMENTS = (
    "beta_initializer", "gamma_initializer", "beta_regularizer", "gamma_regularizer", "beta_constraint",
    "gamma_constraint",
)  # fmt: skip
#: The config entries of `gamma` and `beta`, in Keras's order: `center`, `scale` and the `AFFINE_ARGUMENTS`.
AFFINE_CONFIG = ("center", "scale", *AFFINE_ARGUMENTS)


def set_affine_arguments(layer, center, scale, *arguments):
    """Keeps the arguments of the learned scale `gamma` and offset `beta` on `layer`, one attribute each, as
    Keras's layers do: `center`, `scale` and the `AFFINE_ARGUMENTS` (initializers, regularizers, constraints),
    given in that order."""
    layer.center, layer.scale = center, scale
    getters = {"initializer": initializers.get, "regularizer": regularizers.get, "constraint": constraints.get}
    for name, argument in zip(AFFINE_ARGUMENTS, arguments, strict=True):
        setattr(layer, name, getters[name.split("_")[1]](argument))
    layer.gamma = None
    layer.beta = None


def add_affine_weights(layer, shape, scale=None, center=None):
    """Creates `layer.gamma` (if `scale`, default `layer.scale`) and `layer.beta` (if `center`, default
    `layer.center`) of `shape`, with the layer's initializers, regularizers and constraints."""
    if layer.scale if scale is None else scale:
        layer.gamma = add_weight(
            layer, "gamma", shape, layer.gamma_initializer, layer.gamma_regularizer, layer.gamma_constraint
        )
    if layer.center if center is None else center:
        layer.beta = add_weight(
            layer, "beta", shape, layer.beta_initializer, layer.beta_regularizer, layer.beta_constraint
        )
