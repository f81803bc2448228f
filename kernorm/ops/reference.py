"""The maths of kernorm.ops, each formula written once: statistics, normalization and their gradients.

Every path computes its statistics with `centred_moments`, normalizes with
`standardized` and takes its gradients from `affine_grad` and
`standardize_grad`; the kernel paths of kernels.py call them too, or a fused
TensorFlow kernel that computes the same. Which function runs when is decided
in kernorm/ops/__init__.py, never here.
"""

import functools
import math

import tensorflow as tf

# The large-mean strategies of `centred_moments`.
ALWAYS = "always"
WHERE_LARGE = "where_large"
WHERE_LARGE_XLA = "where_large_xla"
_STRATEGIES = (ALWAYS, WHERE_LARGE, WHERE_LARGE_XLA)


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


def _static_count(x, axes):
    """Number of elements reduced over `axes` where their sizes are known, else None."""
    sizes = [x.shape[a] for a in axes]
    return None if None in sizes else math.prod(sizes)


def _count(x, axes):
    """Number of elements reduced over `axes`, as a tensor of x's dtype: a constant where their sizes are known."""
    if _static_count(x, axes) is not None:
        return tf.constant(_static_count(x, axes), x.dtype)
    shape = tf.shape(x)
    return tf.cast(tf.reduce_prod(tf.gather(shape, list(axes))), x.dtype)


def batch_count(x, axes, dtype):
    """Values per channel of an unmasked batch, where a single value counts as none:
    its variance is 0, not a statistic, and must not reach the moving statistics."""
    count = _count(tf.cast(x, dtype), axes)
    return tf.where(count > 1, count, tf.zeros_like(count))


def inverse_std(variance, epsilon):
    """`rsqrt(variance + epsilon)`, the factor that normalizes."""
    return tf.math.rsqrt(variance + epsilon)


def large_mean(mean, variance, epsilon, limit):
    """Where |mean| / std exceeds `limit`: where a float32 mean, rounded to about
    |mean| * 2**-24, is off by more than its statistics may be. A NaN ratio (a
    variance below zero from a one-pass formula) counts as large."""
    return tf.logical_not(tf.abs(mean) * inverse_std(variance, epsilon) <= limit)


def _corrected_variance(mean_square, correction):
    """The variance from the mean square of deviations from a shift and their mean `correction`."""
    return tf.maximum(mean_square - tf.square(correction), 0.0)


class Moments:
    """Statistics over some axes, with kept dims, as `centred_moments` returns them.

    The mean is `shift + correction`: `shift` is a first estimate, and
    `correction` the mean of the deviations from it (zero where a strategy did
    not take it). For RMS statistics the shift is zero, the correction None, and
    `variance` the mean square.

    Attributes:
        shift, correction, variance: tensors with kept dims.
        deviation: `values - shift` (the values themselves for RMS statistics).
        corrected: None, or where the correction is taken only when a statistic
            needs it, a boolean scalar: whether it was.
        mean: `shift + correction`.
        centred: `values - mean`, taken as `deviation - correction`, which keeps
            the spread of a large mean that `values - mean` with the mean
            rounded to float32 loses.
        count: the number of values behind each statistic.
    """

    def __init__(self, shift, correction, variance, deviation, count, corrected=None):
        self.shift = shift
        self.correction = correction
        self.variance = variance
        self.deviation = deviation
        self.corrected = corrected
        self._count = count

    @property
    def mean(self):
        return self.shift if self.correction is None else self.shift + self.correction

    @functools.cached_property
    def centred(self):
        return self.normalized(None)

    @functools.cached_property
    def count(self):
        return self._count() if callable(self._count) else self._count

    def normalized(self, rstd):
        """`centred * rstd` (`centred` where `rstd` is None).

        Where `corrected` tells whether the correction was taken, this runs in a
        branch on it: the usual case then subtracts nothing and writes the
        values once. Inside the branch, Grappler also keeps the multiply apart
        from a later one (by gamma), which it would otherwise regroup into a
        full-size product of `rstd` and gamma.
        """

        def scaled(centred):
            return centred if rstd is None else centred * rstd

        if self.correction is None:
            return scaled(self.deviation)
        if self.corrected is None:
            return scaled(self.deviation - self.correction)
        return tf.cond(
            self.corrected, lambda: scaled(self.deviation - self.correction), lambda: scaled(self.deviation)
        )


