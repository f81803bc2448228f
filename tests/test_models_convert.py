"""kernorm.models.convert: torchvision ResNets and timm ViTs against a PyTorch reference, strict state dicts,
scripts/convert.py and train.py --init-from.

The reference is torch (a test extra): torchvision's and timm's own model code where they import beside the
installed torch, and everywhere a float64 reference written with torch.nn.functional under the same parameter
names (tests/torch_reference.py). Where a library does not import, a warning says why and the functional
reference runs in its place; nothing is skipped.
"""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import torch_reference as ref
from script_runs import load_script, run_main

from kernorm import models
from kernorm.models import convert

#: Logits must match the reference's within this, relative to their largest magnitude.
TOLERANCE = 1e-5
WIDTH = 8  # the first stage's channels of the small ResNets
SMALL = (64, 64, 3)


@pytest.fixture(scope="module")
def torch():
    """torch is a test extra (pip install -e '.[test]'): without it these tests fail, they do not skip."""
    return ref.load_torch()


def _images(rng, size=224, batch=2):
    return rng.normal(size=(batch, 3, size, size)).astype("float32")


def _logits(model, images_nchw):
    return np.asarray(model(images_nchw.transpose(0, 2, 3, 1), training=False), np.float64)


def _assert_logits_close(actual, expected, tolerance=TOLERANCE):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual / scale, expected / scale, rtol=0, atol=tolerance)
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))


