"""kernorm.RMSNormalization against a float64 NumPy reference and against Keras's layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
import tolerances
from modes import axis_fits, compiled, grid

SHAPES = {2: (4, 6), 3: (3, 4, 5), 4: (2, 3, 4, 5), 5: (2, 3, 2, 3, 4)}
AXES = (-1, 1, [1, 2])
GRID = grid(SHAPES, AXES, axis_fits)
COMPILED_GRID = [(2, -1), (4, 1), (5, [1, 2]), (3, -1)]
EPSILON = 1e-6
TOLERANCE = tolerances.FLOAT32


def _check_forward_and_gradients(rank, axis, mode, rng):
    shape = SHAPES[rank]
    layer = kernorm.RMSNormalization(axis=axis, epsilon=EPSILON)
    layer.build(shape)
    layer.scale.assign(rng.uniform(0.5, 1.5, layer.scale.shape).astype("float32"))

    def step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x)
            loss = tf.reduce_sum(outputs * upstream)
        return outputs, tape.gradient(loss, [x, layer.scale])

    x = rng.normal(0.5, 2.0, shape).astype("float32")
    upstream = rng.normal(size=shape).astype("float32")
    outputs, grads = compiled(step, mode)(tf.constant(x), tf.constant(upstream))
    expected, expected_grads = ref.rms_norm(x, axis, layer.scale.numpy(), EPSILON, upstream)
    ref.assert_close(outputs, expected, TOLERANCE, "outputs")
    for name, actual, wanted in zip(("x", "scale"), grads, expected_grads):
        ref.assert_close(actual, wanted, TOLERANCE, f"d_{name}")


@pytest.mark.parametrize("rank, axis", GRID)
def test_matches_reference_eager(rank, axis, rng):
    _check_forward_and_gradients(rank, axis, "eager", rng)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("rank, axis", COMPILED_GRID)
def test_matches_reference_compiled(rank, axis, mode, rng):
    _check_forward_and_gradients(rank, axis, mode, rng)


def test_does_not_centre(rng):
    """Unlike layer norm, a constant shift changes the output: x / rms(x), not (x - mean) / std."""
    layer = kernorm.RMSNormalization()
    x = np.full((2, 4), 3.0, "float32")
    np.testing.assert_allclose(layer(x), np.ones((2, 4)), rtol=1e-6)


@pytest.mark.parametrize("axis", [-1, [1, 2]])
def test_matches_keras_rms_normalization(axis, rng):
    shape = (3, 4, 5)
    ours, theirs = kernorm.RMSNormalization(axis=axis), keras.layers.RMSNormalization(axis=axis)
    ours.build(shape), theirs.build(shape)
    assert [(w.name, tuple(w.shape)) for w in ours.weights] == [(w.name, tuple(w.shape)) for w in theirs.weights]
    weights = [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in ours.weights]
    ours.set_weights(weights), theirs.set_weights(weights)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    ref.assert_close(ours(x), theirs(x), TOLERANCE)


def test_scale_initializer_and_regularizer():
    """(`scale_constraint` is checked in training, in test_drop_in.py.)"""
    layer = kernorm.RMSNormalization(
        scale_initializer=keras.initializers.Constant(2.0),
        scale_regularizer=keras.regularizers.L2(0.5),
    )
    layer.build((2, 3))
    np.testing.assert_array_equal(layer.scale.numpy(), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(float(sum(layer.losses)), 0.5 * 12, rtol=1e-6)
