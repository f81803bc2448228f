"""Transformer builders: a text classifier and ViT, whose norm is a constructor argument.

Both run one encoder stack (`_encoder`) of `kernorm.models.transformer_layers.TransformerEncoderBlock`:
post-norm `norm(x + f(x))` or pre-norm `x + f(norm(x))` blocks, and a final
norm after a pre-norm stack. In the text classifier, token id 0 is padding; the
padding mask reaches the attention (as `attention_mask`), the norms (so batch
norm statistics skip padded positions) and the mean pooling.
"""

import keras
from keras import initializers

from . import common, norms
from .transformer_layers import (
    ClassToken,
    MaskedGlobalAveragePooling1D,
    PaddingMask,
    PatchEmbedding,
    PositionEmbedding,
    SelectToken,
    TransformerEncoderBlock,
)

#: ViT's norm epsilon unless `norm_kwargs` names one: timm's, keras-hub's and
#: big_vision's layer norm.
VIT_EPSILON = 1e-6


def _encoder(x, num_heads, ff_dim, num_layers, dropout, norm, norm_first, norm_kwargs, activation, mask=None):
    """Embedded tokens `x` through `num_layers` encoder blocks, the final norm of a pre-norm stack, and
    the layer "sequence_output"."""
    d_model = x.shape[-1]
    num_layers = common.positive_int(num_layers, "num_layers")
    if d_model % common.positive_int(num_heads, "num_heads"):
        raise ValueError(f"`num_heads`={num_heads} must divide `d_model`={d_model}.")
    for i in range(1, num_layers + 1):
        block = TransformerEncoderBlock(
            num_heads, ff_dim, dropout, norm, norm_first, norm_kwargs, activation, name=f"block{i}"
        )
        x = block(x) if mask is None else block(x, mask=mask)
    if norm_first:
        layer = norms.make_token_norm(norm, d_model, norm_kwargs, name="final_norm")
        x = layer(x, mask=mask) if mask is not None and norms.takes_mask(layer) else layer(x)
    return keras.layers.Identity(name="sequence_output")(x)


def transformer_classifier(
    vocab_size, sequence_length, num_classes,
    d_model=128, num_heads=4, num_layers=2, ff_dim=512, dropout=0.1,
    norm="layer", norm_first=False, norm_kwargs=None,
    activation="relu", classifier_activation=None, name="transformer_classifier",
):  # fmt: skip
    """A Transformer encoder text classifier.

    Token and learned position embeddings, `num_layers` encoder blocks (see
    `TransformerEncoderBlock`), a final norm when `norm_first=True`, the mean
    over the real tokens, and a Dense head.

    Token id 0 is padding. The padding mask reaches the attention (queries
    attend only to real tokens), the norms (batch norm statistics count only
    real tokens) and the pooling, so appending padding changes neither the
    outputs at real tokens nor the pooled output nor the moving statistics.
    The model takes sequences of any length up to `sequence_length`.

    Args:
        vocab_size: number of token ids, padding (0) included.
        sequence_length: the longest sequence (the number of positions).
        num_classes: number of output logits.
        d_model: features of each token.
        num_heads: attention heads; must divide `d_model`.
        num_layers: number of encoder blocks.
        ff_dim: width of the feed-forward hidden layer.
        dropout: dropout rate on the embeddings, the attention probabilities,
            the sublayer outputs and the pooled features.
        norm: a name from `kernorm.norm_names()` (see `kernorm.models.norms`),
            a Layer class, a callable returning a layer, a Keras config dict,
            or None. "layer" normalizes each token over its features; "batch"
            each feature over the real (batch, token) positions.
        norm_first: pre-norm blocks and a final norm (True), or post-norm
            blocks (False).
        norm_kwargs: dict of extra arguments for every norm.
        activation: the feed-forward activation.
        classifier_activation: activation of the head; None gives logits.
        name: the model's name.

    Returns:
        A functional `keras.Model` mapping int32 token ids `(batch, length)` to
        `(batch, num_classes)`. The layer "sequence_output" gives the
        per-token features and "pool" the pooled ones.
    """
    vocab_size = common.positive_int(vocab_size, "vocab_size")
    d_model = common.positive_int(d_model, "d_model")
    dropout = common.dropout_rate(dropout)
    tokens = keras.Input((None,), dtype="int32", name="token_ids")
    mask = PaddingMask(name="padding_mask")(tokens)
    x = keras.layers.Embedding(vocab_size, d_model, name="token_embedding")(tokens)
    x = PositionEmbedding(sequence_length, name="position_embedding")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    x = _encoder(x, num_heads, ff_dim, num_layers, dropout, norm, norm_first, norm_kwargs, activation, mask)
    x = MaskedGlobalAveragePooling1D(name="pool")(x, mask=mask)
    if dropout:
        x = keras.layers.Dropout(dropout, name="pool_dropout")(x)
    outputs = common.head(x, num_classes, classifier_activation)
    return keras.Model(tokens, outputs, name=name)


