"""kernorm.BatchNormalization against a float64 NumPy reference, and against Keras's renorm."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
import tolerances
from modes import MODES, axis_fits, compiled, grid

SHAPES = {2: (8, 5), 3: (6, 4, 5), 4: (4, 3, 4, 5), 5: (3, 3, 2, 3, 4)}
AXES = (-1, 1, [1, 2])
GRID = grid(SHAPES, AXES, axis_fits)
# tf.function and XLA on a representative subset: both ranks ends, each axis form.
COMPILED_GRID = [(2, -1), (4, 1), (5, [1, 2]), (3, -1)]
MOMENTUM = 0.9
EPSILON = 1e-3
TOLERANCE = tolerances.FLOAT32


def _built_layer(shape, rng, **kwargs):
    return ref.built_with_random_affine(kernorm.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **kwargs), shape, rng)


def _training_step(layer):
    def step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, training=True)
            loss = tf.reduce_sum(outputs * upstream)
        return outputs, tape.gradient(loss, [x, layer.gamma, layer.beta])

    return step


def _check_three_training_steps(rank, axis, mode, rng):
    shape = SHAPES[rank]
    layer = _built_layer(shape, rng, axis=axis)
    step = compiled(_training_step(layer), mode)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    moving_mean = layer.moving_mean.numpy().astype(np.float64)
    moving_variance = layer.moving_variance.numpy().astype(np.float64)
    for i in range(3):
        x = rng.normal(2.0 + i, 3.0, shape).astype("float32")
        upstream = rng.normal(size=shape).astype("float32")
        outputs, (d_x, d_gamma, d_beta) = step(tf.constant(x), tf.constant(upstream))
        expected, grads, mean, variance = ref.batch_norm(x, axis, gamma, beta, EPSILON, upstream)
        ref.assert_close(outputs, expected, TOLERANCE, f"outputs, step {i}")
        for name, actual, wanted in zip(("x", "gamma", "beta"), (d_x, d_gamma, d_beta), grads):
            ref.assert_close(actual, wanted, TOLERANCE, f"d_{name}, step {i}")
        moving_mean = ref.moving_average(moving_mean, mean, MOMENTUM)
        moving_variance = ref.moving_average(moving_variance, variance, MOMENTUM)
        ref.assert_close(layer.moving_mean.numpy(), moving_mean, TOLERANCE, f"moving_mean, step {i}")
        ref.assert_close(layer.moving_variance.numpy(), moving_variance, TOLERANCE, f"moving_variance, step {i}")
    x = rng.normal(4.0, 3.0, shape).astype("float32")
    inference = compiled(lambda x: layer(x, training=False), mode)(tf.constant(x))
    expected = ref.batch_norm_inference(x, axis, moving_mean, moving_variance, gamma, beta, EPSILON)
    ref.assert_close(inference, expected, TOLERANCE, "inference outputs")


@pytest.mark.parametrize("rank, axis", GRID)
def test_training_steps_match_reference_eager(rank, axis, rng):
    _check_three_training_steps(rank, axis, "eager", rng)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("rank, axis", COMPILED_GRID)
def test_training_steps_match_reference_compiled(rank, axis, mode, rng):
    _check_three_training_steps(rank, axis, mode, rng)


@pytest.mark.parametrize("center, scale", [(False, True), (True, False), (False, False)])
def test_without_center_or_scale(center, scale, rng):
    shape = (6, 3, 4)
    layer = _built_layer(shape, rng, center=center, scale=scale)
    assert (layer.gamma is not None) == scale and (layer.beta is not None) == center
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    gamma = layer.gamma.numpy() if scale else None
    beta = layer.beta.numpy() if center else None
    expected, _, _, _ = ref.batch_norm(x, -1, gamma, beta, EPSILON)
    ref.assert_close(layer(x, training=True), expected, TOLERANCE)


@pytest.mark.parametrize("mode", MODES)
def test_inference_uses_moving_statistics_and_leaves_them(mode, rng):
    shape = (5, 4, 3)
    layer = _built_layer(shape, rng, axis=1)
    layer.moving_mean.assign(rng.normal(size=4).astype("float32"))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
    before = [w.numpy().copy() for w in layer.weights]
    x = rng.normal(3.0, 2.0, shape).astype("float32")
    outputs = compiled(lambda x: layer(x, training=False), mode)(tf.constant(x))
    expected = ref.batch_norm_inference(
        x, 1, before[2], before[3], layer.gamma.numpy(), layer.beta.numpy(), EPSILON
    )
    ref.assert_close(outputs, expected, TOLERANCE)
    for old, new in zip(before, layer.weights):
        assert np.array_equal(old, new.numpy())


def test_default_call_is_inference(rng):
    """Called without `training`, the layer uses its moving statistics, as Keras's does."""
    layer = _built_layer((6, 3), rng)
    layer.moving_mean.assign([1.0, -1.0, 0.5])
    x = rng.normal(size=(6, 3)).astype("float32")
    expected = ref.batch_norm_inference(x, -1, [1.0, -1.0, 0.5], np.ones(3), layer.gamma.numpy(), layer.beta.numpy())
    ref.assert_close(layer(x), expected, TOLERANCE)


