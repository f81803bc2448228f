import keras
import tensorflow as tf

from kernorm import ops, validation
from kernorm.group_normalization import GroupNormalization


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

    >>> layer = kernorm.TokenGroupNormalization(groups=4)
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