def _relative_difference(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


def _resnet_reference(depth, **shape_kwargs):
    """(state dict, forward) of torchvision's resnet{depth}: the library's where it imports, else the functional one."""
    torchvision, reason = ref.library("torchvision")
    if torchvision is not None:
        return ref.torchvision_resnet(torchvision, depth)
    warnings.warn(f"{reason}; the functional reference with torchvision's names and maths runs instead")
    state = ref.random_state_dict(ref.resnet_shapes(depth, **shape_kwargs))
    return state, lambda images: ref.resnet_forward(state, depth, images)


def _vit_reference(size, num_layers=12):
    """(state dict, forward) of timm's vit_{size}_patch16_224, `num_layers` blocks: timm's own where it imports,
    else the functional one."""
    d_model, num_heads = ref.VIT_SIZES[size]
    timm, reason = ref.library("timm")
    if timm is not None:
        return ref.timm_vit(timm, f"vit_{size}_patch16_224", depth=num_layers)
    warnings.warn(f"{reason}; the functional reference with timm's names and maths runs instead")
    state = ref.vit_state_dict(ref.vit_shapes(d_model, num_layers))
    return state, lambda images: ref.vit_forward(state, num_heads, images)


# Acceptance: the converted resnet18, resnet50 and vit_tiny give the reference's logits on 224x224 inputs.

@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_logits(depth, torch, rng):
    state, forward = _resnet_reference(depth)
    images = _images(rng)
    model = models.from_torchvision(f"resnet{depth}", state)
    _assert_logits_close(_logits(model, images), forward(images))


def test_timm_vit_tiny_logits(torch, rng):
    state, forward = _vit_reference("tiny")
    images = _images(rng)
    model = models.from_timm("vit_tiny_patch16_224", state)
    _assert_logits_close(_logits(model, images), forward(images))


def test_the_comparison_sees_the_conventions(torch, rng):
    """Keras's default epsilon (1e-3) or "same" padding is far outside the tolerance: the tests above can fail."""
    state = ref.random_state_dict(ref.resnet_shapes(18, num_classes=10, width=WIDTH))
    images = _images(rng, 64)
    expected = ref.resnet_forward(state, 18, images)
    converted = models.from_torchvision("resnet18", state, input_shape=SMALL, base_filters=WIDTH)
    _assert_logits_close(_logits(converted, images), expected)

    keras_epsilon = models.from_torchvision(
        "resnet18", state, input_shape=SMALL, base_filters=WIDTH, norm_kwargs={"epsilon": 1e-3}
    )
    assert _relative_difference(_logits(keras_epsilon, images), expected) > 100 * TOLERANCE

    def same_padding(layer):
        """What "same" pads on even sizes: one pixel less before than after."""
        if isinstance(layer, keras.layers.ZeroPadding2D):
            (top, _), (left, _) = layer.padding
            return keras.layers.ZeroPadding2D(((top - 1, top), (left - 1, left)), name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    shifted = keras.models.clone_model(converted, clone_function=same_padding)
    shifted.set_weights(converted.get_weights())
    assert _relative_difference(_logits(shifted, images), expected) > 100 * TOLERANCE


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_every_torchvision_depth(depth, torch, rng):
    """Every depth maps one-to-one; narrow networks keep it cheap (the mapping does not depend on the width)."""
    state = ref.random_state_dict(ref.resnet_shapes(depth, num_classes=10, width=WIDTH))
    images = _images(rng, 64)
    model = models.from_torchvision(f"resnet{depth}", state, input_shape=SMALL, base_filters=WIDTH)
    assert model.output.shape == (None, 10)  # the classes follow fc.weight
    _assert_logits_close(_logits(model, images), ref.resnet_forward(state, depth, images))


@pytest.mark.parametrize("size", ["small", "base"])
def test_timm_vit_sizes(size, torch, rng):
    """ViT-S and ViT-B at full width, one block: the qkv split and the shapes of every weight."""
    state, forward = _vit_reference(size, num_layers=1)
    images = _images(rng, batch=1)
    model = models.from_timm(f"vit_{size}_patch16_224.augreg_in21k_ft_in1k", state, num_layers=1)
    _assert_logits_close(_logits(model, images), forward(images))


def test_vit_epsilon_is_timms(torch, rng):
    d_model, num_heads = ref.VIT_SIZES["tiny"]
    state = ref.vit_state_dict(ref.vit_shapes(d_model, 2, num_classes=5, patch=8, image=32))
    images = _images(rng, 32)
    expected = ref.vit_forward(state, num_heads, images, patch=8)
    model = models.from_timm("vit_tiny_patch8_32", state, num_layers=2)
    _assert_logits_close(_logits(model, images), expected)
    keras_epsilon = models.from_timm("vit_tiny_patch8_32", state, num_layers=2, norm_kwargs={"epsilon": 1e-3})
    assert _relative_difference(_logits(keras_epsilon, images), expected) > 10 * TOLERANCE


# Acceptance: a missing, extra or mis-shaped tensor fails with an error naming it.

@pytest.fixture(scope="module")
def small_state():
    return ref.random_state_dict(ref.resnet_shapes(18, num_classes=10, width=WIDTH))


def _small_resnet(state, **overrides):
    return models.from_torchvision("resnet18", state, input_shape=SMALL, base_filters=WIDTH, **overrides)


def _without(state, name):
    return {key: value for key, value in state.items() if key != name}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: _without(s, "layer2.0.downsample.1.running_var"), r"missing: layer2\.0\.downsample\.1\.running_var"),
        (lambda s: _without(s, "fc.bias"), r"missing: fc\.bias"),
        (lambda s: {**s, "layer1.0.conv3.weight": s["layer1.0.conv2.weight"]}, r"unexpected: layer1\.0\.conv3\.weight"),
        (
            lambda s: {**s, "layer2.0.conv1.weight": s["layer2.0.conv1.weight"].transpose(1, 0, 2, 3)},
            r"wrong shape: layer2\.0\.conv1\.weight \(8, 16, 3, 3\) \(expected \(16, 8, 3, 3\)\)",
        ),
        (lambda s: {**s, "bn1.running_mean": s["bn1.running_mean"][:4]}, r"wrong shape: bn1\.running_mean \(4,\)"),
    ],
    ids=["missing", "missing-head", "extra", "mis-shaped", "mis-shaped-statistics"],
)
def test_a_state_dict_that_does_not_fit_names_the_tensor(small_state, change, match):
    with pytest.raises(ValueError, match=match):
        _small_resnet(change(small_state))


def test_every_problem_is_listed_and_nothing_changes(small_state):
    model = _small_resnet(small_state)
    before = [weight.numpy().copy() for weight in model.weights]
    broken = {**_without(small_state, "conv1.weight"), "extra.weight": np.zeros(3, "float32")}
    broken["fc.weight"] = np.zeros((10, 3), "float32")
    plan = convert._resnet_plan(model, "resnet18")
    with pytest.raises(ValueError, match="missing: conv1.weight; unexpected: extra.weight; wrong shape: fc.weight") as info:
        convert.load_state_dict(model, broken, plan)
    assert "No weight was changed" in str(info.value)
    for weight, value in zip(model.weights, before):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_a_vit_state_dict_that_does_not_fit_names_the_tensor():
    d_model, _ = ref.VIT_SIZES["tiny"]
    state = ref.vit_state_dict(ref.vit_shapes(d_model, 1))
    with pytest.raises(ValueError, match=r"wrong shape: blocks\.0\.attn\.qkv\.bias \(384,\) \(expected \(576,\)\)"):
        models.from_timm("vit_tiny_patch16_224", {**state, "blocks.0.attn.qkv.bias": state["blocks.0.attn.qkv.bias"][:384]}, num_layers=1)
    with pytest.raises(ValueError, match=r"wrong shape: pos_embed \(1, 197, 192\) \(expected \(1, 65, 192\)\)"):
        models.from_timm("vit_tiny_patch16_128", state, num_layers=1)
    with pytest.raises(ValueError, match=r"unexpected: blocks\.1\.attn\.qkv\.weight"):
        models.from_timm("vit_tiny_patch16_224", {**state, "blocks.1.attn.qkv.weight": state["blocks.0.attn.qkv.weight"]}, num_layers=1)


