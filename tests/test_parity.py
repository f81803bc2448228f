"""Drop-in parity: the same models built with keras.layers and with kernorm agree.

Each builder takes the module the norms come from, so the two models differ only
in that "import". They start from the same seed and the same weights.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
import tolerances

TOLERANCE = tolerances.KERAS
BATCH = 8


def small_cnn(norms):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = norms.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 3, strides=2, use_bias=False)(x)
    x = norms.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = norms.LayerNormalization()(x)
    outputs = keras.layers.Dense(5)(x)
    return keras.Model(inputs, outputs)


def encoder_block(norms, sequence=6, width=8):
    inputs = keras.Input((sequence, width))
    attention_layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    attention = attention_layer(inputs, inputs)
    x = norms.LayerNormalization(epsilon=1e-6)(keras.layers.Add()([inputs, attention]))
    feed_forward = keras.layers.Dense(16, activation="relu")(x)
    feed_forward = keras.layers.Dense(width)(feed_forward)
    x = norms.LayerNormalization(epsilon=1e-6)(keras.layers.Add()([x, feed_forward]))
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(3)(x)
    model = keras.Model(inputs, outputs)
    # The key bias adds the same logit to every key, which softmax ignores: its gradient is zero
    # in exact arithmetic, and its computed value is rounding noise that Adam would turn into a
    # full-size step. It is frozen so the comparison measures the norms, not that noise.
    attention_layer.key_dense.bias.trainable = False
    return model


MODELS = {"cnn": (small_cnn, (8, 8, 3), 5), "encoder": (encoder_block, (6, 8), 3)}


def _twins(name):
    builder, _, _ = MODELS[name]
    keras.utils.set_random_seed(7)
    theirs = builder(keras.layers)
    keras.utils.set_random_seed(7)
    ours = builder(kernorm)
    ours.set_weights(theirs.get_weights())
    # The swap really happened: the norms differ, nothing else does.
    our_types = [type(layer) for layer in ours.layers]
    their_types = [type(layer) for layer in theirs.layers]
    swapped = [(a, b) for a, b in zip(our_types, their_types) if a is not b]
    assert swapped and all(a.__module__.startswith("kernorm") for a, _ in swapped)
    assert len(ours.weights) == len(theirs.weights)
    return ours, theirs


def _data(name, rng):
    _, shape, classes = MODELS[name]
    x = rng.normal(1.0, 2.0, (BATCH, *shape)).astype("float32")
    y = rng.integers(0, classes, BATCH)
    return x, y


def _assert_same_weights(ours, theirs, what):
    for a, b in zip(ours.weights, theirs.weights):
        assert a.path.split("/")[-1] == b.path.split("/")[-1]
        ref.assert_close(a.numpy(), b.numpy(), TOLERANCE, f"{what}: {b.path}")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_forward_pass_agrees(name, training, rng):
    ours, theirs = _twins(name)
    x, _ = _data(name, rng)
    ref.assert_close(ours(x, training=training), theirs(x, training=training), TOLERANCE)
    _assert_same_weights(ours, theirs, "after the forward pass")


def _one_step(model, optimizer, x, y, training):
    loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_function(y, model(x, training=training))
    gradients = tape.gradient(loss, model.trainable_weights)
    optimizer.apply_gradients(zip(gradients, model.trainable_weights))
    return loss, gradients


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_one_optimizer_step_agrees(name, optimizer, training, rng):
    ours, theirs = _twins(name)
    x, y = _data(name, rng)
    make = {"sgd": lambda: keras.optimizers.SGD(0.1), "adam": lambda: keras.optimizers.Adam(1e-2)}[optimizer]
    our_loss, our_gradients = _one_step(ours, make(), x, y, training)
    their_loss, their_gradients = _one_step(theirs, make(), x, y, training)
    ref.assert_close(our_loss, their_loss, TOLERANCE, "loss")
    for a, b, weight in zip(our_gradients, their_gradients, theirs.trainable_weights):
        ref.assert_close(a, b, TOLERANCE, f"gradient of {weight.path}")
    _assert_same_weights(ours, theirs, "after one step")
    for mode in (True, False):
        ref.assert_close(ours(x, training=mode), theirs(x, training=mode), TOLERANCE, f"training={mode} after the step")


def test_moving_statistics_after_fit_agree(rng):
    """Through Keras's own training loop, the moving statistics match too."""
    ours, theirs = _twins("cnn")
    x, y = _data("cnn", rng)
    for model in (ours, theirs):
        model.compile(
            keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    moving = [(a, b) for a, b in zip(ours.weights, theirs.weights) if "moving" in b.path]
    assert len(moving) == 4
    for a, b in moving:
        assert not np.allclose(b.numpy(), 0.0) and not np.allclose(b.numpy(), 1.0)
    _assert_same_weights(ours, theirs, "after fit")
    ref.assert_close(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), TOLERANCE, "predict")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("BatchNormalization", {"axis": 1, "momentum": 0.9, "renorm": True, "renorm_clipping": {"rmax": 3.0}}),
        ("LayerNormalization", {"axis": [1, 2], "epsilon": 1e-5, "center": False}),
        ("RMSNormalization", {"axis": -1, "epsilon": 1e-5}),
        ("GroupNormalization", {"groups": 2, "axis": -1}),
    ],
)
def test_keras_configs_load_into_kernorm(name, kwargs, rng):
    """A config written by a keras.layers norm builds the kernorm layer with the same meaning."""
    theirs = getattr(keras.layers, name)(**kwargs)
    shape = (4, 3, 6)
    theirs.build(shape)
    ours = getattr(kernorm, name).from_config(theirs.get_config())
    ours.build(shape)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in theirs.weights]
    theirs.set_weights(weights), ours.set_weights(weights)
    x = rng.normal(size=shape).astype("float32")
    for training in (False, True):
        ref.assert_close(ours(x, training=training), theirs(x, training=training), TOLERANCE)
