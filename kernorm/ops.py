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

Which path runs (the layers never see it; every path gives the reference
numbers, see tests/test_fast_paths.py):

- TensorFlow kernels, for float16/bfloat16/float32 tensors outside XLA, where
  every op is a kernel with its own pass over memory:
  - `layer_norm` and `rms_norm` over trailing axes (the usual `axis=-1`):
    shifted row statistics from single-read reductions (the row mean, then
    `reduce_euclidean_norm` of the deviations from it, and their mean only for
    rows whose mean is large against their spread), in-place normalization,
    and a gradient that keeps the normalized rows and `rstd` and gets
    `upstream * gamma`, `d_gamma` and `d_beta` from one kernel
    (`FusedBatchNormGradV3`) on CPU.
  - `batch_norm` with the channels last, without a mask or synchronized
    statistics: `FusedBatchNormV3`, statistics and normalization in one kernel
    and one kernel for the gradient; with few channels on CPU, the gradient
    comes from two frozen kernels on rows of several pixels instead. A batch
    whose mean is large against its spread (|mean| / std > `_LARGE_MEAN`)
    reruns on deviations from its first sample, since a float32 mean cannot
    hold its centre.
  - `normalize` on NHWC inputs with per-channel statistics and weights on the
    last axis (BN inference, a per-channel multiply-add): a frozen
    `FusedBatchNormV3` on the input as it is, in the centred form, whose
    gradient also reaches the statistics. An export keeps it as TensorFlow's
    inference batch norm, which Grappler fuses into the preceding convolution
    and the TFLite converter folds into its weights. Other ranks take the
    generic centred multiply-add, which the converter folds into a Dense layer.
- Under XLA (`jit_compile=True`):
  - `batch_norm` with the channels last is still `FusedBatchNormV3` with its
    large-mean rerun (at the lower `_XLA_LARGE_MEAN`): XLA makes it its own
    batch norm, whose gradient it fuses better than that of plain ops.
  - Otherwise `_standardize` in plain ops with automatic differentiation,
    which XLA fuses better than a hand-written gradient; a second reduction
    corrects the mean only where it is large against the spread. `normalize`
    is plain ops (XLA fuses them into one pass).
- Everything else (masks, synchronized statistics, channels-first batch norm,
  group norm, other axes, float64): the generic code with `moments`,
  `normalize` and the custom-gradient `_standardize`.
