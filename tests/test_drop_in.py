"""The drop-in promise off the happy path: what Keras's layers accept, kernorm's accept with the same meaning.

Keras's own test files run against kernorm in `test_keras_suite.py`; this file checks the
items behind them against float64 references: `rms_scaling`, inputs of another rank than
the one built for, float32 inputs under mixed policies, ragged inputs, group norm's XLA
gradient for a large mean, a training batch with one value per channel, and `.keras`
files of the zoo that load after `import kernorm` alone.
"""

import functools
import inspect
import json
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
import tolerances
from modes import compiled

FLOAT32_TOLERANCE = tolerances.FLOAT32
HALF_TOLERANCE = {"mixed_float16": tolerances.FLOAT16, "mixed_bfloat16": tolerances.BFLOAT16}


def _affine(x, axes, gamma, beta):
    shape = [1] * x.ndim
    for axis in axes:
        shape[axis] = x.shape[axis]
    return x * np.reshape(gamma, shape) + (0.0 if beta is None else np.reshape(beta, shape))


# --- Keras's arguments, with Keras's defaults and meaning ---------------------------------

KERAS_LAYERS = {
    "batch": (kernorm.BatchNormalization, keras.layers.BatchNormalization),
    "layer": (kernorm.LayerNormalization, keras.layers.LayerNormalization),
    "rms": (kernorm.RMSNormalization, keras.layers.RMSNormalization),
    "group": (kernorm.GroupNormalization, keras.layers.GroupNormalization),
}


@pytest.mark.parametrize("name", list(KERAS_LAYERS))
def test_every_keras_argument_is_accepted_with_the_same_default(name):
    ours, theirs = KERAS_LAYERS[name]
    our_parameters = inspect.signature(ours.__init__).parameters
    for parameter in inspect.signature(theirs.__init__).parameters.values():
        if parameter.name == "self" or parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert parameter.name in our_parameters, parameter.name
        assert our_parameters[parameter.name].default == parameter.default, parameter.name
    # The defaults as a built layer holds them, in its config.
    our_config, their_config = ours().get_config(), theirs().get_config()
    shared = (set(our_config) & set(their_config)) - {"name"}
    assert {key: our_config[key] for key in shared} == {key: their_config[key] for key in shared}


CONSTRAINED = {
    "batch": (kernorm.BatchNormalization, ("gamma", "beta")),
    "layer": (kernorm.LayerNormalization, ("gamma", "beta")),
    "group": (functools.partial(kernorm.GroupNormalization, groups=2), ("gamma", "beta")),
    "rms": (kernorm.RMSNormalization, ("scale",)),
}


@pytest.mark.parametrize("name", list(CONSTRAINED))
def test_constraints_hold_after_a_training_step(name, rng):
    """One step of `fit` pushes every weight far below 0 (the loss is the outputs times
    1 + their sign at the start, so each scale and offset has a positive gradient); with
    `non_neg` constraints the weights end at 0, without them below 0."""
    make, names = CONSTRAINED[name]
    x = rng.normal(1.0, 2.0, (16, 8)).astype("float32")
    results = {}
    for constrained in (True, False):
        layer = make(**{f"{weight}_constraint": "non_neg" for weight in names if constrained})
        model = keras.Sequential([keras.Input((8,)), layer])
        target = 1.0 + np.sign(np.asarray(layer(x, training=True)))
        model.compile(optimizer=keras.optimizers.SGD(1000.0), loss=lambda target, outputs: keras.ops.mean(target * outputs))
        model.fit(x, target, batch_size=16, epochs=1, verbose=0)
        results[constrained] = [getattr(layer, weight).numpy() for weight in names]
    for weight, free, held in zip(names, results[False], results[True]):
        assert np.all(free < 0), (weight, free)
        np.testing.assert_array_equal(held, np.zeros_like(held), err_msg=weight)


# --- rms_scaling ------------------------------------------------------------------


def _variance_scaled(x, axis, gamma, epsilon):
    """Keras's deprecated `rms_scaling`: gamma * x / sqrt(var(x) + epsilon), in float64."""
    x = np.asarray(x, np.float64)
    axes = ref.canonical(axis, x.ndim)
    variance = x.var(axis=axes, keepdims=True)
    return _affine(x / np.sqrt(variance + epsilon), axes, gamma, None)