def centred_moments(values, axes, centered=True, large_mean_strategy=ALWAYS, limit=None, epsilon=0.0, mask=None,
                    synchronized=False, mean_of_squares=None):
    """Biased, centred statistics of `values` over `axes`: the one routine behind every path.

    The shift is the mean as one reduction gives it; rounded to float32 it is
    off by about |mean| * 2**-24, which matters where the mean is large against
    the spread. The deviations from it are then nearly centred, unlike those
    from one sample, which an outlier spoils, so the mean of their squares
    cannot cancel (unlike `mean(x**2) - mean(x)**2`), and their own mean, the
    correction, puts the mean back in place. How the correction is taken is the
    large-mean strategy:

    - `ALWAYS`: for every statistic; two more reductions, exact whatever the
      mean. The shift carries no gradient and the correction carries it.
    - `WHERE_LARGE`: only for the statistics whose |mean| / std exceeds
      `limit`, in a branch that runs only when one does; `Moments.normalized`
      subtracts it in a branch on the same condition, so that the usual case
      writes the deviations once. For the TensorFlow kernel paths outside XLA.
    - `WHERE_LARGE_XLA`: the same for XLA: the branch reads `values`, so that
      XLA need not write the deviations out for a conditional that rarely runs,
      and sits in a one-step loop, which keeps XLA from turning it into a
      select that computes both sides. The correction is subtracted after it.
      In both `WHERE_LARGE` strategies the shift carries the gradient and the
      correction none: `mean(x - mean(x))` is constant in x.

    Args:
        values: a float tensor in the dtype of the statistics.
        axes: the axes to reduce over.
        centered: False gives RMS statistics: the mean square as `variance`.
        large_mean_strategy: `ALWAYS`, `WHERE_LARGE` or `WHERE_LARGE_XLA`.
        limit: the |mean| / std above which the `WHERE_LARGE` strategies
            correct.
        epsilon: added to the variance in that ratio.
        mask: optional, broadcastable to `values`; only positions where it is
            non-zero count. `ALWAYS` only.
        synchronized: sum over the replicas of the current `tf.distribute`
            replica context. `ALWAYS` only.
        mean_of_squares: optional function giving the mean of the squares of a
            tensor over `axes` with kept dims, for the `WHERE_LARGE` strategies
            and RMS statistics; by default `reduce_mean(square(t))`.

    Returns:
        A `Moments`. With a mask, a statistic with no value counted has mean and
        variance 0.
    """
    if large_mean_strategy not in _STRATEGIES:
        raise ValueError(f"Expected `large_mean_strategy` in {_STRATEGIES}. Received: {large_mean_strategy!r}")
    if large_mean_strategy != ALWAYS and (mask is not None or synchronized):
        raise ValueError(f"A mask and `synchronized` need `large_mean_strategy`={ALWAYS!r}.")
    axes = list(axes)
    weight = None
    if mask is not None:
        weight = tf.broadcast_to(tf.cast(tf.cast(mask, tf.bool), values.dtype), tf.shape(values))

    def weighed(tensor):
        return tensor if weight is None else tensor * weight

    if weight is None and not synchronized and (large_mean_strategy != ALWAYS or _static_count(values, axes)):
        count = functools.partial(_count, values, axes)

        def means(*tensors):
            return [tf.reduce_mean(tensor, axes, keepdims=True) for tensor in tensors]

        def first_mean():
            return means(values)[0]

    else:
        # Sums over the count, which an empty or all-masked reduction keeps at 0 rather than NaN
        # (for a known count, `reduce_mean` gives the same bits).
        reduce = _all_reduce_sum if synchronized else (lambda sums: sums)
        count = _count(values, axes) if weight is None else tf.reduce_sum(weight, axes, keepdims=True)
        # Each all-reduce is one exchange between the replicas: the sums travel together.
        totals = [tf.reduce_sum(weighed(values), axes, keepdims=True)] if centered else []
        *totals, count = reduce(totals + [count])
        safe_count = tf.maximum(count, 1.0)

        def means(*tensors):
            sums = reduce([tf.reduce_sum(tensor, axes, keepdims=True) for tensor in tensors])
            return [value / safe_count for value in sums]

        def first_mean():
            return totals[0] / safe_count

    mean_of_squares = mean_of_squares or (lambda tensor: means(tf.square(tensor))[0])
    if not centered:
        zero = tf.zeros([1] * values.shape.rank, values.dtype)
        return Moments(zero, None, mean_of_squares(weighed(values)), values, count)

    if large_mean_strategy == ALWAYS:
        shift = tf.stop_gradient(first_mean())
        deviation = values - shift
        weighed_deviation = weighed(deviation)
        correction, mean_square = means(weighed_deviation, tf.square(weighed_deviation))
        return Moments(shift, correction, _corrected_variance(mean_square, correction), deviation, count)

    shift = first_mean()
    deviation = values - shift
    mean_square = mean_of_squares(deviation)
    large = large_mean(shift, mean_square, epsilon, limit)
    no_correction = tf.zeros_like(shift)
    if large_mean_strategy == WHERE_LARGE:
        corrected = tf.reduce_any(large)
        # Only the large statistics change, so that the others are the same bits in any batch.
        correction = tf.cond(
            corrected, lambda: tf.where(large, tf.reduce_mean(deviation, axes, keepdims=True), no_correction),
            lambda: no_correction,
        )
    else:
        corrected = None

        def correction_of_values():
            return tf.while_loop(
                lambda step, correction: step < 1,
                lambda step, correction: (
                    step + 1, tf.where(large, tf.reduce_mean(values - shift, axes, keepdims=True), no_correction)
                ),
                (tf.constant(0), no_correction),
                maximum_iterations=1,
            )[1]

        correction = tf.cond(tf.reduce_any(large), correction_of_values, lambda: no_correction)
    correction = tf.stop_gradient(correction)
    return Moments(shift, correction, _corrected_variance(mean_square, correction), deviation, count, corrected)


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
    statistics = centred_moments(tf.cast(x, stats_dtype(x.dtype)), axes, mask=mask, synchronized=synchronized)
    mean, variance, count = statistics.mean, statistics.variance, statistics.count
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
        if mask is not None:
            count = tf.squeeze(count, axes)
    return mean, variance, count


