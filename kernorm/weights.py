"""The weights of kernorm's layers."""

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
