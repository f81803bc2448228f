"""The zoo's norm layers, per builder and per norm name: which layer, which groups, which weights.

The README's table "What each norm normalizes over" says what each name builds in CNNs, MLPs and
Transformers; here every norm position of every builder is checked against it by the weights it
holds (a scale and an offset of the width, moving statistics for batch norm, nothing for "none"),
so that a norm built without its offset or its scale, or with other groups, fails even where
outputs and counts would not show it. Also: the layer before a norm has no bias unless the norm
is "none", the trainable-parameter counts are equal across "batch", "layer", "group" and
"instance", and the published counts hold exactly. Last, the head: logits, or what
`classifier_activation` makes of them.
"""

import keras
import numpy as np
import pytest

import kernorm
import zoo_checks
from kernorm import models

NORMS = kernorm.norm_names()
D_MODEL = 64


def _transformer(norm, norm_first):
    return models.transformer_classifier(
        50, 8, 2, d_model=D_MODEL, num_heads=2, num_layers=1, ff_dim=32, norm=norm, norm_first=norm_first
    )


BUILDERS = {
    # name: (the kind of tensor its norms see, the builder of a small model for a norm)
    "convnet": ("image", lambda norm: models.convnet((16, 16, 3), 4, filters=(8, 64), norm=norm)),
    "resnet8": ("image", lambda norm: models.resnet(8, (8, 8, 3), 4, norm=norm, base_filters=4)),
    # The ImageNet stem, bottlenecks and projection shortcuts (basic blocks: resnet8).
    "resnet50": ("image", lambda norm: models.resnet(50, (32, 32, 3), 4, norm=norm, base_filters=2)),
    "mlp": ("vector", lambda norm: models.mlp((8,), 4, hidden_units=(64, 32), norm=norm)),
    "transformer-post-norm": ("token", lambda norm: _transformer(norm, False)),
    "transformer-pre-norm": ("token", lambda norm: _transformer(norm, True)),
    "vit": ("token", lambda norm: models.vit(16, 4, 4, d_model=D_MODEL, num_heads=2, num_layers=1, ff_dim=32, norm=norm)),
}


def _expected(kind, norm, width):
    """`(layer class, groups or None, {weight name: (shape, trainable)})` of one norm position
    on `width` channels or features, as the README's table defines it."""
    affine = {"gamma": ((width,), True), "beta": ((width,), True)}
    if norm == "none":
        return keras.layers.Identity, None, {}
    if norm == "batch":
        moving = {"moving_mean": ((width,), False), "moving_variance": ((width,), False)}
        return kernorm.BatchNormalization, None, {**affine, **moving}
    if norm == "rms":
        return kernorm.RMSNormalization, None, {"scale": ((width,), True)}
    if kind == "image":
        # Group norm's forms of the paper: one group over (H, W, C), one channel a group, and
        # 32 groups (the widths here are powers of two: fewer channels, one each).
        return kernorm.GroupNormalization, {"layer": 1, "instance": -1, "group": min(32, width)}[norm], affine
    if norm in ("layer", "instance"):
        return kernorm.LayerNormalization, None, affine
    # Without spatial axes: up to 32 groups of at least 8 features.
    group_class = kernorm.GroupNormalization if kind == "vector" else models.TokenGroupNormalization
    return group_class, min(32, width // 8), affine


def _norm_positions(kind, model):
    """`[(norm layer, width, layer before it or None)]` in the order the model builds them."""
    if kind == "token":
        layers = [layer.norm_layer for layer in model._flatten_layers() if isinstance(layer, kernorm.AddNorm)]
        if any(layer.name == "final_norm" for layer in model.layers):
            layers.append(model.get_layer("final_norm"))
        return [(layer, D_MODEL, None) for layer in layers]
    before = {"image": ("norm", "conv"), "vector": ("norm", "dense")}[kind]
    positions = []
    for layer in model.layers:
        if layer.name.startswith("norm") or layer.name.endswith("_norm"):
            producer = model.get_layer(layer.name.replace(*before))
            positions.append((layer, producer.filters if kind == "image" else producer.units, producer))
    return positions


def _weights(layer):
    return {weight.name: (tuple(weight.shape), weight.trainable) for weight in layer.weights}


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_every_norm_position_has_the_weights_of_its_norm(builder):
    kind, build = BUILDERS[builder]
    counts, positions = {}, {}
    for norm in NORMS:
        model = build(norm)
        found = _norm_positions(kind, model)
        positions[norm] = len(found)
        for layer, width, producer in found:
            layer_class, groups, weights = _expected(kind, norm, width)
            where = f"{builder} norm={norm} {layer.name}"
            assert type(layer) is layer_class, (where, type(layer))
            assert _weights(layer) == weights, where
            if groups is not None:
                assert layer.groups == groups, where
            if producer is not None:
                # The norm's offset takes the place of the bias; without a norm the bias stays.
                assert producer.use_bias == (norm == "none"), where
        counts[norm] = zoo_checks.trainable_count(model)
    assert len(set(positions.values())) == 1 and positions["batch"] > 1, positions
    assert counts["batch"] == counts["layer"] == counts["group"] == counts["instance"], counts


def test_cifar_resnet_counts_are_the_published_ones_exactly():
    """He et al. 2016, Table 6: 0.27M and 1.7M parameters; exactly 269,722 and 1,727,962 with
    option A shortcuts and 10 classes. (The other norms with a scale and an offset give the same
    counts: the test above checks every position of the same blocks.)"""
    counts = {depth: zoo_checks.trainable_count(models.get(f"resnet{depth}")) for depth in (20, 110)}
    assert counts == {20: 269_722, 110: 1_727_962}


HEADS = {
    "mlp": (lambda **kwargs: models.mlp((8,), 4, hidden_units=(16,), **kwargs), (8,), "float32"),
    "convnet": (lambda **kwargs: models.convnet((8, 8, 3), 4, filters=(8,), **kwargs), (8, 8, 3), "float32"),
    "resnet8": (lambda **kwargs: models.resnet(8, (8, 8, 3), 4, base_filters=4, **kwargs), (8, 8, 3), "float32"),
    "transformer": (
        lambda **kwargs: models.transformer_classifier(50, 8, 4, d_model=16, num_heads=2, num_layers=1, ff_dim=16, **kwargs),
        (8,), "int32",
    ),
    "vit": (
        lambda **kwargs: models.vit(8, 4, 4, d_model=16, num_heads=2, num_layers=1, ff_dim=16, **kwargs), (8, 8, 3), "float32"
    ),
    "rnn": (lambda **kwargs: models.rnn_classifier(50, 8, 4, units=8, **kwargs), (8,), "int32"),
}


@pytest.mark.parametrize("builder", list(HEADS))
def test_models_output_logits_unless_the_head_is_given_an_activation(builder, rng):
    build, shape, dtype = HEADS[builder]
    x = rng.integers(1, 50, (3, *shape)) if dtype == "int32" else rng.normal(size=(3, *shape))
    logits = np.asarray(build()(x.astype(dtype)))
    probabilities = np.asarray(build(classifier_activation="softmax")(x.astype(dtype)))
    assert logits.shape == probabilities.shape == (3, 4)
    assert np.min(logits) < 0 or np.max(np.abs(logits.sum(-1) - 1.0)) > 1e-3
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
    assert np.all(probabilities > 0)
