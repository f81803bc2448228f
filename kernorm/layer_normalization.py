import warnings

import keras
import tensorflow as tf

from kernorm import ops, validation, weights


@keras.saving.register_keras_serializable(package="kernorm")
class LayerNormalization(keras.layers.Layer):
    """Layer normalization: a drop-in superset of `keras.layers.LayerNormalization`.

    Each sample is normalized over `axis` with its own statistics:

        outputs = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta

    with `mean` and the biased `var` taken over `axis`, and `gamma` and `beta`
    shaped like those axes. Training and inference compute the same thing, and
    the output for one sample never depends on the rest of the batch.

    The layer accepts any input rank whose normalized axes have the sizes it
    was built with, and ragged inputs whose normalized axes are uniform.

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
        rms_scaling: deprecated, as in Keras: if True, `center` is ignored and
            the output is `gamma * x / sqrt(var(x) + epsilon)`, scaled by the
            variance without centring. Use `kernorm.RMSNormalization` for RMS
            normalization.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: a float tensor of any rank, or a `tf.RaggedTensor` whose
            normalized axes are uniform. Under a mixed precision policy, float32
            inputs are normalized as they are (not cast down first) and the
            output has the compute dtype.

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
        rms_scaling = kwargs.pop("rms_scaling", False)
        if rms_scaling:
            warnings.warn(
                "`rms_scaling=True` is deprecated, as in Keras: it scales the inputs by their variance, "
                "not their root mean square. Use kernorm.RMSNormalization for RMS normalization.",
                stacklevel=2,
            )
        super().__init__(**kwargs)
        self.axis = validation.axis_argument(axis)
        self.epsilon = validation.non_negative(epsilon, "epsilon")
        weights.set_affine_arguments(
            self, center, scale, beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint,
        )
        self.rms_scaling = bool(rms_scaling)
        self.supports_masking = True
        # Float32 inputs are normalized as they are under a mixed policy: cast
        # down to float16 first, values beyond 65504 would overflow.
        self.autocast = False

    def build(self, input_shape):
        axes = validation.canonical_axes(self.axis, len(input_shape))
        shape = validation.known_sizes(input_shape, axes, self)
        self._sizes = shape
        # Keras's rms_scaling has a scale and no offset, whatever `scale` and `center` say.
        weights.add_affine_weights(self, shape, self.scale or self.rms_scaling, self.center and not self.rms_scaling)

    def call(self, inputs):
        validation.float_inputs(inputs, self)
        axes = validation.canonical_axes(self.axis, inputs.shape.rank)
        validation.built_sizes(inputs.shape, axes, self._sizes, self)

        def normalize(values, axes):
            return ops.layer_norm(values, axes, self.gamma, self.beta, self.epsilon, self.rms_scaling)

        return tf.cast(ops.on_flat_values(normalize, inputs, axes), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        validation.canonical_axes(self.axis, len(input_shape))
        return input_shape

    def get_config(self):
        config = {
            "axis": self.axis,
            "epsilon": self.epsilon,
            **weights.affine_config(self),
            "rms_scaling": self.rms_scaling,
        }
        return {**super().get_config(), **config}


LayerNorm = LayerNormalization
