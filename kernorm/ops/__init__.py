"""The normalization maths, written once, and the one place that chooses how it runs.

Every layer in kernorm calls these functions; the layers choose axes, hold
weights and assign moving statistics, and do no arithmetic of their own. They
differ only in the axes they reduce over (as in Flax's `_compute_stats` /
`_normalize`):

- batch norm reduces over every axis except the channel axes;
- layer norm and RMS norm reduce over the feature axes of each sample;
- group norm splits the channel axis into groups and reduces within each group.

Conventions:

- Statistics are computed in float32 for float16/bfloat16 inputs (float64
  stays float64), and outputs are cast back to the input dtype.
- Variances are biased and centred. The normalized value is always
  `(x - mean) * rsqrt(var + eps)`, never `x * inv - mean * inv`, which cancels
  for inputs with a large mean and a small spread.

The package:

- `reference.py`: the maths, each formula once: `centred_moments` (every
  statistic, with the large-mean strategy as a parameter), `standardized` (the
  normalization), the gradients, the custom-gradient `standardize` and the
  XLA variant `compiled_standardize`;
- `kernels.py`: the TensorFlow kernel tricks, which compute the same in fewer
  passes over memory;
- this module: the public functions and the dispatch below, which alone
  decides which path runs; `set_fast_paths(False)` turns every fast path off.
  The private TensorFlow probe it uses is in kernorm/_private.py.

Which path runs (the layers never see it; every path gives the reference
numbers, see tests/test_fast_paths.py). "On" means that the fast paths are on
(`set_fast_paths`); "kernel" that they are on and `x` is a
float16/bfloat16/float32 tensor of known rank. The first row of a function
whose conditions all hold runs:

| function | conditions | runs | large-mean strategy |
| --- | --- | --- | --- |
| `layer_norm`, `rms_norm` | kernel, outside XLA, over trailing axes of known size, float32/float64 weights | `kernels.row_norm` (`_row_norm`); on CPU its weight gradients from one kernel | `WHERE_LARGE` above `_LARGE_MEAN` |
| | on, under XLA | `reference.compiled_standardize` (`_compiled_standardize`), automatic gradient | `WHERE_LARGE_XLA` above `_LARGE_MEAN` |
| | otherwise | `reference.standardize`, hand-written gradient | `ALWAYS` |
| `layer_norm(rms_scaling=True)` | always | `moments`, then `normalize` | `ALWAYS` |
| `batch_norm` | kernel, no mask, not synchronized, channels last, per-channel weights, `epsilon` a Python number (at least 1.001e-5 on GPU, for cuDNN) | `kernels.fused_batch_norm` (`_fused_batch_norm`), under XLA too; its gradient from `kernels.wide_batch_norm_grad` (`_wide_batch_norm_grad`) with at most `_FEW_CHANNELS` channels on CPU outside XLA where a sample's pixels make wide rows, else from the gradient kernel | rerun on the deviations above `_LARGE_MEAN` (`_XLA_LARGE_MEAN` under XLA) |
| | no mask, not synchronized, on, under XLA | `reference.compiled_standardize` | `WHERE_LARGE_XLA` |
| | no mask, not synchronized | `reference.standardize` | `ALWAYS` |
| | a mask, or synchronized | `reference.centred_moments`, then `normalize` | `ALWAYS` |
| `ghost_batch_norm` | always | `batch_norm` of each sub-batch, then `reference.pooled_moments` | as `batch_norm` |
| `renorm_batch_norm` | always | `batch_norm` without the affine, then `reference.renormalized` | as `batch_norm` |
| `group_norm` | always, under XLA too (there its automatic gradient loses a large mean's spread) | `reference.standardize` | `ALWAYS` |
| `normalize` | kernel, outside XLA, rank 4, per-channel statistics and weights on the last axis, `epsilon` as for `batch_norm` | `kernels.frozen_batch_norm` (`_frozen_batch_norm`): TensorFlow's inference batch norm, which Grappler and TFLite fold into a convolution | none: the statistics are given |
| | otherwise | `reference.normalize` | none |
| `moments` | always | `reference.centred_moments` | `ALWAYS` |
| `inference_affine`, `merge_moments` (folding and precise BN) | always | `reference.inference_affine`, `reference.merge_moments` | none: the statistics are given |

`layer_norm`, `rms_norm`, `batch_norm` and `group_norm` reach both
standardizations through `_standardize`, which takes the compiled one only
where the table says.

The path functions are called by their names in this module (`_row_norm`,
`_fused_batch_norm`, `_wide_batch_norm_grad`, `_frozen_batch_norm`,
`_standardize`, `_compiled_standardize`), and the tuned constants and the
device check are read from it, so that a test may wrap or replace any of them
with `monkeypatch.setattr(ops, name, ...)`.
"""