def test_trainable_false_means_inference(rng):
    shape = (8, 3)
    layer = _built_layer(shape, rng)
    layer.moving_mean.assign([0.5, -0.5, 2.0])
    layer.moving_variance.assign([2.0, 0.5, 1.5])
    layer.trainable = False
    x = rng.normal(5.0, 3.0, shape).astype("float32")
    outputs = layer(x, training=True)
    expected = ref.batch_norm_inference(
        x, -1, [0.5, -0.5, 2.0], [2.0, 0.5, 1.5], layer.gamma.numpy(), layer.beta.numpy(), EPSILON
    )
    ref.assert_close(outputs, expected, TOLERANCE)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.float32([0.5, -0.5, 2.0]))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.float32([2.0, 0.5, 1.5]))
    # Once trainable again, training=True uses the batch statistics.
    layer.trainable = True
    expected, _, _, _ = ref.batch_norm(x, -1, layer.gamma.numpy(), layer.beta.numpy(), EPSILON)
    ref.assert_close(layer(x, training=True), expected, TOLERANCE)


# --- masks ----------------------------------------------------------------


def _padding_mask(rng, batch, time):
    lengths = rng.integers(1, time + 1, batch)
    lengths[0] = time
    return np.arange(time)[None, :] < lengths[:, None]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("full_rank_mask", [False, True])
def test_masked_statistics_count_only_unmasked_positions(mode, full_rank_mask, rng):
    shape = (4, 6, 3)
    layer = _built_layer(shape, rng)
    mask = _padding_mask(rng, 4, 6)
    if full_rank_mask:
        mask = np.broadcast_to(mask[..., None], shape) & (rng.uniform(size=shape) < 0.8)
        mask[0, 0] = True
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    # Masked positions hold wild values that must not leak into the statistics.
    layer_mask = mask if full_rank_mask else mask[..., None]
    x = np.where(layer_mask, x, np.float32(1e3))
    upstream = rng.normal(size=shape).astype("float32")

    def step(x, mask, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(outputs * upstream)
        return outputs, tape.gradient(loss, x)

    outputs, d_x = compiled(step, mode)(tf.constant(x), tf.constant(mask), tf.constant(upstream))
    expected, expected_d_x, mean, variance, _ = ref.masked_batch_norm(
        x, -1, layer_mask, layer.gamma.numpy(), layer.beta.numpy(), EPSILON, upstream
    )
    unmasked = np.broadcast_to(layer_mask, shape)
    ref.assert_close(np.asarray(outputs)[unmasked], expected[unmasked], TOLERANCE, "outputs")
    ref.assert_close(d_x, expected_d_x, TOLERANCE, "d_x")
    ref.assert_close(layer.moving_mean.numpy(), ref.moving_average(0.0, mean, MOMENTUM), TOLERANCE)
    ref.assert_close(layer.moving_variance.numpy(), ref.moving_average(1.0, variance, MOMENTUM), TOLERANCE)


def test_mask_matches_keras_masked_batch_norm(rng):
    shape = (4, 6, 3)
    mask = _padding_mask(rng, 4, 6)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    ours, theirs = kernorm.BatchNormalization(momentum=0.8), keras.layers.BatchNormalization(momentum=0.8)
    ref.assert_close(ours(x, training=True, mask=mask), theirs(x, training=True, mask=mask), TOLERANCE)
    for a, b in zip(ours.weights, theirs.weights):
        ref.assert_close(a.numpy(), b.numpy(), TOLERANCE, a.name)


def test_keras_propagated_mask_reaches_batch_norm(rng):
    """A mask from Embedding(mask_zero=True) drives the statistics in a functional model."""
    tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]])
    inputs = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(8, 3, mask_zero=True)(inputs)
    norm = kernorm.BatchNormalization(momentum=0.0)
    model = keras.Model(inputs, norm(embedded))
    model(tokens, training=True)
    vectors = model.layers[1](tokens).numpy()[tokens > 0]
    ref.assert_close(norm.moving_mean.numpy(), vectors.mean(0), TOLERANCE)
    ref.assert_close(norm.moving_variance.numpy(), vectors.var(0), TOLERANCE)


