"""kernorm.models.transformer_classifier and vit: every norm, the padding mask, post- and pre-norm blocks."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
import zoo_checks
from kernorm import models

NORMS = kernorm.norm_names()
NUM_CLASSES = 4
VOCAB = 30
LENGTH = 8


def _tokens(rng, batch=8, length=LENGTH, min_length=2):
    """Token ids with a random number of real tokens (ids >= 1) followed by padding (0)."""
    tokens = rng.integers(1, VOCAB, size=(batch, length)).astype("int32")
    lengths = rng.integers(min_length, length + 1, size=batch)
    lengths[0] = length  # one sequence without padding
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return tokens


def _text_model(norm="layer", norm_first=False, sequence_length=LENGTH, **kwargs):
    config = dict(d_model=16, num_heads=2, num_layers=1, ff_dim=32, dropout=0.0)
    config.update(kwargs)
    return models.transformer_classifier(
        VOCAB, sequence_length, NUM_CLASSES, norm=norm, norm_first=norm_first, **config
    )


def _vit_model(norm="layer", norm_first=True, **kwargs):
    config = dict(d_model=16, num_heads=2, num_layers=1, ff_dim=32)
    config.update(kwargs)
    return models.vit(8, 4, NUM_CLASSES, norm=norm, norm_first=norm_first, **config)


@pytest.mark.parametrize("norm", NORMS)
def test_transformer_classifier_every_norm(norm, rng, tmp_path):
    tokens = _tokens(rng)
    labels = np.arange(8) % NUM_CLASSES
    zoo_checks.check_builder(_text_model(norm), tokens, labels, NUM_CLASSES, tmp_path)


@pytest.mark.parametrize("norm", NORMS)
def test_vit_every_norm(norm, rng, tmp_path):
    images = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    labels = np.arange(8) % NUM_CLASSES
    zoo_checks.check_builder(_vit_model(norm), images, labels, NUM_CLASSES, tmp_path)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_pre_norm_text_model_saves_and_serves(norm, rng, tmp_path):
    """The final norm of a pre-norm stack takes the padding mask too, and survives the round trips."""
    model = _text_model(norm, norm_first=True, num_layers=2)
    tokens = _tokens(rng)
    model(tokens, training=True)  # moves the batch norm statistics away from their initial values
    zoo_checks.check_inference(model, tokens, NUM_CLASSES)
    zoo_checks.check_round_trips(model, tokens, tmp_path)


# Acceptance: padding never changes the statistics or the outputs at real tokens.

def _probe(model):
    """A model giving the per-token features, the pooled features and the logits."""
    outputs = [model.get_layer("sequence_output").output, model.get_layer("pool").output, model.output]
    return keras.Model(model.input, outputs)


def _state(model):
    return [w.numpy().copy() for w in model.non_trainable_weights]


def _set_state(model, state):
    for weight, value in zip(model.non_trainable_weights, state):
        weight.assign(value)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_appending_padding_changes_nothing(norm, training, norm_first, rng):
    model = _text_model(
        norm, norm_first, num_layers=2, sequence_length=LENGTH + 5,
        norm_kwargs={"momentum": 0.5} if norm == "batch" else None,
    )
    probe = _probe(model)
    tokens = _tokens(rng, min_length=1)
    real = tokens != 0
    padded = np.concatenate([tokens, np.zeros((len(tokens), 5), "int32")], axis=1)
    # Moving statistics other than their initial zeros and ones make inference a real test.
    model(_tokens(rng), training=True)
    before = _state(model)

    short = [np.asarray(t) for t in probe(tokens, training=training)]
    after_short = _state(model)
    _set_state(model, before)
    long = [np.asarray(t) for t in probe(padded, training=training)]
    after_long = _state(model)

    np.testing.assert_allclose(long[0][:, :LENGTH][real], short[0][real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(long[1], short[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(long[2], short[2], rtol=1e-5, atol=1e-5)
    assert len(after_short) == (0 if norm == "layer" else 2 * (4 + norm_first))
    for moved_short, moved_long, initial in zip(after_short, after_long, before):
        np.testing.assert_allclose(moved_long, moved_short, rtol=1e-5, atol=1e-6)
        assert training == (not np.allclose(moved_short, initial))


def test_padding_reaches_the_batch_statistics(rng):
    """The moving mean of the first norm equals the mean over the real tokens only."""
    model = _text_model("batch", norm_first=True, norm_kwargs={"momentum": 0.0})
    tokens = _tokens(rng)
    block = model.get_layer("block1")
    embedded = keras.Model(model.input, model.get_layer("position_embedding").output)(tokens)
    model(tokens, training=True)
    real = tokens != 0
    expected = np.asarray(embedded)[real].mean(axis=0)
    np.testing.assert_allclose(block.attention_block.norm_layer.moving_mean.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pooling_ignores_padded_values():
    pool = models.MaskedGlobalAveragePooling1D()
    x = np.array([[[1.0, 2.0], [3.0, 4.0], [np.nan, np.inf]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]], "float32")
    mask = np.array([[True, True, False], [False, False, False]])
    np.testing.assert_array_equal(pool(x, mask=mask), [[2.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(pool(x[1:]), [[5.0 / 3, 2.0]])


def test_all_padding_sequence_is_finite(rng):
    model = _text_model("batch", num_layers=2)
    tokens = _tokens(rng)
    tokens[1] = 0
    for training in (False, True):
        assert np.all(np.isfinite(model(tokens, training=training)))


# Acceptance: post-norm and pre-norm blocks, against a block composed by hand from the same weights.

def _softmax(scores):
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=-1, keepdims=True)


def _attention_reference(layer, x, mask):
    """Multi-head self-attention in float64 NumPy from the layer's weights; queries see only real keys."""
    attention = layer.attention
    w = {name: [v.numpy().astype(np.float64) for v in dense.weights] for name, dense in
         [("q", attention.query_dense), ("k", attention.key_dense), ("v", attention.value_dense),
          ("o", attention.output_dense)]}
    q = np.einsum("btd,dhk->bthk", x, w["q"][0]) + w["q"][1]
    k = np.einsum("btd,dhk->bthk", x, w["k"][0]) + w["k"][1]
    v = np.einsum("btd,dhk->bthk", x, w["v"][0]) + w["v"][1]
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    context = np.einsum("bhqs,bshk->bqhk", _softmax(scores), v)
    return np.einsum("bqhk,hkd->bqd", context, w["o"][0]) + w["o"][1]