import functools
import os

import tensorflow as tf

from kernorm import _private
from kernorm.ops import kernels, reference
from kernorm.ops.reference import (  # noqa: F401 (the public API)
    inference_affine,
    merge_moments,
    moments,
    moving_average,
    renorm_correction,
    stats_dtype,
    stddev_from_variance,
    variance_from_stddev,
    where_counted,
)

__all__ = [
    "set_fast_paths",
    "fast_paths_enabled",
    "stats_dtype",
    "moments",
    "normalize",
    "batch_norm",
    "ghost_batch_norm",
    "renorm_batch_norm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "on_flat_values",
    "inference_affine",
    "merge_moments",
    "moving_average",
    "where_counted",
    "renorm_correction",
    "stddev_from_variance",
    "variance_from_stddev",
]

# --- the paths, by the names the dispatch calls them ------------------------------

_row_norm = kernels.row_norm
_fused_batch_norm = kernels.fused_batch_norm
_wide_batch_norm_grad = kernels.wide_batch_norm_grad
_frozen_batch_norm = kernels.frozen_batch_norm
_compiled_standardize = reference.compiled_standardize

# --- the tuned constants ----------------------------------------------------------

_KERNEL_DTYPES = (tf.float16, tf.bfloat16, tf.float32)

# Above this |mean| / std, a statistic computed from a float32 mean (rounded
# to about |mean| * 2**-24) is corrected or recomputed from deviations.
_LARGE_MEAN = 16.0
# XLA's own batch norm computes the variance as mean(x**2) - mean(x)**2, which
# loses about (|mean| / std)**2 * 2**-24 of it; its batches rerun from here.
_XLA_LARGE_MEAN = 4.0

# The frozen kernels of the few-channel training gradient run at close to a
# streaming pass only on wide rows: `x` is viewed as rows of several consecutive
# pixels, each channel vector repeated once per pixel, up to this many values a row.
_FROZEN_ROW_WIDTH = 4096

# Up to this many channels, the training gradient of batch norm on CPU is faster
# from the frozen kernels on wide rows (measured on 16 to 256 channels).
_FEW_CHANNELS = 128

# --- the switch and the probes ----------------------------------------------------

# The one switch for every fast path; see `set_fast_paths`.
_fast_paths = os.environ.get("KERNORM_FAST_PATHS", "1") != "0"

_has_gpu = None


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
    return _private.in_xla_context()


def _cpu_only():
    global _has_gpu
    if _has_gpu is None:
        _has_gpu = bool(tf.config.list_logical_devices("GPU"))
    return not _has_gpu


# --- the conditions ---------------------------------------------------------------


def _kernel_path(x, under_xla=False):
    """Whether `x` can take the TensorFlow kernel paths: a float16/bfloat16/float32 tensor outside
    XLA, or also under XLA for a kernel that XLA compiles well (`under_xla`)."""
    return (
        _fast_paths and tf.is_tensor(x) and x.dtype in _KERNEL_DTYPES and x.shape.rank is not None and x.shape.rank >= 1
        and (under_xla or not _in_xla_context())
    )


