import keras
import tensorflow as tf
from keras import initializers

from kernorm import ops, validation, weights
from kernorm.base_layers import NormalizationLayer


@keras.saving.register_keras_serializable(package="kernorm")
class BatchNormalization(NormalizationLayer):
    """Batch normalization: a drop-in superset of `keras.layers.BatchNormalization`.

    **In training** (`training=True` and `trainable=True`) each channel is
    normalized with the statistics of the current batch:

        outputs = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta

    where `mean` and the biased `var` run over every axis except `axis`, and the
    moving statistics are updated as

        moving_mean = moving_mean * momentum + mean(x) * (1 - momentum)
        moving_variance = moving_variance * momentum + var(x) * (1 - momentum)

    **In inference** (`training=False`, or a layer with `trainable=False`, as in
    Keras) the moving statistics take the place of the batch statistics.

    Beyond Keras, `axis` may be a list (as in tf-keras), `virtual_batch_size`
    gives ghost batch normalization, and a batch with no values to count (an
    empty batch, or a mask that masks everything) leaves the moving statistics
    exactly as they were. Statistics are computed in float32 for float16 and
    bfloat16 inputs, and in a centred form that keeps its precision for inputs
    with a large mean and a small spread.

    Args:
        axis: int or list of ints, the channel axis or axes (those that keep
            their own statistics). `-1` for channels-last, `1` after a
            `channels_first` convolution.
        momentum: momentum of the moving averages, in [0, 1).
        epsilon: small float >= 0 added to the variance.
        center: if True, add the learned offset `beta`.
        scale: if True, multiply by the learned scale `gamma`.
        beta_initializer: initializer for `beta`.
        gamma_initializer: initializer for `gamma`.
        moving_mean_initializer: initializer for the moving mean.
        moving_variance_initializer: initializer for the moving variance.
        beta_regularizer: optional regularizer for `beta`.
        gamma_regularizer: optional regularizer for `gamma`.
        beta_constraint: optional constraint for `beta`.
        gamma_constraint: optional constraint for `gamma`.
        renorm: use Batch Renormalization, which corrects the batch statistics
            towards moving ones during training. Inference is unchanged.
        renorm_clipping: dict with optional keys "rmax", "rmin" and "dmax"
            that clip the renorm corrections `r` and `d`.
        renorm_momentum: momentum of the moving statistics that renorm uses
            during training.
        synchronized: if True, statistics are reduced over all replicas of a
            `tf.distribute` strategy at each training step.
        virtual_batch_size: if set, each consecutive sub-batch of this many
            samples is normalized with its own statistics ("ghost batch
            norm"); it must divide the batch size. The moving statistics are
            updated with the average of the sub-batch statistics. Cannot be
            combined with `renorm`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: a float tensor of any rank.
        training: Python bool: normalize with the batch statistics (True) or the
            moving statistics (False).
        mask: optional tensor with the inputs' shape, or all but its last axis;
            positions where it is False do not count towards the statistics or
            the moving averages.

    Example:

    >>> layer = kernorm.BatchNormalization(momentum=0.9)
    >>> y = layer(np.random.rand(8, 4).astype("float32"), training=True)

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Ioffe, 2017: Batch Renormalization](https://arxiv.org/abs/1702.03275).
        - [Hoffer et al., 2017: Train longer, generalize better](https://arxiv.org/abs/1705.08741)
          (ghost batch normalization).
    """

    config_arguments = (
        "axis", "momentum", "epsilon", *weights.AFFINE_CONFIG, "moving_mean_initializer", "moving_variance_initializer",
        "renorm", "renorm_clipping", "renorm_momentum", "synchronized", "virtual_batch_size",
    )  # fmt: skip

    def __init__(
        self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
        gamma_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones",
        beta_regularizer=None, gamma_regularizer=None, beta_constraint=None, gamma_constraint=None, renorm=False,
        renorm_clipping=None, renorm_momentum=0.99, synchronized=False, virtual_batch_size=None, **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.axis = validation.axis_argument(axis)
        self.momentum = validation.momentum(momentum)
        self.epsilon = validation.non_negative(epsilon, "epsilon")
        weights.set_affine_arguments(
            self, center, scale, beta_initializer, gamma_initializer, beta_regularizer, gamma_regularizer,
            beta_constraint, gamma_constraint,
        )
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.renorm = renorm
        self.renorm_clipping = _renorm_clipping(renorm_clipping) if renorm else renorm_clipping
        self.renorm_momentum = validation.momentum(renorm_momentum, "renorm_momentum")
        self.synchronized = synchronized
        self.virtual_batch_size = validation.positive_int_or_none(virtual_batch_size, "virtual_batch_size")
        if self.virtual_batch_size and renorm:
            # Ghost statistics have no single batch estimate to correct, and
            # the renorm moving statistics would never be updated.
            raise ValueError(
                f"`virtual_batch_size`={self.virtual_batch_size} cannot be combined with `renorm`=True: "
                "pass one or the other."
            )

    def build(self, input_shape):
        ndim = len(input_shape)
        self._axes = validation.canonical_axes(self.axis, ndim)
        self._reduction_axes = [a for a in range(ndim) if a not in self._axes]
        shape = validation.known_sizes(input_shape, self._axes, self)

        def weight(name, initializer, regularizer=None, constraint=None, trainable=False):
            return weights.add_weight(self, name, shape, initializer, regularizer, constraint, trainable)

        weights.add_affine_weights(self, shape)
        self.moving_mean = weight("moving_mean", self.moving_mean_initializer)
        self.moving_variance = weight("moving_variance", self.moving_variance_initializer)
        if self.renorm:
            # Renorm tracks a moving standard deviation, as in the paper; the
            # moving variance is derived from it.
            def stddev_initializer(shape, dtype=None):
                variance_initializer = initializers.get(initializers.serialize(self.moving_variance_initializer))
                return ops.stddev_from_variance(variance_initializer(shape, dtype=dtype), 0.0)

            self.moving_stddev = weight("moving_stddev", stddev_initializer)
            self.renorm_mean = weight("renorm_mean", initializers.get(initializers.serialize(self.moving_mean_initializer)))
            self.renorm_stddev = weight("renorm_stddev", stddev_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=ndim, axes=dict(zip(self._axes, shape)))

    def call(self, inputs, training=None, mask=None):
        validation.float_inputs(inputs, self)
        mask = validation.broadcast_mask(mask, inputs)
        gamma, beta = self._broadcast(self.gamma), self._broadcast(self.beta)
        if not (training and self.trainable):
            outputs = ops.normalize(
                inputs, self._broadcast(self.moving_mean), self._broadcast(self.moving_variance),
                gamma, beta, self.epsilon,
            )
            return tf.cast(outputs, self.compute_dtype)
        if mask is None:
            inputs = validation.more_than_one_value(inputs, self._reduction_axes, self)
        axes, epsilon, synchronized = self._reduction_axes, self.epsilon, self.synchronized
        if self.virtual_batch_size:
            outputs, mean, variance, count = ops.ghost_batch_norm(
                inputs, axes, self.virtual_batch_size, gamma, beta, epsilon, mask, synchronized
            )
        elif self.renorm:
            outputs, mean, variance, count = ops.renorm_batch_norm(
                inputs, axes, gamma, beta, self._broadcast(self.renorm_mean), self._broadcast(self.renorm_stddev),
                epsilon, self.renorm_clipping, mask, synchronized,
            )
        else:
            outputs, mean, variance, count = ops.batch_norm(inputs, axes, gamma, beta, epsilon, mask, synchronized)
        mean, variance, count = self._per_channel(mean), self._per_channel(variance), self._per_channel(count)
        if self.renorm:
            self._update_renorm_statistics(mean, variance, count)
        else:
            self.moving_mean.assign(ops.moving_average(self.moving_mean, mean, self.momentum, count))
            self.moving_variance.assign(ops.moving_average(self.moving_variance, variance, self.momentum, count))
        return tf.cast(outputs, self.compute_dtype)

    def _broadcast(self, weight):
        """A per-channel weight reshaped to broadcast against the inputs."""
        if weight is None:
            return None
        shape = [1] * (len(self._reduction_axes) + len(self._axes))
        for axis in self._axes:
            shape[axis] = self.input_spec.axes[axis]
        return tf.reshape(weight, shape)

    def _per_channel(self, statistic):
        """Statistics with kept dims (or a scalar count) in the weights' shape."""
        shape = self.moving_mean.shape
        statistic = tf.convert_to_tensor(statistic)
        if statistic.shape.rank == 0:
            return tf.fill(shape, statistic)
        return tf.reshape(statistic, shape)

    def _update_renorm_statistics(self, mean, variance, count):
        """Renorm tracks moving standard deviations, as in the paper; the moving variance is derived from one."""
        stddev = ops.stddev_from_variance(variance, self.epsilon)
        self.renorm_mean.assign(ops.moving_average(self.renorm_mean, mean, self.renorm_momentum, count))
        self.renorm_stddev.assign(ops.moving_average(self.renorm_stddev, stddev, self.renorm_momentum, count))
        self.moving_mean.assign(ops.moving_average(self.moving_mean, mean, self.momentum, count))
        moving_stddev = ops.moving_average(self.moving_stddev, stddev, self.momentum, count)
        self.moving_stddev.assign(moving_stddev)
        # A step that counted nothing leaves the moving variance as it was.
        moving_variance = ops.variance_from_stddev(moving_stddev, self.epsilon)
        self.moving_variance.assign(ops.where_counted(count, moving_variance, self.moving_variance))


BatchNorm = BatchNormalization


def _renorm_clipping(clipping):
    clipping = dict(clipping or {})
    unknown = set(clipping) - {"rmax", "rmin", "dmax"}
    if unknown:
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {sorted(unknown)}. "
            "Expected some of 'rmax', 'rmin', 'dmax'."
        )
    rmin, rmax, dmax = clipping.get("rmin"), clipping.get("rmax"), clipping.get("dmax")
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            f"rmax should be greater than rmin in the `renorm_clipping` argument. Received: rmax={rmax}, rmin={rmin}"
        )
    if dmax is not None and dmax < 0:
        raise ValueError(f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}")
    return clipping