"""

import math
import os

import tensorflow as tf

try:  # tells whether ops are being traced for XLA; without it, the kernel paths are not taken in tf.function
    from tensorflow.python.ops import control_flow_util
except ImportError:  # pragma: no cover
    control_flow_util = None

__all__ = [
    "set_fast_paths",
    "fast_paths_enabled",
    "stats_dtype",
    "moments",
    "normalize",
    "batch_norm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "on_flat_values",
    "moving_average",
    "where_counted",
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


def _batch_count(x, axes, dtype):
    """Values per channel of an unmasked batch, where a single value counts as none:
    its variance is 0, not a statistic, and must not reach the moving statistics."""
    count = _count(tf.cast(x, dtype), axes)
    return tf.where(count > 1, count, tf.zeros_like(count))


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
    vectors = _frozen_path(x, mean, variance, gamma, beta, epsilon)
    if vectors is not None:
        return _frozen_batch_norm(x, *vectors, float(epsilon))
    dtype = stats_dtype(x.dtype)
    multiplier = tf.math.rsqrt(tf.cast(variance, dtype) + epsilon)
    if gamma is not None:
        multiplier = multiplier * tf.cast(gamma, dtype)
    outputs = (tf.cast(x, dtype) - tf.cast(mean, dtype)) * multiplier
    if beta is not None:
        outputs = outputs + tf.cast(beta, dtype)
    return tf.cast(outputs, x.dtype)


def _standardize(x, axes, epsilon, centered, gamma, beta, xla_autodiff=True):
    """Normalizes `x` over `axes` and applies the affine, with a hand-written gradient.

    `gamma` and `beta` are None or broadcastable to `x` with the same rank. The
    backward pass recomputes the normalized values from `x`, `mean` and `rstd`
    instead of keeping the intermediate tensors of the forward pass. Under XLA,
    `_compiled_standardize` runs instead unless `xla_autodiff` is False.

    Returns `(outputs, mean, variance)`; mean and variance carry no gradient.
    """
    axes = list(axes)
    if xla_autodiff and _fast_paths and _in_xla_context():
        return _compiled_standardize(x, axes, epsilon, centered, gamma, beta)
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
            # Deviations from a first estimate of the mean keep the spread of a
            # large-mean input, unlike sum(x**2) - sum(x)**2, and unlike a shift
            # by one sample, stay small when that sample is an outlier.
            shift = tf.stop_gradient(tf.reduce_mean(x32, axes, keepdims=True))
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


def _compiled_standardize(x, axes, epsilon, centered, gamma, beta):
    """`_standardize` for XLA: plain ops and automatic differentiation, which XLA fuses
    into fewer passes than the hand-written gradient.

    The mean is one reduction of `x`, as in Keras. Rounded to float32 it is off
    by about |mean| * 2**-24, which matters only where the mean is large against
    the spread; there the mean of the deviations from it is added (a second
    reduction, run only when needed), so `x - mean` keeps the spread.
    """
    dtype = stats_dtype(x.dtype)
    values = tf.cast(x, dtype)
    if centered:
        mean = tf.reduce_mean(values, axes, keepdims=True)
        centred = values - mean
        variance = tf.reduce_mean(tf.square(centred), axes, keepdims=True)
        large = tf.reduce_any(
            tf.stop_gradient(tf.abs(mean) * tf.math.rsqrt(variance + epsilon)) > _LARGE_MEAN
        )
        # The residual has no gradient: `mean(x - mean(x))` is constant in x. The
        # branch reads `values`, not `centred`, so that XLA need not write
        # `centred` out for a conditional that rarely runs, and its reduction sits
        # in a one-step loop, which keeps XLA from turning the conditional into a
        # select that computes both branches.
        def residual_of_values():
            return tf.while_loop(
                lambda step, residual: step < 1,
                lambda step, residual: (step + 1, tf.reduce_mean(values - mean, axes, keepdims=True)),
                (tf.constant(0), tf.zeros_like(mean)),
                maximum_iterations=1,
            )[1]

        residual = tf.stop_gradient(tf.cond(large, residual_of_values, lambda: tf.zeros_like(mean)))
        centred = centred - residual
        variance = tf.maximum(variance - tf.square(residual), 0.0)
        mean = mean + residual
    else:
        mean = tf.zeros([1] * x.shape.rank, dtype)
        variance = tf.reduce_mean(tf.square(values), axes, keepdims=True)
        centred = values
    multiplier = tf.math.rsqrt(variance + epsilon)
    if gamma is not None:
        multiplier = multiplier * tf.cast(gamma, dtype)
    outputs = centred * multiplier
    if beta is not None:
        outputs = outputs + tf.cast(beta, dtype)
    return tf.cast(outputs, x.dtype), tf.stop_gradient(mean), tf.stop_gradient(variance)


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
        `(outputs, mean, variance, count)`, statistics with kept dims. Without a
        mask, a batch of one value per channel has `count` 0, as an empty one.
    """
    if mask is None and not synchronized and _channel_norm_path(x, axes, epsilon):
        channels = x.shape[-1]
        vectors = [_channel_vector(p, channels) for p in (gamma, beta)]
        if all(v is not None or p is None for v, p in zip(vectors, (gamma, beta))):
            outputs, mean, variance = _fused_batch_norm(x, *vectors, float(epsilon))
            stats_shape = [1] * (x.shape.rank - 1) + [channels]
            mean, variance = tf.reshape(mean, stats_shape), tf.reshape(variance, stats_shape)
            return outputs, mean, variance, _batch_count(x, axes, mean.dtype)
    if mask is None and not synchronized:
        outputs, mean, variance = _standardize(x, axes, epsilon, True, gamma, beta)
        return outputs, mean, variance, _batch_count(x, axes, mean.dtype)
    shift, correction, variance, count = _shifted_moments(x, axes, mask, synchronized)
    centred = tf.cast(x, shift.dtype) - shift
    outputs = tf.cast(normalize(centred, correction, variance, gamma, beta, epsilon), x.dtype)
    return outputs, shift + correction, variance, count


def layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-3, rms_scaling=False):
    """Normalizes each sample over `axes`; gamma and beta have shape `[x.shape[a] for a in axes]`.

    `rms_scaling=True` is Keras's deprecated variant, `gamma * x * rsqrt(var(x) + epsilon)`:
    scaled by the variance, not centred, and without beta.
    """
    ndim = x.shape.rank
    if rms_scaling:
        _, variance, _ = moments(x, axes)
        return normalize(x, tf.zeros_like(variance), variance, _broadcast_param(gamma, ndim, axes), None, epsilon)
    if _row_norm_path(x, axes, gamma, beta):
        return _row_norm(x, axes, gamma, beta, epsilon, centered=True)
    gamma = _broadcast_param(gamma, ndim, axes)
    beta = _broadcast_param(beta, ndim, axes)
    return _standardize(x, axes, epsilon, True, gamma, beta)[0]


def rms_norm(x, axes, scale=None, epsilon=1e-6):
    """`x * rsqrt(mean(x**2 over axes) + epsilon) * scale`."""
    if _row_norm_path(x, axes, scale):
        return _row_norm(x, axes, scale, None, epsilon, centered=False)
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
    # Under XLA, automatic differentiation of group norm's per-channel affine
    # over a large-mean group loses the spread in the input gradient (XLA
    # regroups the sums of deviations); the hand-written gradient keeps it.
    outputs = _standardize(grouped, reduce_axes, epsilon, True, gamma, beta, xla_autodiff=False)[0]
    return tf.reshape(outputs, shape)


def on_flat_values(function, x, axes):
    """`function(x, axes)`, or for a `tf.RaggedTensor` the same on its flat values.

    Every axis in `axes` must be a uniform axis of the ragged tensor, after its
    ragged ones, so that each row normalized is a row of the flat values.
    """
    if not isinstance(x, tf.RaggedTensor):
        return function(x, axes)
    if min(axes) <= x.ragged_rank:
        raise ValueError(
            f"A ragged input can be normalized only over uniform axes, after its {x.ragged_rank} ragged "
            f"one(s): the normalized axes {list(axes)} include a ragged axis of shape {x.shape}."
        )
    return x.with_flat_values(function(x.flat_values, [a - x.ragged_rank for a in axes]))


def moving_average(moving, value, momentum, count=None):
    """`moving * momentum + value * (1 - momentum)`, the Keras convention.

    Where `count` (the number of values behind `value`) is zero, the old value
    is kept, so an empty batch or an all-masked step never writes NaN or
    garbage into the moving statistics.
    """
    value = tf.cast(value, moving.dtype)
    return where_counted(count, moving * momentum + value * (1.0 - momentum), moving)


def where_counted(count, updated, moving):
    """`updated` where some value was counted, else `moving` unchanged (see `moving_average`)."""
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


# --- TensorFlow kernel fast paths ---------------------------------------------
#
# Outside XLA every TF op is a kernel with its own pass over memory, so these
# paths use as few full-size passes as they can. They return the same numbers
# as the generic code above (see tests/test_fast_paths.py).

_KERNEL_DTYPES = (tf.float16, tf.bfloat16, tf.float32)

# Above this |mean| / std, a statistic computed from a float32 mean (rounded
# to about |mean| * 2**-24) is corrected or recomputed from deviations.
_LARGE_MEAN = 16.0
# XLA's own batch norm computes the variance as mean(x**2) - mean(x)**2, which
# loses about (|mean| / std)**2 * 2**-24 of it; its batches rerun from here.
_XLA_LARGE_MEAN = 4.0

_has_gpu = None

# The one switch for every fast path (the kernel paths below and the XLA path of
# `_standardize`); see `set_fast_paths`.
_fast_paths = os.environ.get("KERNORM_FAST_PATHS", "1") != "0"


def set_fast_paths(enabled):
    """Turns every fast path on or off; returns the previous setting.

    Off, every function runs the generic code (`moments`, `normalize`, and the
    hand-written gradient of the standardization), which the fast paths must
    match: for debugging, and for comparing a fast path with the reference. A
    `tf.function` keeps the paths it was traced with. The environment variable
    `KERNORM_FAST_PATHS=0` starts a process with them off.
    """
    global _fast_paths
    previous, _fast_paths = _fast_paths, bool(enabled)
    return previous


def fast_paths_enabled():
    """Whether the fast paths are on (see `set_fast_paths`)."""
    return _fast_paths


