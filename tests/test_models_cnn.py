"""kernorm.models.mlp and convnet: every norm builds, runs, overfits, saves and serves."""

import functools

import keras
import numpy as np
import pytest

import kernorm
import zoo_checks
from kernorm import models

NORMS = kernorm.norm_names()
NUM_CLASSES = 4
# These models take a few hundredths of a second a step: they must fit the batch, not only halve
# the loss (measured: 0.1 of the first loss in 13 to 27 steps, by half in 2 to 9).
FIT = {"factor": 0.1, "steps": 45}


def _batch(rng, shape):
    x = rng.normal(size=(8, *shape)).astype("float32")
    y = np.arange(8) % NUM_CLASSES
    return x, y


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_every_norm(norm, rng, tmp_path):
    model = models.mlp((4, 4, 1), NUM_CLASSES, hidden_units=(32, 16), norm=norm)
    zoo_checks.check_builder(model, *_batch(rng, (4, 4, 1)), NUM_CLASSES, tmp_path, **FIT)


@pytest.mark.parametrize("norm", NORMS)
def test_convnet_every_norm(norm, rng, tmp_path):
    model = models.convnet((8, 8, 3), NUM_CLASSES, filters=(8, 16), norm=norm)
    zoo_checks.check_builder(model, *_batch(rng, (8, 8, 3)), NUM_CLASSES, tmp_path, **FIT)


