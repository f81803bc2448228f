"""kernorm.get_norm and kernorm.norm_names: every form of spec, and the errors."""

import functools

import keras
import numpy as np
import pytest

import kernorm

EXPECTED = {
    "batch": kernorm.BatchNormalization,
    "layer": kernorm.LayerNormalization,
    "rms": kernorm.RMSNormalization,
    "group": kernorm.GroupNormalization,
    "instance": kernorm.GroupNormalization,
    "none": keras.layers.Identity,
}


def test_norm_names():
    assert kernorm.norm_names() == tuple(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_name_gives_its_layer(name, rng):
    kwargs = {"groups": 2} if name == "group" else {}
    layer = kernorm.get_norm(name, name="n", **kwargs)
    assert type(layer) is EXPECTED[name]
    assert layer.name == "n"
    x = rng.normal(size=(4, 3, 6)).astype("float32")
    assert layer(x, training=True).shape == x.shape


def test_names_are_case_insensitive():
    assert isinstance(kernorm.get_norm("Batch"), kernorm.BatchNormalization)


def test_instance_is_group_norm_with_one_channel_per_group(rng):
    layer = kernorm.get_norm("instance", epsilon=1e-5)
    assert layer.groups == -1 and layer.epsilon == 1e-5
    x = rng.normal(2.0, 3.0, (2, 5, 3)).astype("float32")
    expected = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_kwargs_reach_the_layer():
    layer = kernorm.get_norm("batch", momentum=0.9, epsilon=1e-5, axis=1)
    assert (layer.momentum, layer.epsilon, layer.axis) == (0.9, 1e-5, 1)


@pytest.mark.parametrize("spec", [None, "none", "None"])
def test_none_gives_an_identity_that_ignores_norm_arguments(spec, rng):
    layer = kernorm.get_norm(spec, axis=1, epsilon=1e-5, momentum=0.9, name="skip")
    assert isinstance(layer, keras.layers.Identity) and layer.name == "skip"
    x = rng.normal(size=(2, 3)).astype("float32")
    np.testing.assert_array_equal(layer(x), x)


@pytest.mark.parametrize("cls", [kernorm.LayerNormalization, keras.layers.LayerNormalization])
def test_a_layer_class(cls):
    layer = kernorm.get_norm(cls, epsilon=1e-4)
    assert type(layer) is cls and layer.epsilon == 1e-4


def test_a_partial():
    spec = functools.partial(kernorm.BatchNormalization, momentum=0.9)
    layer = kernorm.get_norm(spec, epsilon=1e-4)
    assert isinstance(layer, kernorm.BatchNormalization)
    assert (layer.momentum, layer.epsilon) == (0.9, 1e-4)


def test_a_callable_returning_a_layer():
    layer = kernorm.get_norm(lambda **kwargs: kernorm.GroupNormalization(groups=4, **kwargs), epsilon=0.5)
    assert isinstance(layer, kernorm.GroupNormalization) and (layer.groups, layer.epsilon) == (4, 0.5)


@pytest.mark.parametrize(
    "layer",
    [kernorm.GroupNormalization(groups=2, epsilon=0.25), kernorm.BatchNormalization(momentum=0.5, axis=[1, 2])],
    ids=["group", "batch"],
)
def test_a_keras_config_dict(layer):
    config = keras.layers.serialize(layer)
    rebuilt = kernorm.get_norm(config, name="from_dict")
    assert type(rebuilt) is type(layer) and rebuilt is not layer and rebuilt.name == "from_dict"
    expected = {**layer.get_config(), "name": "from_dict"}
    assert rebuilt.get_config() == expected


def test_a_config_dict_updated_by_kwargs():
    config = {"class_name": "kernorm>LayerNormalization", "config": {"epsilon": 0.1, "axis": -1}}
    layer = kernorm.get_norm(config, epsilon=0.2)
    assert isinstance(layer, kernorm.LayerNormalization) and layer.epsilon == 0.2
    assert config["config"]["epsilon"] == 0.1  # the caller's dict is untouched


def test_each_call_makes_a_new_layer():
    assert kernorm.get_norm("layer") is not kernorm.get_norm("layer")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'batchnorm'") as info:
        kernorm.get_norm("batchnorm")
    for name in kernorm.norm_names():
        assert name in str(info.value)


def test_a_layer_instance_is_refused():
    with pytest.raises(TypeError, match="layer class, a name or a functools.partial"):
        kernorm.get_norm(kernorm.LayerNormalization())


@pytest.mark.parametrize("spec", [3, 1.5, ["layer"]])
def test_other_types_are_refused(spec):
    with pytest.raises(TypeError, match="`norm` must be"):
        kernorm.get_norm(spec)


def test_a_dict_without_class_name():
    with pytest.raises(ValueError, match="'class_name'"):
        kernorm.get_norm({"config": {}})


def test_a_callable_returning_something_else():
    with pytest.raises(TypeError, match="not a keras.layers.Layer"):
        kernorm.get_norm(lambda **kwargs: "layer")