# --- ghost batch norm -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, axis", [((12, 3), -1), ((8, 3, 2, 2), 1)])
def test_virtual_batch_size_normalizes_each_sub_batch(shape, axis, mode, rng):
    size = 4
    layer = _built_layer(shape, rng, axis=axis, virtual_batch_size=size)
    x = rng.normal(0.0, 1.0, shape).astype("float32")
    x += np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)).astype("float32")  # sub-batches differ
    upstream = rng.normal(size=shape).astype("float32")
    outputs, (d_x, d_gamma, d_beta) = compiled(_training_step(layer), mode)(tf.constant(x), tf.constant(upstream))
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    pieces = [
        ref.batch_norm(x[i:i + size], axis, gamma, beta, EPSILON, upstream[i:i + size])
        for i in range(0, shape[0], size)
    ]
    ref.assert_close(outputs, np.concatenate([p[0] for p in pieces]), TOLERANCE, "outputs")
    ref.assert_close(d_x, np.concatenate([p[1][0] for p in pieces]), TOLERANCE, "d_x")
    ref.assert_close(d_gamma, sum(p[1][1] for p in pieces), TOLERANCE, "d_gamma")
    ref.assert_close(d_beta, sum(p[1][2] for p in pieces), TOLERANCE, "d_beta")
    mean = np.mean([p[2] for p in pieces], axis=0)
    variance = np.mean([p[3] for p in pieces], axis=0)
    ref.assert_close(layer.moving_mean.numpy(), ref.moving_average(0.0, mean, MOMENTUM), TOLERANCE)
    ref.assert_close(layer.moving_variance.numpy(), ref.moving_average(1.0, variance, MOMENTUM), TOLERANCE)


def test_virtual_batch_size_with_mask_weights_sub_batches_by_count(rng):
    shape, size = (8, 5, 2), 4
    layer = _built_layer(shape, rng, virtual_batch_size=size)
    mask = np.ones((8, 5), bool)
    mask[:4, 2:] = False  # the first sub-batch counts 8 positions, the second 20
    x = rng.normal(size=shape).astype("float32")
    x[4:] += 3.0
    outputs = layer(x, training=True, mask=mask).numpy()
    means, variances, counts = [], [], []
    for i in (0, 4):
        out, _, mean, variance, count = ref.masked_batch_norm(
            x[i:i + size], -1, mask[i:i + size, :, None], layer.gamma.numpy(), layer.beta.numpy(), EPSILON
        )
        ref.assert_close(outputs[i:i + size][mask[i:i + size]], out[mask[i:i + size]], TOLERANCE)
        means.append(mean), variances.append(variance), counts.append(count)
    mean = (means[0] * counts[0] + means[1] * counts[1]) / (counts[0] + counts[1])
    variance = (variances[0] * counts[0] + variances[1] * counts[1]) / (counts[0] + counts[1])
    ref.assert_close(layer.moving_mean.numpy(), ref.moving_average(0.0, mean, MOMENTUM), TOLERANCE)
    ref.assert_close(layer.moving_variance.numpy(), ref.moving_average(1.0, variance, MOMENTUM), TOLERANCE)


