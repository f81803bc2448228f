"""Checks every zoo builder must pass: inference, overfitting a tiny batch, .keras and SavedModel round trips."""

import keras
import numpy as np
import tensorflow as tf

# The exported SavedModel against the model (rtol and atol): measured up to 7e-7 (ViT, ResNet).
TOLERANCE = 1e-5
# Batches of 1 and 8 may take different convolution and matmul kernels: a few ulps per layer add
# up, measured up to 6.5e-6 (the ImageNet ResNets).
BATCH_TOLERANCE = 1e-4
STEPS = 30


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def check_inference(model, x, num_classes):
    """Runs inference at batch sizes 8 and 1; inference never depends on the rest of the batch."""
    outputs = np.asarray(model(x, training=False))
    assert outputs.shape == (len(x), num_classes)
    assert np.all(np.isfinite(outputs))
    single = np.asarray(model(x[:1], training=False))
    assert single.shape == (1, num_classes)
    np.testing.assert_allclose(single, outputs[:1], rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE)


def check_overfits(model, x, y, learning_rate, factor=0.5, steps=STEPS):
    """Adam on one fixed batch: the training loss must fall to `factor` times its first value
    within `steps` steps (by half unless asked for more, where the steps are cheap).

    The steps run eagerly and stop once the loss is there: on a tiny model,
    tracing a training function costs more than the steps themselves.
    """
    optimizer = keras.optimizers.Adam(learning_rate)
    loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_function(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_weights)
        assert all(g is not None for g in gradients)
        optimizer.apply_gradients(zip(gradients, model.trainable_weights))
        losses.append(float(loss))
        if losses[-1] <= factor * losses[0]:
            break
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] <= factor * losses[0], f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}: {losses}"
    return losses


def check_round_trips(model, x, directory):
    """The .keras file (safe_mode=True, no custom_objects) and the exported SavedModel give the same outputs."""
    expected = np.asarray(model(x, training=False))
    path = str(directory / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    # The same weights through the same layers: the same bits.
    np.testing.assert_array_equal(loaded(x, training=False), expected)

    export_path = str(directory / "saved_model")
    model.export(export_path, verbose=False)
    reloaded = tf.saved_model.load(export_path)  # keep it: `serve` does not hold its variables
    served = reloaded.serve
    np.testing.assert_allclose(served(tf.constant(x)), expected, rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(served(tf.constant(x[:1])), expected[:1], rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE)


def check_builder(model, x, y, num_classes, directory, learning_rate=1e-2, **overfit):
    """All of the above on one model: inference, overfitting (`overfit`: `factor` and `steps` of
    `check_overfits`), then the round trips of the trained model."""
    check_inference(model, x, num_classes)
    check_overfits(model, x, y, learning_rate, **overfit)
    check_round_trips(model, x, directory)
