"""Half precision, mixed policies, large float16 inputs and the large-mean / small-spread float32 case."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
import tolerances
from modes import MODES, compiled

POLICIES = ("float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
SHAPE = (6, 3, 8)

NORMS = {
    "batch": (
        functools.partial(kernorm.BatchNormalization, momentum=0.5),
        lambda x, w, u: _batch_reference(x, w, u),
    ),
    "layer": (
        kernorm.LayerNormalization,
        lambda x, w, u: ref.layer_norm(x, -1, w[0], w[1], 1e-3, u),
    ),
    "rms": (
        kernorm.RMSNormalization,
        lambda x, w, u: ref.rms_norm(x, -1, w[0], 1e-6, u),
    ),
    "group": (
        functools.partial(kernorm.GroupNormalization, groups=4),
        lambda x, w, u: ref.group_norm(x, 4, -1, w[0], w[1], 1e-3, u),
    ),
}


def _batch_reference(x, weights, upstream):
    outputs, grads, _, _ = ref.batch_norm(x, -1, weights[0], weights[1], 1e-3, upstream)
    return outputs, grads


def _as_float64(tensor):
    return np.asarray(tf.cast(tensor, tf.float64))


def _built(name, policy, rng, shape=SHAPE):
    layer = NORMS[name][0](dtype=policy)
    layer.build(shape)
    for weight in layer.trainable_weights:
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
    return layer


def _step(layer):
    def step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
        return outputs, tape.gradient(loss, [x, *layer.trainable_weights])

    return step


def _check_half(name, policy, mode, rng, loc=2.0, scale=3.0):
    """Outputs and gradients of a training step in half precision against the float64 reference,
    within the tolerance of the compute dtype."""
    layer = _built(name, policy, rng)
    compute_dtype = tf.as_dtype(layer.compute_dtype)
    assert compute_dtype in (tf.float16, tf.bfloat16)
    assert all(w.dtype == "float32" for w in layer.weights), [w.dtype for w in layer.weights]
    x = tf.cast(rng.normal(loc, scale, SHAPE), compute_dtype)
    upstream = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    weights = [w.numpy() for w in layer.trainable_weights]
    outputs, grads = compiled(_step(layer), mode)(x, upstream)
    assert outputs.dtype == compute_dtype and grads[0].dtype == compute_dtype
    for value in (outputs, *grads):
        assert np.all(np.isfinite(_as_float64(value)))
    # The reference sees the input as the layer does: already rounded to half precision.
    expected, expected_grads = NORMS[name][1](_as_float64(x), weights, upstream.numpy())
    tolerance = tolerances.for_dtype(compute_dtype)
    ref.assert_close(_as_float64(outputs), expected, tolerance, "outputs")
    for actual, wanted in zip(grads, expected_grads):
        ref.assert_close(_as_float64(actual), wanted, tolerance, "gradients")
    return layer, x


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(NORMS))
def test_half_precision_matches_reference(name, policy, rng):
    _check_half(name, policy, "eager", rng)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("policy", ["mixed_float16", "bfloat16"])
@pytest.mark.parametrize("name", ["batch", "layer"])
def test_half_precision_matches_reference_compiled(name, policy, mode, rng):
    _check_half(name, policy, mode, rng)


# Rows whose mean is large against their spread: a mean taken in half precision is off by
# up to half a unit in its last place (1/32 at 10 in bfloat16, at 100 in float16), a sizable
# part of the spread; the statistics in float32 keep the error at the rounding of the outputs.
LARGE_RATIO = {"bfloat16": 10.0, "mixed_bfloat16": 10.0, "float16": 100.0, "mixed_float16": 100.0}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["bfloat16", "mixed_float16"])
@pytest.mark.parametrize("name", list(NORMS))
def test_half_precision_statistics_are_float32_for_a_large_mean(name, policy, mode, rng):
    _check_half(name, policy, mode, rng, loc=LARGE_RATIO[policy], scale=1.0)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("policy", ["bfloat16", "mixed_float16"])
def test_half_precision_masked_batch_norm_has_float32_statistics(policy, mode, rng):
    """The masked path (and the synchronized one, which shares it) takes its statistics in float32
    too: outputs within the half-precision tolerance, moving statistics within float32's."""
    layer = _built("batch", policy, rng)
    compute_dtype = tf.as_dtype(layer.compute_dtype)
    x = tf.cast(rng.normal(LARGE_RATIO[policy], 1.0, SHAPE), compute_dtype)
    mask = np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE[:2]) % 4 != 1
    outputs = compiled(lambda x, mask: layer(x, training=True, mask=mask), mode)(x, tf.constant(mask))
    expected, _, mean, variance, _ = ref.masked_batch_norm(
        _as_float64(x), -1, mask[..., None], *[w.numpy() for w in layer.trainable_weights], 1e-3
    )
    ref.assert_close(_as_float64(outputs)[mask], expected[mask], tolerances.for_dtype(compute_dtype), "outputs")
    moving_mean, moving_variance = ref.moving_average(0.0, mean, 0.5), ref.moving_average(1.0, variance, 0.5)
    ref.assert_close(layer.moving_mean.numpy(), moving_mean, tolerances.FLOAT32, "moving_mean")
    ref.assert_close(layer.moving_variance.numpy(), moving_variance, tolerances.FLOAT32, "moving_variance")