def standardized(centred, rstd=None, gamma=None, beta=None):
    """The normalization formula, `centred * rstd * gamma + beta`, on centred values.

    `rstd` and `gamma` (each optional) are multiplied together first, so that
    the values take one multiply and one add, in the centred form: never
    `x * inv - mean * inv`, which cancels for a large mean (and which XLA turns
    into a fused multiply-add that loses the rest).
    """
    multiplier = rstd
    if gamma is not None:
        gamma = tf.cast(gamma, centred.dtype)
        multiplier = gamma if multiplier is None else multiplier * gamma
    outputs = centred if multiplier is None else centred * multiplier
    return outputs if beta is None else outputs + tf.cast(beta, centred.dtype)


def normalize(x, mean, variance, gamma=None, beta=None, epsilon=1e-3):
    """`gamma * (x - mean) * rsqrt(variance + epsilon) + beta` in `stats_dtype(x.dtype)`, the result in x's dtype."""
    dtype = stats_dtype(x.dtype)
    centred = tf.cast(x, dtype) - tf.cast(mean, dtype)
    outputs = standardized(centred, inverse_std(tf.cast(variance, dtype), epsilon), gamma, beta)
    return tf.cast(outputs, x.dtype)


def inference_affine(mean, variance, gamma=None, beta=None, epsilon=1e-3):
    """`(scale, shift)` with `normalize(x, mean, variance, gamma, beta, epsilon) == x * scale + shift`:
    `scale = gamma * rsqrt(variance + epsilon)` and `shift = beta - mean * scale`, in the dtype of `mean`.

    This is the form a batch norm takes when it is folded into the layer before
    it; compute it in float64 (the uncentred `x * scale + shift` loses what the
    centred form keeps for a large mean)."""
    scale = inverse_std(variance, epsilon)
    scale = scale if gamma is None else scale * tf.cast(gamma, scale.dtype)
    shift = -mean * scale
    return scale, shift if beta is None else shift + tf.cast(beta, shift.dtype)


