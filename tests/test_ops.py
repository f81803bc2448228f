"""kernorm.ops, the shared maths, against a float64 NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
import tolerances
from kernorm import ops
from kernorm.ops import reference
from modes import MODES, compiled

TOLERANCE = tolerances.FLOAT32


# --- the reference itself ----------------------------------------------------


@pytest.mark.parametrize(
    "name, function",
    [
        ("batch", lambda x, u: ref.batch_norm(x, 1, [0.5, 2.0, 1.5], [0.1, 0.2, 0.3], 1e-3, u)[1][0]),
        ("layer", lambda x, u: ref.layer_norm(x, [1, 2], None, None, 1e-3, u)[1][0]),
        ("rms", lambda x, u: ref.rms_norm(x, -1, [0.5, 1.0, 2.0, 1.0], 1e-6, u)[1][0]),
        ("group", lambda x, u: ref.group_norm(x, 1, 1, [0.5, 2.0, 1.5], None, 1e-3, u)[1][0]),
        ("masked", lambda x, u: ref.masked_batch_norm(x, -1, _MASK, None, None, 1e-3, u)[1]),
    ],
)
def test_reference_gradients_match_finite_differences(name, function, rng):
    """The analytic float64 gradients the layer tests rely on are themselves right."""
    x = rng.normal(1.0, 2.0, (3, 3, 4))
    upstream = rng.normal(size=x.shape)
    outputs_only = {
        "batch": lambda x: ref.batch_norm(x, 1, [0.5, 2.0, 1.5], [0.1, 0.2, 0.3], 1e-3)[0],
        "layer": lambda x: ref.layer_norm(x, [1, 2], None, None, 1e-3)[0],
        "rms": lambda x: ref.rms_norm(x, -1, [0.5, 1.0, 2.0, 1.0], 1e-6)[0],
        "group": lambda x: ref.group_norm(x, 1, 1, [0.5, 2.0, 1.5], None, 1e-3)[0],
        "masked": lambda x: ref.masked_batch_norm(x, -1, _MASK)[0],
    }[name]
    numeric = ref.finite_difference_grad(outputs_only, x, upstream)
    # Central differences in float64 with a step of 1e-6: measured 1.3e-9 at most.
    ref.assert_close(function(x, upstream), numeric, 1e-8)


_MASK = np.arange(3 * 3 * 4).reshape(3, 3, 4) % 3 != 0


def test_reference_parameter_gradients_match_finite_differences(rng):
    x = rng.normal(size=(5, 3))
    upstream = rng.normal(size=x.shape)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    _, (_, d_gamma, d_beta), _, _ = ref.batch_norm(x, -1, gamma, beta, 1e-3, upstream)
    numeric_gamma = ref.finite_difference_grad(lambda g: ref.batch_norm(x, -1, g, beta)[0], gamma, upstream)
    numeric_beta = ref.finite_difference_grad(lambda b: ref.batch_norm(x, -1, gamma, b)[0], beta, upstream)
    ref.assert_close(d_gamma, numeric_gamma, 1e-8)
    ref.assert_close(d_beta, numeric_beta, 1e-8)


# --- statistics ---------------------------------------------------------------


@pytest.mark.parametrize("axes", [[0], [0, 1], [1, 2], [0, 1, 2]])
@pytest.mark.parametrize("keepdims", [True, False])
def test_moments_match_reference(axes, keepdims, rng):
    x = rng.normal(3.0, 2.0, (4, 3, 5)).astype("float32")
    mean, variance, count = ops.moments(tf.constant(x), axes, keepdims=keepdims)
    x64 = x.astype(np.float64)
    ref.assert_close(mean, x64.mean(axis=tuple(axes), keepdims=keepdims), TOLERANCE)
    ref.assert_close(variance, x64.var(axis=tuple(axes), keepdims=keepdims), TOLERANCE)
    assert float(count) == np.prod([x.shape[a] for a in axes])


def test_masked_moments_count_only_unmasked(rng):
    x = rng.normal(size=(4, 6, 3)).astype("float32")
    mask = rng.uniform(size=(4, 6, 1)) < 0.6
    x = np.where(mask, x, np.float32(1e4))
    mean, variance, count = ops.moments(tf.constant(x), [0, 1], mask=tf.constant(mask))
    _, _, expected_mean, expected_variance, expected_count = ref.masked_batch_norm(x, -1, mask)
    ref.assert_close(np.reshape(mean, [-1]), expected_mean, TOLERANCE)
    ref.assert_close(np.reshape(variance, [-1]), expected_variance, TOLERANCE)
    np.testing.assert_array_equal(np.reshape(count, [-1]), expected_count)


def test_moments_of_nothing_are_zero_not_nan():
    mean, variance, count = ops.moments(tf.ones((3, 2)), [0], mask=tf.zeros((3, 2)))
    np.testing.assert_array_equal(mean, np.zeros((1, 2)))
    np.testing.assert_array_equal(variance, np.zeros((1, 2)))
    np.testing.assert_array_equal(count, np.zeros((1, 2)))
    mean, variance, count = ops.moments(tf.zeros((0, 2)), [0])
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(variance)) and float(count) == 0


@pytest.mark.parametrize("mode", MODES)
def test_moments_keep_precision_for_a_large_mean(mode, rng):
    x = (1e4 + 1e-2 * rng.normal(size=(64, 3))).astype("float32")
    mean, variance, _ = compiled(lambda x: ops.moments(x, [0]), mode)(tf.constant(x))
    x64 = x.astype(np.float64)
    ref.assert_close(variance, x64.var(axis=0, keepdims=True), tolerances.LARGE_MEAN)
    # float32 holds a mean near 1e4 to within half a unit in the last place.
    assert np.all(np.abs(np.asarray(mean, np.float64) - x64.mean(axis=0)) <= np.spacing(np.float32(1e4)))


@pytest.mark.parametrize("dtype, expected", [("float16", "float32"), ("bfloat16", "float32"), ("float64", "float64")])
def test_statistics_dtype(dtype, expected):
    assert ops.stats_dtype(dtype) == tf.as_dtype(expected)
    mean, variance, _ = ops.moments(tf.ones((2, 3), dtype), [0])
    assert mean.dtype == expected and variance.dtype == expected


# --- normalization ---------------------------------------------------------


def test_normalize_is_the_affine_formula(rng):
    x = rng.normal(size=(4, 3)).astype("float32")
    mean, variance = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    outputs = ops.normalize(tf.constant(x), mean.astype("float32"), variance.astype("float32"),
                            gamma.astype("float32"), beta.astype("float32"), 1e-3)
    expected = ref.batch_norm_inference(x, -1, mean, variance, gamma, beta, 1e-3)
    ref.assert_close(outputs, expected, TOLERANCE)
    assert outputs.dtype == tf.float32


@pytest.mark.parametrize("with_affine", [True, False])
def test_inference_affine_is_normalize_as_one_multiply_and_add(with_affine, rng):
    x = rng.normal(size=(5, 3))
    mean, variance = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    gamma, beta = (rng.normal(size=3), rng.normal(size=3)) if with_affine else (None, None)
    scale, shift = ops.inference_affine(*(None if v is None else tf.constant(v) for v in (mean, variance, gamma, beta)),
                                        epsilon=1e-3)
    assert scale.dtype == shift.dtype == tf.float64
    expected = ref.batch_norm_inference(x, -1, mean, variance, gamma, beta, 1e-3)
    np.testing.assert_allclose(x * scale.numpy() + shift.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_merge_moments_gives_the_statistics_of_all_the_batches_together(rng):
    batches = [rng.normal(loc, 2.0, size=(n, 3)) for loc, n in [(1e3, 7), (-5.0, 1), (0.5, 20)]]
    state = [tf.zeros(3, tf.float64)] * 3
    for batch in batches:
        state = ops.merge_moments(*state, np.full(3, float(len(batch))), batch.mean(0), batch.var(0))
    state = ops.merge_moments(*state, tf.zeros(3, tf.float64), np.full(3, 1e9), np.full(3, 1e9))  # an empty batch
    values = np.concatenate(batches)
    count, mean, squares = (t.numpy() for t in state)
    np.testing.assert_array_equal(count, len(values))
    np.testing.assert_allclose(mean, values.mean(0), rtol=1e-12)
    np.testing.assert_allclose(squares / count, values.var(0), rtol=1e-10)


def _gradients(function, x, upstream, params):
    with tf.GradientTape() as tape:
        tape.watch([x, *params])
        outputs = function(x, *params)
        loss = tf.reduce_sum(outputs * upstream)
    return outputs, tape.gradient(loss, [x, *params])


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_op(mode, rng):
    x = rng.normal(2.0, 3.0, (6, 4, 3)).astype("float32")
    upstream = rng.normal(size=x.shape).astype("float32")
    gamma, beta = rng.uniform(0.5, 1.5, (1, 1, 3)).astype("float32"), rng.normal(size=(1, 1, 3)).astype("float32")

    def run(x, upstream, gamma, beta):
        results = {}

        def function(x, gamma, beta):
            outputs, mean, variance, count = ops.batch_norm(x, [0, 1], gamma, beta, 1e-3)
            results.update(mean=mean, variance=variance, count=count)
            return outputs

        outputs, grads = _gradients(function, x, upstream, [gamma, beta])
        return outputs, grads, results

    outputs, grads, stats = compiled(run, mode)(*map(tf.constant, (x, upstream, gamma, beta)))
    expected, expected_grads, mean, variance = ref.batch_norm(x, -1, gamma, beta, 1e-3, upstream)
    ref.assert_close(outputs, expected, TOLERANCE)
    ref.assert_close(grads[0], expected_grads[0], TOLERANCE)
    ref.assert_close(np.reshape(grads[1], [-1]), expected_grads[1], TOLERANCE)
    ref.assert_close(np.reshape(grads[2], [-1]), expected_grads[2], TOLERANCE)
    ref.assert_close(np.reshape(stats["mean"], [-1]), mean, TOLERANCE)
    ref.assert_close(np.reshape(stats["variance"], [-1]), variance, TOLERANCE)
    assert float(stats["count"]) == 24


@pytest.mark.parametrize("mode", MODES)
def test_masked_batch_norm_op(mode, rng):
    x = rng.normal(size=(5, 4, 2)).astype("float32")
    mask = rng.uniform(size=(5, 4, 1)) < 0.7
    mask[0, 0] = True
    upstream = rng.normal(size=x.shape).astype("float32")

    def run(x, mask, upstream):
        return _gradients(lambda x: ops.batch_norm(x, [0, 1], mask=mask)[0], x, upstream, [])

    outputs, (d_x,) = compiled(run, mode)(tf.constant(x), tf.constant(mask), tf.constant(upstream))
    expected, expected_d_x, _, _, _ = ref.masked_batch_norm(x, -1, mask, upstream=upstream)
    ref.assert_close(outputs, expected, TOLERANCE)
    ref.assert_close(d_x, expected_d_x, TOLERANCE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axes", [(2,), (1, 2)])
def test_layer_norm_op(axes, mode, rng):
    x = rng.normal(2.0, 3.0, (3, 4, 5)).astype("float32")
    upstream = rng.normal(size=x.shape).astype("float32")
    shape = [x.shape[a] for a in axes]
    gamma, beta = rng.uniform(0.5, 1.5, shape).astype("float32"), rng.normal(size=shape).astype("float32")
    run = compiled(
        lambda *args: _gradients(lambda x, g, b: ops.layer_norm(x, axes, g, b, 1e-3), *args), mode
    )
    outputs, grads = run(tf.constant(x), tf.constant(upstream), [tf.constant(gamma), tf.constant(beta)])
    expected, expected_grads = ref.layer_norm(x, list(axes), gamma, beta, 1e-3, upstream)
    ref.assert_close(outputs, expected, TOLERANCE)
    for actual, wanted in zip(grads, expected_grads):
        ref.assert_close(actual, wanted, TOLERANCE)


@pytest.mark.parametrize("mode", MODES)
def test_rms_norm_op(mode, rng):
    x = rng.normal(1.0, 2.0, (3, 4, 5)).astype("float32")
    upstream = rng.normal(size=x.shape).astype("float32")
    scale = rng.uniform(0.5, 1.5, 5).astype("float32")
    run = compiled(lambda *args: _gradients(lambda x, s: ops.rms_norm(x, [2], s, 1e-6), *args), mode)
    outputs, grads = run(tf.constant(x), tf.constant(upstream), [tf.constant(scale)])
    expected, expected_grads = ref.rms_norm(x, -1, scale, 1e-6, upstream)
    ref.assert_close(outputs, expected, TOLERANCE)
    for actual, wanted in zip(grads, expected_grads):
        ref.assert_close(actual, wanted, TOLERANCE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups, axis", [(2, 3), (3, 1), (6, 3)])
def test_group_norm_op(groups, axis, mode, rng):
    shape = [2, 3, 4, 3]
    shape[axis] = 6
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    upstream = rng.normal(size=x.shape).astype("float32")
    gamma, beta = rng.uniform(0.5, 1.5, 6).astype("float32"), rng.normal(size=6).astype("float32")
    run = compiled(
        lambda *args: _gradients(lambda x, g, b: ops.group_norm(x, groups, axis, g, b, 1e-3), *args), mode
    )
    outputs, grads = run(tf.constant(x), tf.constant(upstream), [tf.constant(gamma), tf.constant(beta)])
    expected, expected_grads = ref.group_norm(x, groups, axis, gamma, beta, 1e-3, upstream)
    ref.assert_close(outputs, expected, TOLERANCE)
    for actual, wanted in zip(grads, expected_grads):
        ref.assert_close(actual, wanted, TOLERANCE)


def test_float64_stays_float64(rng):
    x = rng.normal(size=(4, 5))
    outputs = ops.layer_norm(tf.constant(x), [1], epsilon=1e-3)
    assert outputs.dtype == tf.float64
    ref.assert_close(outputs, ref.layer_norm(x, -1)[0], tolerances.FLOAT64)


@pytest.mark.parametrize(
    "function",
    [
        lambda x: ops.layer_norm(x, [1], epsilon=1e-3),
        lambda x: ops.batch_norm(x, [0], epsilon=1e-3)[0],
        lambda x: ops.group_norm(x, 2, 1, epsilon=1e-3),
        lambda x: ops.rms_norm(x, [1], epsilon=1e-6),
    ],
    ids=["layer", "batch", "group", "rms"],
)
def test_xla_gives_the_results_it_gives_without(function, rng):
    x = tf.constant(rng.normal(3.0, 2.0, (6, 8)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(6, 8)).astype("float32"))
    plain = tf.function(lambda x: _gradients(function, x, upstream, []), autograph=False)(x)
    xla = tf.function(lambda x: _gradients(function, x, upstream, []), jit_compile=True, autograph=False)(x)
    ref.assert_close(xla[0], plain[0], 1e-6)
    ref.assert_close(xla[1][0], plain[1][0], tolerances.FLOAT32)


# --- moving averages and renorm -------------------------------------------------


def test_moving_average_is_the_keras_convention(rng):
    moving, value = rng.normal(size=3).astype("float32"), rng.normal(size=3).astype("float32")
    updated = ops.moving_average(tf.constant(moving), tf.constant(value), 0.9)
    ref.assert_close(updated, ref.moving_average(moving, value, 0.9), 1e-6)


def test_moving_average_keeps_the_old_value_where_nothing_was_counted(rng):
    moving = rng.normal(size=3).astype("float32")
    value = np.array([1.0, np.nan, 2.0], "float32")
    updated = ops.moving_average(tf.constant(moving), tf.constant(value), 0.9, count=tf.constant([4.0, 0.0, 1.0]))
    assert updated.numpy()[1] == moving[1]
    ref.assert_close(updated.numpy()[[0, 2]], ref.moving_average(moving, value, 0.9)[[0, 2]], 1e-6)


@pytest.mark.parametrize("clipping", [{}, {"rmin": 0.9, "rmax": 1.1, "dmax": 0.3}])
def test_renorm_correction(clipping, rng):
    mean, variance = rng.normal(size=4), rng.uniform(0.1, 4.0, 4)
    renorm_mean, renorm_stddev = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    r, d = ops.renorm_correction(*(tf.constant(v, tf.float32) for v in (mean, variance, renorm_mean, renorm_stddev)),
                                 1e-3, clipping)
    expected_r = np.sqrt(variance + 1e-3) / renorm_stddev
    expected_d = (mean - renorm_mean) / renorm_stddev
    if clipping:
        expected_r = np.clip(expected_r, clipping["rmin"], clipping["rmax"])
        expected_d = np.clip(expected_d, -clipping["dmax"], clipping["dmax"])
    ref.assert_close(r, expected_r, TOLERANCE)
    ref.assert_close(d, expected_d, TOLERANCE)


def test_the_fast_path_switch_turns_every_kernel_path_off(rng):
    """With the switch off, training batch norm runs the generic code: no fused kernel in its graph, same numbers."""
    x = rng.normal(1.0, 2.0, (4, 3, 3, 8)).astype("float32")

    def op_types(x):
        graph = tf.function(lambda x: ops.batch_norm(x, [0, 1, 2])[0]).get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}

    assert ops.fast_paths_enabled()
    assert "FusedBatchNormV3" in op_types(x)
    previous = ops.set_fast_paths(False)
    try:
        assert previous is True and not ops.fast_paths_enabled()
        assert not {"FusedBatchNormV3", "FusedBatchNormGradV3"} & op_types(x)
        generic = ops.batch_norm(tf.constant(x), [0, 1, 2])[0]
    finally:
        ops.set_fast_paths(previous)
    fast = ops.batch_norm(tf.constant(x), [0, 1, 2])[0]
    expected = ref.batch_norm(x, -1)[0]
    ref.assert_close(generic, expected, 1e-6, "generic")
    ref.assert_close(fast, expected, 1e-6, "fast")


# --- one centred-statistics routine, three large-mean strategies ----------------------

STRATEGIES = [reference.ALWAYS, reference.WHERE_LARGE, reference.WHERE_LARGE_XLA]


def _strategy_moments(strategy):
    def statistics(values):
        moments = reference.centred_moments(values, [1], large_mean_strategy=strategy, limit=16.0, epsilon=1e-3)
        return moments.mean, moments.variance, moments.centred

    return tf.function(statistics, jit_compile=True) if strategy == reference.WHERE_LARGE_XLA else statistics


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_large_mean_strategy_gives_the_centred_statistics(strategy, rng):
    """Rows of mean 1e4 and std 1e-2 (where a float32 mean is off by a tenth of the spread) beside
    rows of mean 0: every strategy gives the float64 statistics, and the small rows are the same
    bits as on their own, so a row's statistics never depend on the rest of the batch."""
    large = rng.normal(1e4, 1e-2, (4, 256)).astype("float32")
    small = rng.normal(0.0, 1.0, (4, 256)).astype("float32")
    values = np.concatenate([large, small])
    mean, variance, centred = _strategy_moments(strategy)(tf.constant(values))
    values64 = values.astype(np.float64)
    expected_mean = values64.mean(1, keepdims=True)
    ref.assert_close(mean, expected_mean, 1e-7, "mean")
    for rows in (slice(0, 4), slice(4, 8)):
        ref.assert_close(variance[rows], values64[rows].var(1, keepdims=True), tolerances.LARGE_MEAN, "variance")
        ref.assert_close(centred[rows], (values64 - expected_mean)[rows], tolerances.LARGE_MEAN, "centred")
    alone = _strategy_moments(strategy)(tf.constant(small))
    for name, together, on_its_own in zip(["mean", "variance", "centred"], (mean, variance, centred), alone):
        np.testing.assert_array_equal(np.asarray(together)[4:], on_its_own, err_msg=name)


def test_the_strategies_that_correct_where_needed_take_no_mask():
    values = tf.ones((2, 3))
    with pytest.raises(ValueError, match="large_mean_strategy"):
        reference.centred_moments(values, [1], large_mean_strategy="sometimes")
    with pytest.raises(ValueError, match="`large_mean_strategy`='always'"):
        reference.centred_moments(values, [1], large_mean_strategy=reference.WHERE_LARGE, limit=16.0,
                                  mask=tf.ones((2, 3)))


def test_ghost_batch_norm_needs_the_batch_axis_among_the_reduced_axes():
    with pytest.raises(ValueError, match="`virtual_batch_size`.*batch axis 0"):
        ops.ghost_batch_norm(tf.ones((4, 3)), [1], 2)
