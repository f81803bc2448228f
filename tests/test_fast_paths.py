"""The fast paths of kernorm.ops give the numbers of the float64 reference formulas.

Each path (see the top of kernorm/ops.py) is checked where it runs: the
TensorFlow kernel paths eagerly and in a `tf.function`, the compiled path under
`jit_compile`. Outputs and gradients, float32 and half precision, and the
large-mean / small-spread float32 inputs that a rounded float32 mean spoils.
"""

import collections
import importlib.util
import math
import pathlib

import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
import tolerances
from kernorm import ops
from modes import MODES, compiled

TOLERANCE = tolerances.BY_DTYPE
LARGE_MEAN_TOLERANCE = tolerances.LARGE_MEAN
DTYPES = (tf.float32, tf.float16, tf.bfloat16)
EPSILON = 1e-3


def _f64(value):
    return np.asarray(tf.cast(value, tf.float64))


def _inputs(rng, shape, dtype, loc=1.0, scale=2.0):
    """x rounded to `dtype`, and a float32 upstream gradient."""
    x = tf.cast(rng.normal(loc, scale, shape), dtype)
    upstream = tf.cast(rng.normal(size=shape), dtype)
    return x, upstream


def _gradients(function, inputs, upstream):
    """`function(*inputs)` and the gradients of `sum(outputs * upstream)` for every input."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = function(*inputs)
    return outputs, tape.gradient(outputs, inputs, output_gradients=upstream)


def _op_types(function, *args):
    """The op types of the graph `function` traces to, with its gradient functions."""
    graph = function.get_concrete_function(*args).graph
    types = {op.type for op in graph.get_operations()}
    for definition in graph.as_graph_def().library.function:
        types.update(node.op for node in definition.node_def)
    return types


# --- layer norm and RMS norm over trailing axes --------------------------------

ROW_CASES = [
    # (shape, axes): the axes are the trailing ones, where the row kernels run.
    ((4, 6, 16), [2]),
    ((3, 5, 4, 6), [2, 3]),
    ((7, 12), [-1]),
]


def _row_function(norm, axes):
    if norm == "layer":
        return lambda x, gamma, beta: ops.layer_norm(x, axes, gamma, beta, EPSILON)
    return lambda x, scale: ops.rms_norm(x, axes, scale, 1e-6)


def _row_reference(norm, x, axes, weights, upstream):
    if norm == "layer":
        outputs, grads = ref.layer_norm(x, axes, weights[0], weights[1], EPSILON, upstream)
        return outputs, grads
    return ref.rms_norm(x, axes, weights[0], 1e-6, upstream)


def _row_weights(rng, x, axes, norm):
    shape = [x.shape[a] for a in axes]
    count = 2 if norm == "layer" else 1
    return [tf.constant(rng.uniform(0.5, 1.5, shape).astype("float32")) for _ in range(count)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, axes", ROW_CASES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_row_norms_match_reference(norm, shape, axes, dtype, mode, rng):
    x, upstream = _inputs(rng, shape, dtype)
    weights = _row_weights(rng, x, axes, norm)
    step = compiled(lambda *inputs: _gradients(_row_function(norm, axes), list(inputs), upstream), mode)
    outputs, grads = step(x, *weights)
    assert outputs.dtype == dtype and grads[0].dtype == dtype
    expected, expected_grads = _row_reference(norm, _f64(x), axes, [_f64(w) for w in weights], _f64(upstream))
    tolerance = TOLERANCE[dtype]
    ref.assert_close(_f64(outputs), expected, tolerance, "outputs")
    for name, grad, expected_grad in zip(["d_x", "d_gamma", "d_beta"], grads, expected_grads):
        ref.assert_close(_f64(grad), expected_grad, tolerance, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_row_norms_without_weights(norm, mode, rng):
    x, upstream = _inputs(rng, (5, 9), tf.float32)
    function = lambda x: (ops.layer_norm(x, [1], epsilon=EPSILON) if norm == "layer"  # noqa: E731
                          else ops.rms_norm(x, [1], epsilon=1e-6))
    outputs, grads = compiled(lambda x: _gradients(function, [x], upstream), mode)(x)
    expected, expected_grads = _row_reference(norm, _f64(x), [1], [None, None], _f64(upstream))
    ref.assert_close(_f64(outputs), expected, tolerances.FLOAT32, "outputs")
    ref.assert_close(_f64(grads[0]), expected_grads[0], tolerances.FLOAT32, "d_x")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axes", [[1], [1, 2]])
def test_layer_norm_keeps_a_large_mean_spread(axes, mode, rng):
    """Mean 1e4 and std 1e-2 in float32: the float32 mean alone is off by a tenth of the spread."""
    x = tf.constant(rng.normal(1e4, 1e-2, (6, 8, 32)).astype("float32"))
    upstream = tf.constant(rng.normal(size=x.shape).astype("float32"))
    weights = _row_weights(rng, x, axes, "layer")
    step = compiled(lambda *inputs: _gradients(_row_function("layer", axes), list(inputs), upstream), mode)
    outputs, grads = step(x, *weights)
    expected, expected_grads = _row_reference("layer", _f64(x), axes, [_f64(w) for w in weights], _f64(upstream))
    ref.assert_close(_f64(outputs), expected, LARGE_MEAN_TOLERANCE, "outputs")
    ref.assert_close(_f64(grads[0]), expected_grads[0], LARGE_MEAN_TOLERANCE, "d_x")
    ref.assert_close(_f64(grads[1]), expected_grads[1], LARGE_MEAN_TOLERANCE, "d_gamma")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loc", [0.0, 10.0, 40.0, -300.0])
def test_layer_norm_on_either_side_of_the_large_mean_threshold(loc, mode, rng):
    """|mean| / std below and above the threshold where the compiled path adds a correction."""
    x = tf.constant(rng.normal(loc, 1.0, (16, 64)).astype("float32"))
    upstream = tf.constant(rng.normal(size=x.shape).astype("float32"))
    outputs, grads = compiled(lambda x: _gradients(lambda x: ops.layer_norm(x, [1]), [x], upstream), mode)(x)
    expected, expected_grads = ref.layer_norm(_f64(x), [1], None, None, EPSILON, _f64(upstream))
    ref.assert_close(_f64(outputs), expected, tolerances.FLOAT32, "outputs")
    ref.assert_close(_f64(grads[0]), expected_grads[0], tolerances.FLOAT32, "d_x")


def test_layer_norm_row_of_one_outlier(rng):
    """A first value far from the rest (the shift of the row kernels) keeps float32 precision."""
    x = rng.normal(0.0, 1.0, (4, 256)).astype("float32")
    x[:, 0] = 1000.0
    outputs = tf.function(lambda x: ops.layer_norm(x, [1]))(tf.constant(x))
    expected, _ = ref.layer_norm(x.astype(np.float64), [1], None, None, EPSILON)
    ref.assert_close(_f64(outputs), expected, tolerances.FLOAT32, "outputs")


# --- batch norm in training, channels last ---------------------------------------

BATCH_SHAPES = [(4, 5, 6, 8), (2, 8, 8, 3), (32, 8), (3, 7, 5)]


def _batch_function(axes):
    def function(x, gamma, beta):
        outputs, mean, variance, count = ops.batch_norm(x, axes, gamma, beta, EPSILON)
        return outputs, mean, variance, count

    return function


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_batch_norm_matches_reference(shape, dtype, mode, rng):
    x, upstream = _inputs(rng, shape, dtype)
    axes = list(range(len(shape) - 1))
    channels = shape[-1]
    broadcast = [1] * (len(shape) - 1) + [channels]
    gamma = tf.constant(rng.uniform(0.5, 1.5, broadcast).astype("float32"))
    beta = tf.constant(rng.normal(size=broadcast).astype("float32"))

    def step(x, gamma, beta):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            outputs, mean, variance, count = _batch_function(axes)(x, gamma, beta)
        grads = tape.gradient(outputs, [x, gamma, beta], output_gradients=upstream)
        return outputs, mean, variance, count, grads

    outputs, mean, variance, count, grads = compiled(step, mode)(x, gamma, beta)
    assert outputs.dtype == dtype and grads[0].dtype == dtype
    assert mean.shape == broadcast and variance.shape == broadcast
    expected, expected_grads, expected_mean, expected_variance = ref.batch_norm(
        _f64(x), -1, _f64(gamma).reshape(-1), _f64(beta).reshape(-1), EPSILON, _f64(upstream)
    )
    tolerance = TOLERANCE[dtype]
    ref.assert_close(_f64(outputs), expected, tolerance, "outputs")
    ref.assert_close(_f64(mean).reshape(-1), expected_mean, tolerances.FLOAT32, "mean")
    ref.assert_close(_f64(variance).reshape(-1), expected_variance, tolerances.FLOAT32, "variance")
    assert float(count) == np.prod(shape[:-1])
    for name, grad, expected_grad in zip(["d_x", "d_gamma", "d_beta"], grads, expected_grads):
        ref.assert_close(_f64(grad).reshape(expected_grad.shape), expected_grad, tolerance, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "loc, scale", [(1e4, 1e-2), (100.0, 1.0), (10.0, 1.0), (-5e3, 3.0)], ids=["1e4", "100", "10", "-5e3"]
)
def test_batch_norm_keeps_a_large_mean_spread(loc, scale, mode, rng):
    """The fused kernel centres with a float32 mean; large means rerun on shifted inputs."""
    x = tf.constant(rng.normal(loc, scale, (16, 4, 4, 6)).astype("float32"))
    upstream = tf.constant(rng.normal(size=x.shape).astype("float32"))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs, mean, variance, _ = ops.batch_norm(x, [0, 1, 2], epsilon=EPSILON)
        return outputs, mean, variance, tape.gradient(outputs, x, output_gradients=upstream)

    outputs, mean, variance, d_x = compiled(step, mode)(x)
    expected, (expected_d_x, _, _), expected_mean, expected_variance = ref.batch_norm(
        _f64(x), -1, None, None, EPSILON, _f64(upstream)
    )
    tolerance = LARGE_MEAN_TOLERANCE if scale < 1 else tolerances.FLOAT32
    ref.assert_close(_f64(outputs), expected, tolerance, "outputs")
    ref.assert_close(_f64(d_x), expected_d_x, tolerance, "d_x")
    ref.assert_close(_f64(variance).reshape(-1), expected_variance, tolerance, "variance")
    np.testing.assert_allclose(_f64(mean).reshape(-1), expected_mean, rtol=1e-6)


def test_batch_norm_of_an_empty_batch(rng):
    """No values: empty outputs and a zero count, whatever the kernel writes as statistics."""
    function = tf.function(lambda x: ops.batch_norm(x, [0], epsilon=EPSILON))
    outputs, _, _, count = function(tf.zeros((0, 4)))
    assert outputs.shape == (0, 4) and float(count) == 0.0
    moving = tf.constant([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(ops.moving_average(moving, tf.fill([4], np.nan), 0.9, count), moving)


# --- inference: normalize with per-channel statistics ------------------------------


def _frozen_reference(x, mean, variance, gamma, beta, upstream):
    rstd = 1.0 / np.sqrt(variance + EPSILON)
    normalized = (x - mean) * rstd
    outputs = normalized * gamma + beta
    axes = tuple(range(x.ndim - 1))
    grads = (
        upstream * gamma * rstd,
        -(upstream * gamma * rstd).sum(axes),
        (-0.5 * upstream * gamma * normalized * rstd ** 2).sum(axes),
        (upstream * normalized).sum(axes),
        upstream.sum(axes),
    )
    return outputs, grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("stats_rank", [1, 3], ids=["vector", "kept-dims"])
@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (3, 5, 7)], ids=["nhwc-kernel", "rank-3-plain"])
def test_normalize_with_channel_statistics(shape, stats_rank, dtype, mode, rng):
    """BN inference folded into one multiply-add; its gradient reaches the statistics too
    (masked training normalizes with batch statistics through the same function)."""
    x, upstream = _inputs(rng, shape, dtype)
    stats_shape = [1] * (stats_rank - 1) + [shape[-1]]
    mean = tf.constant(rng.normal(size=stats_shape).astype("float32"))
    variance = tf.constant(rng.uniform(0.5, 2.0, stats_shape).astype("float32"))
    gamma = tf.constant(rng.uniform(0.5, 1.5, stats_shape).astype("float32"))
    beta = tf.constant(rng.normal(size=stats_shape).astype("float32"))

    def step(*inputs):
        return _gradients(lambda *a: ops.normalize(*a, epsilon=EPSILON), list(inputs), upstream)

    outputs, grads = compiled(step, mode)(x, mean, variance, gamma, beta)
    assert outputs.dtype == dtype and grads[0].dtype == dtype
    flat = [_f64(v).reshape(-1) for v in (mean, variance, gamma, beta)]
    expected, expected_grads = _frozen_reference(_f64(x), *flat, _f64(upstream))
    tolerance = TOLERANCE[dtype]
    ref.assert_close(_f64(outputs), expected, tolerance, "outputs")
    names = ["d_x", "d_mean", "d_variance", "d_gamma", "d_beta"]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        ref.assert_close(_f64(grad).reshape(expected_grad.shape), expected_grad, tolerance, name)


def test_normalize_with_a_batch_size_known_at_run_time_only(rng):
    channels = 3
    stats = [tf.constant(rng.uniform(0.5, 1.5, channels).astype("float32")) for _ in range(4)]
    run = tf.function(
        lambda x: ops.normalize(x, *stats, epsilon=EPSILON),
        input_signature=[tf.TensorSpec([None, 2, 8, channels], tf.float32)],
    )
    for batch in (1, 3):
        x = rng.normal(size=(batch, 2, 8, channels)).astype("float32")
        expected, _ = _frozen_reference(x.astype(np.float64), *[_f64(v) for v in stats], np.ones_like(x))
        ref.assert_close(_f64(run(x)), expected, tolerances.FLOAT32, f"outputs, batch {batch}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(256, 8), (4, 8, 8, 8)], ids=["plain", "nhwc-kernel"])
def test_normalize_keeps_a_large_mean_spread(shape, mode, rng):
    x = rng.normal(1e4, 1e-2, shape).astype("float32")
    axes = tuple(range(len(shape) - 1))
    mean = x.astype(np.float64).mean(axes).astype("float32")
    variance = x.astype(np.float64).var(axes).astype("float32")
    outputs = compiled(lambda x, m, v: ops.normalize(x, m, v, epsilon=1e-6), mode)(x, mean, variance)
    # The reference uses the float32 statistics the layer would hold.
    expected = (x.astype(np.float64) - mean) / np.sqrt(variance.astype(np.float64) + 1e-6)
    ref.assert_close(_f64(outputs), expected, LARGE_MEAN_TOLERANCE, "outputs")


# --- which path runs ----------------------------------------------------------------
#
# A graph holds both branches of every `tf.cond`, so its op types cannot tell which path
# ran. These tests count calls instead: ops' private path functions are wrapped by
# counters (and still run), and so are the fused kernels, whose calls in eager mode are
# the kernels that executed. Under `tf.function` and XLA a call of a path function is a
# trace: the path the graph was built from.

PATHS = ("_row_norm", "_fused_batch_norm", "_wide_batch_norm_grad", "_frozen_batch_norm", "_standardize",
         "_compiled_standardize")
FAST_PATHS = ("_row_norm", "_fused_batch_norm", "_wide_batch_norm_grad", "_frozen_batch_norm", "_compiled_standardize")
TRAINING_KERNEL, FROZEN_KERNEL = ("FusedBatchNormV3", True), ("FusedBatchNormV3", False)
TRAINING_GRADIENT, FROZEN_GRADIENT = ("FusedBatchNormGradV3", True), ("FusedBatchNormGradV3", False)


@pytest.fixture
def calls(monkeypatch):
    """A Counter of the calls of ops' path functions (by name) and of the fused kernels
    (by `(kernel, is_training)`), which all still run."""
    counts = collections.Counter()

    def counting(function, key):
        def wrapper(*args, **kwargs):
            counts[key(kwargs)] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in PATHS:
        monkeypatch.setattr(ops, name, counting(getattr(ops, name), lambda kwargs, name=name: name))
    for name in ("FusedBatchNormV3", "FusedBatchNormGradV3"):
        key = lambda kwargs, name=name: (name, bool(kwargs["is_training"]))  # noqa: E731
        monkeypatch.setattr(tf.raw_ops, name, counting(getattr(tf.raw_ops, name), key))
    return counts


@pytest.fixture
def cpu(monkeypatch):
    """ops sees no GPU, as on CI, whatever the machine has."""
    monkeypatch.setattr(ops, "_has_gpu", False)


@pytest.fixture
def gpu(monkeypatch):
    """ops believes a GPU is present, so that its branches for GPUs run here, on the CPU."""
    monkeypatch.setattr(ops, "_has_gpu", True)


def _ran(function, mode, *inputs):
    """`((outputs, gradients of every input), upstream)`: `function(*inputs)` in `mode` and its
    gradients for a random upstream gradient."""
    upstream = tf.cast(np.random.default_rng(0).normal(size=tuple(inputs[0].shape)), inputs[0].dtype)

    def step(*inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = function(*inputs)
        return outputs, tape.gradient(outputs, list(inputs), output_gradients=tf.cast(upstream, outputs.dtype))

    return compiled(step, mode)(*inputs), upstream


def _layer_norm_last(x, gamma, beta):
    return ops.layer_norm(x, [x.shape.rank - 1], gamma, beta, EPSILON)


def _rms_norm_last(x, scale):
    return ops.rms_norm(x, [x.shape.rank - 1], scale, 1e-6)


ROW_NORMS = {"layer": (_layer_norm_last, 2), "rms": (_rms_norm_last, 1)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("norm", list(ROW_NORMS))
def test_row_norms_run_the_row_kernels_outside_xla(norm, dtype, mode, calls, cpu, rng):
    function, count = ROW_NORMS[norm]
    x = tf.cast(rng.normal(size=(4, 3, 16)), dtype)
    _ran(function, mode, x, *[tf.ones([16])] * count)
    if mode == "xla":
        assert calls["_row_norm"] == 0 and calls["_compiled_standardize"] == 1, calls
    else:
        assert calls["_row_norm"] == 1 and calls["_standardize"] == 0, calls
    if mode == "eager":
        # The weight gradients come from one frozen gradient kernel on the CPU.
        assert calls[FROZEN_GRADIENT] == 1 and calls[TRAINING_KERNEL] == 0, calls


GENERIC_ROW_CASES = {
    "layer-not-trailing-axes": (lambda x: ops.layer_norm(x, [1]), tf.float32),
    "rms-not-trailing-axes": (lambda x: ops.rms_norm(x, [1]), tf.float32),
    "layer-float64": (lambda x: ops.layer_norm(x, [2]), tf.float64),
    "rms-float64": (lambda x: ops.rms_norm(x, [2]), tf.float64),
    "group": (lambda x: ops.group_norm(x, 1, 2), tf.float32),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(GENERIC_ROW_CASES))
def test_per_sample_norms_take_the_generic_code_elsewhere(case, mode, calls, rng):
    function, dtype = GENERIC_ROW_CASES[case]
    _ran(function, mode, tf.cast(rng.normal(size=(2, 4, 3)), dtype))
    assert calls["_row_norm"] == 0 and calls["_standardize"] == 1, calls
    # Group norm keeps its hand-written gradient under XLA too.
    assert calls["_compiled_standardize"] == (mode == "xla" and case != "group"), calls
    assert calls[TRAINING_KERNEL] == calls[FROZEN_KERNEL] == calls[FROZEN_GRADIENT] == 0, calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, wide", [((4, 4, 4, 8), True), ((6, 5), False)], ids=["nhwc", "rank-2"])
def test_training_batch_norm_runs_the_fused_kernel_with_the_channels_last(shape, wide, dtype, mode, calls, cpu, rng):
    axes = list(range(len(shape) - 1))
    _ran(lambda x: ops.batch_norm(x, axes, epsilon=EPSILON)[0], mode, tf.cast(rng.normal(size=shape), dtype))
    assert calls["_fused_batch_norm"] == 1 and calls["_standardize"] == 0, calls
    if mode == "eager":
        # One training kernel (the mean is small: no rerun). The gradient of few channels takes
        # rows of several pixels, where a sample has them (16 here); a vector has one.
        assert calls[TRAINING_KERNEL] == 1 and calls["_wide_batch_norm_grad"] == wide, calls
        assert calls[TRAINING_GRADIENT] == (not wide), calls


GENERIC_BATCH_CASES = {
    # case: (function of x, whether the custom-gradient standardization runs)
    "channels-first": (lambda x: ops.batch_norm(x, [0, 2])[0], True),
    "float64": (lambda x: ops.batch_norm(tf.cast(x, tf.float64), [0, 1])[0], True),
    "masked": (lambda x: ops.batch_norm(x, [0, 1], mask=tf.ones(x.shape[:2] + [1]))[0], False),
    "synchronized": (lambda x: ops.batch_norm(x, [0, 1], synchronized=True)[0], False),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(GENERIC_BATCH_CASES))
def test_training_batch_norm_takes_the_generic_code_elsewhere(case, mode, calls, rng):
    function, standardizes = GENERIC_BATCH_CASES[case]
    x = tf.constant(rng.normal(size=(4, 5, 3)).astype("float32"))
    (outputs, _), _ = _ran(function, mode, x)
    assert calls["_fused_batch_norm"] == 0 and calls[TRAINING_KERNEL] == 0, calls
    assert calls["_standardize"] == standardizes, calls
    axis = 1 if case == "channels-first" else -1
    ref.assert_close(_f64(outputs), ref.batch_norm(_f64(x), axis, epsilon=EPSILON)[0], tolerances.FLOAT32)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("channels", [8, 256])
def test_the_few_channel_training_gradient_takes_the_wide_rows_on_cpu_outside_xla(channels, mode, calls, cpu, rng):
    x = tf.constant(rng.normal(size=(4, 4, 4, channels)).astype("float32"))
    (_, (d_x,)), upstream = _ran(lambda x: ops.batch_norm(x, [0, 1, 2], epsilon=EPSILON)[0], mode, x)
    wide = channels <= ops._FEW_CHANNELS and mode == "eager"
    assert calls["_wide_batch_norm_grad"] == wide, calls
    if mode == "eager":
        assert calls[TRAINING_GRADIENT] == (not wide), calls
    _, (expected_d_x, _, _), _, _ = ref.batch_norm(_f64(x), -1, None, None, EPSILON, _f64(upstream))
    ref.assert_close(_f64(d_x), expected_d_x, tolerances.FLOAT32, "d_x")


@pytest.mark.parametrize("loc, scale, reruns", [(1.0, 2.0, False), (1e4, 1e-2, True), (-300.0, 1.0, True)])
def test_a_large_mean_batch_reruns_the_fused_kernel_on_shifted_inputs(loc, scale, reruns, calls, cpu, rng):
    x = tf.constant(rng.normal(loc, scale, (16, 4, 4, 6)).astype("float32"))
    _ran(lambda x: ops.batch_norm(x, [0, 1, 2], epsilon=EPSILON)[0], "eager", x)
    assert calls[TRAINING_KERNEL] == 1 + reruns, calls


LARGE_MEAN_FUNCTIONS = {
    "layer": (
        lambda x: ops.layer_norm(x, [1], epsilon=EPSILON),
        lambda x, u: ref.layer_norm(x, [1], None, None, EPSILON, u),
    ),
    "batch": (
        lambda x: ops.batch_norm(x, [0], epsilon=EPSILON)[0],
        lambda x, u: ref.batch_norm(x, -1, None, None, EPSILON, u)[:2],
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", list(LARGE_MEAN_FUNCTIONS))
def test_the_large_mean_correction_runs_where_the_mean_calls_for_it(norm, mode, monkeypatch, rng):
    """A large mean against the spread: within tolerance with the correction (layer norm's
    second reduction, batch norm's rerun on shifted inputs, forward and backward), and far off
    when the thresholds are raised so that it never runs. Mean 0: the same bits either way.

    Under XLA, batch norm becomes XLA's own, whose `mean(x**2) - mean(x)**2` loses mean 1e3 and
    std 1 (measured 0.2 to 0.3 uncorrected) more surely than mean 1e4 and std 1e-2."""
    function, reference = LARGE_MEAN_FUNCTIONS[norm]
    loc, scale = (1e3, 1.0) if (norm, mode) == ("batch", "xla") else (1e4, 1e-2)
    large = tf.constant(rng.normal(loc, scale, (32, 64)).astype("float32"))
    small = tf.constant(rng.normal(0.0, 1.0, (32, 64)).astype("float32"))

    def errors(x):
        (outputs, (d_x,)), upstream = _ran(function, mode, x)
        expected, expected_grads = reference(_f64(x), _f64(upstream))
        return [ref.relative_error(_f64(outputs), expected), ref.relative_error(_f64(d_x), expected_grads[0])]

    assert max(errors(large)) <= tolerances.LARGE_MEAN
    unchanged = _ran(function, mode, small)[0]
    monkeypatch.setattr(ops, "_LARGE_MEAN", math.inf)
    monkeypatch.setattr(ops, "_XLA_LARGE_MEAN", math.inf)
    assert max(errors(large)) > 100 * tolerances.LARGE_MEAN
    np.testing.assert_array_equal(_ran(function, mode, small)[0][0], unchanged[0])


@pytest.mark.parametrize("mode", MODES)
def test_inference_batch_norm_runs_the_frozen_kernel_on_nhwc_outside_xla(mode, calls, rng):
    x = tf.constant(rng.normal(size=(2, 3, 4, 8)).astype("float32"))
    mean, variance = tf.constant(rng.normal(size=8).astype("float32")), tf.ones([8])
    _ran(lambda x, m, v: ops.normalize(x, m, v, epsilon=EPSILON), mode, x, mean, variance)
    assert calls["_frozen_batch_norm"] == (mode != "xla"), calls
    if mode == "eager":
        assert calls[FROZEN_KERNEL] == calls[FROZEN_GRADIENT] == 1, calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape, stats_shape, dtype",
    [((2, 4, 3), [3], tf.float32), ((2, 4, 3, 5), [1, 4, 1, 1], tf.float32), ((2, 4, 3, 5), [5], tf.float64)],
    ids=["rank-3", "statistics-on-axis-1", "float64"],
)
def test_inference_batch_norm_takes_the_plain_multiply_add_elsewhere(shape, stats_shape, dtype, mode, calls, rng):
    x = tf.cast(rng.normal(size=shape), dtype)
    mean, variance = tf.cast(rng.normal(size=stats_shape), dtype), tf.ones(stats_shape, dtype)
    (outputs, _), _ = _ran(lambda x: ops.normalize(x, mean, variance, epsilon=EPSILON), mode, x)
    assert calls["_frozen_batch_norm"] == 0 and calls[FROZEN_KERNEL] == 0, calls
    expected = (_f64(x) - _f64(mean)) / np.sqrt(_f64(variance) + EPSILON)
    ref.assert_close(_f64(outputs), expected, tolerances.for_dtype(dtype))


SWITCHED_OFF = {
    # name: (function, inputs from rng, float64 reference of the outputs)
    "layer": (
        _layer_norm_last, lambda rng: [rng.normal(size=(4, 16)), rng.uniform(0.5, 1.5, 16), rng.normal(size=16)],
        lambda x, g, b: ref.layer_norm(x, -1, g, b, EPSILON)[0],
    ),
    "rms": (_rms_norm_last, lambda rng: [rng.normal(size=(4, 16)), rng.uniform(0.5, 1.5, 16)],
            lambda x, s: ref.rms_norm(x, -1, s, 1e-6)[0]),
    "batch": (lambda x: ops.batch_norm(x, [0, 1, 2], epsilon=EPSILON)[0], lambda rng: [rng.normal(3.0, 2.0, (4, 3, 3, 8))],
              lambda x: ref.batch_norm(x, -1, epsilon=EPSILON)[0]),
    "normalize": (
        lambda x, m, v: ops.normalize(x, m, v, epsilon=EPSILON),
        lambda rng: [rng.normal(size=(2, 3, 4, 8)), rng.normal(size=8), rng.uniform(0.5, 2.0, 8)],
        lambda x, m, v: (x - m) / np.sqrt(v + EPSILON),
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SWITCHED_OFF))
def test_with_the_fast_paths_off_only_the_generic_code_runs(name, mode, calls, monkeypatch, rng):
    function, make_inputs, reference = SWITCHED_OFF[name]
    inputs = [tf.constant(np.asarray(v, "float32")) for v in make_inputs(rng)]
    monkeypatch.setattr(ops, "_fast_paths", ops.fast_paths_enabled())  # restored after the test
    assert ops.set_fast_paths(False) is True and not ops.fast_paths_enabled()
    (outputs, _), _ = _ran(function, mode, *inputs)
    assert not any(calls[path] for path in FAST_PATHS), calls
    assert not any(calls[kernel] for kernel in (TRAINING_KERNEL, FROZEN_KERNEL, TRAINING_GRADIENT, FROZEN_GRADIENT))
    ref.assert_close(_f64(outputs), reference(*[_f64(v) for v in inputs]), tolerances.FLOAT32)


def test_kernorm_fast_paths_0_starts_with_the_fast_paths_off(monkeypatch):
    """The environment variable is read when ops is imported: a fresh copy of the module sees it."""
    spec = importlib.util.spec_from_file_location("kernorm_ops_copy", ops.__file__)
    for value, enabled in [("0", False), ("1", True)]:
        monkeypatch.setenv("KERNORM_FAST_PATHS", value)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.fast_paths_enabled() is enabled


# --- the branches for GPUs, run on the CPU ------------------------------------------


def test_the_device_check_sees_the_machine(monkeypatch):
    monkeypatch.setattr(ops, "_has_gpu", None)
    assert ops._cpu_only() == (not tf.config.list_logical_devices("GPU"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("epsilon, fused", [(1e-3, True), (1e-5, False), (1e-6, False)])
def test_on_gpu_the_fused_kernels_take_only_an_epsilon_cudnn_accepts(epsilon, fused, mode, calls, gpu, rng):
    """cuDNN rejects an epsilon below 1e-5: such batches take the generic code, with the same numbers.
    On a GPU the few-channel gradient is the training kernel's own."""
    x = tf.constant(rng.normal(2.0, 3.0, (4, 3, 3, 8)).astype("float32"))
    gamma = tf.constant(rng.uniform(0.5, 1.5, (1, 1, 1, 8)).astype("float32"))
    beta = tf.constant(rng.normal(size=(1, 1, 1, 8)).astype("float32"))
    (outputs, grads), upstream = _ran(
        lambda x, g, b: ops.batch_norm(x, [0, 1, 2], g, b, epsilon=epsilon)[0], mode, x, gamma, beta
    )
    assert calls["_fused_batch_norm"] == fused and calls["_standardize"] == (not fused), calls
    assert calls["_wide_batch_norm_grad"] == 0, calls
    if mode == "eager":
        assert calls[TRAINING_GRADIENT] == fused, calls
    expected, expected_grads, _, _ = ref.batch_norm(
        _f64(x), -1, _f64(gamma).reshape(-1), _f64(beta).reshape(-1), epsilon, _f64(upstream)
    )
    ref.assert_close(_f64(outputs), expected, tolerances.FLOAT32, "outputs")
    for name, grad, expected_grad in zip(["d_x", "d_gamma", "d_beta"], grads, expected_grads):
        ref.assert_close(_f64(grad).reshape(expected_grad.shape), expected_grad, tolerances.FLOAT32, name)

    (frozen, _), _ = _ran(lambda x: ops.normalize(x, gamma, beta ** 2 + 0.5, epsilon=epsilon), mode, x)
    assert calls["_frozen_batch_norm"] == (fused and mode != "xla"), calls
    moving_mean, moving_variance = _f64(gamma).reshape(-1), _f64(beta).reshape(-1) ** 2 + 0.5
    ref.assert_close(_f64(frozen), (_f64(x) - moving_mean) / np.sqrt(moving_variance + epsilon), tolerances.FLOAT32)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("norm", list(ROW_NORMS))
def test_on_gpu_the_row_norm_weight_gradients_are_plain_sums(norm, mode, calls, gpu, rng):
    function, count = ROW_NORMS[norm]
    x = tf.constant(rng.normal(1.0, 2.0, (4, 3, 16)).astype("float32"))
    weights = [tf.constant(rng.uniform(0.5, 1.5, 16).astype("float32")) for _ in range(count)]
    (outputs, grads), upstream = _ran(function, mode, x, *weights)
    assert calls["_row_norm"] == 1 and calls[FROZEN_GRADIENT] == 0, calls
    expected, expected_grads = _row_reference(norm, _f64(x), [2], [_f64(w) for w in weights], _f64(upstream))
    ref.assert_close(_f64(outputs), expected, tolerances.FLOAT32, "outputs")
    for name, grad, expected_grad in zip(["d_x", "d_gamma", "d_beta"], grads, expected_grads):
        ref.assert_close(_f64(grad), expected_grad, tolerances.FLOAT32, name)


def test_frozen_batch_norm_takes_the_convolution_output_as_it_is():
    """Inference batch norm is the frozen kernel straight on the NHWC tensor, with the channel
    vectors: no reshape or tiling between it and a convolution, which Grappler and the TFLite
    converter would have to see through to fold it. (This replaces the view of few-channel
    inputs as wide rows with tiled parameters.) Other ranks take the plain multiply-add."""
    kernel = tf.constant(np.ones((3, 3, 3, 8), "float32"))
    stats = [tf.constant(np.full([8], value, "float32")) for value in (0.5, 2.0, 1.5, 0.1)]

    def conv_norm(x):
        return ops.normalize(tf.nn.conv2d(x, kernel, 1, "SAME"), *stats)

    graph = tf.function(conv_norm, autograph=False).get_concrete_function(tf.TensorSpec([None, 8, 8, 3])).graph
    (frozen,) = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
    assert not frozen.get_attr("is_training")
    assert frozen.inputs[0].op.type == "Conv2D"
    assert [tensor.shape.as_list() for tensor in frozen.inputs[1:]] == [[8]] * 4
    assert "Tile" not in {op.type for op in graph.get_operations()}
    assert all(op.outputs[0].shape.rank == 1 for op in graph.get_operations() if op.type == "Reshape")
    dense = _op_types(tf.function(lambda x: ops.normalize(x, *stats[:2]), autograph=False), tf.ones((4, 8)))
    assert "FusedBatchNormV3" not in dense and "Reshape" not in dense


# --- the benchmark's plumbing (not its timings) -------------------------------------------


def _bench_module():
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("kernorm_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_rewrites_only_its_readme_block(tmp_path):
    bench = _bench_module()
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{bench.START}\nold table\n{bench.END}\nafter\n")
    bench.README = readme
    bench.update_readme("| new | table |")
    assert readme.read_text() == f"before\n{bench.START}\n| new | table |\n{bench.END}\nafter\n"


def test_bench_rows_carry_the_times_and_the_ratios_spread_over_the_rounds():
    bench = _bench_module()
    lines = []
    rows = bench.layer_rows(
        [("layer", (2, 4, 8), ("-",))], rounds=3, warmup=1, seconds=0.01, modes=(False,), log=lines.append
    )
    assert [row["mode"] for row in rows] == ["fwd", "fwd+bwd"]
    for row in rows:
        assert row["rounds"] == 3 and row["kernorm_ms"] > 0 and row["keras_ms"] > 0 and row["stream_ms"] > 0
        for name in ("keras", "stream"):
            spread = row[f"kernorm/{name}"]
            assert spread["min"] <= spread["median"] <= spread["max"]
    assert len(lines) == 2 and all(line.startswith("| LayerNorm | 2x4x8 |") for line in lines)


def test_bench_times_each_function_back_to_back_in_rounds(monkeypatch):
    bench = _bench_module()
    calls = []
    clock = iter(range(10**6))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    functions = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    per_round = bench.time_steady(functions, rounds=3, warmup=1, seconds=4)
    assert {name: len(times) for name, times in per_round.items()} == {"a": 3, "b": 3}
    timed = calls[2:]  # after one warm-up call each, runs of 4 calls (4 s at 1 s per call), the order rotated
    assert timed == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4 + ["a"] * 4 + ["b"] * 4