def affine_grad(upstream, normalized, gamma, gamma_axes, beta_axes, keepdims=True):
    """Gradients of `normalized * gamma + beta`: `(d_normalized, d_gamma, d_beta)`.

    `d_gamma` and `d_beta` are summed over `gamma_axes` and `beta_axes`, or
    None where those are None.
    """
    d_normalized = upstream if gamma is None else upstream * tf.cast(gamma, upstream.dtype)
    d_gamma = None if gamma_axes is None else tf.reduce_sum(upstream * normalized, gamma_axes, keepdims=keepdims)
    d_beta = None if beta_axes is None else tf.reduce_sum(upstream, beta_axes, keepdims=keepdims)
    return d_normalized, d_gamma, d_beta


def standardize_grad(d_normalized, normalized, rstd, axes, centered, rows=False):
    """The input gradient of `normalized = (x - mean(x)) * rstd(x)` over `axes` (`x * rstd(x)` where
    not `centered`), from the gradient of `normalized`:
    `(d_normalized - normalized * mean(d_normalized * normalized) - mean(d_normalized)) * rstd`.

    `rows`: `axes` is the last axis alone, where the mean of the products is a
    row-wise dot product: one read of each, and no product tensor.
    """
    if rows:
        projection = tf.expand_dims(tf.einsum("...d,...d->...", d_normalized, normalized), -1) / normalized.shape[-1]
    else:
        projection = tf.reduce_mean(d_normalized * normalized, axes, keepdims=True)
    d_x = d_normalized - normalized * projection
    if centered:
        d_x = d_x - tf.reduce_mean(d_normalized, axes, keepdims=True)
    return d_x * rstd


def standardize(x, axes, epsilon, centered, gamma, beta):
    """Normalizes `x` over `axes` and applies the affine, with a hand-written gradient.

    `gamma` and `beta` are None or broadcastable to `x` with the same rank. The
    statistics take every correction (`ALWAYS`). The backward pass recomputes
    the normalized values from `x`, the shift, the correction and `rstd`
    instead of keeping the intermediate tensors of the forward pass.

    Returns `(outputs, mean, variance)`; mean and variance carry no gradient.
    """
    axes = list(axes)
    dtype = stats_dtype(x.dtype)
    input_dtype = x.dtype
    params = [p for p in (gamma, beta) if p is not None]

    def param_axes(param):
        return None if param is None else [i for i, size in enumerate(param.shape) if size == 1]

    @tf.custom_gradient
    def forward(x, *params):
        params = list(params)
        scale = params.pop(0) if gamma is not None else None
        offset = params.pop(0) if beta is not None else None
        statistics = centred_moments(tf.cast(x, dtype), axes, centered)
        # The backward pass keeps these small tensors, not the deviations.
        shift, correction = statistics.shift, statistics.correction
        rstd = inverse_std(statistics.variance, epsilon)
        outputs = standardized(statistics.centred, rstd, scale, offset)

        def backward(upstream, *unused_upstreams):
            values = tf.cast(x, dtype)
            # As in the forward pass: `x - mean` with the mean rounded to
            # float32 loses the small spread of a large-mean input.
            normalized = standardized(values - shift - correction if centered else values, rstd)
            d_normalized, d_scale, d_offset = affine_grad(
                tf.cast(upstream, dtype), normalized, scale, param_axes(scale), param_axes(offset)
            )
            grads = [tf.cast(standardize_grad(d_normalized, normalized, rstd, axes, centered), input_dtype)]
            if scale is not None:
                grads.append(tf.cast(d_scale, scale.dtype))
            if offset is not None:
                grads.append(tf.cast(d_offset, offset.dtype))
            return grads

        return (tf.cast(outputs, input_dtype), statistics.mean, statistics.variance), backward

    outputs, mean, variance = forward(x, *params)
    return outputs, tf.stop_gradient(mean), tf.stop_gradient(variance)