def _in_xla_context():
    """Whether ops are being traced for XLA: `tf.function(jit_compile=True)` or a function inside one."""
    if tf.executing_eagerly():
        return False
    if control_flow_util is None:  # pragma: no cover
        return True
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _cpu_only():
    global _has_gpu
    if _has_gpu is None:
        _has_gpu = bool(tf.config.list_logical_devices("GPU"))
    return not _has_gpu


def _kernel_path(x, under_xla=False):
    """Whether `x` can take the TensorFlow kernel paths: a float16/bfloat16/float32 tensor outside
    XLA, or also under XLA for a kernel that XLA compiles well (`under_xla`)."""
    return (
        _fast_paths and tf.is_tensor(x) and x.dtype in _KERNEL_DTYPES and x.shape.rank is not None and x.shape.rank >= 1
        and (under_xla or not _in_xla_context())
    )


def _channel_vector(value, channels):
    """`value` as a float32 vector of `channels`, or None when it does not broadcast as a
    per-channel (last-axis) vector: every axis but the last of size 1."""
    if value is None:
        return None
    shape = value.shape
    if shape.rank is None or not shape.is_fully_defined():
        return None
    dims = shape.as_list()
    if not dims or dims[-1] != channels or any(d != 1 for d in dims[:-1]):
        return None
    return tf.reshape(tf.cast(value, tf.float32), [channels])


def _frozen_path(x, mean, variance, gamma, beta, epsilon):
    """The channel vectors `(mean, variance, gamma, beta)` when `normalize` can run as one frozen
    fused batch norm: an NHWC input, statistics and weights per channel on the last axis. None
    otherwise.

    Other ranks take the plain centred multiply-add: a reshape into the kernel's four axes
    would stay in a TFLite model as RESHAPE ops that keep the multiply-add from folding into a
    preceding Dense layer."""
    if not _kernel_path(x) or not _kernel_epsilon(epsilon) or x.shape.rank != 4:
        return None
    channels = x.shape[-1]
    if channels is None:
        return None
    values = tuple(None if v is None else tf.convert_to_tensor(v) for v in (mean, variance, gamma, beta))
    if any(v is not None and (v.shape.rank is None or v.shape.rank > x.shape.rank) for v in values):
        return None
    vectors = [_channel_vector(v, channels) for v in values]
    if vectors[0] is None or vectors[1] is None:
        return None
    if any(vector is None and value is not None for vector, value in zip(vectors, values)):
        return None
    return vectors


def _as_channels(x, channels):
    """`x` viewed as an NHWC batch `(1, 1, rows, channels)` for the fused batch norm kernels."""
    return tf.reshape(x, [1, 1, -1, channels])


# The frozen kernels of the few-channel training gradient run at close to a
# streaming pass only on wide rows: `x` is viewed as rows of several consecutive
# pixels, each channel vector repeated once per pixel, up to this many values a row.
_FROZEN_ROW_WIDTH = 4096


# Up to this many channels, the training gradient of batch norm on CPU is faster
# from the frozen kernels on wide rows (measured on 16 to 256 channels).
_FEW_CHANNELS = 128


def _pixels_per_row(x, channels):
    """How many consecutive pixels of `x` one row of the frozen kernel's view holds: the largest
    power of two that keeps the row within `_FROZEN_ROW_WIDTH` and divides the pixel count of
    one sample. Rows never span two samples, whatever the batch size, so a sample's outputs
    are the same bits in any batch."""
    dims = x.shape.as_list()[1:-1]
    if None in dims:
        return 1
    pixels = math.prod(dims)
    pixels_per_row = 1
    while pixels % (2 * pixels_per_row) == 0 and 2 * pixels_per_row * channels <= _FROZEN_ROW_WIDTH:
        pixels_per_row *= 2
    return pixels_per_row


def _per_pixel(vector, pixels):
    """A channel vector repeated for each pixel of a wide row."""
    return tf.tile(vector, [pixels]) if pixels > 1 else vector


def _channel_affine_grad(upstream, x, scale):
    """Gradients of `x * scale + offset` over the last axis: `(upstream * scale,
    sum(upstream * x), sum(upstream))`, the sums over every axis but the last; on CPU
    one kernel (a frozen fused batch norm's gradient with mean 0 and variance 1)."""
    channels = x.shape[-1]
    if not _cpu_only():
        axes = list(range(x.shape.rank - 1))
        d_x = upstream if scale is None else upstream * scale
        return d_x, tf.reduce_sum(upstream * x, axes), tf.reduce_sum(upstream, axes)
    zeros, ones = tf.zeros([channels], tf.float32), tf.ones([channels], tf.float32)
    d_x, d_scale, d_offset = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=_as_channels(upstream, channels), x=_as_channels(x, channels),
        scale=ones if scale is None else scale, reserve_space_1=zeros, reserve_space_2=ones,
        reserve_space_3=zeros, epsilon=0.0, is_training=False,
    )[:3]
    return tf.reshape(d_x, tf.shape(x)), d_scale, d_offset