def _layers(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_mlp_structure():
    model = models.mlp((28, 28, 1), 10, dropout=0.25)
    dense = _layers(model, keras.layers.Dense)
    assert [d.units for d in dense] == [256, 128, 10]
    # Dense -> norm -> ReLU: the norm's offset replaces the bias.
    assert [d.use_bias for d in dense] == [False, False, True]
    assert len(_layers(model, kernorm.BatchNormalization)) == 2
    assert [d.rate for d in _layers(model, keras.layers.Dropout)] == [0.25, 0.25]
    assert zoo_checks.trainable_count(model) == 784 * 256 + 2 * 256 + 256 * 128 + 2 * 128 + 128 * 10 + 10
    assert model.name == "mlp"


def test_convnet_structure():
    model = models.convnet((32, 32, 3), 10, name="small")
    convs = _layers(model, keras.layers.Conv2D)
    assert [c.filters for c in convs] == [32, 64, 128]
    assert not any(c.use_bias for c in convs)
    assert len(_layers(model, kernorm.BatchNormalization)) == 3
    assert len(_layers(model, keras.layers.MaxPooling2D)) == 3
    assert model.output.shape == (None, 10)
    assert model.name == "small"


def test_positional_arguments_follow_the_documented_signatures():
    model = models.mlp((6,), 3, (8, 4), "layer", 0.5)
    assert [type(model.get_layer(f"norm{i}")) for i in (1, 2)] == [kernorm.LayerNormalization] * 2
    assert model.get_layer("dropout1").rate == 0.5
    model = models.convnet((8, 8, 1), 3, (4, 8), "instance")
    assert model.get_layer("norm2").groups == -1 and model.get_layer("conv2").filters == 8


@pytest.mark.parametrize("builder", [models.mlp, models.convnet])
def test_no_norm_keeps_the_bias(builder):
    model = builder((8, 8, 3), 4, norm=None)
    assert not _layers(model, kernorm.BatchNormalization)
    assert all(layer.use_bias for layer in _layers(model, keras.layers.Dense) + _layers(model, keras.layers.Conv2D))


def test_convnet_norm_meanings():
    """In a CNN, "layer" is one group over (H, W, C), "instance" one channel per group, "group" 32 fitted groups."""
    def norm_layer(norm, filters=(64,)):
        return models.convnet((8, 8, 3), 4, filters=filters, norm=norm).get_layer("norm1")

    layer = norm_layer("layer")
    assert isinstance(layer, kernorm.GroupNormalization) and layer.groups == 1
    assert models.convnet((8, 8, 3), 4, norm="layer", norm_kwargs={"epsilon": 0.3}).get_layer("norm2").epsilon == 0.3
    assert layer.gamma.shape == (64,)
    assert norm_layer("instance").groups == -1
    assert norm_layer("group").groups == 32
    assert norm_layer("group", filters=(48,)).groups == 24
    assert norm_layer("group", filters=(8,)).groups == 8
    rms = norm_layer("rms")
    assert isinstance(rms, kernorm.RMSNormalization) and rms.axis == -1
    assert isinstance(norm_layer("batch"), kernorm.BatchNormalization)
    assert isinstance(norm_layer("none"), keras.layers.Identity)
    assert isinstance(norm_layer(None), keras.layers.Identity)


def test_mlp_norm_meanings():
    def norm_layer(norm, units=64):
        return models.mlp((10,), 4, hidden_units=(units,), norm=norm).get_layer("norm1")

    assert isinstance(norm_layer("layer"), kernorm.LayerNormalization)
    assert models.mlp((10,), 4, norm="layer", norm_kwargs={"epsilon": 0.3}).get_layer("norm2").epsilon == 0.3
    # A vector has no spatial axes: "instance" normalizes the whole sample, like "layer".
    assert isinstance(norm_layer("instance"), kernorm.LayerNormalization)
    assert norm_layer("group", 256).groups == 32
    assert norm_layer("group", 64).groups == 8
    assert isinstance(norm_layer("rms"), kernorm.RMSNormalization)


@pytest.mark.parametrize(
    "norm, norm_kwargs, kind, attribute, value",
    [
        ("batch", {"momentum": 0.9}, kernorm.BatchNormalization, "momentum", 0.9),
        ("BATCH", None, kernorm.BatchNormalization, "momentum", 0.99),
        (kernorm.LayerNormalization, {"epsilon": 1e-5}, kernorm.LayerNormalization, "epsilon", 1e-5),
        (keras.layers.BatchNormalization, None, keras.layers.BatchNormalization, "momentum", 0.99),
        (functools.partial(kernorm.BatchNormalization, momentum=0.5), None, kernorm.BatchNormalization, "momentum", 0.5),
        (
            functools.partial(kernorm.BatchNormalization, momentum=0.5), {"epsilon": 0.01},
            kernorm.BatchNormalization, "epsilon", 0.01,
        ),
        (keras.layers.serialize(kernorm.RMSNormalization(epsilon=0.1)), None, kernorm.RMSNormalization, "epsilon", 0.1),
        ({"class_name": "kernorm>GroupNormalization", "config": {"groups": 2}}, {"epsilon": 0.2},
         kernorm.GroupNormalization, "epsilon", 0.2),
        ("group", {"groups": 4}, kernorm.GroupNormalization, "groups", 4),
        (None, {"momentum": 0.9}, keras.layers.Identity, None, None),
        ("none", None, keras.layers.Identity, None, None),
    ],
)
@pytest.mark.parametrize("builder", ["mlp", "convnet"])
def test_every_norm_form(builder, norm, norm_kwargs, kind, attribute, value, rng, tmp_path):
    build = getattr(models, builder)
    model = build((8, 8, 4), 3, norm=norm, norm_kwargs=norm_kwargs, **({"filters": (8, 16)} if builder == "convnet" else {"hidden_units": (16, 16)}))
    norm_layers = [model.get_layer("norm1"), model.get_layer("norm2")]
    for layer in norm_layers:
        assert type(layer) is kind
        assert attribute is None or getattr(layer, attribute) == value
    x = rng.normal(size=(4, 8, 8, 4)).astype("float32")
    outputs = model(x, training=True)
    assert outputs.shape == (4, 3)
    # Whatever form the norm came in, the model saves as a config and loads.
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.get_layer("norm2")) is kind
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("builder", [models.mlp, models.convnet])
def test_unknown_norm_lists_the_known_ones(builder):
    with pytest.raises(ValueError, match="Unknown norm 'weight'.*batch, layer, rms, group, instance, none"):
        builder((8, 8, 3), 4, norm="weight")


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"input_shape": (8, 8), "num_classes": 4}, "input_shape"),
        ({"input_shape": (8, 8, 3), "num_classes": 0}, "num_classes"),
        ({"input_shape": (8, 8, 3), "num_classes": 4, "filters": (8, -1)}, "filters"),
        ({"input_shape": (8, 8, 3), "num_classes": 4, "dropout": 1.5}, "dropout"),
    ],
)
def test_convnet_rejects_bad_arguments(arguments, match):
    with pytest.raises(ValueError, match=match):
        models.convnet(**arguments)


def test_mlp_rejects_bad_norm_kwargs():
    with pytest.raises(TypeError, match="norm_kwargs"):
        models.mlp((4,), 2, norm_kwargs=[("momentum", 0.9)])
