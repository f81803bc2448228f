"""kernorm.LayerNormalization against a float64 NumPy reference and against Keras's layer."""

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
EPSILON = 1e-3
TOLERANCE = tolerances.FLOAT32


def _built_layer(shape, rng, **kwargs):
    return ref.built_with_random_affine(kernorm.LayerNormalization(epsilon=EPSILON, **kwargs), shape, rng)


def _check_forward_and_gradients(rank, axis, mode, rng):
    shape = SHAPES[rank]
    layer = _built_layer(shape, rng, axis=axis)

    def step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x)
            loss = tf.reduce_sum(outputs * upstream)
        return outputs, tape.gradient(loss, [x, layer.gamma, layer.beta])

    step = compiled(step, mode)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    upstream = rng.normal(size=shape).astype("float32")
    outputs, grads = step(tf.constant(x), tf.constant(upstream))
    expected, expected_grads = ref.layer_norm(x, axis, layer.gamma.numpy(), layer.beta.numpy(), EPSILON, upstream)
    ref.assert_close(outputs, expected, TOLERANCE, "outputs")
    for name, actual, wanted in zip(("x", "gamma", "beta"), grads, expected_grads):
        ref.assert_close(actual, wanted, TOLERANCE, f"d_{name}")


@pytest.mark.parametrize("rank, axis", GRID)
def test_matches_reference_eager(rank, axis, rng):
    _check_forward_and_gradients(rank, axis, "eager", rng)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("rank, axis", COMPILED_GRID)
def test_matches_reference_compiled(rank, axis, mode, rng):
    _check_forward_and_gradients(rank, axis, mode, rng)


@pytest.mark.parametrize("center, scale", [(False, True), (True, False), (False, False)])
def test_without_center_or_scale(center, scale, rng):
    shape = (3, 4, 5)
    layer = _built_layer(shape, rng, center=center, scale=scale)
    assert (layer.gamma is not None) == scale and (layer.beta is not None) == center
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    gamma = layer.gamma.numpy() if scale else None
    beta = layer.beta.numpy() if center else None
    ref.assert_close(layer(x), ref.layer_norm(x, -1, gamma, beta, EPSILON)[0], TOLERANCE)


def test_training_and_inference_are_identical(rng):
    layer = _built_layer((4, 3, 6), rng)
    x = rng.normal(size=(4, 3, 6)).astype("float32")
    np.testing.assert_array_equal(layer(x, training=True), layer(x, training=False))
    assert not layer.non_trainable_weights


@pytest.mark.parametrize("axis", [-1, [1, 2]])
def test_matches_keras_layer_normalization(axis, rng):
    shape = (3, 4, 5)
    ours = kernorm.LayerNormalization(axis=axis)
    theirs = keras.layers.LayerNormalization(axis=axis)
    ours.build(shape), theirs.build(shape)
    assert [(w.name, w.shape) for w in ours.weights] == [(w.name, w.shape) for w in theirs.weights]
    weights = [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in ours.weights]
    ours.set_weights(weights), theirs.set_weights(weights)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    ref.assert_close(ours(x), theirs(x), TOLERANCE)


def test_zero_variance_input_gives_beta(rng):
    layer = _built_layer((2, 5), rng)
    x = np.full((2, 5), 7.0, "float32")
    np.testing.assert_allclose(layer(x), np.broadcast_to(layer.beta.numpy(), (2, 5)), atol=1e-6)