def _kernel_epsilon(epsilon):
    """Whether the fused batch norm kernels take `epsilon` as given: a Python number, and on GPU
    one cuDNN accepts (it rejects or raises anything below 1e-5)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        return False
    return _cpu_only() or epsilon >= 1.001e-5


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


def _channel_norm_path(x, axes, epsilon):
    """Whether training batch norm over `axes` can take the fused kernel: channels last. Under
    XLA too, where it becomes XLA's own batch norm, which fuses its gradient better than the
    gradient of plain ops."""
    rank = x.shape.rank
    return (
        _kernel_path(x, under_xla=True) and _kernel_epsilon(epsilon) and rank >= 2
        and sorted(a % rank for a in axes) == list(range(rank - 1)) and x.shape[-1] is not None
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


def _broadcast_param(param, ndim, axes):
    """Reshapes a weight of shape `[x.shape[a] for a in axes]` to broadcast over a rank-`ndim` x."""
    if param is None:
        return None
    shape = [1] * ndim
    for axis, size in zip(axes, param.shape):
        shape[axis] = size
    return tf.reshape(param, shape)


# --- the public functions and the dispatch -----------------------------------------


def normalize(x, mean, variance, gamma=None, beta=None, epsilon=1e-3):
    """`gamma * (x - mean) * rsqrt(variance + epsilon) + beta`, in the centred form.

    `mean`, `variance`, `gamma` and `beta` must broadcast against `x`. The
    arithmetic runs in `stats_dtype(x.dtype)`; the result has x's dtype.
    """
    vectors = _frozen_path(x, mean, variance, gamma, beta, epsilon)
    if vectors is not None:
        return _frozen_batch_norm(x, *vectors, float(epsilon))
    return reference.normalize(x, mean, variance, gamma, beta, epsilon)


def _standardize(x, axes, epsilon, centered, gamma, beta, xla_autodiff=True):
    """Normalizes `x` over `axes` and applies the affine: `reference.standardize`, with its
    hand-written gradient, or under XLA `_compiled_standardize` unless `xla_autodiff` is False.

    Returns `(outputs, mean, variance)`; mean and variance carry no gradient.
    """
    if xla_autodiff and _fast_paths and _in_xla_context():
        return _compiled_standardize(x, axes, epsilon, centered, gamma, beta, _LARGE_MEAN)
    return reference.standardize(x, axes, epsilon, centered, gamma, beta)


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
            xla = _in_xla_context()
            wide_gradient = None
            if channels <= _FEW_CHANNELS and _cpu_only() and not xla:
                # With few channels, the gradient kernel of training is slow on CPU; the
                # frozen kernels on wide rows of several pixels do the same work sooner.
                pixels = kernels.pixels_per_row(x, channels, _FROZEN_ROW_WIDTH)
                if pixels > 1:
                    wide_gradient = functools.partial(_wide_batch_norm_grad, pixels=pixels)
            limit = _XLA_LARGE_MEAN if xla else _LARGE_MEAN
            outputs, mean, variance = _fused_batch_norm(x, *vectors, float(epsilon), limit, wide_gradient)
            stats_shape = [1] * (x.shape.rank - 1) + [channels]
            mean, variance = tf.reshape(mean, stats_shape), tf.reshape(variance, stats_shape)
            return outputs, mean, variance, reference.batch_count(x, axes, mean.dtype)
    if mask is None and not synchronized:
        outputs, mean, variance = _standardize(x, axes, epsilon, True, gamma, beta)
        return outputs, mean, variance, reference.batch_count(x, axes, mean.dtype)
    statistics = reference.centred_moments(
        tf.cast(x, stats_dtype(x.dtype)), axes, mask=mask, synchronized=synchronized
    )
    outputs = normalize(statistics.deviation, statistics.correction, statistics.variance, gamma, beta, epsilon)
    return tf.cast(outputs, x.dtype), statistics.mean, statistics.variance, statistics.count


def ghost_batch_norm(x, axes, virtual_batch_size, gamma=None, beta=None, epsilon=1e-3, mask=None,
                     synchronized=False):
    """Ghost batch normalization: `batch_norm` of each consecutive sub-batch of `virtual_batch_size` samples.

    Args:
        x: a float tensor whose batch axis 0 is among `axes`.
        axes, gamma, beta, epsilon, mask, synchronized: as for `batch_norm`.
        virtual_batch_size: the samples per sub-batch; it must divide the batch size.

    Returns:
        `(outputs, mean, variance, count)` as `batch_norm` returns them: each
        sub-batch normalized with its own statistics, and the statistics of the
        sub-batches pooled (`reference.pooled_moments`), with kept dims.

    Raises:
        ValueError: if axis 0 is not reduced, or `virtual_batch_size` does not
            divide a batch size known when tracing (in a graph, when the batch
            arrives).
    """
    size = virtual_batch_size
    if 0 not in [a % x.shape.rank for a in axes]:
        raise ValueError(
            "`virtual_batch_size` needs the batch axis 0 among the reduced axes: it cannot be a channel "
            f"axis (`axis`). Received: axes={list(axes)}"
        )
    batch = x.shape[0]
    if batch is not None and batch % size:
        raise ValueError(f"`virtual_batch_size`={size} must divide the batch size; received a batch of {batch}.")
    shape = tf.shape(x)
    divides = tf.debugging.assert_equal(
        shape[0] % size, 0, message=f"`virtual_batch_size`={size} must divide the batch size."
    )
    # In a graph the check must run before the reshape, whose own error says nothing useful.
    with tf.control_dependencies([divides] if divides is not None else []):
        ghost_shape = tf.concat([[-1, size], shape[1:]], axis=0)
    ghosts = tf.reshape(x, ghost_shape)
    if mask is not None:
        mask = tf.reshape(tf.broadcast_to(mask, shape), ghost_shape)

    def expand(weight):
        return None if weight is None else weight[tf.newaxis]

    outputs, mean, variance, count = batch_norm(
        ghosts, [a % x.shape.rank + 1 for a in axes], expand(gamma), expand(beta), epsilon, mask, synchronized
    )
    return (tf.reshape(outputs, shape), *reference.pooled_moments(mean, variance, count))


def renorm_batch_norm(x, axes, gamma, beta, renorm_mean, renorm_stddev, epsilon, clipping, mask=None,
                      synchronized=False):
    """Batch Renormalization: `batch_norm`, then corrected towards the moving statistics.

    The inputs are normalized with the batch statistics (centred, so that a
    large mean keeps its precision), then `(normalized * r + d) * gamma + beta`
    with `renorm_correction`'s `r` and `d`, which carry no gradient.

    Args:
        x, axes, gamma, beta, epsilon, mask, synchronized: as for `batch_norm`.
        renorm_mean, renorm_stddev: the moving statistics renorm corrects
            towards, broadcastable to `x`.
        clipping: a dict with optional "rmin", "rmax" and "dmax".

    Returns:
        `(outputs, mean, variance, count)` as `batch_norm` returns them: the
        statistics are the batch's.
    """
    normalized, mean, variance, count = batch_norm(
        tf.cast(x, stats_dtype(x.dtype)), axes, None, None, epsilon, mask, synchronized
    )
    r, d = renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, clipping)
    return reference.renormalized(normalized, r, d, gamma, beta), mean, variance, count


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
        return _row_norm(x, axes, gamma, beta, epsilon, True, _LARGE_MEAN, _cpu_only())
    gamma = _broadcast_param(gamma, ndim, axes)
    beta = _broadcast_param(beta, ndim, axes)
    return _standardize(x, axes, epsilon, True, gamma, beta)[0]


def rms_norm(x, axes, scale=None, epsilon=1e-6):
    """`x * rsqrt(mean(x**2 over axes) + epsilon) * scale`."""
    if _row_norm_path(x, axes, scale):
        return _row_norm(x, axes, scale, None, epsilon, False, _LARGE_MEAN, _cpu_only())
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
