"""TensorFlow kernel tricks behind kernorm.ops: the maths of reference.py in fewer passes over memory.

Outside XLA every TensorFlow op is a kernel with its own pass over memory, so
these functions use as few full-size passes as they can: single-read
reductions, fused batch norm kernels, work in place. They compute their
statistics, normalization and gradients with the functions of reference.py, or
with a fused kernel that computes the same, and give the reference numbers
(tests/test_fast_paths.py). They decide nothing: kernorm/ops/__init__.py
chooses when each runs and passes its choices (the large-mean limit, the
gradient to take) as arguments. The fused kernels are used only as their
documentation describes (see kernorm/_private.py).
"""

import math

import tensorflow as tf

from kernorm.ops import reference


def as_channels(x, channels):
    """`x` viewed as an NHWC batch `(1, 1, rows, channels)` for the fused batch norm kernels."""
    return tf.reshape(x, [1, 1, -1, channels])


def pixels_per_row(x, channels, max_width):
    """How many consecutive pixels of `x` one row of the frozen kernel's view holds: the largest
    power of two that keeps the row within `max_width` values and divides the pixel count of
    one sample. Rows never span two samples, whatever the batch size, so a sample's outputs
    are the same bits in any batch."""
    dims = x.shape.as_list()[1:-1]
    if None in dims:
        return 1
    pixels = math.prod(dims)
    pixels_per_row = 1
    while pixels % (2 * pixels_per_row) == 0 and 2 * pixels_per_row * channels <= max_width:
        pixels_per_row *= 2
    return pixels_per_row


def per_pixel(vector, pixels):
    """A channel vector repeated for each pixel of a wide row."""
    return tf.tile(vector, [pixels]) if pixels > 1 else vector


def channel_affine_grad(upstream, x, scale, fused):
    """Gradients of `x * scale + offset` over the last axis: `(upstream * scale,
    sum(upstream * x), sum(upstream))`, the sums over every axis but the last; `fused`
    (for the CPU), from one kernel: a frozen fused batch norm's gradient with mean 0 and
    variance 1."""
    channels = x.shape[-1]
    if not fused:
        axes = list(range(x.shape.rank - 1))
        return reference.affine_grad(upstream, x, scale, axes, axes, keepdims=False)
    zeros, ones = tf.zeros([channels], tf.float32), tf.ones([channels], tf.float32)
    d_x, d_scale, d_offset = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=as_channels(upstream, channels), x=as_channels(x, channels),
        scale=ones if scale is None else scale, reserve_space_1=zeros, reserve_space_2=ones,
        reserve_space_3=zeros, epsilon=0.0, is_training=False,
    )[:3]
    return tf.reshape(d_x, tf.shape(x)), d_scale, d_offset


def _row_mean_of_squares(rows):
    """The mean square of each row: one kernel and one read (`reduce_euclidean_norm`)."""
    return tf.square(tf.math.reduce_euclidean_norm(rows, -1, keepdims=True)) / rows.shape[-1]


