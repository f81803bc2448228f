"""Bad arguments and bad inputs get a ValueError or TypeError that names the argument."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm

LAYERS = {
    "batch": kernorm.BatchNormalization,
    "layer": kernorm.LayerNormalization,
    "rms": kernorm.RMSNormalization,
    "group": functools.partial(kernorm.GroupNormalization, groups=2),
}
MULTI_AXIS_LAYERS = {name: LAYERS[name] for name in ("batch", "layer", "rms")}


def _float(*shape):
    return np.ones(shape, "float32")


# --- constructor arguments ----------------------------------------------------


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("name", ["momentum", "renorm_momentum"])
def test_momentum_outside_zero_one(name, momentum):
    with pytest.raises(ValueError, match=f"`{name}`.*\\[0, 1\\)"):
        kernorm.BatchNormalization(**{name: momentum})


@pytest.mark.parametrize("momentum", [0.0, 0.999])
def test_momentum_inside_zero_one_is_accepted(momentum):
    assert kernorm.BatchNormalization(momentum=momentum).momentum == momentum


def test_momentum_of_the_wrong_type():
    with pytest.raises(TypeError, match="`momentum`"):
        kernorm.BatchNormalization(momentum="high")


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("epsilon", [-1e-3, float("nan"), float("inf")])
def test_bad_epsilon(layer, epsilon):
    with pytest.raises(ValueError, match="`epsilon`"):
        layer(epsilon=epsilon)


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_zero_epsilon_is_accepted(layer):
    assert layer(epsilon=0.0).epsilon == 0.0


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("axis", ["last", 1.5, None, True])
def test_axis_of_the_wrong_type(layer, axis):
    with pytest.raises(TypeError, match="`axis`"):
        layer(axis=axis)


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("axis", [2, -3])
def test_axis_out_of_range(layer, axis):
    with pytest.raises(ValueError, match="`axis`.*out of range"):
        layer(axis=axis)(_float(2, 4))


@pytest.mark.parametrize("layer", MULTI_AXIS_LAYERS.values(), ids=MULTI_AXIS_LAYERS.keys())
def test_axis_list_out_of_range(layer):
    with pytest.raises(ValueError, match="`axis`.*out of range"):
        layer(axis=[1, 3])(_float(2, 3, 4))


@pytest.mark.parametrize("layer", MULTI_AXIS_LAYERS.values(), ids=MULTI_AXIS_LAYERS.keys())
@pytest.mark.parametrize("axis", [[1, 1], [2, -1]])
def test_duplicate_axis(layer, axis):
    with pytest.raises(ValueError, match="`axis`.*twice"):
        layer(axis=axis)(_float(2, 3, 4))


@pytest.mark.parametrize("layer", MULTI_AXIS_LAYERS.values(), ids=MULTI_AXIS_LAYERS.keys())
def test_empty_axis_list(layer):
    with pytest.raises(TypeError, match="`axis`"):
        layer(axis=[])


def test_group_axis_on_the_batch():
    with pytest.raises(ValueError, match="`axis`"):
        kernorm.GroupNormalization(groups=1, axis=0)(_float(2, 4))


@pytest.mark.parametrize("groups", [0, -2, 2.5, "two"])
def test_bad_groups(groups):
    with pytest.raises(ValueError, match="`groups`"):
        kernorm.GroupNormalization(groups=groups)


@pytest.mark.parametrize("groups, channels", [(4, 6), (32, 16), (5, 8)])
def test_groups_not_dividing_channels(groups, channels):
    with pytest.raises(ValueError, match=f"`groups`={groups}.*{channels}"):
        kernorm.GroupNormalization(groups=groups)(_float(2, 3, channels))


@pytest.mark.parametrize("size", [0, -4, 2.0, True])
def test_bad_virtual_batch_size(size):
    with pytest.raises(ValueError, match="`virtual_batch_size`"):
        kernorm.BatchNormalization(virtual_batch_size=size)


def test_virtual_batch_size_with_renorm():
    with pytest.raises(ValueError, match="`virtual_batch_size`.*`renorm`"):
        kernorm.BatchNormalization(virtual_batch_size=4, renorm=True)


@pytest.mark.parametrize(
    "clipping, match",
    [({"rmax": 2.0, "bogus": 1.0}, "bogus"), ({"rmax": 0.5, "rmin": 1.0}, "rmax"), ({"dmax": -1.0}, "dmax")],
)
def test_bad_renorm_clipping(clipping, match):
    with pytest.raises(ValueError, match=f"`renorm_clipping`|{match}") as info:
        kernorm.BatchNormalization(renorm=True, renorm_clipping=clipping)
    assert "renorm_clipping" in str(info.value) and match in str(info.value)


def test_add_norm_needs_a_layer():
    with pytest.raises(TypeError, match="`sublayer`"):
        kernorm.AddNorm(lambda x: x)
    with pytest.raises(TypeError, match="`norm_kwargs`"):
        kernorm.AddNorm(keras.layers.Dense(4), norm_kwargs=[1])


# --- inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_size_on_normalized_axes_differs_from_the_built_size(layer):
    norm = layer()
    norm(_float(2, 4))
    with pytest.raises(ValueError, match="axis 1 of input shape to have value 4.*\\(2, 6\\)"):
        norm(_float(2, 6))


@pytest.mark.parametrize("layer", MULTI_AXIS_LAYERS.values(), ids=MULTI_AXIS_LAYERS.keys())
def test_unknown_size_on_normalized_axes(layer):
    with pytest.raises(ValueError, match="known size on the normalized axes"):
        layer(axis=[1, 2]).build((None, None, 4))


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize(
    "inputs", [np.ones((2, 4), "int32"), np.ones((2, 4), bool), np.full((2, 4), "a")], ids=["int", "bool", "string"]
)
def test_non_float_inputs(layer, inputs):
    with pytest.raises(TypeError, match="`inputs`.*" + str(tf.as_dtype(inputs.dtype).name)):
        layer()(inputs, training=True)


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_non_float_inputs_in_a_functional_model(layer):
    inputs = keras.Input((4,), dtype="int32")
    model = keras.Model(inputs, layer()(inputs))
    with pytest.raises(TypeError, match="`inputs`.*int32"):
        model(np.ones((2, 4), "int32"))


@pytest.mark.parametrize("batch", [6, 10])
def test_virtual_batch_size_not_dividing_the_batch(batch):
    layer = kernorm.BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match=f"`virtual_batch_size`=4.*{batch}"):
        layer(_float(batch, 3), training=True)


def test_virtual_batch_size_not_dividing_a_dynamic_batch():
    layer = kernorm.BatchNormalization(virtual_batch_size=4)
    step = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec((None, 3))])
    with pytest.raises(tf.errors.InvalidArgumentError, match="`virtual_batch_size`"):
        step(_float(6, 3))


def test_virtual_batch_size_with_the_batch_as_a_channel_axis():
    with pytest.raises(ValueError, match="`virtual_batch_size`"):
        kernorm.BatchNormalization(axis=[0, 1], virtual_batch_size=2)(_float(4, 3), training=True)


@pytest.mark.parametrize("mask_shape", [(4, 3), (4, 5, 2), (3, 5), (4, 5, 3, 1)])
def test_mask_that_does_not_fit(mask_shape):
    layer = kernorm.BatchNormalization()
    with pytest.raises(ValueError, match="`mask`.*" + str(mask_shape).replace("(", "\\(").replace(")", "\\)")):
        layer(_float(4, 5, 3), training=True, mask=np.ones(mask_shape, bool))


@pytest.mark.parametrize("shape, axis", [((1, 5), -1), ((1, 3, 4), [1, 2])])
def test_batch_norm_training_with_one_value_per_channel(shape, axis):
    layer = kernorm.BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match="one value per channel.*inputs.shape"):
        layer(_float(*shape), training=True)
    # Inference has no batch statistics to compute: fine.
    assert layer(_float(*shape), training=False).shape == shape
