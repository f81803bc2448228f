"""The fast paths of kernorm.ops give the numbers of the float64 reference formulas.

Each path (see the top of kernorm/ops.py) is checked where it runs: the
TensorFlow kernel paths eagerly and in a `tf.function`, the compiled path under
`jit_compile`. Outputs and gradients, float32 and half precision, and the
large-mean / small-spread float32 inputs that a rounded float32 mean spoils.
"""

import importlib.util
import pathlib

import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
from kernorm import ops
from modes import MODES, compiled

TOLERANCE = {tf.float32: 1e-5, tf.float16: 1e-2, tf.bfloat16: 1e-2}
LARGE_MEAN_TOLERANCE = 1e-3
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
    ref.assert_close(_f64(outputs), expected, 1e-5, "outputs")
    ref.assert_close(_f64(grads[0]), expected_grads[0], 1e-5, "d_x")


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
    ref.assert_close(_f64(outputs), expected, 1e-5, "outputs")
    ref.assert_close(_f64(grads[0]), expected_grads[0], 1e-5, "d_x")


def test_layer_norm_row_of_one_outlier(rng):
    """A first value far from the rest (the shift of the row kernels) keeps float32 precision."""
    x = rng.normal(0.0, 1.0, (4, 256)).astype("float32")
    x[:, 0] = 1000.0
    outputs = tf.function(lambda x: ops.layer_norm(x, [1]))(tf.constant(x))
    expected, _ = ref.layer_norm(x.astype(np.float64), [1], None, None, EPSILON)
    ref.assert_close(_f64(outputs), expected, 1e-5, "outputs")


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
    ref.assert_close(_f64(mean).reshape(-1), expected_mean, 1e-5, "mean")
    ref.assert_close(_f64(variance).reshape(-1), expected_variance, 1e-5, "variance")
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
    tolerance = LARGE_MEAN_TOLERANCE if scale < 1 else 1e-5
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
        ref.assert_close(_f64(run(x)), expected, 1e-5, f"outputs, batch {batch}")


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


def _paths(function, *args):
    plain = _op_types(tf.function(function, autograph=False), *args)
    xla = _op_types(tf.function(function, jit_compile=True, autograph=False), *args)
    return plain, xla


def _forward_backward(function):
    def step(x, *weights):
        return _gradients(function, [x, *weights], tf.ones_like(x))

    return step


def test_row_kernels_run_outside_xla_only():
    x, gamma, beta = tf.ones((4, 8)), tf.ones([8]), tf.zeros([8])
    plain, xla = _paths(_forward_backward(lambda x, g, b: ops.layer_norm(x, [1], g, b)), x, gamma, beta)
    assert "EuclideanNorm" in plain
    assert "EuclideanNorm" not in xla and "FusedBatchNormGradV3" not in xla
    if not tf.config.list_logical_devices("GPU"):
        assert "FusedBatchNormGradV3" in plain


def test_fused_batch_norm_runs_with_and_without_xla():
    x, gamma, beta = tf.ones((4, 3, 8)), tf.ones([1, 1, 8]), tf.zeros([1, 1, 8])
    plain, xla = _paths(_forward_backward(lambda x, g, b: ops.batch_norm(x, [0, 1], g, b)[0]), x, gamma, beta)
    assert "FusedBatchNormV3" in plain and "FusedBatchNormGradV3" in plain
    assert "FusedBatchNormV3" in xla and "FusedBatchNormGradV3" in xla


def test_frozen_batch_norm_runs_outside_xla_only():
    x, mean, variance = tf.ones((2, 3, 4, 8)), tf.zeros([8]), tf.ones([8])
    plain, xla = _paths(lambda x, m, v: ops.normalize(x, m, v), x, mean, variance)
    assert "FusedBatchNormV3" in plain
    assert "FusedBatchNormV3" not in xla


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


@pytest.mark.parametrize(
    "function",
    [
        lambda x: ops.layer_norm(x, [1]),  # not the trailing axes
        lambda x: ops.batch_norm(x, [0, 2])[0],  # channels first
        lambda x: ops.normalize(x, tf.zeros([1, 4, 1]), tf.ones([1, 4, 1])),  # statistics on axis 1
    ],
    ids=["layer-norm-axis-1", "batch-norm-channels-first", "normalize-axis-1"],
)
def test_general_paths_where_the_kernels_do_not_apply(function):
    plain = _op_types(tf.function(function, autograph=False), tf.ones((2, 4, 3)))
    assert "FusedBatchNormV3" not in plain and "EuclideanNorm" not in plain


@pytest.mark.parametrize("synchronized", [False, True])
def test_masked_or_synchronized_statistics_stay_general(synchronized):
    """Their statistics come from `moments`; only the final multiply-add may be one kernel."""
    mask = None if synchronized else tf.ones((2, 4, 3))
    function = tf.function(lambda x: ops.batch_norm(x, [0, 1], mask=mask, synchronized=synchronized)[0])
    graph = function.get_concrete_function(tf.ones((2, 4, 3))).graph
    training_kernels = [
        op for op in graph.get_operations() if op.type == "FusedBatchNormV3" and op.get_attr("is_training")
    ]
    assert not training_kernels


@pytest.mark.parametrize("function", [
    lambda x: ops.layer_norm(x, [2]),
    lambda x: ops.batch_norm(x, [0, 1])[0],
    lambda x: ops.rms_norm(x, [2]),
])
def test_float64_takes_the_general_path(function, rng):
    x = tf.constant(rng.normal(size=(2, 4, 3)))
    plain = _op_types(tf.function(function, autograph=False), x)
    assert "FusedBatchNormV3" not in plain and "EuclideanNorm" not in plain


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


def test_bench_rows_carry_both_medians_and_the_ratios():
    bench = _bench_module()
    lines = []
    rows = bench.layer_rows([("layer", (2, 4, 8), ("-",))], calls=1, warmup=1, modes=(False,), log=lines.append)
    assert [row["mode"] for row in rows] == ["fwd", "fwd+bwd"]
    for row in rows:
        assert row["kernorm/keras"] == pytest.approx(row["kernorm_ms"] / row["keras_ms"])
        assert row["kernorm/stream"] == pytest.approx(row["kernorm_ms"] / row["stream_ms"])
    assert len(lines) == 2 and all(line.startswith("| LayerNorm | 2x4x8 |") for line in lines)
