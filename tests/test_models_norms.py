"""kernorm.models.norms: what each norm name means in CNNs, MLPs and Transformers."""

import functools
import json

import keras
import numpy as np
import pytest
from keras.src.saving import serialization_lib

import kernorm
from kernorm import registry
from kernorm.models import norms


@pytest.mark.parametrize(
    "channels, groups, min_group_size, expected",
    [(64, 32, 1, 32), (48, 32, 1, 24), (16, 32, 1, 16), (3, 32, 1, 3), (7, 4, 1, 1), (64, 32, 8, 8),
     (768, 32, 8, 32), (8, 32, 8, 1), (4, 32, 8, 1), (10, -1, 1, -1)],
)
def test_fit_groups(channels, groups, min_group_size, expected):
    assert norms.fit_groups(channels, groups, min_group_size) == expected


@pytest.mark.parametrize("groups", [0, -2, 2.0, True])
def test_fit_groups_rejects_bad_groups(groups):
    with pytest.raises(ValueError, match="groups"):
        norms.fit_groups(8, groups)


def test_image_layer_norm_is_one_group_over_height_width_channels(rng):
    """The Group Normalization paper's LN for images: each sample over (H, W, C), per-channel weights."""
    layer = norms.image_norm("layer", 6, {"epsilon": 0.0})
    x = rng.normal(2.0, 3.0, size=(2, 4, 5, 6)).astype("float32")
    outputs = np.asarray(layer(x))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(1, 2, 3), keepdims=True)
    std = x64.std(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(outputs, (x64 - mean) / std, atol=1e-4)
    assert layer.gamma.shape == (6,)


def test_image_instance_norm_is_each_channel_over_height_width(rng):
    layer = norms.image_norm("instance", 6, {"epsilon": 0.0})
    x = rng.normal(2.0, 3.0, size=(2, 4, 5, 6)).astype("float32")
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(axis=(1, 2), keepdims=True)) / x64.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(layer(x), expected, atol=1e-4)


def test_image_group_norm_fits_and_keeps_explicit_groups():
    assert norms.image_norm("group", 96).groups == 32
    assert norms.image_norm("group", 40).groups == 20
    assert norms.image_norm("group", 40, {"groups": 4}).groups == 4
    assert norms.image_norm("group", 40, {"groups": 16}).groups == 10


def test_token_norm_results_are_json():
    """Whatever form a norm came in, the AddNorm config it gives is plain JSON."""
    for spec in ["batch", "group", "instance", None, kernorm.RMSNormalization,
                 functools.partial(kernorm.BatchNormalization, momentum=0.5)]:
        norm, norm_kwargs = norms.token_norm(spec, 64, {"epsilon": 0.01})
        json.dumps([norm, norm_kwargs])
        layer = kernorm.get_norm(norm, **norm_kwargs)
        assert layer.epsilon == 0.01 if not isinstance(layer, keras.layers.Identity) else True


def test_token_norm_configs_are_not_marked_as_shared():
    """`load_model` marks configs of objects with equal `id()` as one shared object; ours are private copies."""
    layer = kernorm.BatchNormalization(momentum=0.5)
    with serialization_lib.ObjectSharingScope():
        first = registry.layer_config(layer)
        second = registry.layer_config(layer)  # the same id(): Keras marks both configs as one object
        one, other = kernorm.get_norm(first), kernorm.get_norm(second)
    assert "shared_object_id" not in json.dumps([first, second])
    assert one is not other


def test_unknown_norm_lists_the_known_ones():
    for function in (norms.image_norm, norms.vector_norm):
        with pytest.raises(ValueError, match="Unknown norm 'weight'. Known norms: batch, layer, rms, group, instance, none"):
            function("weight", 8)
    with pytest.raises(ValueError, match="Known norms"):
        norms.token_norm("weight", 8)


def test_is_identity():
    assert norms.is_identity(None) and norms.is_identity("none") and norms.is_identity("None")
    assert norms.is_identity(keras.layers.Identity)
    assert norms.is_identity(keras.layers.serialize(keras.layers.Identity()))
    assert not norms.is_identity("batch")
    assert not norms.is_identity(functools.partial(kernorm.BatchNormalization, momentum=0.5))


def test_token_group_normalization_round_trips(rng):
    layer = norms.TokenGroupNormalization(groups=4, epsilon=0.01, name="g")
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    expected = layer(x)
    restored = keras.layers.deserialize(json.loads(json.dumps(keras.layers.serialize(layer))))
    assert type(restored) is norms.TokenGroupNormalization
    assert (restored.groups, restored.epsilon) == (4, 0.01)
    np.testing.assert_allclose(restored(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="last axis"):
        norms.TokenGroupNormalization(axis=1)
