"""The layers the zoo's Transformers are made of: embeddings, masks, attention, feed-forward, encoder blocks.

Each encoder block is two `kernorm.AddNorm` residual blocks, self-attention and
a feed-forward network: post-norm `norm(x + f(x))` or pre-norm
`x + f(norm(x))`. The builders are in `kernorm.models.transformer`.
"""

import keras
import tensorflow as tf
from keras import initializers

from kernorm.add_norm import AddNorm
from kernorm.layer_config import ArgumentsConfig

from . import common, norms


@keras.saving.register_keras_serializable(package="kernorm")
class PaddingMask(ArgumentsConfig, keras.layers.Layer):
    """`token_ids != padding_id`: the boolean mask of the real tokens.

    Args:
        padding_id: the id of the padding token.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: integer token ids of any shape.
    """

    config_arguments = ("padding_id",)

    def __init__(self, padding_id=0, **kwargs):
        super().__init__(**kwargs)
        self.padding_id = int(padding_id)

    def call(self, inputs):
        return keras.ops.not_equal(inputs, self.padding_id)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype="bool")


@keras.saving.register_keras_serializable(package="kernorm")
class PositionEmbedding(ArgumentsConfig, keras.layers.Layer):
    """Adds a learned embedding of each position: `outputs = inputs + embeddings[:length]`.

    Sequences may be shorter than `sequence_length`; position `t` always gets
    the same vector, so appending tokens never changes the earlier ones.

    Args:
        sequence_length: the longest sequence, the number of positions.
        initializer: initializer for the `(sequence_length, features)` table.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: `(batch, length, features)` with `length <= sequence_length`.
    """

    config_arguments = ("sequence_length", "initializer")

    def __init__(self, sequence_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = common.positive_int(sequence_length, "sequence_length")
        self.initializer = initializers.get(initializer)
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(f"PositionEmbedding needs (batch, length, features) inputs. Received: {tuple(input_shape)}")
        if input_shape[1] is not None and input_shape[1] > self.sequence_length:
            raise ValueError(
                f"Sequences of length {input_shape[1]} exceed `sequence_length`={self.sequence_length}."
            )
        self.embeddings = self.add_weight(
            shape=(self.sequence_length, input_shape[-1]), name="embeddings", initializer=self.initializer
        )

    def call(self, inputs):
        length = tf.shape(inputs)[1]
        checked = tf.debugging.assert_less_equal(
            length, self.sequence_length, message=f"Sequences longer than `sequence_length`={self.sequence_length}."
        )
        with tf.control_dependencies([checked] if checked is not None else []):
            positions = self.embeddings[:length]
        return inputs + keras.ops.cast(positions, inputs.dtype)[tf.newaxis]

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="kernorm")
class PatchEmbedding(ArgumentsConfig, keras.layers.Layer):
    """Splits images into non-overlapping patches and projects each to `d_model` features.

    A `patch_size` x `patch_size` convolution with stride `patch_size`,
    flattened to a sequence of `(height / patch) * (width / patch)` tokens.

    Args:
        patch_size: side of a square patch, in pixels.
        d_model: features of each token.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: `(batch, height, width, channels)` images; the patch size must
            divide height and width.
    """

    config_arguments = ("patch_size", "d_model")

    def __init__(self, patch_size, d_model, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = common.positive_int(patch_size, "patch_size")
        self.d_model = common.positive_int(d_model, "d_model")
        self.projection = keras.layers.Conv2D(
            self.d_model, self.patch_size, strides=self.patch_size, padding="valid", name="projection"
        )

    def build(self, input_shape):
        if len(input_shape) != 4 or any(s is None or s % self.patch_size for s in input_shape[1:3]):
            raise ValueError(
                f"PatchEmbedding needs (batch, height, width, channels) images whose height and width "
                f"`patch_size`={self.patch_size} divides. Received: input_shape={tuple(input_shape)}"
            )
        self.projection.build(input_shape)

    def call(self, inputs):
        x = self.projection(inputs)
        return keras.ops.reshape(x, (-1, x.shape[1] * x.shape[2], self.d_model))

    def compute_output_shape(self, input_shape):
        patches = (input_shape[1] // self.patch_size) * (input_shape[2] // self.patch_size)
        return (input_shape[0], patches, self.d_model)


@keras.saving.register_keras_serializable(package="kernorm")
class ClassToken(ArgumentsConfig, keras.layers.Layer):
    """Prepends a learned class token to a sequence: `(batch, n, d)` -> `(batch, n + 1, d)`.

    Args:
        initializer: initializer for the `(1, 1, d)` token.
        **kwargs: base layer arguments such as `name`.
    """

    config_arguments = ("initializer",)

    def __init__(self, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.initializer = initializers.get(initializer)

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), name="token", initializer=self.initializer)

    def call(self, inputs):
        token = keras.ops.cast(self.token, inputs.dtype)
        token = keras.ops.broadcast_to(token, (keras.ops.shape(inputs)[0], 1, inputs.shape[-1]))
        return keras.ops.concatenate([token, inputs], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])


