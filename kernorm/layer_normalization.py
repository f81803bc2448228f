import keras
from keras import constraints, initializers, regularizers

from kernorm import ops, validation


@keras.saving.register_keras_serializable(package="kernorm")
class LayerNormalization(keras.layers.Layer):
    """Layer normalization: a drop-in superset of `keras.layers.LayerNormalization`.

    Each sample is normalized over `axis` with its own statistics:

        outputs = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta

    with `mean` and the biased `var` taken over `axis`, and `gamma` and `beta`
    shaped like those axes. Training and inference compute the same thing, and
    the output for one sample never depends on the rest of the batch.

    Unlike Keras's layer, the result is computed in the centred form
    `(x - mean) * rsqrt(var + eps)`, which keeps its precision for inputs with
    a large mean and a small spread (Keras's `x * inv - mean * inv` cancels),
    with a hand-written gradient, and in float32 for half-precision inputs.

    Args:
        axis: int or list of ints: the axes to normalize over, usually the
            feature axis `-1`.
        epsilon: small float >= 0 added to the variance.
        center: if True, add the learned offset `beta`.
        scale: if True, multiply by the learned scale `gamma`.
        beta_initializer: initializer for `beta`.
        gamma_initializer: initializer for `gamma`.
        beta_regularizer: optional regularizer for `beta`.
        gamma_regularizer: optional regularizer for `gamma`.
        beta_constraint: optional constraint for `beta`.
        gamma_constraint: optional constraint for `gamma`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: a float tensor of any rank.

    Example:

    >>> layer = kernorm.LayerNormalization(axis=-1)
    >>> y = layer(np.random.rand(2, 5, 8).astype("float32"))

    Reference:
        - [Ba et al., 2016](https://arxiv.org/abs/1607.06450).
    """

    def __init__(
        self,
        axis=-1,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        # Keras configs carry a deprecated `rms_scaling`; only its default is meaningful.
        if kwargs.pop("rms_scaling", False):
            raise ValueError("`rms_scaling=True` is not supported: use kernorm.RMSNormalization instead.")
        super().__init__(**kwargs)
        self.axis = validation.axis_argument(axis)
        self.epsilon = validation.non_negative(epsilon, "epsilon")
        self.center = center
        self.scale = scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma = None
        self.beta = None

    def build(self, input_shape):
        self._axes = validation.canonical_axes(self.axis, len(input_shape))
        shape = validation.known_sizes(input_shape, self._axes, self)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint, autocast=False,
                dtype=ops.stats_dtype(self.variable_dtype),
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint, autocast=False,
                dtype=ops.stats_dtype(self.variable_dtype),
            )
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes=dict(zip(self._axes, shape)))

    def call(self, inputs):
        validation.float_inputs(inputs, self)
        outputs = ops.layer_norm(inputs, self._axes, self.gamma, self.beta, self.epsilon)
        return keras.ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        validation.canonical_axes(self.axis, len(input_shape))
        return input_shape

    def get_config(self):
        config = {
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        return {**super().get_config(), **config}


LayerNorm = LayerNormalization
