"""kernorm.models.resnet: published parameter counts, every norm, shortcuts and zero-initialised residuals."""

import functools

import keras
import numpy as np
import pytest

import kernorm
import zoo_checks
from kernorm import models

NORMS = kernorm.norm_names()
NUM_CLASSES = 4


def _batch(rng, size):
    x = rng.normal(size=(8, size, size, 3)).astype("float32")
    return x, np.arange(8) % NUM_CLASSES


@pytest.mark.parametrize("norm", NORMS)
def test_cifar_resnet_every_norm(norm, rng, tmp_path):
    model = models.resnet(8, (8, 8, 3), NUM_CLASSES, norm=norm, base_filters=4)
    zoo_checks.check_builder(model, *_batch(rng, 8), NUM_CLASSES, tmp_path)


@pytest.mark.parametrize("norm", NORMS)
def test_imagenet_resnets_build_and_run_with_every_norm(norm, rng):
    """The ImageNet paths, basic and bottleneck blocks, at a small width; the CIFAR test above trains.

    64 pixels leave 2x2 maps in the last stage: on 1x1 maps, instance norm (and group norm with one
    channel a group) normalizes single values, and its output is rounding noise times rsqrt(epsilon).
    """
    x, _ = _batch(rng, 64)
    for depth in (18, 50):
        model = models.resnet(depth, (64, 64, 3), NUM_CLASSES, norm=norm, base_filters=2)
        assert model(x, training=True).shape == (8, NUM_CLASSES)
        zoo_checks.check_inference(model, x, NUM_CLASSES)


def test_imagenet_resnet_overfits(rng):
    model = models.resnet(18, (32, 32, 3), NUM_CLASSES, norm="batch", base_filters=4)
    zoo_checks.check_overfits(model, *_batch(rng, 32), learning_rate=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_resnets_round_trip(depth, rng, tmp_path):
    model = models.resnet(depth, (32, 32, 3), NUM_CLASSES, norm="batch", base_filters=2)
    x, _ = _batch(rng, 32)
    model(x, training=True)
    zoo_checks.check_round_trips(model, x, tmp_path)


# Acceptance: trainable-parameter counts with norm="batch" equal the published ones.

@pytest.mark.parametrize("depth, count", [(18, 11_689_512)])
def test_imagenet_count(depth, count):
    assert zoo_checks.trainable_count(models.get(f"resnet{depth}", norm="batch")) == count


@pytest.mark.slow
@pytest.mark.parametrize("depth, count", [(34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)])
def test_deep_imagenet_counts(depth, count):
    assert zoo_checks.trainable_count(models.get(f"resnet{depth}", norm="batch")) == count


@pytest.mark.parametrize("depth, count", [(20, 269_722), (110, 1_727_962)])
def test_cifar_counts(depth, count):
    """He et al. 2016, Table 6: 0.27M and 1.7M parameters; exactly 269,722 and 1,727,962 (option A
    shortcuts, 10 classes), as the README states them."""
    assert zoo_checks.trainable_count(models.resnet(depth, (32, 32, 3), 10, norm="batch")) == count


def test_cifar_resnet20_exact_structure():
    model = models.resnet(20, (32, 32, 3), 10)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 19  # the stem and 3 stages of 3 blocks of 2; the head makes 20
    assert not any(conv.use_bias for conv in convs)
    assert [c.filters for c in convs] == [16] * 7 + [32] * 6 + [64] * 6
    # Shortcuts have no parameters; each conv 3x3 is followed by a norm with gamma and beta.
    def block(c_in, c):
        return c_in * c * 9 + c * c * 9 + 4 * c

    stem = 3 * 16 * 9 + 2 * 16
    stages = sum(block(c_in, c) + 2 * block(c, c) for c_in, c in [(16, 16), (16, 32), (32, 64)])
    assert zoo_checks.trainable_count(model) == stem + stages + 64 * 10 + 10 == 269_722
    assert len([layer for layer in model.layers if isinstance(layer, models.ChannelPadShortcut)]) == 2
    assert model.output.shape == (None, 10)


def test_imagenet_resnet_structure():
    model = models.resnet(50, (64, 64, 3), 10, base_filters=8)
    assert model.get_layer("stem_conv").kernel_size == (7, 7)
    assert model.get_layer("stem_conv").strides == (2, 2)
    assert model.get_layer("stage1_block1_shortcut_conv").filters == 32
    # v1.5: the stride sits on the 3x3 convolution.
    assert model.get_layer("stage2_block1_1_conv").strides == (1, 1)
    assert model.get_layer("stage2_block1_2_conv").strides == (2, 2)
    assert model.get_layer("stage4_block3_out").output.shape == (None, 2, 2, 256)
    assert model.name == "resnet50"


# Acceptance: the reference's padding (PyTorch's symmetric padding) and epsilon by default.

def _windows(x, size, stride, padding, fill):
    """(batch, out_h, out_w, channels, size, size) windows of NHWC `x` padded by `padding` on every side."""
    x = np.pad(x.astype(np.float64), [(0, 0), (padding, padding), (padding, padding), (0, 0)], constant_values=fill)
    return np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]