def test_loaded_weights_are_the_state_dicts(small_state):
    """Layouts: OIHW -> HWIO, (out, in) -> (in, out); running statistics become the moving ones."""
    model = _small_resnet(small_state)
    np.testing.assert_array_equal(model.get_layer("stem_conv").kernel, small_state["conv1.weight"].transpose(2, 3, 1, 0))
    norm = model.get_layer("stage2_block1_shortcut_norm")
    np.testing.assert_array_equal(norm.moving_variance, small_state["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(norm.moving_mean, small_state["layer2.0.downsample.1.running_mean"])
    np.testing.assert_array_equal(norm.gamma, small_state["layer2.0.downsample.1.weight"])
    np.testing.assert_array_equal(model.get_layer("head").kernel, small_state["fc.weight"].T)
    assert norm.epsilon == 1e-5


def test_state_dict_values_may_be_torch_tensors_or_anything_with_numpy(small_state, torch):
    expected = _small_resnet(small_state).get_layer("stage3_block2_2_conv").kernel.numpy()
    tensors = {key: torch.as_tensor(value) for key, value in small_state.items()}
    tensors["layer3.1.conv2.weight"] = tensors["layer3.1.conv2.weight"].requires_grad_()  # needs detach()
    tf_tensors = {key: tf.constant(value) for key, value in small_state.items()}
    for state in (tensors, tf_tensors):
        np.testing.assert_array_equal(_small_resnet(state).get_layer("stage3_block2_2_conv").kernel, expected)
    halves = {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in tensors.items()}
    loaded = _small_resnet(halves).get_layer("stage3_block2_2_conv").kernel.numpy()
    np.testing.assert_allclose(loaded, expected, rtol=1e-2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: models.from_torchvision("resnet20", s), ValueError, "Known models: resnet18, resnet34"),
        (lambda s: models.from_timm("vit_huge_patch14_224", s), ValueError, "Unknown timm model 'vit_huge"),
        (lambda s: models.from_timm("deit_tiny_patch16_224", s), ValueError, "vit_tiny_patch16_224"),
        (lambda s: _small_resnet(s, norm="group"), ValueError, "do not transfer to norm='group'"),
        (lambda s: _small_resnet(s, shortcut="pad"), ValueError, r"unexpected: layer2\.0\.downsample\.0\.weight"),
        (lambda s: _small_resnet(list(s.items())), TypeError, "state_dict"),
        (lambda s: _small_resnet({**s, "fc.bias": "zeros"}), TypeError, "'fc.bias'"),
    ],
    ids=["unknown-torchvision", "unknown-size", "unknown-timm", "norm", "architecture", "not-a-mapping", "not-an-array"],
)
def test_rejects_bad_arguments(small_state, call, error, match):
    with pytest.raises(error, match=match):
        call(small_state)


# Files and scripts.

def test_read_state_dict_reads_npz_pt_and_safetensors(small_state, torch, tmp_path):
    np.savez(tmp_path / "weights.npz", **small_state)
    torch.save(
        {"state_dict": {f"module.{key}": torch.as_tensor(value) for key, value in small_state.items()}, "epoch": 3},
        tmp_path / "checkpoint.pth",
    )  # a training checkpoint of a DataParallel model
    paths = [tmp_path / "weights.npz", tmp_path / "checkpoint.pth"]
    try:
        from safetensors.numpy import save_file
    except ImportError:
        pass  # a test extra; .safetensors reading is then untested here
    else:
        save_file({key: np.ascontiguousarray(value) for key, value in small_state.items()}, tmp_path / "w.safetensors")
        paths.append(tmp_path / "w.safetensors")
    for path in paths:
        state = convert.read_state_dict(path)
        assert sorted(state) == sorted(small_state), path
        for key, value in small_state.items():
            np.testing.assert_array_equal(state[key], value)
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected a \.npz, \.safetensors"):
        convert.read_state_dict(tmp_path / "weights.h5")