def _trailing_axes(axes, rank):
    """Whether `axes` are the last `len(axes)` axes of a rank-`rank` tensor."""
    return sorted(a % rank for a in axes) == list(range(rank - len(axes), rank))


def _row_norm_path(x, axes, *params):
    """Whether layer or RMS norm over `axes` can take the row kernels."""
    if not _kernel_path(x) or not _trailing_axes(axes, x.shape.rank):
        return False
    sizes = x.shape[x.shape.rank - len(axes):]
    if not sizes.is_fully_defined() or sizes.num_elements() == 0:
        return False
    return all(p is None or tf.as_dtype(p.dtype) in (tf.float32, tf.float64) for p in params)


def _row_norm(x, axes, scale, offset, epsilon, centered):
    """Layer norm (`centered`) or RMS norm of `x` over its trailing `axes`, with the affine.

    The input is viewed as rows of `depth` features. Statistics take single-read
    reductions: the row mean, then the sum of squares of the deviations from it
    (`reduce_euclidean_norm` is one kernel), a shifted form that keeps a large
    mean's precision. Every later op works in place. The gradient
    keeps the normalized rows and `rstd`, and gets `upstream * gamma` and the
    weight gradients from one kernel.
    """
    rank = x.shape.rank
    depth = x.shape[rank - len(axes):].num_elements()
    shape = tf.shape(x)
    rows = tf.reshape(x, tf.concat([shape[: rank - len(axes)], [depth]], 0)) if len(axes) > 1 else x
    input_dtype = x.dtype
    params = [p for p in (scale, offset) if p is not None]
    params = [tf.reshape(tf.cast(p, tf.float32), [depth]) for p in params]

    @tf.custom_gradient
    def forward(rows, *params):
        params = list(params)
        gamma = params.pop(0) if scale is not None else None
        beta = params.pop(0) if offset is not None else None
        values = tf.cast(rows, tf.float32)
        if centered:
            # Deviations from the rounded row mean are nearly centred, so their
            # variance cannot cancel (a shift by one value of the row would, for
            # an outlier). Rounded to float32, the mean is off by about
            # |mean| * 2**-24; only where that matters against the spread does a
            # second reduction take the deviations' own mean out.
            mean = tf.reduce_mean(values, -1, keepdims=True)
            deviation = values - mean
            mean_square = tf.square(tf.math.reduce_euclidean_norm(deviation, -1, keepdims=True)) / depth
            rstd = tf.math.rsqrt(mean_square + epsilon)

            large = tf.abs(mean) * rstd > _LARGE_MEAN

            def recentred():
                # Only the large rows change, so each row's outputs are the same bits in any batch.
                deviation_mean = tf.where(large, tf.reduce_mean(deviation, -1, keepdims=True), 0.0)
                exact_rstd = tf.math.rsqrt(tf.maximum(mean_square - tf.square(deviation_mean), 0.0) + epsilon)
                exact_rstd = tf.where(large, exact_rstd, rstd)
                return (deviation - deviation_mean) * exact_rstd, exact_rstd

            normalized, rstd = tf.cond(tf.reduce_any(large), recentred, lambda: (deviation * rstd, rstd))
        else:
            norm = tf.math.reduce_euclidean_norm(values, -1, keepdims=True)
            rstd = tf.math.rsqrt(tf.square(norm) / depth + epsilon)
            normalized = values * rstd
        outputs = normalized if gamma is None else normalized * gamma
        outputs = outputs if beta is None else tf.nn.bias_add(outputs, beta)

        def backward(upstream):
            upstream = tf.cast(upstream, tf.float32)
            d_normalized, d_gamma, d_beta = _channel_affine_grad(upstream, normalized, gamma)
            # A row-wise dot product: one read of each, no product tensor.
            projection = tf.expand_dims(tf.einsum("...d,...d->...", d_normalized, normalized), -1) / depth
            d_rows = d_normalized - normalized * projection
            if centered:
                d_rows = d_rows - tf.reduce_mean(d_normalized, -1, keepdims=True)
            grads = [tf.cast(d_rows * rstd, input_dtype)]
            if gamma is not None:
                grads.append(d_gamma)
            if beta is not None:
                grads.append(d_beta)
            return grads

        return tf.cast(outputs, input_dtype), backward

    outputs = forward(rows, *params)
    return tf.reshape(outputs, shape) if len(axes) > 1 else outputs