def compiled_standardize(x, axes, epsilon, centered, gamma, beta, limit):
    """`standardize` for XLA: plain ops and automatic differentiation, which XLA fuses into fewer
    passes than the hand-written gradient. The mean is one reduction, as in Keras, corrected only
    where it is large against the spread (`WHERE_LARGE_XLA` above `limit`)."""
    statistics = centred_moments(tf.cast(x, stats_dtype(x.dtype)), axes, centered, WHERE_LARGE_XLA, limit, epsilon)
    outputs = standardized(statistics.centred, inverse_std(statistics.variance, epsilon), gamma, beta)
    return tf.cast(outputs, x.dtype), tf.stop_gradient(statistics.mean), tf.stop_gradient(statistics.variance)


def pooled_moments(mean, variance, count):
    """Statistics of sub-batches (axis 0) pooled into one: their means and variances averaged
    with their counts as weights. The pooled variance is the mean variance within a sub-batch,
    the one each sub-batch was normalized with. Returns `(mean, variance, count)`."""
    count = tf.broadcast_to(tf.cast(count, mean.dtype), tf.shape(mean))
    total = tf.maximum(tf.reduce_sum(count, 0), 1.0)
    return tf.reduce_sum(mean * count, 0) / total, tf.reduce_sum(variance * count, 0) / total, tf.reduce_sum(count, 0)


def merge_moments(count, mean, squares, batch_count, batch_mean, batch_variance):
    """Running statistics `(count, mean, squares)` (`squares`: the sum of squared deviations from the mean)
    updated by a batch's `(count, mean, biased variance)`, by Chan et al.'s pairwise formula: exact pooled
    moments, without a sum of squares that cancels. The pooled variance is `squares / count`.

    Unlike `pooled_moments`, the variance includes the spread between the batches' means: this is the
    variance of all the values together. A zero `batch_count` leaves the statistics as they are."""
    total = count + batch_count
    delta = batch_mean - mean
    weight = batch_count / tf.maximum(total, 1.0)
    return total, mean + delta * weight, squares + batch_variance * batch_count + delta**2 * count * weight


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


def stddev_from_variance(variance, epsilon):
    """The standard deviation Batch Renormalization tracks: `sqrt(variance + epsilon)`."""
    return tf.sqrt(variance + epsilon)


def variance_from_stddev(stddev, epsilon):
    """The variance of a renorm standard deviation, `stddev**2 - epsilon`, never below zero
    (rounding can make it slightly negative)."""
    return tf.nn.relu(tf.square(stddev) - epsilon)


def renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, clipping):
    """Batch Renormalization's `(r, d)`: the batch statistics expressed relative to the moving ones.

    `normalized * r + d` equals the input normalized by the moving statistics;
    `clipping` maps optional "rmin", "rmax" and "dmax" to bounds. No gradient
    flows through `r` and `d` (Ioffe 2017).
    """
    stddev = stddev_from_variance(variance, epsilon)
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


def renormalized(normalized, r, d, gamma=None, beta=None):
    """`(normalized * r + d) * gamma + beta`, folded into one multiply and one add."""
    offset = d if gamma is None else d * tf.cast(gamma, d.dtype)
    offset = offset if beta is None else offset + tf.cast(beta, offset.dtype)
    return standardized(normalized, r, gamma, offset)
