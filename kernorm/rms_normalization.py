import keras
from keras import constraints, initializers, regularizers

from kernorm import ops, validation, weights
from kernorm.base_layers import SampleNormalization


@keras.saving.register_keras_serializable(package="kernorm")
class RMSNormalization(SampleNormalization):
    """Root-mean-square normalization: a superset of `keras.layers.RMSNormalization`.

    Each sample is scaled by the root mean square of its values over `axis`,
    without centring:

        outputs = x * rsqrt(mean(x ** 2) + epsilon) * scale

    Args:
        axis: int or list of ints: the axes to normalize over.
        epsilon: small float >= 0 added to the mean square.
        scale_initializer: initializer for the learned `scale` (ones).
        scale_regularizer: optional regularizer for `scale`.
        scale_constraint: optional constraint for `scale`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: a float tensor of any rank whose normalized axes have the sizes
            the layer was built with, or a `tf.RaggedTensor` whose normalized
            axes are uniform. Under a mixed precision policy, float32 inputs are
            normalized as they are (not cast down first) and the output has the
            compute dtype.

    Example:

    >>> layer = kernorm.RMSNormalization()
    >>> y = layer(np.random.rand(2, 5, 8).astype("float32"))

    Reference:
        - [Zhang and Sennrich, 2019](https://arxiv.org/abs/1910.07467).
    """

    config_arguments = ("axis", "epsilon", "scale_initializer", "scale_regularizer", "scale_constraint")

    def __init__(
        self,
        axis=-1,
        epsilon=1e-6,
        scale_initializer="ones",
        scale_regularizer=None,
        scale_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = validation.axis_argument(axis)
        self.epsilon = validation.non_negative(epsilon, "epsilon")
        self.scale_initializer = initializers.get(scale_initializer)
        self.scale_regularizer = regularizers.get(scale_regularizer)
        self.scale_constraint = constraints.get(scale_constraint)

    def _build_weights(self, shape):
        self.scale = weights.add_weight(
            self, "scale", shape, self.scale_initializer, self.scale_regularizer, self.scale_constraint
        )

    def _normalize(self, values, axes):
        return ops.rms_norm(values, axes, self.scale, self.epsilon)


RMSNorm = RMSNormalization
