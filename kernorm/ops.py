"""The normalization maths, written once.

Every layer in kernorm calls these functions and does no arithmetic of its own.
The layers differ only in the axes they reduce over (as in Flax's
`_compute_stats` / `_normalize`):

- batch norm reduces over every axis except the channel axes;
- layer norm and RMS norm reduce over the feature axes of each sample;
- group norm splits the channel axis into groups and reduces within each group.

Conventions:

- Statistics are computed in float32 for float16/bfloat16 inputs (float64
  stays float64), and outputs are cast back to the input dtype.
- Variances are biased and centred: `mean((x - mean)**2)`. The normalized value
  is always `(x - mean) * rsqrt(var + eps)`, never `x * inv - mean * inv`,
  which cancels catastrophically for inputs with a large mean and a small
  spread (and XLA turns it into a fused multiply-add that loses the rest).
- Unmasked layer, RMS, group and batch norm use a custom gradient that keeps
  only `x`, `mean` and `rstd` for the backward pass.
"""

import tensorflow as tf

__all__ = [
    "stats_dtype",
    "moments",
    "normalize",
    "batch_norm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "moving_average",
    "renorm_correction",
]


def stats_dtype(dtype):
    """The dtype statistics are computed in: float32 or better."""
    dtype = tf.as_dtype(dtype)
    return tf.float64 if dtype == tf.float64 else tf.float32


def _all_reduce_sum(values):
    """Sums `values` over the replicas of the current `tf.distribute` replica
    context; returns them unchanged outside one."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _count(x, axes):
    """Number of elements reduced over `axes`, as a tensor of x's dtype."""
    shape = tf.shape(x)
    return tf.cast(tf.reduce_prod(tf.gather(shape, list(axes))), x.dtype)


def moments(x, axes, mask=None, synchronized=False, keepdims=True):
    """Biased, centred mean and variance of `x` over `axes`.

    Args:
        x: a float tensor. Half-precision inputs are promoted to float32.
        axes: the axes to reduce over.
        mask: optional tensor broadcastable to `x`; only positions where it is
            non-zero count.
        synchronized: sum the statistics over the replicas of the current
            `tf.distribute` replica context.
        keepdims: keep the reduced axes with size 1.

    Returns:
        `(mean, variance, count)`, each in `stats_dtype(x.dtype)`. `count` is
        the number of values that contributed (per statistic with a mask). Where
        it is zero, mean and variance are zero rather than NaN.
    """
    shift, correction, variance, count = _shifted_moments(x, axes, mask, synchronized)
    mean = shift + correction
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
        if mask is not None:
            count = tf.squeeze(count, axes)
    return mean, variance, count


def _shifted_moments(x, axes, mask=None, synchronized=False):
    """`moments` with kept dims and the mean split as `shift + correction`.

    `shift` is a first estimate of the mean and carries no gradient. For a large
    mean and a small spread, `x - shift - correction` keeps the spread that
    `x - mean` loses once `mean` is rounded to float32.
    """
    axes = list(axes)
    x = tf.cast(x, stats_dtype(x.dtype))
    reduce = _all_reduce_sum if synchronized else (lambda values: values)
    if mask is None:
        weight = None
        total, count = reduce([tf.reduce_sum(x, axes, keepdims=True), _count(x, axes)])
    else:
        weight = tf.broadcast_to(tf.cast(tf.cast(mask, tf.bool), x.dtype), tf.shape(x))
        total, count = reduce([tf.reduce_sum(x * weight, axes, keepdims=True), tf.reduce_sum(weight, axes, keepdims=True)])
    safe_count = tf.maximum(count, 1.0)
    # A plain sum of values with a large mean loses the small spread; the
    # deviations from a first estimate of the mean keep it.
    shift = tf.stop_gradient(total / safe_count)
    deviation = x - shift if weight is None else (x - shift) * weight
    deviation_sum, squares = reduce(
        [tf.reduce_sum(deviation, axes, keepdims=True), tf.reduce_sum(tf.square(deviation), axes, keepdims=True)]
    )
    correction = deviation_sum / safe_count
    variance = tf.maximum(squares / safe_count - tf.square(correction), 0.0)
    return shift, correction, variance, count


