import numbers

import keras

from kernorm import ops, validation, weights
from kernorm.base_layers import NormalizationLayer


@keras.saving.register_keras_serializable(package="kernorm")
class GroupNormalization(NormalizationLayer):
    """Group normalization: a drop-in superset of `keras.layers.GroupNormalization`.

    The channels on `axis` are split into `groups` groups of consecutive
    channels. Each group of each sample is normalized with its own statistics,
    taken over the group's channels and every non-batch axis, and then scaled
    and shifted per channel:

        outputs = gamma * (x - mean_group(x)) / sqrt(var_group(x) + epsilon) + beta

    `groups=1` is layer normalization over all non-batch axes with per-channel
    weights; `groups=-1` (one channel per group) is instance normalization.

    Args:
        groups: number of groups; must divide the channels. -1 for instance norm.
        axis: the channel axis.
        epsilon: small float >= 0 added to the variance.
        center, scale, beta_initializer, gamma_initializer, beta_regularizer,
            gamma_regularizer, beta_constraint, gamma_constraint: the learned
            offset `beta` and scale `gamma`, as in `kernorm.BatchNormalization`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: a float tensor of rank >= 2, the batch on axis 0.

    Example:

    >>> layer = kernorm.GroupNormalization(groups=4)
    >>> y = layer(np.random.rand(2, 8, 8, 16).astype("float32"))

    Reference:
        - [Wu and He, 2018](https://arxiv.org/abs/1803.08494).
        - [Ulyanov et al., 2016](https://arxiv.org/abs/1607.08022) (instance norm).
    """

    config_arguments = ("groups", "axis", "epsilon", *weights.AFFINE_CONFIG)

    def __init__(
        self, groups=32, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
        gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
        gamma_constraint=None, **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or (groups < 1 and groups != -1):
            raise ValueError(
                "Received an invalid value for argument `groups`: expected a positive int, or -1 for "
                f"instance normalization. Received: groups={groups!r}"
            )
        if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
            raise TypeError(f"Expected `axis` to be an int (the channel axis). Received: axis={axis!r}")
        self.groups = int(groups)
        self.axis = int(axis)
        self.epsilon = validation.non_negative(epsilon, "epsilon")
        weights.set_affine_arguments(
            self, center, scale, beta_initializer, gamma_initializer, beta_regularizer, gamma_regularizer,
            beta_constraint, gamma_constraint,
        )

    def build(self, input_shape):
        (channels,) = validation.known_sizes(input_shape, (self._channel_axis(len(input_shape)),), self)
        self._channels = channels
        self._groups = channels if self.groups == -1 else self.groups
        where = f"(axis {self.axis} of input shape {tuple(input_shape)})"
        if self._groups > channels:
            raise ValueError(
                f"`groups`={self.groups} cannot be more than the number of channels ({channels}) {where}."
            )
        if channels % self._groups:
            # The second sentence carries the phrase of Keras's message, which code may match on.
            raise ValueError(
                f"`groups`={self.groups} must divide the number of channels, {channels} {where}. "
                "Keras words this as: the number of groups must be a multiple of the number of channels; "
                f"what is needed is {channels} % {self.groups} == 0."
            )
        weights.add_affine_weights(self, (channels,))

    def _channel_axis(self, ndim):
        (axis,) = validation.canonical_axes(self.axis, ndim)
        if axis == 0:
            raise ValueError("`axis`=0 is the batch axis; GroupNormalization needs the channel axis.")
        return axis

    def call(self, inputs):
        validation.float_inputs(inputs, self)
        axis = self._channel_axis(inputs.shape.rank)
        validation.built_sizes(inputs.shape, (axis,), (self._channels,), self)
        outputs = ops.group_norm(inputs, self._groups, axis, self.gamma, self.beta, self.epsilon)
        return keras.ops.cast(outputs, self.compute_dtype)


GroupNorm = GroupNormalization