def _kernel_epsilon(epsilon):
    """Whether the fused batch norm kernels take `epsilon` as given: a Python number, and on GPU
    one cuDNN accepts (it rejects or raises anything below 1e-5)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        return False
    return _cpu_only() or epsilon >= 1.001e-5


def _channel_norm_path(x, axes, epsilon):
    """Whether training batch norm over `axes` can take the fused kernel: channels last. Under
    XLA too, where it becomes XLA's own batch norm, which fuses its gradient better than the
    gradient of plain ops."""
    rank = x.shape.rank
    return (
        _kernel_path(x, under_xla=True) and _kernel_epsilon(epsilon) and rank >= 2
        and sorted(a % rank for a in axes) == list(range(rank - 1)) and x.shape[-1] is not None
    )


def _fused_batch_norm(x, gamma, beta, epsilon):
    """Training batch norm over every axis but the last with `FusedBatchNormV3`: statistics and
    normalization in one kernel, and one kernel for the gradient.

    The kernel centres with a float32 batch mean, which cannot hold the centre of
    inputs whose mean is large against their spread (|mean| / std above
    `_LARGE_MEAN`, or `_XLA_LARGE_MEAN` under XLA); those batches rerun on the
    deviations from the first sample, and so does their gradient. Returns
    `(outputs, mean, variance)`, statistics as vectors.
    """
    channels = x.shape[-1]
    input_dtype = x.dtype
    count = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
    params = [p for p in (gamma, beta) if p is not None]
    limit = _XLA_LARGE_MEAN if _in_xla_context() else _LARGE_MEAN
    # With few channels, the gradient kernel of training is slow on CPU; the
    # frozen kernels on wide rows of several pixels do the same work sooner.
    few_channels = channels <= _FEW_CHANNELS and _cpu_only() and not _in_xla_context()
    pixels = _pixels_per_row(x, channels) if few_channels else 1

    @tf.custom_gradient
    def forward(values, *params):
        params = list(params)
        scale = params.pop(0) if gamma is not None else tf.ones([channels], tf.float32)
        offset = params.pop(0) if beta is not None else tf.zeros([channels], tf.float32)

        def shift():
            return tf.stop_gradient(tf.cast(values[:, :, :1, :], tf.float32))

        def fused(values):
            # outputs, mean, unbiased variance, and the three reserve spaces of the gradient
            return tf.raw_ops.FusedBatchNormV3(
                x=values, scale=scale, offset=offset, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=epsilon, is_training=True,
            )

        plain = fused(values)
        mean, variance = plain[1], plain[2]
        # Written so that a NaN ratio (a variance below zero from XLA's one-pass formula) reruns too.
        imprecise = tf.logical_not(tf.reduce_all(tf.abs(mean) * tf.math.rsqrt(variance + epsilon) <= limit))

        def shifted():
            first = shift()
            outputs, mean, *rest = fused(tf.cast(values, tf.float32) - first)
            return [tf.cast(outputs, input_dtype), mean + tf.reduce_sum(first, [0, 1, 2]), *rest]

        # The reserve spaces hold the statistics of the run taken, shifted or not.
        outputs, mean, variance, *reserve = tf.cond(imprecise, shifted, lambda: list(plain))

        def backward(upstream, *unused_upstreams):
            def gradient(values, reserve):
                if pixels > 1:
                    grads = _wide_batch_norm_grad(upstream, values, scale, reserve[0], biased, epsilon, pixels)
                else:
                    grads = tf.raw_ops.FusedBatchNormGradV3(
                        y_backprop=tf.cast(upstream, values.dtype), x=values, scale=scale,
                        reserve_space_1=reserve[0], reserve_space_2=reserve[1], reserve_space_3=reserve[2],
                        epsilon=epsilon, is_training=True,
                    )[:3]
                d_values, d_scale, d_offset = grads
                return tf.cast(d_values, input_dtype), d_scale, d_offset

            d_values, d_scale, d_offset = tf.cond(
                imprecise,
                lambda: gradient(tf.cast(values, tf.float32) - shift(), reserve),
                lambda: gradient(values, reserve),
            )
            return [d_values] + ([d_scale] if gamma is not None else []) + ([d_offset] if beta is not None else [])

        # The kernel returns the unbiased variance (not finite for a single value);
        # the moving statistics take the biased one.
        biased = tf.where(count > 1.0, variance * ((count - 1.0) / tf.maximum(count, 1.0)), tf.zeros_like(variance))
        return (outputs, mean, biased), backward

    outputs, mean, variance = forward(_as_channels(x, channels), *params)
    return tf.reshape(outputs, tf.shape(x)), tf.stop_gradient(mean), tf.stop_gradient(variance)


def _wide_batch_norm_grad(upstream, values, scale, mean, variance, epsilon, pixels):
    """The gradient of training batch norm over `(1, 1, rows, channels)` values from the frozen
    kernels on rows of `pixels` pixels: `(d_values, d_scale, d_offset)`.

    With `normalized = (values - mean) * rstd`, the gradient is
    `upstream * scale * rstd - scale * rstd / count * (d_offset + normalized * d_scale)`:
    the frozen gradient kernel gives the first term and the sums, a frozen
    forward kernel the second term.
    """
    channels = values.shape[-1]
    width = channels * pixels
    count = tf.cast(tf.size(values, out_type=tf.int64) // channels, tf.float32)

    def wide(vector):
        return _per_pixel(vector, pixels)

    def summed(vector):
        return tf.reduce_sum(tf.reshape(vector, [pixels, channels]), 0)

    rows = _as_channels(values, width)
    d_rows, d_scale, d_offset = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=_as_channels(tf.cast(upstream, values.dtype), width), x=rows, scale=wide(scale),
        reserve_space_1=wide(mean), reserve_space_2=wide(variance), reserve_space_3=tf.zeros([0]),
        epsilon=epsilon, is_training=False,
    )[:3]
    d_scale, d_offset = summed(d_scale), summed(d_offset)
    factor = scale * tf.math.rsqrt(variance + epsilon) / count
    mean_terms = tf.raw_ops.FusedBatchNormV3(
        x=rows, scale=wide(factor * d_scale), offset=wide(factor * d_offset), mean=wide(mean),
        variance=wide(variance), epsilon=epsilon, is_training=False,
    )[0]
    d_values = tf.reshape(d_rows - mean_terms, tf.shape(values))
    return d_values, d_scale, d_offset


def _frozen_batch_norm(x, mean, variance, scale, offset, epsilon):
    """`(x - mean) * rsqrt(variance + epsilon) * scale + offset` over the last axis in one kernel,
    the centred form; the gradient also reaches `mean` and `variance`, which may be batch
    statistics. `x` is NHWC; the other arguments are float32 channel vectors or None.

    This is TensorFlow's own inference batch norm, a per-channel multiply-add on the input as it
    is, which Grappler fuses into a preceding convolution and the TFLite converter folds into the
    convolution's weights."""
    channels = x.shape[-1]
    input_dtype = x.dtype
    params = [p for p in (scale, offset) if p is not None]

    @tf.custom_gradient
    def forward(x, mean, variance, *params):
        params = list(params)
        gamma = params.pop(0) if scale is not None else tf.ones([channels], tf.float32)
        beta = params.pop(0) if offset is not None else tf.zeros([channels], tf.float32)
        outputs = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=epsilon, is_training=False,
        )[0]

        def backward(upstream):
            d_x, d_scale, d_offset = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=_as_channels(tf.cast(upstream, input_dtype), channels), x=_as_channels(x, channels),
                scale=gamma, reserve_space_1=mean, reserve_space_2=variance,
                reserve_space_3=tf.zeros([0]), epsilon=epsilon, is_training=False,
            )[:3]
            rstd = tf.math.rsqrt(variance + epsilon)
            grads = [
                tf.reshape(d_x, tf.shape(x)),
                -d_offset * gamma * rstd,
                -0.5 * d_scale * gamma * tf.square(rstd),
            ]
            if scale is not None:
                grads.append(d_scale)
            if offset is not None:
                grads.append(d_offset)
            return grads

        return outputs, backward

    return forward(x, mean, variance, *params)