def normalize(x, mean, variance, gamma=None, beta=None, epsilon=1e-3):
    """`gamma * (x - mean) * rsqrt(variance + epsilon) + beta`, in the centred form.

    `mean`, `variance`, `gamma` and `beta` must broadcast against `x`. The
    arithmetic runs in `stats_dtype(x.dtype)`; the result has x's dtype.
    """
    dtype = stats_dtype(x.dtype)
    multiplier = tf.math.rsqrt(tf.cast(variance, dtype) + epsilon)
    if gamma is not None:
        multiplier = multiplier * tf.cast(gamma, dtype)
    outputs = (tf.cast(x, dtype) - tf.cast(mean, dtype)) * multiplier
    if beta is not None:
        outputs = outputs + tf.cast(beta, dtype)
    return tf.cast(outputs, x.dtype)


def _standardize(x, axes, epsilon, centered, gamma, beta):
    """Normalizes `x` over `axes` and applies the affine, with a hand-written gradient.

    `gamma` and `beta` are None or broadcastable to `x` with the same rank. The
    backward pass recomputes the normalized values from `x`, `mean` and `rstd`
    instead of keeping the intermediate tensors of the forward pass.

    Returns `(outputs, mean, variance)`; mean and variance carry no gradient.
    """
    axes = list(axes)
    dtype = stats_dtype(x.dtype)
    input_dtype = x.dtype
    params = [p for p in (gamma, beta) if p is not None]

    def param_axes(param):
        return [i for i, size in enumerate(param.shape) if size == 1]

    @tf.custom_gradient
    def forward(x, *params):
        params = list(params)
        scale = params.pop(0) if gamma is not None else None
        offset = params.pop(0) if beta is not None else None
        x32 = tf.cast(x, dtype)
        if centered:
            # One pass over the deviations from one sample of each group: safe
            # for a large mean and a small spread, unlike sum(x**2) - sum(x)**2.
            shift = _first_along(x32, axes)
            deviation = x32 - shift
            deviation_mean = tf.reduce_mean(deviation, axes, keepdims=True)
            mean_square = tf.reduce_mean(tf.square(deviation), axes, keepdims=True)
            mean = shift + deviation_mean
            variance = tf.maximum(mean_square - tf.square(deviation_mean), 0.0)
            centred = deviation - deviation_mean
        else:
            mean = tf.zeros([1] * x.shape.rank, dtype)
            variance = tf.reduce_mean(tf.square(x32), axes, keepdims=True)
            centred = x32
        rstd = tf.math.rsqrt(variance + epsilon)
        multiplier = rstd if scale is None else rstd * tf.cast(scale, dtype)
        outputs = centred * multiplier
        if offset is not None:
            outputs = outputs + tf.cast(offset, dtype)

        def backward(upstream, *unused_upstreams):
            upstream = tf.cast(upstream, dtype)
            if centered:
                # As in the forward pass: `x - mean` with the mean rounded to
                # float32 loses the small spread of a large-mean input.
                normalized = (tf.cast(x, dtype) - shift - deviation_mean) * rstd
            else:
                normalized = tf.cast(x, dtype) * rstd
            d_normalized = upstream if scale is None else upstream * tf.cast(scale, dtype)
            projection = tf.reduce_mean(d_normalized * normalized, axes, keepdims=True)
            d_x = d_normalized - normalized * projection
            if centered:
                d_x = d_x - tf.reduce_mean(d_normalized, axes, keepdims=True)
            grads = [tf.cast(d_x * rstd, input_dtype)]
            if scale is not None:
                d_scale = tf.reduce_sum(upstream * normalized, param_axes(scale), keepdims=True)
                grads.append(tf.cast(d_scale, scale.dtype))
            if offset is not None:
                d_offset = tf.reduce_sum(upstream, param_axes(offset), keepdims=True)
                grads.append(tf.cast(d_offset, offset.dtype))
            return grads

        return (tf.cast(outputs, input_dtype), mean, variance), backward

    outputs, mean, variance = forward(x, *params)
    return outputs, tf.stop_gradient(mean), tf.stop_gradient(variance)


def _first_along(x, axes):
    """The first element of each group reduced over `axes` (zero for an empty group), with kept dims."""
    first = x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.shape.rank))]
    return tf.stop_gradient(tf.reduce_sum(first, axes, keepdims=True))


def _broadcast_param(param, ndim, axes):
    """Reshapes a weight of shape `[x.shape[a] for a in axes]` to broadcast over a rank-`ndim` x."""
    if param is None:
        return None
    shape = [1] * ndim
    for axis, size in zip(axes, param.shape):
        shape[axis] = size
    return tf.reshape(param, shape)


