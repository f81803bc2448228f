"""Float64 NumPy references for the normalization formulas, and their gradients.

Written from the formulas in DESIGN.md, independently of kernorm, so the tests
can compare the layers against them. Gradients are the analytic ones; one test
in `test_ops.py` checks them against central finite differences.
"""

import numpy as np


def relative_error(actual, expected, floor=1e-6):
    """max|actual - expected| / max(max|expected|, floor), in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(expected))), floor)
    return float(np.max(np.abs(actual - expected))) / scale


def assert_close(actual, expected, tolerance, what="value"):
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


def canonical(axis, ndim):
    axes = [axis] if isinstance(axis, int) else list(axis)
    return tuple(sorted(a % ndim for a in axes))


def param_shape(x_shape, axes):
    """The shape of a weight over `axes`, and the shape that broadcasts it against x."""
    shape = tuple(x_shape[a] for a in axes)
    broadcast = [1] * len(x_shape)
    for a in axes:
        broadcast[a] = x_shape[a]
    return shape, tuple(broadcast)


# --- a centred standardization over `reduce_axes`, and its gradient ---------


def standardize(x, reduce_axes, epsilon):
    """Returns (normalized, mean, variance), statistics with kept dims."""
    x = np.asarray(x, np.float64)
    reduce_axes = tuple(reduce_axes)
    mean = x.mean(axis=reduce_axes, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=reduce_axes, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon), mean, variance


def standardize_grad(x, reduce_axes, epsilon, d_normalized):
    """d loss / d x, given d loss / d normalized, for `standardize`."""
    normalized, _, variance = standardize(x, reduce_axes, epsilon)
    d_normalized = np.asarray(d_normalized, np.float64)
    reduce_axes = tuple(reduce_axes)
    mean_d = d_normalized.mean(axis=reduce_axes, keepdims=True)
    mean_dn = (d_normalized * normalized).mean(axis=reduce_axes, keepdims=True)
    return (d_normalized - mean_d - normalized * mean_dn) / np.sqrt(variance + epsilon)


# --- the layers -----------------------------------------------------------


def affine_norm(x, reduce_axes, param_axes, gamma, beta, epsilon, upstream=None):
    """`gamma * standardize(x) + beta` with weights over `param_axes`.

    Returns (outputs, grads) where grads = (d_x, d_gamma, d_beta) for the loss
    `sum(outputs * upstream)` (None without `upstream`).
    """
    x = np.asarray(x, np.float64)
    _, broadcast = param_shape(x.shape, param_axes)
    g = np.ones(broadcast) if gamma is None else np.reshape(np.asarray(gamma, np.float64), broadcast)
    b = np.zeros(broadcast) if beta is None else np.reshape(np.asarray(beta, np.float64), broadcast)
    normalized, _, _ = standardize(x, reduce_axes, epsilon)
    outputs = g * normalized + b
    if upstream is None:
        return outputs, None
    upstream = np.asarray(upstream, np.float64)
    other_axes = tuple(a for a in range(x.ndim) if a not in param_axes)
    d_x = standardize_grad(x, reduce_axes, epsilon, upstream * g)
    d_gamma = (upstream * normalized).sum(axis=other_axes).reshape([x.shape[a] for a in param_axes])
    d_beta = upstream.sum(axis=other_axes).reshape([x.shape[a] for a in param_axes])
    return outputs, (d_x, d_gamma, d_beta)


def batch_norm(x, axis, gamma=None, beta=None, epsilon=1e-3, upstream=None):
    """Training-mode batch norm: statistics over every axis but `axis`.

    Returns (outputs, grads, mean, variance); mean and variance in the weights' shape.
    """
    x = np.asarray(x, np.float64)
    axes = canonical(axis, x.ndim)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in axes)
    outputs, grads = affine_norm(x, reduce_axes, axes, gamma, beta, epsilon, upstream)
    _, mean, variance = standardize(x, reduce_axes, epsilon)
    shape = [x.shape[a] for a in axes]
    return outputs, grads, mean.reshape(shape), variance.reshape(shape)


def batch_norm_inference(x, axis, moving_mean, moving_variance, gamma=None, beta=None, epsilon=1e-3):
    x = np.asarray(x, np.float64)
    _, broadcast = param_shape(x.shape, canonical(axis, x.ndim))
    mean = np.reshape(np.asarray(moving_mean, np.float64), broadcast)
    variance = np.reshape(np.asarray(moving_variance, np.float64), broadcast)
    outputs = (x - mean) / np.sqrt(variance + epsilon)
    if gamma is not None:
        outputs = outputs * np.reshape(np.asarray(gamma, np.float64), broadcast)
    if beta is not None:
        outputs = outputs + np.reshape(np.asarray(beta, np.float64), broadcast)
    return outputs


def layer_norm(x, axis, gamma=None, beta=None, epsilon=1e-3, upstream=None):
    """Per-sample statistics over `axis`; weights over `axis`."""
    x = np.asarray(x, np.float64)
    axes = canonical(axis, x.ndim)
    return affine_norm(x, axes, axes, gamma, beta, epsilon, upstream)


def rms_norm(x, axis, scale=None, epsilon=1e-6, upstream=None):
    """`x / sqrt(mean(x**2 over axis) + eps) * scale`; grads = (d_x, d_scale)."""
    x = np.asarray(x, np.float64)
    axes = canonical(axis, x.ndim)
    _, broadcast = param_shape(x.shape, axes)
    s = np.ones(broadcast) if scale is None else np.reshape(np.asarray(scale, np.float64), broadcast)
    rstd = 1.0 / np.sqrt((x**2).mean(axis=axes, keepdims=True) + epsilon)
    outputs = x * rstd * s
    if upstream is None:
        return outputs, None
    upstream = np.asarray(upstream, np.float64)
    d_z = upstream * s
    d_x = rstd * d_z - x * rstd**3 * (d_z * x).mean(axis=axes, keepdims=True)
    other_axes = tuple(a for a in range(x.ndim) if a not in axes)
    d_scale = (upstream * x * rstd).sum(axis=other_axes).reshape([x.shape[a] for a in axes])
    return outputs, (d_x, d_scale)


def group_norm(x, groups, axis=-1, gamma=None, beta=None, epsilon=1e-3, upstream=None):
    """Per-sample statistics over each group of `groups` consecutive channels and every non-batch axis."""
    x = np.asarray(x, np.float64)
    ndim = x.ndim
    axis = axis % ndim
    channels = x.shape[axis]
    groups = channels if groups == -1 else groups
    # Channels last, then split: (batch, ..., groups, channels // groups).
    moved = np.moveaxis(x, axis, -1)
    grouped = moved.reshape(moved.shape[:-1] + (groups, channels // groups))
    reduce_axes = tuple(range(1, ndim - 1)) + (ndim,)

    def ungroup(values):
        return np.moveaxis(values.reshape(moved.shape), -1, axis)

    normalized, _, _ = standardize(grouped, reduce_axes, epsilon)
    normalized = ungroup(normalized)
    _, broadcast = param_shape(x.shape, (axis,))
    g = np.ones(broadcast) if gamma is None else np.reshape(np.asarray(gamma, np.float64), broadcast)
    b = np.zeros(broadcast) if beta is None else np.reshape(np.asarray(beta, np.float64), broadcast)
    outputs = g * normalized + b
    if upstream is None:
        return outputs, None
    upstream = np.asarray(upstream, np.float64)
    d_normalized = np.moveaxis(upstream * g, axis, -1).reshape(grouped.shape)
    d_x = ungroup(standardize_grad(grouped, reduce_axes, epsilon, d_normalized))
    other_axes = tuple(a for a in range(ndim) if a != axis)
    d_gamma = (upstream * normalized).sum(axis=other_axes)
    d_beta = upstream.sum(axis=other_axes)
    return outputs, (d_x, d_gamma, d_beta)


def moving_average(moving, value, momentum):
    """The Keras convention: `moving * momentum + value * (1 - momentum)`."""
    return np.asarray(moving, np.float64) * momentum + np.asarray(value, np.float64) * (1.0 - momentum)


def finite_difference_grad(function, x, upstream, step=1e-6):
    """Central differences of `sum(function(x) * upstream)` with respect to x (float64)."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + step
        plus = np.sum(function(x) * upstream)
        flat[i] = saved - step
        minus = np.sum(function(x) * upstream)
        flat[i] = saved
        grad.reshape(-1)[i] = (plus - minus) / (2 * step)
    return grad


