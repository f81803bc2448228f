"""kernorm.models.get and names: the named configurations the scripts build."""

import keras
import numpy as np
import pytest

import kernorm
from kernorm import models

REQUIRED = [
    "mlp", "convnet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34",
    "resnet50", "resnet101", "resnet152", "transformer_tiny", "transformer_small", "vit_tiny", "vit_small",
    "vit_base",
]
TEXT = ["transformer_tiny", "transformer_small"]
# Cheap to build at full width: the generic keyword arguments are checked on these in the fast tier.
CHEAP_IMAGE = ["mlp", "convnet", "resnet20", "resnet32", "resnet18", "vit_tiny", "vit_small"]
COSTLY_IMAGE = [name for name in REQUIRED if name not in TEXT + CHEAP_IMAGE]


def test_names():
    assert set(REQUIRED) <= set(models.names())
    assert len(set(models.names())) == len(models.names())
    assert isinstance(models.names(), tuple)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model 'resnet19'. Known models: mlp, convnet, resnet20") as info:
        models.get("resnet19")
    for name in models.names():
        assert name in str(info.value)


def _check_image_entry(name):
    model = models.get(
        name, input_shape=(32, 32, 3), num_classes=7, norm="group", norm_kwargs={"epsilon": 1e-5}, name="custom"
    )
    assert model.name == "custom"
    assert model.input.shape == (None, 32, 32, 3)
    assert model.output.shape == (None, 7)
    norm_layers = [layer for layer in model._flatten_layers() if isinstance(layer, kernorm.GroupNormalization)]
    assert norm_layers and all(layer.epsilon == 1e-5 for layer in norm_layers)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    assert np.all(np.isfinite(model(x, training=False)))


@pytest.mark.parametrize("name", CHEAP_IMAGE)
def test_image_entries_take_the_generic_arguments(name):
    _check_image_entry(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", COSTLY_IMAGE)
def test_costly_image_entries_take_the_generic_arguments(name):
    _check_image_entry(name)


@pytest.mark.parametrize("name", TEXT)
def test_text_entries_take_the_generic_arguments(name):
    model = models.get(name, vocab_size=500, sequence_length=32, num_classes=3, norm="batch", name="custom")
    assert model.name == "custom"
    assert model.output.shape == (None, 3)
    assert model.get_layer("token_embedding").input_dim == 500
    assert model.get_layer("position_embedding").sequence_length == 32
    assert isinstance(model.get_layer("block1").attention_block.norm_layer, kernorm.BatchNormalization)
    tokens = np.array([[5, 6, 7, 0], [1, 2, 3, 4]], "int32")
    assert np.all(np.isfinite(model(tokens, training=False)))


def test_defaults():
    model = models.get("resnet20")
    assert model.name == "resnet20"
    assert model.input.shape == (None, 32, 32, 3) and model.output.shape == (None, 10)
    assert isinstance(model.get_layer("stem_norm"), kernorm.BatchNormalization)
    assert models.get("mlp").input.shape == (None, 28, 28, 1)


def test_transformer_configurations():
    tiny, small = models.registry.defaults("transformer_tiny"), models.registry.defaults("transformer_small")
    assert (small["d_model"], small["num_heads"], small["num_layers"], small["ff_dim"]) == (256, 4, 4, 1024)
    assert tiny["d_model"] <= 128 and tiny["num_layers"] == 2 and tiny["dropout"] > 0
    model = models.get("transformer_small", vocab_size=1000, sequence_length=128)
    assert len([layer for layer in model.layers if isinstance(layer, models.TransformerEncoderBlock)]) == 4
    assert model(np.ones((32, 128), "int32")).shape == (32, 2)


def test_vit_patch_size_follows_the_image_size():
    assert models.get("vit_tiny", num_layers=1).get_layer("patch_embedding").patch_size == 16
    small = models.get("vit_tiny", input_shape=(28, 28, 1), num_classes=10, num_layers=1)
    assert small.get_layer("patch_embedding").patch_size == 4
    assert small.get_layer("position_embedding").sequence_length == 7 * 7 + 1
    assert models.get("vit_tiny", input_shape=(32, 32, 3), patch_size=8, num_layers=1).get_layer("patch_embedding").patch_size == 8


def test_overrides_reach_the_builder():
    model = models.get("resnet56", input_shape=(16, 16, 3), base_filters=4, zero_init_residual=True)
    assert model.get_layer("stem_conv").filters == 4
    assert len([layer for layer in model.layers if isinstance(layer, keras.layers.Add)]) == 27
    np.testing.assert_array_equal(model.get_layer("stage3_block9_2_norm").gamma.numpy(), 0.0)
    with pytest.raises(TypeError):
        models.get("mlp", not_an_argument=1)


def test_every_entry_returns_a_new_model():
    one, other = models.get("mlp"), models.get("mlp")
    assert one is not other
    assert not any(a is b for a, b in zip(one.weights, other.weights))
    assert isinstance(one, keras.Model)