@keras.saving.register_keras_serializable(package="kernorm")
class SelfAttention(ArgumentsConfig, keras.layers.Layer):
    """Multi-head self-attention with dropout on its output: a sublayer for `kernorm.AddNorm`.

    `outputs = dropout(MultiHeadAttention(x, x, attention_mask))`, with
    `key_dim = features // num_heads` and the output projected back to the
    input's features.

    Args:
        num_heads: number of attention heads; must divide the features.
        dropout: dropout rate on the attention probabilities and the output.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: `(batch, length, features)`.
        training: Python bool, for dropout.
        attention_mask: optional boolean `(batch, length, length)`: which
            positions each query may attend to.
    """

    config_arguments = ("num_heads", "dropout")

    def __init__(self, num_heads, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = common.positive_int(num_heads, "num_heads")
        self.dropout = common.dropout_rate(dropout)
        self.attention = None
        self.output_dropout = keras.layers.Dropout(self.dropout, name="output_dropout")
        self.supports_masking = True

    def build(self, input_shape):
        features = input_shape[-1]
        if features % self.num_heads:
            raise ValueError(f"`num_heads`={self.num_heads} must divide the features, {features}.")
        self.attention = keras.layers.MultiHeadAttention(
            self.num_heads, features // self.num_heads, dropout=self.dropout, name="attention"
        )
        self.attention.build(input_shape, input_shape)

    def call(self, inputs, training=None, attention_mask=None):
        outputs = self.attention(inputs, inputs, attention_mask=attention_mask, training=training)
        return self.output_dropout(outputs, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="kernorm")
class FeedForward(ArgumentsConfig, keras.layers.Layer):
    """The position-wise feed-forward network: `dropout(Dense(activation(Dense(x))))`.

    Args:
        hidden_dim: width of the hidden layer (`ff_dim`).
        dropout: dropout rate on the output.
        activation: the hidden activation.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: `(..., features)`; the output has the same shape.
        training: Python bool, for dropout.
    """

    config_arguments = ("hidden_dim", "dropout", "activation")

    def __init__(self, hidden_dim, dropout=0.0, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = common.positive_int(hidden_dim, "hidden_dim")
        self.dropout = common.dropout_rate(dropout)
        self.activation = keras.activations.get(activation)
        self.hidden = keras.layers.Dense(self.hidden_dim, activation=self.activation, name="hidden")
        self.output_dense = None
        self.output_dropout = keras.layers.Dropout(self.dropout, name="output_dropout")
        self.supports_masking = True

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.output_dense = keras.layers.Dense(input_shape[-1], name="output")
        self.output_dense.build((*input_shape[:-1], self.hidden_dim))

    def call(self, inputs, training=None):
        return self.output_dropout(self.output_dense(self.hidden(inputs)), training=training)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="kernorm")
class TransformerEncoderBlock(ArgumentsConfig, keras.layers.Layer):
    """A Transformer encoder block: self-attention and a feed-forward network, each in `kernorm.AddNorm`.

    Post-norm (`norm_first=False`, Vaswani et al.):

        h = norm1(x + SelfAttention(x))
        outputs = norm2(h + FeedForward(h))

    Pre-norm (`norm_first=True`, ViT, GPT-2):

        h = x + SelfAttention(norm1(x))
        outputs = h + FeedForward(norm2(h))

    Args:
        num_heads: number of attention heads; must divide the features.
        ff_dim: width of the feed-forward hidden layer.
        dropout: dropout rate on the attention probabilities and on the
            outputs of both sublayers.
        norm: a name from `kernorm.norm_names()` (see `kernorm.models.norms`
            for what each normalizes over on tokens), a Layer class, a
            callable returning a layer, a Keras config dict, or None.
        norm_first: pre-norm (True) or post-norm (False).
        norm_kwargs: dict of extra arguments for the norms.
        activation: the feed-forward activation.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: `(batch, length, features)`.
        mask: optional boolean `(batch, length)`, False at padding. Queries
            attend only to real keys, and batch statistics skip padding.
        training: Python bool.

    Reference:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762).
        - [Xiong et al., 2020](https://arxiv.org/abs/2002.04745) (pre-norm).
    """

    config_arguments = ("num_heads", "ff_dim", "dropout", "norm", "norm_first", "norm_kwargs", "activation")

    def __init__(
        self, num_heads, ff_dim, dropout=0.0, norm="layer", norm_first=False, norm_kwargs=None,
        activation="relu", **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = common.positive_int(num_heads, "num_heads")
        self.ff_dim = common.positive_int(ff_dim, "ff_dim")
        self.dropout = common.dropout_rate(dropout)
        # A class or a partial is kept as the config of the layer it builds, so
        # that get_config is JSON; an unknown name fails here, not at build time.
        self.norm = norms.serializable(norm, norm_kwargs)
        self.norm_first = bool(norm_first)
        self.norm_kwargs = dict(norm_kwargs or {})
        self.activation = keras.activations.get(activation)
        self.supports_masking = True
        self.attention_block = None
        self.feedforward_block = None

    def build(self, input_shape):
        features = input_shape[-1]
        norm, norm_kwargs = norms.token_norm(self.norm, features, self.norm_kwargs)

        def add_norm(sublayer, name):
            return AddNorm(sublayer, norm=norm, norm_first=self.norm_first, norm_kwargs=norm_kwargs, name=name)

        self.attention_block = add_norm(SelfAttention(self.num_heads, self.dropout, name="self_attention"), "attention")
        self.feedforward_block = add_norm(
            FeedForward(self.ff_dim, self.dropout, self.activation, name="feedforward"), "feedforward"
        )
        self.attention_block.build(input_shape)
        self.feedforward_block.build(input_shape)

    def call(self, inputs, mask=None, training=None):
        attention_mask = None
        if mask is not None:
            mask = keras.ops.cast(mask, "bool")
            # Every query attends to the real keys only.
            attention_mask = keras.ops.logical_and(
                keras.ops.ones_like(mask)[:, :, None], mask[:, None, :]
            )
        x = self.attention_block(inputs, training=training, mask=mask, attention_mask=attention_mask)
        return self.feedforward_block(x, training=training, mask=mask)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask


@keras.saving.register_keras_serializable(package="kernorm")
class MaskedGlobalAveragePooling1D(keras.layers.Layer):
    """The mean over the real positions of each sequence.

        outputs = sum_t(mask[t] * x[t]) / max(sum_t(mask[t]), 1)

    Padded positions contribute nothing, whatever their values (even NaN);
    a sequence with no real position gives zeros.

    Call arguments:
        inputs: `(batch, length, features)`.
        mask: optional boolean `(batch, length)`, False at padding; without it,
            every position counts.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is None:
            return keras.ops.mean(inputs, axis=1)
        mask = keras.ops.cast(mask, "bool")[:, :, None]
        total = keras.ops.sum(keras.ops.where(mask, inputs, keras.ops.zeros_like(inputs)), axis=1)
        count = keras.ops.sum(keras.ops.cast(mask, inputs.dtype), axis=1)
        return total / keras.ops.maximum(count, 1.0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def compute_mask(self, inputs, mask=None):
        # The time axis is gone, and with it the mask.
        return None


@keras.saving.register_keras_serializable(package="kernorm")
class SelectToken(ArgumentsConfig, keras.layers.Layer):
    """The token at `index` of each sequence: `inputs[:, index]` (ViT's class token).

    Args:
        index: the position to take.
        **kwargs: base layer arguments such as `name`.
    """

    config_arguments = ("index",)

    def __init__(self, index=0, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, inputs):
        return inputs[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])