@pytest.mark.parametrize("policy", POLICIES)
def test_half_precision_moving_statistics(policy, rng):
    layer = _built("batch", policy, rng)
    moving_mean, moving_variance = np.zeros(8), np.ones(8)
    for i in range(3):
        x = tf.cast(rng.normal(2.0 + i, 3.0, SHAPE), layer.compute_dtype)
        layer(x, training=True)
        _, _, mean, variance = ref.batch_norm(_as_float64(x), -1)
        moving_mean = ref.moving_average(moving_mean, mean, 0.5)
        moving_variance = ref.moving_average(moving_variance, variance, 0.5)
    assert layer.moving_mean.dtype == "float32" and layer.moving_variance.dtype == "float32"
    # float32 statistics of the rounded inputs: float32's error, not half precision's.
    ref.assert_close(layer.moving_mean.numpy(), moving_mean, tolerances.FLOAT32)
    ref.assert_close(layer.moving_variance.numpy(), moving_variance, tolerances.FLOAT32)


@pytest.mark.parametrize("policy", ["float16", "mixed_float16"])
@pytest.mark.parametrize("name", list(NORMS))
def test_float16_inputs_up_to_6e4_stay_finite(name, policy, rng):
    layer = _built(name, policy, rng)
    values = rng.uniform(-6e4, 6e4, SHAPE)
    values[0, 0, :] = 6e4
    values[1, 0, :] = -6e4
    x = tf.constant(values, tf.float16)
    upstream = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    outputs, grads = _step(layer)(x, upstream)
    for value in (outputs, *grads, *layer.weights, layer(x, training=False)):
        assert np.all(np.isfinite(_as_float64(value)))
    expected, _ = NORMS[name][1](_as_float64(x), [w.numpy() for w in layer.trainable_weights], upstream.numpy())
    ref.assert_close(_as_float64(outputs), expected, tolerances.FLOAT16)


def test_global_mixed_policy_in_a_model(rng):
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((4, 8))
    x = kernorm.BatchNormalization()(inputs)
    x = kernorm.LayerNormalization()(x)
    x = kernorm.RMSNormalization()(x)
    x = kernorm.GroupNormalization(groups=2)(x)
    model = keras.Model(inputs, x)
    assert model.output.dtype == "float16"
    assert all(w.dtype == "float32" for w in model.weights)
    data = rng.normal(size=(8, 4, 8)).astype("float32")
    outputs = model(data, training=True)
    assert outputs.dtype == "float16" and np.all(np.isfinite(_as_float64(outputs)))


@pytest.mark.parametrize("name", list(NORMS))
def test_float64_policy_stays_float64(name, rng):
    layer = _built(name, "float64", rng)
    assert all(w.dtype == "float64" for w in layer.weights)
    x = tf.constant(rng.normal(2.0, 3.0, SHAPE))
    upstream = tf.constant(rng.normal(size=SHAPE))
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = layer(x, training=True)
        loss = tf.reduce_sum(outputs * upstream)
    d_x = tape.gradient(loss, x)
    assert outputs.dtype == tf.float64 and d_x.dtype == tf.float64
    expected, expected_grads = NORMS[name][1](x.numpy(), [w.numpy() for w in layer.trainable_weights], upstream.numpy())
    ref.assert_close(outputs, expected, tolerances.FLOAT64, "outputs")
    ref.assert_close(d_x, expected_grads[0], tolerances.FLOAT64, "d_x")


# --- large mean, small spread, in float32 ------------------------------------------

LARGE_MEAN_TOLERANCE = tolerances.LARGE_MEAN
ROWS, COLUMNS = 16, 32
ROW_MASK = np.arange(ROWS) % 5 != 3
NO_CORRECTION = {"rmin": 1.0, "rmax": 1.0, "dmax": 0.0}  # renorm with r = 1 and d = 0


def _unit(size):
    return np.ones(size), np.zeros(size)


