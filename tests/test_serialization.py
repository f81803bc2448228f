"""Configs round-trip, `.keras` files load safely, and exported SavedModels serve without kernorm."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kernorm

SHAPE = (6, 8)

# Keras's own conversions of numpy inputs in `fit`, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

LAYERS = {
    "batch": lambda: kernorm.BatchNormalization(
        axis=[1, 2], momentum=0.8, epsilon=1e-4, center=False, virtual_batch_size=2,
        gamma_regularizer=keras.regularizers.L2(1e-3), beta_constraint=keras.constraints.NonNeg(),
        moving_variance_initializer=keras.initializers.Constant(2.0),
    ),
    "batch_renorm": lambda: kernorm.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}, renorm_momentum=0.9, synchronized=True
    ),
    "layer": lambda: kernorm.LayerNormalization(axis=[1, 2], epsilon=1e-5, scale=False),
    "rms": lambda: kernorm.RMSNormalization(axis=-1, epsilon=1e-5, scale_initializer="glorot_uniform"),
    "group": lambda: kernorm.GroupNormalization(groups=4, axis=-1, epsilon=1e-4),
    "instance": lambda: kernorm.get_norm("instance"),
    "add_norm_post": lambda: kernorm.AddNorm(keras.layers.Dense(8), norm="layer", norm_kwargs={"epsilon": 1e-4}),
    "add_norm_pre": lambda: kernorm.AddNorm(keras.layers.Dense(8, activation="relu"), norm="batch", norm_first=True),
    "none": lambda: kernorm.get_norm(None),
}


def _inputs(rng, batch=4):
    return rng.normal(1.0, 2.0, (batch, *SHAPE)).astype("float32")


def _randomize(layer, rng):
    layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.weights])


@pytest.mark.parametrize("name", list(LAYERS))
def test_get_config_from_config_round_trip(name, rng):
    layer = LAYERS[name]()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert type(clone) is type(layer)
    assert clone.get_config() == config
    layer.build((None, *SHAPE)), clone.build((None, *SHAPE))
    _randomize(layer, rng)
    clone.set_weights(layer.get_weights())
    x = _inputs(rng)
    for training in (False, True):
        np.testing.assert_array_equal(layer(x, training=training), clone(x, training=training))


@pytest.mark.parametrize("name", ["batch", "layer", "rms", "group"])
def test_get_config_has_every_constructor_argument(name):
    import inspect

    layer = LAYERS[name]()
    parameters = set(inspect.signature(type(layer).__init__).parameters) - {"self", "kwargs"}
    assert parameters <= set(layer.get_config())


def every_layer_model():
    inputs = keras.Input(SHAPE)
    x = keras.layers.Dense(8)(inputs)
    for name in LAYERS:
        x = LAYERS[name]()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.fixture(scope="module")
def trained_model():
    rng = np.random.default_rng(99)
    model = every_layer_model()
    kinds = {type(layer) for layer in model.layers}
    assert {
        kernorm.BatchNormalization, kernorm.LayerNormalization, kernorm.RMSNormalization,
        kernorm.GroupNormalization, kernorm.AddNorm, keras.layers.Identity,
    } <= kinds
    model.compile("adam", "mse")
    model.fit(_inputs(rng, 8), rng.normal(size=(8, 3)), batch_size=4, epochs=1, verbose=0)
    return model


def test_keras_file_loads_in_safe_mode_without_custom_objects(trained_model, tmp_path, rng):
    path = tmp_path / "model.keras"
    trained_model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in trained_model.layers]
    assert [w.path for w in loaded.weights] == [w.path for w in trained_model.weights]
    for a, b in zip(loaded.weights, trained_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)
    x = _inputs(rng)
    np.testing.assert_array_equal(loaded(x, training=False), trained_model(x, training=False))
    assert loaded.get_layer(index=2).get_config() == trained_model.get_layer(index=2).get_config()


SERVE_WITHOUT_KERNORM = textwrap.dedent(
    """
    import importlib.abc, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

    class NoKernorm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "kernorm" or name.startswith("kernorm."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, NoKernorm())
    try:
        import kernorm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("kernorm is importable")

    import numpy as np
    import tensorflow as tf

    saved_model, inputs, outputs = sys.argv[1:4]
    loaded = tf.saved_model.load(saved_model)
    np.save(outputs, loaded.serve(tf.constant(np.load(inputs))).numpy())
    assert not any(name.startswith("kernorm") for name in sys.modules), "kernorm was loaded"
    """
)


def test_exported_saved_model_serves_without_kernorm(trained_model, tmp_path, rng):
    export_dir = tmp_path / "saved_model"
    trained_model.export(str(export_dir), verbose=False)
    x = _inputs(rng, 5)
    np.save(tmp_path / "inputs.npy", x)
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_KERNORM, str(export_dir), str(tmp_path / "inputs.npy"),
         str(tmp_path / "outputs.npy")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(tmp_path / "outputs.npy")
    expected = trained_model(x, training=False).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)