def batch_norm(x, axes, gamma=None, beta=None, epsilon=1e-3, mask=None, synchronized=False):
    """Training-mode batch normalization with the batch's own statistics.

    Args:
        x: a float tensor.
        axes: the axes to reduce over: every axis but the channel axes.
        gamma, beta: None or tensors broadcastable to `x` with the same rank.
        epsilon: added to the variance.
        mask: optional tensor broadcastable to `x`: only non-zero positions
            count towards the statistics.
        synchronized: reduce the statistics over all replicas.

    Returns:
        `(outputs, mean, variance, count)`, statistics with kept dims.
    """
    if mask is None and not synchronized:
        outputs, mean, variance = _standardize(x, axes, epsilon, True, gamma, beta)
        return outputs, mean, variance, _count(tf.cast(x, mean.dtype), axes)
    shift, correction, variance, count = _shifted_moments(x, axes, mask, synchronized)
    centred = tf.cast(x, shift.dtype) - shift
    outputs = tf.cast(normalize(centred, correction, variance, gamma, beta, epsilon), x.dtype)
    return outputs, shift + correction, variance, count


def layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-3):
    """Normalizes each sample over `axes`; gamma and beta have shape `[x.shape[a] for a in axes]`."""
    ndim = x.shape.rank
    gamma = _broadcast_param(gamma, ndim, axes)
    beta = _broadcast_param(beta, ndim, axes)
    return _standardize(x, axes, epsilon, True, gamma, beta)[0]


def rms_norm(x, axes, scale=None, epsilon=1e-6):
    """`x * rsqrt(mean(x**2 over axes) + epsilon) * scale`."""
    scale = _broadcast_param(scale, x.shape.rank, axes)
    return _standardize(x, axes, epsilon, False, scale, None)[0]


def group_norm(x, groups, axis, gamma=None, beta=None, epsilon=1e-3):
    """Splits channel `axis` into `groups` and normalizes each group of each sample.

    The statistics cover the group's channels and every axis but the batch
    axis 0. gamma and beta are per channel: shape `(x.shape[axis],)`.
    """
    ndim = x.shape.rank
    channels = x.shape[axis]
    shape = tf.shape(x)
    grouped_shape = tf.concat(
        [shape[:axis], [groups, channels // groups], shape[axis + 1:]], axis=0
    )
    grouped = tf.reshape(x, grouped_shape)
    reduce_axes = [i for i in range(1, ndim + 1) if i != axis]
    param_shape = [1] * (ndim + 1)
    param_shape[axis], param_shape[axis + 1] = groups, channels // groups
    gamma = None if gamma is None else tf.reshape(gamma, param_shape)
    beta = None if beta is None else tf.reshape(beta, param_shape)
    outputs = _standardize(grouped, reduce_axes, epsilon, True, gamma, beta)[0]
    return tf.reshape(outputs, shape)


def moving_average(moving, value, momentum, count=None):
    """`moving * momentum + value * (1 - momentum)`, the Keras convention.

    Where `count` (the number of values behind `value`) is zero, the old value
    is kept, so an empty batch or an all-masked step never writes NaN or
    garbage into the moving statistics.
    """
    value = tf.cast(value, moving.dtype)
    updated = moving * momentum + value * (1.0 - momentum)
    if count is None:
        return updated
    count = tf.broadcast_to(tf.cast(count, moving.dtype), tf.shape(moving))
    return tf.where(count > 0, updated, moving)


def renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, clipping):
    """Batch Renormalization's `(r, d)`: the batch statistics expressed relative to the moving ones.

    `normalized * r + d` equals the input normalized by the moving statistics;
    `clipping` maps optional "rmin", "rmax" and "dmax" to bounds. No gradient
    flows through `r` and `d` (Ioffe 2017).
    """
    stddev = tf.sqrt(variance + epsilon)
    renorm_stddev = tf.maximum(tf.cast(renorm_stddev, stddev.dtype), tf.sqrt(tf.cast(epsilon, stddev.dtype)))
    r = stddev / renorm_stddev
    d = (mean - tf.cast(renorm_mean, mean.dtype)) / renorm_stddev
    if clipping.get("rmin") is not None:
        r = tf.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = tf.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = tf.clip_by_value(d, -clipping["dmax"], clipping["dmax"])
    return tf.stop_gradient(r), tf.stop_gradient(d)