def test_convert_script_writes_keras_and_saved_model(torch, rng, tmp_path):
    d_model, num_heads = ref.VIT_SIZES["tiny"]
    state = ref.vit_state_dict(ref.vit_shapes(d_model, 12))
    np.savez(tmp_path / "vit_tiny.npz", **state)
    images = _images(rng)
    expected = ref.vit_forward(state, num_heads, images)
    out, saved_model = tmp_path / "out" / "vit_tiny.keras", tmp_path / "saved_model"
    argv = ["vit_tiny_patch16_224", str(tmp_path / "vit_tiny.npz"), "--out", str(out), "--saved-model", str(saved_model)]
    status, stdout, stderr = run_main("convert", argv)
    assert status == 0, stderr
    assert "5,717,416 trainable parameters" in stdout

    loaded = keras.saving.load_model(out, safe_mode=True)
    _assert_logits_close(_logits(loaded, images), expected)
    served = tf.saved_model.load(str(saved_model))
    signature = served.signatures["serving_default"]
    (served_logits,) = signature(tf.constant(images.transpose(0, 2, 3, 1))).values()
    _assert_logits_close(np.asarray(served_logits, np.float64), expected)

    status, _, stderr = run_main("convert", ["resnet18", str(tmp_path / "vit_tiny.npz"), "--out", str(tmp_path / "r.keras")])
    assert status == 2 and "missing: bn1.bias, bn1.running_mean" in stderr
    assert "unexpected: blocks.0.attn.proj.bias" in stderr and "No weight was changed" in stderr
    assert not (tmp_path / "r.keras").exists()
    status, _, stderr = run_main("convert", ["resnet19", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "r.keras")])
    assert status == 2 and "Unknown model 'resnet19'. Known models: resnet18" in stderr and "missing.pth" not in stderr


# Fine-tuning: transfer_weights and train.py --init-from.

def test_transfer_weights_keeps_a_head_of_another_shape(small_state):
    source = _small_resnet(small_state)
    target = models.get("resnet18", input_shape=(32, 32, 3), num_classes=3, base_filters=WIDTH)
    assert convert.transfer_weights(source, target) == ["head"]
    for layer in target.layers:
        if layer.weights and layer.name != "head":
            for ours, theirs in zip(layer.weights, source.get_layer(layer.name).weights):
                np.testing.assert_array_equal(ours, theirs)
    wider = models.get("resnet18", input_shape=(32, 32, 3), num_classes=3, base_filters=2 * WIDTH)
    with pytest.raises(ValueError, match=r"stem_conv \(weights \[\('kernel', \(7, 7, 3, 8\)\)\]"):
        convert.transfer_weights(source, wider)
    truncated = keras.Model(source.input, source.get_layer("stage4_block1_out").output)
    with pytest.raises(ValueError, match=r"stage4_block2_2_conv \(only in the source\)"):
        convert.transfer_weights(source, truncated)


class _InitialWeights(keras.callbacks.Callback):
    """Records the zoo model's weights when training begins."""

    def on_train_begin(self, logs=None):
        core = next(layer for layer in self.model.layers if isinstance(layer, keras.Model))
        self.weights = {f"{layer.name}/{i}": w.numpy() for layer in core.layers for i, w in enumerate(layer.weights)}


def test_train_init_from(tmp_path):
    source = models.get("convnet", num_classes=3)
    for weight in source.weights:  # away from any initializer's values
        weight.assign(np.random.default_rng(0).normal(size=weight.shape).astype("float32"))
    source.save(tmp_path / "source.keras")
    probe = _InitialWeights()
    argv = [
        "--model", "convnet", "--dataset", "fashion_mnist", "--epochs", "1", "--batch-size", "16",
        "--init-from", str(tmp_path / "source.keras"), "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    with tfds.testing.mock_data(num_examples=16):
        metrics = load_script("train").main(argv, callbacks=[probe])
    assert metrics["args"]["init_from"] == str(tmp_path / "source.keras")
    for layer in source.layers:
        for i, weight in enumerate(layer.weights):
            key = f"{layer.name}/{i}"
            if layer.name == "head":
                assert probe.weights[key].shape[-1] == 10  # fashion_mnist's classes, a new head
            else:
                np.testing.assert_array_equal(probe.weights[key], weight.numpy(), err_msg=key)

    other = models.get("convnet", num_classes=3, filters=(8,))
    other.save(tmp_path / "other.keras")
    argv[argv.index("--init-from") + 1] = str(tmp_path / "other.keras")
    argv[-1] = str(tmp_path / "run2")
    with tfds.testing.mock_data(num_examples=16):
        status, _, stderr = run_main("train", argv)
    assert status == 2 and "--init-from" in stderr and "conv1" in stderr
    assert not (tmp_path / "run2").exists()
