"""kernorm.GroupNormalization against a float64 NumPy reference, instance norm and layer norm."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
import tolerances
from modes import axis_fits, compiled, grid

CHANNELS = 6
AXES = (-1, 1)  # GroupNormalization takes one channel axis
GRID = grid((2, 3, 4, 5), AXES, axis_fits)
COMPILED_GRID = [(2, -1), (4, 1), (5, -1), (3, 1)]
EPSILON = 1e-3
TOLERANCE = tolerances.FLOAT32


def _shape(rank, axis):
    shape = [3] + [4, 3, 2, 3][: rank - 1]
    shape[axis] = CHANNELS
    return tuple(shape)


def _built_layer(shape, rng, **kwargs):
    return ref.built_with_random_affine(kernorm.GroupNormalization(epsilon=EPSILON, **kwargs), shape, rng)


def _check_forward_and_gradients(shape, axis, groups, mode, rng):
    layer = _built_layer(shape, rng, groups=groups, axis=axis)

    def step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x)
            loss = tf.reduce_sum(outputs * upstream)
        return outputs, tape.gradient(loss, [x, layer.gamma, layer.beta])

    x = rng.normal(2.0, 3.0, shape).astype("float32")
    x += np.arange(shape[axis]).reshape([-1 if a == axis % len(shape) else 1 for a in range(len(shape))])
    upstream = rng.normal(size=shape).astype("float32")
    outputs, grads = compiled(step, mode)(tf.constant(x), tf.constant(upstream))
    expected, expected_grads = ref.group_norm(
        x, groups, axis, layer.gamma.numpy(), layer.beta.numpy(), EPSILON, upstream
    )
    ref.assert_close(outputs, expected, TOLERANCE, "outputs")
    for name, actual, wanted in zip(("x", "gamma", "beta"), grads, expected_grads):
        ref.assert_close(actual, wanted, TOLERANCE, f"d_{name}")


@pytest.mark.parametrize("groups", [3, 1, -1])
@pytest.mark.parametrize("rank, axis", GRID)
def test_matches_reference_eager(rank, axis, groups, rng):
    _check_forward_and_gradients(_shape(rank, axis), axis, groups, "eager", rng)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("rank, axis", COMPILED_GRID)
def test_matches_reference_compiled(rank, axis, mode, rng):
    _check_forward_and_gradients(_shape(rank, axis), axis, 2, mode, rng)


def test_groups_minus_one_is_instance_norm(rng):
    """Each channel of each sample normalized over its spatial positions (written here, not
    through the group reference), with per-channel weights."""
    x = rng.normal(1.0, 2.0, (2, 5, 4, 6)).astype("float32")
    x += np.arange(6, dtype="float32") * 3.0  # channels with their own means
    layer = _built_layer(x.shape, rng, groups=-1)
    mean = x.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    variance = x.astype(np.float64).var(axis=(1, 2), keepdims=True)
    expected = (x - mean) / np.sqrt(variance + EPSILON) * layer.gamma.numpy() + layer.beta.numpy()
    ref.assert_close(layer(x), expected, TOLERANCE)


def test_groups_one_is_layer_norm_over_every_non_batch_axis(rng):
    """Each sample normalized over (H, W, C), with per-channel weights (written here)."""
    x = rng.normal(1.0, 2.0, (2, 5, 4, 3)).astype("float32")
    x += np.arange(2, dtype="float32").reshape(2, 1, 1, 1) * 5.0  # samples with their own means
    layer = _built_layer(x.shape, rng, groups=1)
    mean = x.astype(np.float64).mean(axis=(1, 2, 3), keepdims=True)
    variance = x.astype(np.float64).var(axis=(1, 2, 3), keepdims=True)
    expected = (x - mean) / np.sqrt(variance + EPSILON) * layer.gamma.numpy() + layer.beta.numpy()
    ref.assert_close(layer(x), expected, TOLERANCE)


@pytest.mark.parametrize("groups, axis", [(3, -1), (2, 1), (-1, -1)])
def test_matches_keras_group_normalization(groups, axis, rng):
    shape = _shape(4, axis)
    ours = kernorm.GroupNormalization(groups=groups, axis=axis)
    theirs = keras.layers.GroupNormalization(groups=groups, axis=axis)
    ours.build(shape), theirs.build(shape)
    assert [(w.name, w.shape) for w in ours.weights] == [(w.name, w.shape) for w in theirs.weights]
    weights = [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in ours.weights]
    ours.set_weights(weights), theirs.set_weights(weights)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    ref.assert_close(ours(x), theirs(x), TOLERANCE)


def test_unknown_batch_and_spatial_sizes_in_a_function(rng):
    layer = _built_layer((None, None, 6), rng, groups=3)
    call = tf.function(layer, input_signature=[tf.TensorSpec((None, None, 6))])
    for shape in [(2, 3, 6), (3, 5, 6)]:
        x = rng.normal(size=shape).astype("float32")
        expected, _ = ref.group_norm(x, 3, -1, layer.gamma.numpy(), layer.beta.numpy(), EPSILON)
        ref.assert_close(call(x), expected, TOLERANCE)


def test_samples_are_independent(rng):
    layer = _built_layer((4, 3, 6), rng, groups=2)
    x = rng.normal(size=(4, 3, 6)).astype("float32")
    y = rng.normal(5.0, 9.0, (4, 3, 6)).astype("float32")
    y[0] = x[0]
    np.testing.assert_allclose(layer(x)[0], layer(y)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_outlier_first_value_keeps_precision(mode, rng):
    # The first value of each group sits 1000 standard deviations out: statistics
    # centred on that one sample would lose the spread of the others.
    x = rng.normal(0.0, 1.0, (2, 16, 16, 4)).astype("float32")
    x[:, 0, 0, :] = 1000.0
    layer = kernorm.GroupNormalization(groups=2, epsilon=EPSILON)
    outputs = compiled(lambda x: layer(x), mode)(tf.constant(x))
    expected = ref.group_norm(x, 2, -1, None, None, EPSILON)[0]
    ref.assert_close(outputs, expected, TOLERANCE)