@pytest.mark.parametrize("axis", [-1, [1, 2]])
def test_rms_scaling_matches_reference_and_keras(axis, rng):
    shape = (3, 4, 5)
    with pytest.warns(UserWarning, match="rms_scaling.*deprecated"):
        ours = kernorm.LayerNormalization(axis=axis, rms_scaling=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = keras.layers.LayerNormalization(axis=axis, rms_scaling=True)
    ours.build(shape), theirs.build(shape)
    # Only the scale, as in Keras: rms_scaling has no offset.
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights] == ["gamma"]
    gamma = rng.uniform(0.5, 1.5, ours.gamma.shape).astype("float32")
    ours.gamma.assign(gamma), theirs.gamma.assign(gamma)
    x = rng.normal(3.0, 2.0, shape).astype("float32")
    expected = _variance_scaled(x, axis, gamma, 1e-3)
    ref.assert_close(ours(x), expected, FLOAT32_TOLERANCE, "outputs")
    ref.assert_close(theirs(x), expected, FLOAT32_TOLERANCE, "Keras's outputs")
    # It survives get_config / from_config, with the warning again.
    with pytest.warns(UserWarning):
        clone = kernorm.LayerNormalization.from_config(ours.get_config())
    assert clone.rms_scaling and clone.get_config()["rms_scaling"]
    assert kernorm.LayerNormalization().get_config()["rms_scaling"] is False