def _feedforward_reference(layer, x):
    w1, b1 = (v.numpy().astype(np.float64) for v in layer.hidden.weights)
    w2, b2 = (v.numpy().astype(np.float64) for v in layer.output_dense.weights)
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def _norm_reference(norm, layer, x, mask):
    gamma, beta = (v.numpy() for v in layer.trainable_weights)
    if norm == "layer":
        return ref.layer_norm(x, -1, gamma, beta, 1e-3)[0]
    # Batch norm in training: statistics over the real (batch, token) positions.
    mean = x[mask].mean(axis=0)
    variance = x[mask].var(axis=0)
    return (x - mean) / np.sqrt(variance + 1e-3) * gamma + beta


@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_block_matches_hand_composed(norm, norm_first, rng):
    shape = (3, 5, 8)
    block = models.TransformerEncoderBlock(num_heads=2, ff_dim=16, norm=norm, norm_first=norm_first)
    block.build(shape)
    for weight in block.trainable_weights:
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype("float32"))
    x = rng.normal(size=shape).astype("float32")
    mask = np.ones(shape[:2], bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    outputs = np.asarray(block(x, mask=mask, training=True))

    attention, feedforward = block.attention_block, block.feedforward_block
    assert attention.norm_first == feedforward.norm_first == norm_first

    def attend(h):
        return _attention_reference(attention.sublayer, h, mask)

    def feed(h):
        return _feedforward_reference(feedforward.sublayer, h)

    def norm1(h):
        return _norm_reference(norm, attention.norm_layer, h, mask)

    def norm2(h):
        return _norm_reference(norm, feedforward.norm_layer, h, mask)

    x64 = x.astype(np.float64)
    if norm_first:
        h = x64 + attend(norm1(x64))
        expected = h + feed(norm2(h))
    else:
        h = norm1(x64 + attend(x64))
        expected = norm2(h + feed(h))
    np.testing.assert_allclose(outputs[mask], expected[mask], rtol=5e-6, atol=5e-6)


@pytest.mark.parametrize("build", [_text_model, _vit_model], ids=["text", "vit"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_final_norm_only_in_pre_norm_models(build, norm_first):
    model = build("rms", norm_first=norm_first, num_layers=2)
    names = [layer.name for layer in model.layers]
    assert ("final_norm" in names) == norm_first
    if norm_first:
        assert isinstance(model.get_layer("final_norm"), kernorm.RMSNormalization)
    for i in (1, 2):
        block = model.get_layer(f"block{i}")
        assert block.norm_first == norm_first
        assert isinstance(block.attention_block.norm_layer, kernorm.RMSNormalization)


def test_vit_final_norm_is_the_last_thing_before_the_class_token(rng):
    model = _vit_model("layer", norm_first=True)
    images = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    probe = keras.Model(model.input, [model.get_layer("final_norm").output, model.get_layer("pool").output])
    tokens, pooled = probe(images)
    assert tokens.shape == (2, 5, 16)
    np.testing.assert_array_equal(pooled, tokens[:, 0])
    np.testing.assert_allclose(np.mean(tokens, axis=-1), 0.0, atol=1e-6)


# Parameter counts.

def test_bert_base_block_count():
    block = models.TransformerEncoderBlock(num_heads=12, ff_dim=3072, norm="batch")
    block.build((None, 128, 768))
    assert zoo_checks.trainable_count(block) == 7_087_872


def test_vit_tiny_count():
    assert zoo_checks.trainable_count(models.vit(224, 16, 1000, norm="batch")) == 5_717_416


def test_default_vit_tiny_has_timms_epsilon_and_count():
    """Every layer norm of `models.get("vit_tiny")` has timm's epsilon, 1e-6; a user's epsilon wins."""
    model = models.get("vit_tiny")
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, kernorm.LayerNormalization)]
    assert len(norms) == 2 * 12 + 1 and {layer.epsilon for layer in norms} == {1e-6}
    assert zoo_checks.trainable_count(model) == 5_717_416
    custom = _vit_model("layer", num_layers=1, norm_kwargs={"epsilon": 1e-3})
    assert {layer.epsilon for layer in custom._flatten_layers() if hasattr(layer, "epsilon")} == {1e-3}


@pytest.mark.parametrize(
    "config, count",
    [
        (dict(d_model=384, num_heads=6, ff_dim=1536), 22_050_664),  # ViT-S/16, as in timm
        (dict(d_model=768, num_heads=12, ff_dim=3072), 86_567_656),  # ViT-B/16
    ],
    ids=["vit_small", "vit_base"],
)
def test_vit_counts(config, count):
    assert zoo_checks.trainable_count(models.vit(224, 16, 1000, norm="batch", **config)) == count


def test_text_model_count():
    model = _text_model("layer", num_layers=2)
    block = 4 * (16 * 16 + 16) + (16 * 32 + 32 + 32 * 16 + 16) + 4 * 16
    assert zoo_checks.trainable_count(model) == VOCAB * 16 + LENGTH * 16 + 2 * block + 16 * NUM_CLASSES + NUM_CLASSES


# Norm meanings and forms on tokens.

def test_token_norm_meanings(rng):
    def norm_layer(norm, d_model=64, norm_kwargs=None):
        model = _text_model(norm, d_model=d_model, num_heads=2, norm_kwargs=norm_kwargs)
        return model.get_layer("block1").attention_block.norm_layer

    assert type(norm_layer("layer")) is kernorm.LayerNormalization
    assert type(norm_layer("instance")) is kernorm.LayerNormalization
    assert type(norm_layer("batch")) is kernorm.BatchNormalization
    assert type(norm_layer("rms")) is kernorm.RMSNormalization
    assert type(norm_layer(None)) is keras.layers.Identity
    group = norm_layer("group")
    assert type(group) is models.TokenGroupNormalization
    assert group.groups == 8  # 32 groups reduced to keep 8 features in each
    assert norm_layer("group", 768).groups == 32
    assert norm_layer("group", norm_kwargs={"groups": 4}).groups == 4


def test_token_group_norm_normalizes_each_token(rng):
    layer = models.TokenGroupNormalization(groups=2, epsilon=0.0)
    x = rng.normal(3.0, 2.0, size=(2, 3, 8)).astype("float32")
    outputs = np.asarray(layer(x)).reshape(2, 3, 2, 4)
    np.testing.assert_allclose(outputs.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(outputs.std(-1), 1.0, atol=1e-5)
    # Each token on its own: the output for one token ignores the others.
    np.testing.assert_allclose(layer(x[:1, 1:2]), layer(x)[:1, 1:2], atol=1e-6)


@pytest.mark.parametrize(
    "norm, norm_kwargs, kind, attribute, value",
    [
        ("layer", {"epsilon": 1e-6}, kernorm.LayerNormalization, "epsilon", 1e-6),
        (kernorm.RMSNormalization, {"epsilon": 1e-5}, kernorm.RMSNormalization, "epsilon", 1e-5),
        (functools.partial(kernorm.BatchNormalization, momentum=0.5), None, kernorm.BatchNormalization, "momentum", 0.5),
        (keras.layers.serialize(kernorm.LayerNormalization(epsilon=0.1)), None, kernorm.LayerNormalization, "epsilon", 0.1),
        ({"class_name": "kernorm>RMSNormalization", "config": {}}, {"epsilon": 0.2},
         kernorm.RMSNormalization, "epsilon", 0.2),
        (None, None, keras.layers.Identity, "name", "norm"),
    ],
)
@pytest.mark.parametrize("build", [_text_model, _vit_model], ids=["text", "vit"])
def test_every_norm_form(build, norm, norm_kwargs, kind, attribute, value, rng, tmp_path):
    model = build(norm, norm_kwargs=norm_kwargs, norm_first=True)
    for layer in [model.get_layer("block1").attention_block.norm_layer, model.get_layer("block1").feedforward_block.norm_layer]:
        assert type(layer) is kind
        assert getattr(layer, attribute) == value
    final = model.get_layer("final_norm")
    assert type(final) is kind
    inputs = _tokens(rng) if build is _text_model else rng.normal(size=(8, 8, 8, 3)).astype("float32")
    expected = model(inputs, training=False)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.get_layer("block1").attention_block.norm_layer) is kind
    np.testing.assert_array_equal(loaded(inputs, training=False), expected)


@pytest.mark.parametrize(
    "norm", [kernorm.RMSNormalization, functools.partial(kernorm.BatchNormalization, momentum=0.5)],
    ids=["class", "partial"],
)
def test_add_norm_with_a_class_or_partial_saves(norm, rng, tmp_path):
    """`kernorm.AddNorm` itself, as the blocks use it, with a norm that is not JSON."""
    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, kernorm.AddNorm(keras.layers.Dense(8), norm=norm, norm_kwargs={"epsilon": 0.01})(inputs))
    x = rng.normal(size=(3, 4, 8)).astype("float32")
    model(x, training=True)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    norm_layer = loaded.layers[-1].norm_layer
    assert type(norm_layer) is type(model.layers[-1].norm_layer)
    assert norm_layer.epsilon == 0.01
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