def test_virtual_batch_size_inference_uses_moving_statistics(rng):
    layer = _built_layer((6, 3), rng, virtual_batch_size=3)
    x = rng.normal(size=(6, 3)).astype("float32")
    expected = ref.batch_norm_inference(x, -1, np.zeros(3), np.ones(3), layer.gamma.numpy(), layer.beta.numpy())
    ref.assert_close(layer(x, training=False), expected, TOLERANCE)


# --- renorm -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clipping", [None, {"rmax": 1.5, "rmin": 0.8, "dmax": 0.5}])
def test_renorm_matches_keras(clipping, mode, rng):
    shape = (8, 4)
    kwargs = dict(momentum=0.8, renorm=True, renorm_clipping=clipping, renorm_momentum=0.7)
    ours = kernorm.BatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(shape), theirs.build(shape)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    weights = [rng.uniform(0.5, 1.5, 4).astype("float32"), rng.normal(size=4).astype("float32")]
    ours.set_weights(weights + ours.get_weights()[2:]), theirs.set_weights(weights + theirs.get_weights()[2:])
    our_step = compiled(_training_step(ours), mode)
    their_step = compiled(_training_step(theirs), mode)
    for i in range(3):
        x = tf.constant(rng.normal(2.0 * i, 1.0 + i, shape).astype("float32"))
        upstream = tf.constant(rng.normal(size=shape).astype("float32"))
        (our_out, our_grads), (their_out, their_grads) = our_step(x, upstream), their_step(x, upstream)
        ref.assert_close(our_out, their_out, TOLERANCE, f"outputs, step {i}")
        for a, b in zip(our_grads, their_grads):
            ref.assert_close(a, b, TOLERANCE, f"gradients, step {i}")
        for a, b in zip(ours.weights, theirs.weights):
            ref.assert_close(a.numpy(), b.numpy(), TOLERANCE, f"{a.name}, step {i}")
    x = rng.normal(size=shape).astype("float32")
    ref.assert_close(ours(x, training=False), theirs(x, training=False), TOLERANCE, "inference")


def test_masked_renorm_matches_keras(rng):
    shape = (4, 6, 3)
    mask = _padding_mask(rng, 4, 6)
    kwargs = dict(momentum=0.8, renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}, renorm_momentum=0.7)
    ours, theirs = kernorm.BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    for i in range(2):
        x = rng.normal(1.0 + i, 2.0, shape).astype("float32")
        ref.assert_close(ours(x, training=True, mask=mask), theirs(x, training=True, mask=mask), TOLERANCE, f"step {i}")
        for a, b in zip(ours.weights, theirs.weights):
            ref.assert_close(a.numpy(), b.numpy(), TOLERANCE, f"{a.name}, step {i}")


def test_renorm_clipped_to_no_correction_is_plain_batch_norm(rng):
    """Renorm statistics far from the batch's, with r and d clipped to 1 and 0."""
    layer = kernorm.BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.0, "rmin": 1.0, "dmax": 0.0})
    x = rng.normal(5.0, 3.0, (16, 2)).astype("float32")
    # r = 1 and d = 0 after clipping: plain batch norm.
    expected, _, _, _ = ref.batch_norm(x, -1)
    ref.assert_close(layer(x, training=True), expected, TOLERANCE)


