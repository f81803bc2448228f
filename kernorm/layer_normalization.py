import warnings

import keras

from kernorm import ops, validation, weights
from kernorm.base_layers import SampleNormalization


@keras.saving.register_keras_serializable(package="kernorm")
class LayerNormalization(SampleNormalization):
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
        center, scale, beta_initializer, gamma_initializer, beta_regularizer,
            gamma_regularizer, beta_constraint, gamma_constraint: the learned
            offset `beta` and scale `gamma`, as in `kernorm.BatchNormalization`.
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

    config_arguments = ("axis", "epsilon", *weights.AFFINE_CONFIG, "rms_scaling")

    def __init__(
        self, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros", gamma_initializer="ones",
        beta_regularizer=None, gamma_regularizer=None, beta_constraint=None, gamma_constraint=None, **kwargs,
    ):  # fmt: skip
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
            self, center, scale, beta_initializer, gamma_initializer, beta_regularizer, gamma_regularizer,
            beta_constraint, gamma_constraint,
        )
        self.rms_scaling = bool(rms_scaling)

    def _build_weights(self, shape):
        # Keras's rms_scaling has a scale and no offset, whatever `scale` and `center` say.
        weights.add_affine_weights(self, shape, self.scale or self.rms_scaling, self.center and not self.rms_scaling)

    def _normalize(self, values, axes):
        return ops.layer_norm(values, axes, self.gamma, self.beta, self.epsilon, self.rms_scaling)


LayerNorm = LayerNormalization