def test_keras_config_with_rms_scaling_loads(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = keras.layers.LayerNormalization(rms_scaling=True).get_config()
        layer = kernorm.LayerNormalization.from_config(config)
    assert layer.rms_scaling
    config = keras.layers.LayerNormalization().get_config()
    assert not kernorm.LayerNormalization.from_config(config).rms_scaling


# --- another input rank than the one built for ------------------------------------


@pytest.mark.parametrize("axis", [-1, [-2, -1]])
@pytest.mark.parametrize("name", ["layer", "rms"])
def test_row_norms_take_another_rank(name, axis, rng):
    layer = kernorm.LayerNormalization(axis=axis) if name == "layer" else kernorm.RMSNormalization(axis=axis)
    layer.build((2, 3, 4))
    x = rng.normal(1.0, 2.0, (5, 2, 3, 4)).astype("float32")
    if name == "layer":
        expected = ref.layer_norm(x, axis, layer.gamma.numpy(), layer.beta.numpy(), 1e-3)[0]
    else:
        expected = ref.rms_norm(x, axis, layer.scale.numpy(), 1e-6)[0]
    ref.assert_close(layer(x), expected, FLOAT32_TOLERANCE)
    with pytest.raises(ValueError, match="expected axis 3 of input shape to have value 4"):
        layer(np.zeros((5, 2, 3, 6), "float32"))


def test_group_norm_takes_another_rank(rng):
    layer = ref.built_with_random_affine(kernorm.GroupNormalization(groups=2), (2, 3, 4), rng)
    x = rng.normal(1.0, 2.0, (2, 3, 5, 4)).astype("float32")
    expected = ref.group_norm(x, 2, -1, layer.gamma.numpy(), layer.beta.numpy(), 1e-3)[0]
    ref.assert_close(layer(x), expected, FLOAT32_TOLERANCE)


# --- float32 inputs under mixed policies ------------------------------------------

LAYERS = {
    "batch": lambda: kernorm.BatchNormalization(),
    "layer": lambda: kernorm.LayerNormalization(),
    "rms": lambda: kernorm.RMSNormalization(),
    "group": lambda: kernorm.GroupNormalization(groups=2),
}


def _float64_reference(name, layer, x, training):
    if name == "layer":
        return ref.layer_norm(x, -1, layer.gamma.numpy(), layer.beta.numpy(), 1e-3)[0]
    if name == "rms":
        return ref.rms_norm(x, -1, layer.scale.numpy(), 1e-6)[0]
    if name == "group":
        return ref.group_norm(x, 2, -1, layer.gamma.numpy(), layer.beta.numpy(), 1e-3)[0]
    assert training
    return ref.batch_norm(x, -1, layer.gamma.numpy(), layer.beta.numpy(), 1e-3)[0]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mean, std", [(7e4, 1e3), (100.0, 1.0)])
def test_float32_inputs_under_a_mixed_policy(name, policy, mean, std, rng):
    """Beyond float16's range (Keras issue #22586), and a large mean in bfloat16: normalized from float32."""
    keras.config.set_dtype_policy(policy)
    layer = LAYERS[name]()
    x = rng.normal(mean, std, (8, 3, 4)).astype("float32")
    layer.build(x.shape)
    outputs = layer(x, training=True)
    assert outputs.dtype == keras.config.dtype_policy().compute_dtype
    outputs = np.asarray(tf.cast(outputs, tf.float32))
    assert np.all(np.isfinite(outputs))
    ref.assert_close(outputs, _float64_reference(name, layer, x, True), HALF_TOLERANCE[policy])
    if name == "batch":
        moving_mean, moving_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
        ref.assert_close(moving_mean, 0.99 * 0 + 0.01 * x.mean(axis=(0, 1)), FLOAT32_TOLERANCE, "moving_mean")
        ref.assert_close(moving_variance, 0.99 + 0.01 * x.var(axis=(0, 1)), FLOAT32_TOLERANCE, "moving_variance")


# --- ragged inputs -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("name", ["layer", "rms"])
def test_ragged_rows_match_dense_rows(name, mode, rng):
    rows = [rng.normal(2.0, 3.0, (length, 6)).astype("float32") for length in (3, 1, 4)]
    ragged = tf.RaggedTensor.from_row_lengths(np.concatenate(rows), [len(r) for r in rows])
    layer = kernorm.LayerNormalization() if name == "layer" else kernorm.RMSNormalization()
    ref.built_with_random_affine(layer, (None, None, 6), rng) if name == "layer" else layer.build((None, None, 6))
    outputs = compiled(layer, mode)(ragged)
    assert isinstance(outputs, tf.RaggedTensor)
    assert outputs.row_lengths().numpy().tolist() == [3, 1, 4]
    for row, output in zip(rows, outputs):
        ref.assert_close(output, layer(row[np.newaxis])[0], FLOAT32_TOLERANCE, "against the dense row")
        if name == "layer":
            expected = ref.layer_norm(row, -1, layer.gamma.numpy(), layer.beta.numpy(), 1e-3)[0]
        else:
            expected = ref.rms_norm(row, -1, layer.scale.numpy(), 1e-6)[0]
        ref.assert_close(output, expected, FLOAT32_TOLERANCE)


def test_ragged_axis_is_refused(rng):
    ragged = tf.RaggedTensor.from_row_lengths(np.ones((5, 4), "float32"), [2, 3])
    layer = kernorm.LayerNormalization(axis=[1, 2])
    layer.build((2, 3, 4))
    with pytest.raises(ValueError, match="ragged"):
        layer(ragged)


# --- group norm's gradient under XLA for a large mean ------------------------------


@pytest.mark.parametrize("mean", [1e4, 1e6])
def test_group_norm_xla_gradient_keeps_a_large_mean_spread(mean, rng):
    shape = (2, 3, 5, 12)
    layer = ref.built_with_random_affine(kernorm.GroupNormalization(groups=4), shape, rng)
    x = (mean + 1e-2 * rng.normal(size=shape)).astype("float32")
    upstream = rng.normal(size=shape).astype("float32")

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x)
        return outputs, tape.gradient(outputs, [x, layer.gamma, layer.beta], upstream)

    expected, expected_grads = ref.group_norm(x, 4, -1, layer.gamma.numpy(), layer.beta.numpy(), 1e-3, upstream)
    for mode in ("eager", "xla"):
        outputs, grads = compiled(step, mode)(tf.constant(x))
        ref.assert_close(outputs, expected, FLOAT32_TOLERANCE, f"{mode} outputs")
        for what, actual, wanted in zip(("x", "gamma", "beta"), grads, expected_grads):
            ref.assert_close(actual, wanted, FLOAT32_TOLERANCE, f"{mode} d_{what}")


# --- one value per channel in training ------------------------------------------------


def _moving(layer):
    return [w.numpy().copy() for w in layer.non_trainable_weights]