def masked_batch_norm(x, axis, mask, gamma=None, beta=None, epsilon=1e-3, upstream=None):
    """Batch norm whose statistics count only the positions where `mask` (broadcast to x) is true.

    Every position, masked or not, is normalized with those statistics.
    Returns (outputs, d_x, mean, variance, count); d_x is None without `upstream`.
    """
    x = np.asarray(x, np.float64)
    axes = canonical(axis, x.ndim)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in axes)
    _, broadcast = param_shape(x.shape, axes)
    weight = np.broadcast_to(np.asarray(mask, bool), x.shape).astype(np.float64)
    count = weight.sum(axis=reduce_axes, keepdims=True)
    mean = (x * weight).sum(axis=reduce_axes, keepdims=True) / count
    variance = (((x - mean) ** 2) * weight).sum(axis=reduce_axes, keepdims=True) / count
    rstd = 1.0 / np.sqrt(variance + epsilon)
    normalized = (x - mean) * rstd
    g = np.ones(broadcast) if gamma is None else np.reshape(np.asarray(gamma, np.float64), broadcast)
    b = np.zeros(broadcast) if beta is None else np.reshape(np.asarray(beta, np.float64), broadcast)
    outputs = g * normalized + b
    shape = [x.shape[a] for a in axes]
    d_x = None
    if upstream is not None:
        # Every output depends on the statistics; only unmasked inputs feed them.
        d_normalized = np.asarray(upstream, np.float64) * g
        sum_d = d_normalized.sum(axis=reduce_axes, keepdims=True)
        sum_dn = (d_normalized * normalized).sum(axis=reduce_axes, keepdims=True)
        d_x = rstd * (d_normalized - weight / count * (sum_d + normalized * sum_dn))
    return outputs, d_x, mean.reshape(shape), variance.reshape(shape), count.reshape(shape)


def built_with_random_affine(layer, shape, rng):
    """`layer` built for `shape`, with random gamma in [0.5, 1.5] and random beta, so that
    the references see non-trivial weights."""
    layer.build(shape)
    if layer.gamma is not None:
        layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32"))
    if layer.beta is not None:
        layer.beta.assign(rng.normal(size=layer.beta.shape).astype("float32"))
    return layer