def vit(
    image_size=None, patch_size=16, num_classes=1000, channels=3,
    d_model=192, num_heads=3, num_layers=12, ff_dim=768,
    norm="layer", norm_first=True, dropout=0.0, norm_kwargs=None,
    activation="gelu", classifier_activation=None, input_shape=None, name="vit",
):  # fmt: skip
    """A Vision Transformer classifier (Dosovitskiy et al. 2021).

    Patch embedding, a class token, learned position embeddings, `num_layers`
    encoder blocks (see `TransformerEncoderBlock`), a final norm when
    `norm_first=True`, and a Dense head on the class token. The defaults are
    ViT-Ti/16; ViT-S is `d_model=384, num_heads=6, ff_dim=1536`, ViT-B
    `d_model=768, num_heads=12, ff_dim=3072`. The weights are those of timm's
    `VisionTransformer` (one-to-one; `kernorm.models.convert.from_timm` loads
    them), and norms given by name take timm's `epsilon=1e-6` unless
    `norm_kwargs` sets one.

    Args:
        image_size: int or `(height, width)`; the patch size must divide both.
        patch_size: side of a square patch.
        num_classes: number of output logits.
        channels: image channels.
        d_model: features of each token.
        num_heads: attention heads; must divide `d_model`.
        num_layers: number of encoder blocks.
        ff_dim: width of the feed-forward hidden layer.
        norm: a name from `kernorm.norm_names()` (see `kernorm.models.norms`),
            a Layer class, a callable returning a layer, a Keras config dict,
            or None. "layer" normalizes each token over its features; "batch"
            each feature over the (batch, token) positions.
        norm_first: pre-norm blocks and a final norm (True, as in ViT), or
            post-norm blocks (False).
        dropout: dropout rate on the embeddings, the attention probabilities
            and the sublayer outputs.
        norm_kwargs: dict of extra arguments for every norm; the epsilon is
            1e-6 (`VIT_EPSILON`) unless it names one.
        activation: the feed-forward activation.
        classifier_activation: activation of the head; None gives logits.
        input_shape: `(height, width, channels)`, instead of `image_size` and
            `channels`.
        name: the model's name.

    Returns:
        A functional `keras.Model` mapping float images to `(batch, num_classes)`.
    """
    if input_shape is not None:
        height, width, channels = common.image_shape(input_shape)
    elif image_size is not None:
        height, width = common.int_tuple(image_size, "image_size", 2)
    else:
        raise ValueError("Pass `image_size` (and `channels`) or `input_shape`.")
    patch_size = common.positive_int(patch_size, "patch_size")
    if height % patch_size or width % patch_size:
        raise ValueError(f"`patch_size`={patch_size} must divide the image size ({height}, {width}).")
    d_model = common.positive_int(d_model, "d_model")
    dropout = common.dropout_rate(dropout)
    num_patches = (height // patch_size) * (width // patch_size)
    norm_kwargs = norms.with_default_epsilon(norm, norm_kwargs, VIT_EPSILON)

    images = keras.Input((height, width, common.positive_int(channels, "channels")), name="images")
    x = PatchEmbedding(patch_size, d_model, name="patch_embedding")(images)
    x = ClassToken(name="class_token")(x)
    position_initializer = initializers.RandomNormal(stddev=0.02)
    x = PositionEmbedding(num_patches + 1, initializer=position_initializer, name="position_embedding")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    x = _encoder(x, num_heads, ff_dim, num_layers, dropout, norm, norm_first, norm_kwargs, activation)
    x = SelectToken(0, name="pool")(x)
    outputs = common.head(x, num_classes, classifier_activation)
    return keras.Model(images, outputs, name=name)