def _conv_reference(x, kernel, stride, padding):
    """PyTorch's conv2d (zero padding on every side), in float64, on NHWC inputs and HWIO kernels."""
    return np.einsum("bhwcij,ijco->bhwo", _windows(x, kernel.shape[0], stride, padding, 0.0), kernel)


def _max_pool_reference(x, size, stride, padding):
    """PyTorch's max_pool2d: padded pixels never win."""
    return _windows(x, size, stride, padding, -np.inf).max(axis=(-2, -1))


@pytest.mark.parametrize("variant, size", [("imagenet", 64), ("imagenet", 66), ("cifar", 16), ("cifar", 15)])
def test_strided_layers_pad_as_the_reference(variant, size, rng):
    """Strided convolutions pad kernel_size // 2 on every side, and the stem pool pads one ignored pixel.

    Keras's "same" pads (0, 1) on even sizes instead: the 3x3 stride-2 outputs would sit one pixel
    off. A linear activation puts negative values next to the stem pool's padding, where zero
    padding would win the max.
    """
    depth, stage, before = (18, 2, "stage1_block2_out") if variant == "imagenet" else (8, 2, "stage1_block1_out")
    model = models.resnet(depth, (size, size, 3), NUM_CLASSES, base_filters=4, activation="linear", variant=variant)
    names = [before, f"stage{stage}_block1_1_conv"]
    if variant == "imagenet":
        names += ["stem_conv", "stem_act", "stem_pool", f"stage{stage}_block1_shortcut_conv"]
    probe = keras.Model(model.input, [model.get_layer(name).output for name in names])
    x = rng.normal(size=(2, size, size, 3)).astype("float32")
    outputs = dict(zip(names, [np.asarray(t) for t in probe(x, training=False)]))

    def kernel(name):
        return model.get_layer(name).kernel.numpy().astype(np.float64)

    expected = {f"stage{stage}_block1_1_conv": _conv_reference(outputs[before], kernel(names[1]), 2, 1)}
    if variant == "imagenet":
        expected["stem_conv"] = _conv_reference(x, kernel("stem_conv"), 2, 3)
        expected["stem_pool"] = _max_pool_reference(outputs["stem_act"], 3, 2, 1)
        expected[f"stage{stage}_block1_shortcut_conv"] = _conv_reference(outputs[before], kernel(names[-1]), 2, 0)
        assert outputs["stem_act"].min() < 0
    for name, value in expected.items():
        assert outputs[name].shape == value.shape, name
        # float32 against float64: measured up to 3e-7 of the largest value.
        np.testing.assert_allclose(outputs[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max(), err_msg=name)


def test_default_resnet50_has_the_references_conventions():
    model = models.get("resnet50")
    norms = [layer for layer in model.layers if isinstance(layer, kernorm.BatchNormalization)]
    assert len(norms) == 53 and all(layer.epsilon == 1e-5 for layer in norms)
    pads = {layer.name: layer.padding for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)}
    assert pads == {
        "stem_pad": ((3, 3), (3, 3)),
        **{f"stage{s}_block1_2_pad": ((1, 1), (1, 1)) for s in (2, 3, 4)},
    }
    strided = [layer.name for layer in model.layers if getattr(layer, "strides", (1, 1)) != (1, 1)]
    assert sorted(strided) == sorted(
        ["stem_conv", "stem_pool", *[f"stage{s}_block1_{part}_conv" for s in (2, 3, 4) for part in ("2", "shortcut")]]
    )
    assert model.get_layer("stem_pool_window").padding == "same"
    assert model.get_layer("stem_pool").output.shape == (None, 56, 56, 64)


@pytest.mark.parametrize(
    "norm, norm_kwargs, epsilon",
    [("batch", {"epsilon": 1e-3}, 1e-3), ("group", None, 1e-5), (kernorm.BatchNormalization, None, 1e-3)],
    ids=["user-wins", "other-names", "a-class-keeps-its-own"],
)
def test_epsilon_default(norm, norm_kwargs, epsilon):
    model = models.resnet(8, (8, 8, 3), NUM_CLASSES, norm=norm, norm_kwargs=norm_kwargs)
    epsilons = {layer.epsilon for layer in model.layers if hasattr(layer, "epsilon")}
    assert epsilons == {epsilon}


