"""kernorm.AddNorm: post-norm `norm(x + f(x))` and pre-norm `x + f(norm(x))`, against hand-composed NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
import tolerances
from modes import compiled

TOLERANCE = tolerances.FLOAT32
SHAPE = (3, 4, 6)


def _dense(rng):
    dense = keras.layers.Dense(SHAPE[-1])
    dense.build(SHAPE)
    kernel = rng.normal(0.0, 0.5, dense.kernel.shape).astype("float32")
    bias = rng.normal(size=dense.bias.shape).astype("float32")
    dense.set_weights([kernel, bias])
    return dense, lambda x: x @ kernel.astype(np.float64) + bias


def _norm_reference(norm, x, block):
    weights = [w.numpy() for w in block.norm_layer.weights]
    if norm == "layer":
        return ref.layer_norm(x, -1, weights[0], weights[1], 1e-3)[0]
    if norm == "rms":
        return ref.rms_norm(x, -1, weights[0], 1e-6)[0]
    if norm == "batch":
        return ref.batch_norm(x, -1, weights[0], weights[1], 1e-3)[0]
    if norm == "group":
        return ref.group_norm(x, 2, -1, weights[0], weights[1], 1e-3)[0]
    return x


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("norm", ["layer", "rms", "batch", "group", None])
def test_matches_hand_composed(norm, norm_first, mode, rng):
    dense, dense_reference = _dense(rng)
    norm_kwargs = {"groups": 2} if norm == "group" else None
    block = kernorm.AddNorm(dense, norm=norm, norm_first=norm_first, norm_kwargs=norm_kwargs)
    block.build(SHAPE)
    for weight in block.norm_layer.trainable_weights:
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
    x = rng.normal(1.0, 2.0, SHAPE).astype("float32")
    outputs = compiled(lambda x: block(x, training=True), mode)(tf.constant(x))
    x64 = x.astype(np.float64)
    if norm_first:
        expected = x64 + dense_reference(_norm_reference(norm, x64, block))
    else:
        expected = _norm_reference(norm, x64 + dense_reference(x64), block)
    ref.assert_close(outputs, expected, TOLERANCE)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_gradients_match_a_hand_composed_keras_graph(norm_first, mode, rng):
    dense, _ = _dense(rng)
    block = kernorm.AddNorm(dense, norm="layer", norm_first=norm_first)
    block.build(SHAPE)
    norm = keras.layers.LayerNormalization(epsilon=1e-3)
    norm.build(SHAPE)
    norm.set_weights(block.norm_layer.get_weights())

    def composed(x):
        return x + dense(norm(x)) if norm_first else norm(x + dense(x))

    x = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    upstream = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    def gradients(function, variables):
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(function(x) * upstream)
            return tape.gradient(loss, [x, *variables])

        return compiled(step, mode)(x)

    results = [gradients(block, block.trainable_weights), gradients(composed, dense.trainable_weights + norm.trainable_weights)]
    assert len(results[0]) == len(results[1]) == 5
    for ours, theirs in zip(*results):
        ref.assert_close(ours, theirs, TOLERANCE)


def test_batch_norm_inside_follows_training(rng):
    dense, dense_reference = _dense(rng)
    block = kernorm.AddNorm(dense, norm="batch", norm_kwargs={"momentum": 0.5})
    x = rng.normal(3.0, 2.0, SHAPE).astype("float32")
    inference = block(x, training=False)
    np.testing.assert_array_equal(block.norm_layer.moving_mean.numpy(), np.zeros(SHAPE[-1]))
    ref.assert_close(inference, ref.batch_norm_inference(x + dense_reference(x), -1, np.zeros(6), np.ones(6)), TOLERANCE)
    block(x, training=True)
    _, _, mean, _ = ref.batch_norm(x + dense_reference(x.astype(np.float64)), -1)
    ref.assert_close(block.norm_layer.moving_mean.numpy(), 0.5 * mean, TOLERANCE)


def test_mask_reaches_the_norm(rng):
    dense, dense_reference = _dense(rng)
    block = kernorm.AddNorm(dense, norm="batch", norm_kwargs={"momentum": 0.0})
    x = rng.normal(size=SHAPE).astype("float32")
    mask = np.ones(SHAPE[:2], bool)
    mask[1:, 2:] = False
    block(x, training=True, mask=mask)
    residual = x + dense_reference(x.astype(np.float64))
    ref.assert_close(block.norm_layer.moving_mean.numpy(), residual[mask].mean(0), TOLERANCE)


def test_sublayer_keyword_arguments_are_passed(rng):
    class Scaled(keras.layers.Layer):
        def call(self, x, factor=1.0, training=None):
            return x * factor

    block = kernorm.AddNorm(Scaled(), norm=None)
    x = rng.normal(size=SHAPE).astype("float32")
    np.testing.assert_allclose(block(x, factor=3.0), 4.0 * x, rtol=1e-6)


def test_norm_kwargs_reach_the_norm():
    block = kernorm.AddNorm(keras.layers.Dense(6), norm="layer", norm_kwargs={"epsilon": 0.25})
    assert isinstance(block.norm_layer, kernorm.LayerNormalization)
    assert block.norm_layer.epsilon == 0.25


def test_weights_are_tracked(rng):
    block = kernorm.AddNorm(keras.layers.Dense(6), norm="batch")
    block.build(SHAPE)
    assert len(block.trainable_weights) == 4  # kernel, bias, gamma, beta
    assert len(block.non_trainable_weights) == 2  # moving mean and variance
