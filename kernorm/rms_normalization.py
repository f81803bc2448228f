import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from kernorm import ops, validation, weights


@keras.saving.register_keras_serializable(package="kernorm")
class RMSNormalization(keras.layers.Layer):
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
        self.supports_masking = True
        # Float32 inputs are normalized as they are under a mixed policy (see LayerNormalization).
        self.autocast = False

    def build(self, input_shape):
        axes = validation.canonical_axes(self.axis, len(input_shape))
        shape = validation.known_sizes(input_shape, axes, self)
        self._sizes = shape
        self.scale = weights.add_weight(
            self, "scale", shape, self.scale_initializer, self.scale_regularizer, self.scale_constraint
        )

    def call(self, inputs):
        validation.float_inputs(inputs, self)
        axes = validation.canonical_axes(self.axis, inputs.shape.rank)
        validation.built_sizes(inputs.shape, axes, self._sizes, self)

        def normalize(values, axes):
            return ops.rms_norm(values, axes, self.scale, self.epsilon)

        return tf.cast(ops.on_flat_values(normalize, inputs, axes), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        validation.canonical_axes(self.axis, len(input_shape))
        return input_shape

    def get_config(self):
        config = {
            "axis": self.axis,
            "epsilon": self.epsilon,
            "scale_initializer": initializers.serialize(self.scale_initializer),
            "scale_regularizer": regularizers.serialize(self.scale_regularizer),
            "scale_constraint": constraints.serialize(self.scale_constraint),
        }
        return {**super().get_config(), **config}


RMSNorm = RMSNormalization