def test_channel_pad_shortcut(rng):
    layer = models.ChannelPadShortcut(6, 2)
    x = rng.normal(size=(2, 5, 5, 4)).astype("float32")
    outputs = np.asarray(layer(x))
    assert outputs.shape == layer.compute_output_shape(x.shape) == (2, 3, 3, 6)
    np.testing.assert_array_equal(outputs[..., :4], x[:, ::2, ::2])
    np.testing.assert_array_equal(outputs[..., 4:], 0.0)
    with pytest.raises(ValueError, match="at most"):
        models.ChannelPadShortcut(2)(x)


def test_projection_shortcuts_on_cifar():
    pad = models.resnet(20, (32, 32, 3), 10)
    projection = models.resnet(20, (32, 32, 3), 10, shortcut="projection")
    extra = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert zoo_checks.trainable_count(projection) == zoo_checks.trainable_count(pad) + extra


@pytest.mark.parametrize("norm, argument", [("batch", "gamma"), ("group", "gamma"), ("rms", "scale")])
def test_zero_init_residual(norm, argument, rng):
    """Each block's last norm starts with a zero scale, so each block starts as relu(shortcut)."""
    model = models.resnet(8, (8, 8, 3), NUM_CLASSES, norm=norm, zero_init_residual=True)
    last = model.get_layer("stage2_block1_2_norm")
    first = model.get_layer("stage2_block1_1_norm")
    np.testing.assert_array_equal(getattr(last, argument).numpy(), 0.0)
    np.testing.assert_array_equal(getattr(first, argument).numpy(), 1.0)
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    probe = keras.Model(model.input, [model.get_layer("stage1_block1_out").output, model.get_layer("stem_act").output])
    block, stem = probe(x, training=False)
    np.testing.assert_allclose(block, np.maximum(stem, 0.0), atol=1e-6)
    assert not model.get_layer("stage1_block1_2_norm").get_config()[f"{argument}_initializer"]["class_name"] == "Ones"


def test_zero_init_residual_without_a_scale_is_a_no_op():
    model = models.resnet(8, (8, 8, 3), NUM_CLASSES, norm=None, zero_init_residual=True)
    assert isinstance(model.get_layer("stage1_block1_2_norm"), keras.layers.Identity)


@pytest.mark.parametrize(
    "norm, kind",
    [
        (kernorm.BatchNormalization, kernorm.BatchNormalization),
        (functools.partial(kernorm.GroupNormalization, groups=4), kernorm.GroupNormalization),
        (keras.layers.serialize(kernorm.GroupNormalization(groups=2)), kernorm.GroupNormalization),
        (None, keras.layers.Identity),
    ],
)
def test_norm_forms(norm, kind, rng):
    model = models.resnet(8, (8, 8, 3), NUM_CLASSES, norm=norm, norm_kwargs={"epsilon": 1e-2} if norm else None)
    norms = [layer for layer in model.layers if layer.name.endswith("_norm")]
    assert len(norms) == 7
    assert all(type(layer) is kind for layer in norms)
    if norm is not None:
        assert all(layer.epsilon == 1e-2 for layer in norms)
    assert all(layer.use_bias == (norm is None) for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert model(rng.normal(size=(2, 8, 8, 3)).astype("float32"), training=True).shape == (2, NUM_CLASSES)


def test_group_norm_fits_the_channels():
    model = models.resnet(8, (8, 8, 3), NUM_CLASSES, norm="group", base_filters=12)
    assert model.get_layer("stem_norm").groups == 12
    assert model.get_layer("stage3_block1_2_norm").groups == 24  # 48 channels: 32 is not a divisor


@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(depth=21), "depth"),
        (dict(depth=19, variant="imagenet"), "ImageNet"),
        (dict(depth=18, variant="cifar"), "6n"),
        (dict(depth=20, variant="vgg"), "variant"),
        (dict(depth=20, shortcut="dense"), "shortcut"),
        (dict(depth=20, norm="weight"), "Unknown norm 'weight'.*batch, layer, rms, group, instance, none"),
    ],
)
def test_rejects_bad_arguments(arguments, match):
    with pytest.raises(ValueError, match=match):
        models.resnet(input_shape=(32, 32, 3), num_classes=10, **arguments)


def test_cifar_variant_of_an_imagenet_depth():
    model = models.resnet(50, (32, 32, 3), 10, variant="cifar")
    assert model.get_layer("stem_conv").kernel_size == (3, 3)
    assert len([layer for layer in model.layers if isinstance(layer, keras.layers.Add)]) == 24