@pytest.mark.parametrize("build", [_text_model, _vit_model], ids=["text", "vit"])
def test_unknown_norm_lists_the_known_ones(build):
    with pytest.raises(ValueError, match="Unknown norm 'weight'.*batch, layer, rms, group, instance, none"):
        build("weight")


# Shapes and arguments.

def test_text_model_takes_any_length_up_to_sequence_length(rng):
    model = _text_model()
    assert model(_tokens(rng, length=3, min_length=1)).shape == (8, NUM_CLASSES)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        model(_tokens(rng, length=LENGTH + 1))


def test_positional_arguments_follow_the_documented_signatures():
    text = models.transformer_classifier(VOCAB, LENGTH, NUM_CLASSES, 16, 2, 3, 24, 0.25, "rms", True)
    block = text.get_layer("block3")
    assert (block.num_heads, block.ff_dim, block.dropout, block.norm, block.norm_first) == (2, 24, 0.25, "rms", True)
    image = models.vit(8, 4, NUM_CLASSES, 1, 16, 2, 3, 24, "batch", False)
    block = image.get_layer("block3")
    assert (block.num_heads, block.ff_dim, block.norm, block.norm_first) == (2, 24, "batch", False)
    assert image.input.shape == (None, 8, 8, 1)


def test_vit_accepts_input_shape():
    model = models.vit(input_shape=(12, 16, 1), patch_size=4, num_classes=3, d_model=8, num_heads=2, num_layers=1, ff_dim=8)
    assert model.input.shape == (None, 12, 16, 1)
    assert model.get_layer("position_embedding").sequence_length == 3 * 4 + 1


@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(image_size=10, patch_size=4), "patch_size"),
        (dict(image_size=8, patch_size=4, d_model=10, num_heads=3), "num_heads"),
        (dict(patch_size=4), "image_size"),
        (dict(image_size=8, patch_size=4, dropout=-0.1), "dropout"),
    ],
)
def test_vit_rejects_bad_arguments(arguments, match):
    with pytest.raises(ValueError, match=match):
        models.vit(**arguments)


def test_text_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        models.transformer_classifier(10, 8, 2, d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        models.transformer_classifier(0, 8, 2)