def row_norm(x, axes, scale, offset, epsilon, centered, limit, fused_affine_grad):
    """Layer norm (`centered`) or RMS norm of `x` over its trailing `axes`, with the affine.

    The input is viewed as rows of `depth` features. The statistics take
    single-read reductions: the row mean, then the sum of squares of the
    deviations from it in one kernel, and the deviations' mean only for rows
    whose |mean| / std exceeds `limit` (`WHERE_LARGE`). Every later op works in
    place. The gradient keeps the normalized rows and `rstd`, and takes
    `upstream * gamma` and the weight gradients from one kernel where
    `fused_affine_grad` (see `channel_affine_grad`).
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
        statistics = reference.centred_moments(
            tf.cast(rows, tf.float32), [-1], centered, reference.WHERE_LARGE, limit, epsilon,
            mean_of_squares=_row_mean_of_squares,
        )
        rstd = reference.inverse_std(statistics.variance, epsilon)
        normalized = statistics.normalized(rstd)
        outputs = reference.standardized(normalized, gamma=gamma, beta=beta)

        def backward(upstream):
            d_normalized, d_gamma, d_beta = channel_affine_grad(
                tf.cast(upstream, tf.float32), normalized, gamma, fused_affine_grad
            )
            d_rows = reference.standardize_grad(d_normalized, normalized, rstd, [-1], centered, rows=True)
            grads = [tf.cast(d_rows, input_dtype)]
            if gamma is not None:
                grads.append(d_gamma)
            if beta is not None:
                grads.append(d_beta)
            return grads

        return tf.cast(outputs, input_dtype), backward

    outputs = forward(rows, *params)
    return tf.reshape(outputs, shape) if len(axes) > 1 else outputs


def fused_batch_norm(x, gamma, beta, epsilon, limit, wide_gradient=None):
    """Training batch norm over every axis but the last with `FusedBatchNormV3`: statistics and
    normalization in one kernel, and one kernel for the gradient.

    The kernel centres with a float32 batch mean, which cannot hold the centre
    of inputs whose |mean| / std exceeds `limit`; those batches rerun on the
    deviations from that mean (the shift of `reference.centred_moments`), whose
    mean the rerun takes as the correction, and so does their gradient.
    `wide_gradient`, if given, computes the gradient from the inputs, the
    weight, the mean and variance the kernel centred with, and epsilon (see
    `wide_batch_norm_grad`) instead of the gradient kernel.

    Returns `(outputs, mean, variance)`, statistics as vectors.
    """
    channels = x.shape[-1]
    input_dtype = x.dtype
    count = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
    params = [p for p in (gamma, beta) if p is not None]

    @tf.custom_gradient
    def forward(values, *params):
        params = list(params)
        scale = params.pop(0) if gamma is not None else tf.ones([channels], tf.float32)
        offset = params.pop(0) if beta is not None else tf.zeros([channels], tf.float32)

        def fused(values):
            # outputs, mean, unbiased variance, and the three reserve spaces of the gradient
            return tf.raw_ops.FusedBatchNormV3(
                x=values, scale=scale, offset=offset, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=epsilon, is_training=True,
            )

        plain = fused(values)
        shift = tf.stop_gradient(plain[1])
        imprecise = tf.reduce_any(reference.large_mean(plain[1], plain[2], epsilon, limit))

        def shifted():
            outputs, correction, *rest = fused(tf.cast(values, tf.float32) - shift)
            return [tf.cast(outputs, input_dtype), shift + correction, correction, *rest]

        # The kernel's own mean, and the reserve spaces, are those of the run taken, shifted or not.
        outputs, mean, kernel_mean, variance, *reserve = tf.cond(
            imprecise, shifted, lambda: [plain[0], plain[1], plain[1], *plain[2:]]
        )

        def backward(upstream, *unused_upstreams):
            def gradient(values):
                if wide_gradient is not None:
                    grads = wide_gradient(upstream, values, scale, kernel_mean, biased, epsilon)
                else:
                    grads = tf.raw_ops.FusedBatchNormGradV3(
                        y_backprop=tf.cast(upstream, values.dtype), x=values, scale=scale,
                        reserve_space_1=reserve[0], reserve_space_2=reserve[1], reserve_space_3=reserve[2],
                        epsilon=epsilon, is_training=True,
                    )[:3]
                d_values, d_scale, d_offset = grads
                return tf.cast(d_values, input_dtype), d_scale, d_offset

            d_values, d_scale, d_offset = tf.cond(
                imprecise, lambda: gradient(tf.cast(values, tf.float32) - shift), lambda: gradient(values)
            )
            return [d_values] + ([d_scale] if gamma is not None else []) + ([d_offset] if beta is not None else [])

        # The kernel returns the unbiased variance (not finite for a single value);
        # the moving statistics take the biased one.
        biased = tf.where(count > 1.0, variance * ((count - 1.0) / tf.maximum(count, 1.0)), tf.zeros_like(variance))
        return (outputs, mean, biased), backward

    outputs, mean, variance = forward(as_channels(x, channels), *params)
    return tf.reshape(outputs, tf.shape(x)), tf.stop_gradient(mean), tf.stop_gradient(variance)


def wide_batch_norm_grad(upstream, values, scale, mean, variance, epsilon, pixels):
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
        return per_pixel(vector, pixels)

    def summed(vector):
        return tf.reduce_sum(tf.reshape(vector, [pixels, channels]), 0)

    rows = as_channels(values, width)
    d_rows, d_scale, d_offset = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=as_channels(tf.cast(upstream, values.dtype), width), x=rows, scale=wide(scale),
        reserve_space_1=wide(mean), reserve_space_2=wide(variance), reserve_space_3=tf.zeros([0]),
        epsilon=epsilon, is_training=False,
    )[:3]
    d_scale, d_offset = summed(d_scale), summed(d_offset)
    factor = scale * reference.inverse_std(variance, epsilon) / count
    mean_terms = tf.raw_ops.FusedBatchNormV3(
        x=rows, scale=wide(factor * d_scale), offset=wide(factor * d_offset), mean=wide(mean),
        variance=wide(variance), epsilon=epsilon, is_training=False,
    )[0]
    d_values = tf.reshape(d_rows - mean_terms, tf.shape(values))
    return d_values, d_scale, d_offset


def frozen_batch_norm(x, mean, variance, scale, offset, epsilon):
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
                y_backprop=as_channels(tf.cast(upstream, input_dtype), channels), x=as_channels(x, channels),
                scale=gamma, reserve_space_1=mean, reserve_space_2=variance,
                reserve_space_3=tf.zeros([0]), epsilon=epsilon, is_training=False,
            )[:3]
            rstd = reference.inverse_std(variance, epsilon)
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