LARGE_MEAN_CASES = {
    # name: (layer, call arguments, reference (outputs, d_x) from (x, epsilon, upstream))
    "batch": (
        lambda eps: kernorm.BatchNormalization(epsilon=eps), {},
        lambda x, eps, u: _first_grad(ref.batch_norm(x, -1, *_unit(COLUMNS), eps, u)),
    ),
    "batch_masked": (
        lambda eps: kernorm.BatchNormalization(epsilon=eps), {"mask": ROW_MASK},
        lambda x, eps, u: ref.masked_batch_norm(x, -1, ROW_MASK[:, None], None, None, eps, u)[:2],
    ),
    "batch_synchronized": (
        lambda eps: kernorm.BatchNormalization(epsilon=eps, synchronized=True), {},
        lambda x, eps, u: _first_grad(ref.batch_norm(x, -1, *_unit(COLUMNS), eps, u)),
    ),
    "batch_renorm": (
        lambda eps: kernorm.BatchNormalization(epsilon=eps, renorm=True, renorm_clipping=NO_CORRECTION), {},
        lambda x, eps, u: _first_grad(ref.batch_norm(x, -1, *_unit(COLUMNS), eps, u)),
    ),
    "batch_virtual": (
        lambda eps: kernorm.BatchNormalization(epsilon=eps, virtual_batch_size=4), {},
        lambda x, eps, u: tuple(
            np.concatenate(part)
            for part in zip(*(_first_grad(ref.batch_norm(x[i:i + 4], -1, *_unit(COLUMNS), eps, u[i:i + 4]))
                              for i in range(0, ROWS, 4)))
        ),
    ),
    "layer": (
        lambda eps: kernorm.LayerNormalization(epsilon=eps), {},
        lambda x, eps, u: _first_grad(ref.layer_norm(x, -1, *_unit(COLUMNS), eps, u)),
    ),
    "group": (
        lambda eps: kernorm.GroupNormalization(groups=2, epsilon=eps), {},
        lambda x, eps, u: _first_grad(ref.group_norm(x, 2, -1, *_unit(COLUMNS), eps, u)),
    ),
}


def _first_grad(result):
    """(outputs, d_x) from a reference's (outputs, grads, ...)."""
    return result[0], result[1][0]


def _large_mean_inputs(rng, shape=(ROWS, COLUMNS)):
    return (1e4 + 1e-2 * rng.normal(size=shape)).astype("float32")


@pytest.mark.parametrize("epsilon, mode", [(1e-6, mode) for mode in MODES] + [(1e-3, "eager")])
@pytest.mark.parametrize("name", list(LARGE_MEAN_CASES))
def test_large_mean_small_spread_keeps_precision(name, epsilon, mode, rng):
    make, call_kwargs, reference = LARGE_MEAN_CASES[name]
    layer = make(epsilon)
    x = _large_mean_inputs(rng)
    upstream = rng.normal(size=x.shape).astype("float32")

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, training=True, **call_kwargs)
            loss = tf.reduce_sum(outputs * upstream)
        return outputs, tape.gradient(loss, x)

    outputs, d_x = compiled(step, mode)(tf.constant(x))
    expected, expected_d_x = reference(x, epsilon, upstream)
    assert np.max(np.abs(expected)) > 0.1  # the spread survives float32 rounding of the inputs
    rows = ROW_MASK if "mask" in call_kwargs else slice(None)
    ref.assert_close(np.asarray(outputs)[rows], expected[rows], LARGE_MEAN_TOLERANCE, "outputs")
    ref.assert_close(d_x, expected_d_x, LARGE_MEAN_TOLERANCE, "d_x")


@pytest.mark.parametrize("mode", MODES)
def test_large_mean_moving_variance(mode, rng):
    layer = kernorm.BatchNormalization(momentum=0.0)
    x = _large_mean_inputs(rng)
    compiled(lambda x: layer(x, training=True), mode)(tf.constant(x))
    ref.assert_close(layer.moving_variance.numpy(), x.astype(np.float64).var(0), tolerances.FLOAT32)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_keras_layer_normalization_loses_the_large_mean_case(mode, rng):
    """Documents why kernorm computes the centred form: Keras's `x * inv - mean * inv` cancels."""
    layer = keras.layers.LayerNormalization(epsilon=1e-6)
    x = _large_mean_inputs(rng)
    outputs = compiled(lambda x: layer(x), mode)(tf.constant(x))
    assert ref.relative_error(outputs, ref.layer_norm(x, -1, epsilon=1e-6)[0]) > LARGE_MEAN_TOLERANCE