# --- edge cases -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_empty_batch_leaves_moving_statistics_bit_identical(kwargs, mode, rng):
    layer = _built_layer((4, 3), rng, **kwargs)
    layer(rng.normal(size=(4, 3)).astype("float32"), training=True)
    before = [w.numpy().copy() for w in layer.non_trainable_weights]
    outputs = compiled(lambda x: layer(x, training=True), mode)(tf.zeros((0, 3)))
    assert outputs.shape == (0, 3)
    for old, new in zip(before, layer.non_trainable_weights):
        assert np.array_equal(old, new.numpy()), new.name


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}])
def test_empty_batch_in_a_graph_traced_for_any_batch_size(kwargs, rng):
    """The check for one value per channel lets an empty batch through: it counts nothing."""
    layer = _built_layer((None, 3), rng, **kwargs)
    step = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec((None, 3))])
    step(rng.normal(size=(4, 3)).astype("float32"))
    before = [w.numpy().copy() for w in layer.non_trainable_weights]
    assert step(tf.zeros((0, 3))).shape == (0, 3)
    for old, new in zip(before, layer.non_trainable_weights):
        assert np.array_equal(old, new.numpy()), new.name
    with pytest.raises(tf.errors.InvalidArgumentError, match="one value per channel"):
        step(tf.ones((1, 3)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_all_masked_step_leaves_moving_statistics_bit_identical(kwargs, mode, rng):
    layer = _built_layer((4, 5, 3), rng, **kwargs)
    layer(rng.normal(size=(4, 5, 3)).astype("float32"), training=True)
    before = [w.numpy().copy() for w in layer.non_trainable_weights]
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    outputs = compiled(lambda x, m: layer(x, training=True, mask=m), mode)(x, tf.zeros((4, 5), bool))
    assert np.all(np.isfinite(outputs))
    for old, new in zip(before, layer.non_trainable_weights):
        assert np.array_equal(old, new.numpy()), new.name


def test_partly_masked_channels_keep_only_their_moving_statistics(rng):
    """With a full-rank mask, a channel with no unmasked value keeps its moving statistics."""
    layer = _built_layer((4, 3), rng)
    mask = np.ones((4, 3), bool)
    mask[:, 1] = False
    layer(rng.normal(3.0, 2.0, (4, 3)).astype("float32"), training=True, mask=mask)
    assert layer.moving_mean.numpy()[1] == 0.0 and layer.moving_variance.numpy()[1] == 1.0
    assert layer.moving_mean.numpy()[0] != 0.0 and layer.moving_mean.numpy()[2] != 0.0


def test_synchronized_outside_a_strategy_is_plain_batch_norm(rng):
    x = rng.normal(1.0, 2.0, (8, 3)).astype("float32")
    layer = kernorm.BatchNormalization(synchronized=True, momentum=MOMENTUM)
    expected, _, mean, variance = ref.batch_norm(x, -1)
    ref.assert_close(layer(x, training=True), expected, TOLERANCE)
    ref.assert_close(layer.moving_mean.numpy(), ref.moving_average(0.0, mean, MOMENTUM), TOLERANCE)
    ref.assert_close(layer.moving_variance.numpy(), ref.moving_average(1.0, variance, MOMENTUM), TOLERANCE)


def test_unknown_batch_size_in_a_function(rng):
    layer = _built_layer((None, 4), rng)
    step = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec((None, 4))])
    for batch in (3, 7):
        x = rng.normal(size=(batch, 4)).astype("float32")
        expected, _, _, _ = ref.batch_norm(x, -1, layer.gamma.numpy(), layer.beta.numpy(), EPSILON)
        ref.assert_close(step(x), expected, TOLERANCE)


def test_weights_have_keras_names_and_order():
    ours, theirs = kernorm.BatchNormalization(), keras.layers.BatchNormalization()
    ours.build((2, 3)), theirs.build((2, 3))
    assert [(w.name, w.shape, w.trainable) for w in ours.weights] == [
        (w.name, w.shape, w.trainable) for w in theirs.weights
    ]


def test_regularizers_apply_to_gamma_and_beta(rng):
    """(Constraints are checked in training, in test_drop_in.py.)"""
    layer = kernorm.BatchNormalization(
        gamma_regularizer=keras.regularizers.L2(0.5), beta_regularizer=keras.regularizers.L1(0.25),
    )
    layer.build((4, 3))
    layer.gamma.assign([1.0, 2.0, 3.0])
    layer.beta.assign([-1.0, 1.0, 2.0])
    np.testing.assert_allclose(sum(float(loss) for loss in layer.losses), 0.5 * 14 + 0.25 * 4, rtol=1e-6)
