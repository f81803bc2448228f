"""Property tests: which outputs depend on the rest of the batch, and which never do."""

import functools

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kernorm
from modes import MODES

SETTINGS = settings(max_examples=25, deadline=None)
VALUES = st.floats(-10.0, 10.0, width=32, allow_nan=False, allow_infinity=False)
FEATURES = 4


def batches(min_batch=2, max_batch=6):
    """A float32 batch of (batch, 3, FEATURES) and, of the same shape, other values for its samples."""
    shape = st.integers(min_batch, max_batch).map(lambda batch: (batch, 3, FEATURES))
    return shape.flatmap(
        lambda shape: st.tuples(hnp.arrays(np.float32, shape, elements=VALUES), hnp.arrays(np.float32, shape, elements=VALUES))
    )


PER_SAMPLE_NORMS = {
    "layer": functools.partial(kernorm.LayerNormalization, axis=-1),
    "layer_2d": functools.partial(kernorm.LayerNormalization, axis=[1, 2]),
    "rms": kernorm.RMSNormalization,
    "group": functools.partial(kernorm.GroupNormalization, groups=2),
}
_LAYERS = {}


def _layer(name):
    """One layer per norm, with non-trivial weights, reused across examples."""
    if name not in _LAYERS:
        layer = PER_SAMPLE_NORMS[name]() if name in PER_SAMPLE_NORMS else kernorm.BatchNormalization()
        layer.build((None, 3, FEATURES))
        rng = np.random.default_rng(0)
        for weight in layer.weights:
            weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
        _LAYERS[name] = layer
    return _LAYERS[name]


@SETTINGS
@given(data=batches(), name=st.sampled_from(sorted(PER_SAMPLE_NORMS)), training=st.booleans())
def test_per_sample_norm_output_never_depends_on_other_samples(data, name, training):
    x, others = data
    changed = others.copy()
    changed[0] = x[0]
    layer = _layer(name)
    first = layer(x, training=training).numpy()[0]
    np.testing.assert_array_equal(first, layer(changed, training=training).numpy()[0])
    # Nor on how many other samples there are.
    np.testing.assert_allclose(first, layer(x[:1], training=training).numpy()[0], rtol=0, atol=1e-6)


@SETTINGS
@given(data=batches(min_batch=3))
def test_batch_norm_training_output_depends_on_other_samples(data):
    x, _ = data
    # Unless sample 0 sits at the batch mean, it is normalized to a non-zero value...
    assume(np.max(np.abs(x[0].astype(np.float64) - x.mean(0, dtype=np.float64))) > 0.1)
    layer = kernorm.BatchNormalization(axis=[1, 2])  # statistics over the batch alone
    first = layer(x, training=True).numpy()[0]
    # ...while in a batch of copies of itself it sits at the mean, and gets beta alone.
    copies = np.broadcast_to(x[:1], x.shape)
    first_among_copies = layer(copies, training=True).numpy()[0]
    np.testing.assert_array_equal(first_among_copies, np.zeros_like(first))
    assert np.max(np.abs(first - first_among_copies)) > 1e-3


@SETTINGS
@given(data=batches(min_batch=3), delta=st.floats(1.0, 10.0) | st.floats(-10.0, -1.0))
def test_batch_norm_training_output_moves_with_the_batch_mean(data, delta):
    """Shifting every other sample by `delta` moves the batch mean, and with it sample 0's output.

    Sample 0 is kept strictly inside the range of the batch, so it cannot be the lone outlier
    whose normalized value saturates at +-sqrt(batch - 1) whatever the shift.
    """
    x, _ = data
    x = x.copy()
    x[2] = x[1] + 2.0
    x[0] = x[1] + 1.0
    shifted = x.copy()
    shifted[1:] += np.float32(delta)
    layer = kernorm.BatchNormalization(axis=[1, 2])
    difference = layer(x, training=True).numpy()[0] - layer(shifted, training=True).numpy()[0]
    # y0 is strictly monotone in the shift; over a shift of at least 1 it moves by more than 1e-4.
    assert np.max(np.abs(difference)) > 1e-5


@SETTINGS
@given(data=batches())
def test_batch_norm_inference_output_never_depends_on_other_samples(data):
    x, others = data
    layer = _layer("batch")
    layer.moving_mean.assign(np.linspace(-1.0, 1.0, FEATURES, dtype="float32"))
    layer.moving_variance.assign(np.linspace(0.5, 2.0, FEATURES, dtype="float32"))
    changed = others.copy()
    changed[0] = x[0]
    first = layer(x, training=False).numpy()[0]
    np.testing.assert_array_equal(first, layer(changed, training=False).numpy()[0])
    np.testing.assert_array_equal(first, layer(x[:1], training=False).numpy()[0])


# --- renorm: a step that counts nothing leaves every moving statistic exactly as it was ----

RENORM_FEATURES = 3
_RENORM = {}


def _renorm_steps(mode):
    """A renorm layer and its training steps in `mode`, `(x, mask) -> outputs` and `x -> outputs`,
    traced for any batch size, made once per mode and reused across examples (XLA compiles once
    per shape)."""
    if mode not in _RENORM:
        layer = kernorm.BatchNormalization(
            renorm=True, momentum=0.9, renorm_momentum=0.7, renorm_clipping={"rmin": 0.5, "rmax": 2.0, "dmax": 1.0}
        )
        layer.build((None, 5, RENORM_FEATURES))
        masked = lambda x, mask: layer(x, training=True, mask=mask)  # noqa: E731
        plain = lambda x: layer(x, training=True)  # noqa: E731
        if mode != "eager":
            inputs, mask = tf.TensorSpec((None, 5, RENORM_FEATURES)), tf.TensorSpec((None, 5), tf.bool)
            masked = tf.function(masked, input_signature=[inputs, mask], jit_compile=mode == "xla", autograph=False)
            plain = tf.function(plain, input_signature=[inputs], jit_compile=mode == "xla", autograph=False)
        _RENORM[mode] = layer, masked, plain
    return _RENORM[mode]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), trained=st.booleans())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nothing", ["empty-batch", "all-masked"])
def test_renorm_moving_statistics_stay_bit_identical_when_nothing_counts(nothing, mode, seed, trained):
    """From any state, a step with no samples or with every position masked changes no bit of the
    moving mean, variance and standard deviation, nor of renorm's own statistics. The states:
    random moving statistics (as `set_weights` may leave them, the moving variance apart from the
    moving standard deviation), then, if `trained`, a training step with part of the batch masked.
    The moving variance is derived from the moving standard deviation: recomputed from it, it
    would move (by a unit in the last place, in most seeds under XLA, after a training step)."""
    layer, masked, plain = _renorm_steps(mode)
    rng = np.random.default_rng(seed)
    for weight in layer.non_trainable_weights:
        weight.assign(rng.uniform(0.1, 3.0, weight.shape).astype("float32"))
    x = rng.normal(rng.uniform(-5.0, 5.0), rng.uniform(0.1, 5.0), (4, 5, RENORM_FEATURES)).astype("float32")
    if trained:
        masked(x, rng.uniform(size=(4, 5)) < 0.7)
    before = [weight.numpy().copy() for weight in layer.non_trainable_weights]
    if nothing == "empty-batch":
        outputs = plain(np.zeros((0, 5, RENORM_FEATURES), "float32"))
    else:
        outputs = masked(x, np.zeros((4, 5), bool))
    assert np.all(np.isfinite(np.asarray(outputs)))
    for old, weight in zip(before, layer.non_trainable_weights):
        np.testing.assert_array_equal(weight.numpy(), old, err_msg=weight.name)