@pytest.mark.parametrize("renorm", [False, True])
def test_one_value_per_channel_fails_alike_in_eager_and_in_a_graph(renorm, rng):
    layer = kernorm.BatchNormalization(renorm=renorm)
    layer.build((None, 3))
    before = _moving(layer)
    single = rng.normal(size=(1, 3)).astype("float32")
    with pytest.raises(ValueError, match="one value per channel.*drop_remainder") as eager:
        layer(single, training=True)
    graph = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec((None, 3))])
    with pytest.raises(tf.errors.InvalidArgumentError, match="one value per channel.*drop_remainder"):
        graph(single)
    assert "GroupNormalization" in str(eager.value) and "larger batch" in str(eager.value)
    for old, new in zip(before, _moving(layer)):
        np.testing.assert_array_equal(old, new)
    # XLA runs no assertions: there the batch counts as empty and the statistics stay bit for bit.
    xla = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec((None, 3))], jit_compile=True)
    xla(single)
    for old, new in zip(before, _moving(layer)):
        np.testing.assert_array_equal(old, new)
    # A real batch through the same graph still trains.
    graph(rng.normal(size=(4, 3)).astype("float32"))
    assert not np.array_equal(before[0], layer.moving_mean.numpy())


@pytest.mark.parametrize("run_eagerly", [True, False])
def test_fit_with_a_last_batch_of_one_fails_the_same_way(run_eagerly, rng):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(kernorm.BatchNormalization()(inputs)))
    model.compile("sgd", "mse", run_eagerly=run_eagerly)
    x, y = rng.normal(size=(101, 3)), rng.normal(size=(101, 2))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="one value per channel"):
        model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    # The remedy the message names works.
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(50, drop_remainder=True)
    model.fit(data, epochs=1, verbose=0)


# --- .keras files of the zoo load after `import kernorm` alone -------------------------

SMALL_TEXT = {"vocab_size": 40, "sequence_length": 6, "num_classes": 3}
SMALL_IMAGE = {"input_shape": (32, 32, 3), "num_classes": 3}
SMALL_TRANSFORMER = {"d_model": 8, "num_heads": 2, "num_layers": 1, "ff_dim": 16}


def _small_overrides(name):
    """Builder arguments that keep each zoo model small; a new name must be given its own here."""
    if name in ("mlp", "convnet"):
        return {"num_classes": 3}
    if name.startswith("resnet"):
        return {**SMALL_IMAGE, "base_filters": 4}
    if name.startswith("vit"):
        return {**SMALL_IMAGE, **SMALL_TRANSFORMER}
    if name.startswith("transformer"):
        return {**SMALL_TEXT, **SMALL_TRANSFORMER}
    if name.startswith(("lstm", "gru", "bilstm", "bigru")):
        return {**SMALL_TEXT, "units": 4}
    raise AssertionError(f"no small configuration for zoo model {name!r}: add one to _small_overrides")


LOADER = """
import json, sys
import keras, numpy as np
import kernorm
assert "tensorflow_datasets" not in sys.modules, "import kernorm must stay light"
folder = sys.argv[1]
errors = {}
for name in json.load(open(folder + "/names.json")):
    model = keras.saving.load_model(f"{folder}/{name}.keras", safe_mode=True)
    data = np.load(f"{folder}/{name}.npz")
    errors[name] = float(np.max(np.abs(np.asarray(model(data["x"], training=False)) - data["y"])))
print(json.dumps(errors))
"""


@pytest.mark.slow
def test_every_zoo_model_loads_after_import_kernorm_alone(tmp_path, rng):
    from kernorm import models

    names = list(models.names())
    for name in names:
        model = models.get(name, **_small_overrides(name))
        shape = tuple(SMALL_TEXT["sequence_length"] if size is None else size for size in model.inputs[0].shape[1:])
        if model.inputs[0].dtype.startswith("int"):
            x = rng.integers(1, 40, (2, *shape)).astype(model.inputs[0].dtype)
        else:
            x = rng.normal(size=(2, *shape)).astype("float32")
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.asarray(model(x, training=False)))
        model.save(tmp_path / f"{name}.keras")
    (tmp_path / "names.json").write_text(json.dumps(names))
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted(names)
    assert all(error <= 1e-6 for error in errors.values()), errors
