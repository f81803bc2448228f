import keras

from kernorm import registry


@keras.saving.register_keras_serializable(package="kernorm")
class AddNorm(keras.layers.Layer):
    """A residual connection around `sublayer`, with a normalization before or after it.

    Post-norm (`norm_first=False`, the original Transformer):

        outputs = norm(x + sublayer(x))

    Pre-norm (`norm_first=True`, as in GPT-2 and ViT):

        outputs = x + sublayer(norm(x))

    Args:
        sublayer: a Keras layer mapping a tensor to one of the same shape,
            such as self-attention or a feed-forward network.
        norm: anything `kernorm.get_norm` accepts: "layer", "batch", "rms",
            a Layer class, a partial, a config dict or None.
        norm_first: put the norm before the sublayer (pre-norm).
        norm_kwargs: dict of extra arguments for the norm (`epsilon`, ...).
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: the residual stream.
        training: Python bool, passed to the norm and the sublayer.
        mask: optional padding mask of all but the last axis; it reaches the
            norm, so batch statistics skip padded positions.
        **sublayer_kwargs: passed to the sublayer (e.g. `attention_mask`).

    Example:

    >>> block = kernorm.AddNorm(keras.layers.Dense(16), norm="layer")
    >>> y = block(np.random.rand(2, 5, 16).astype("float32"))

    Reference:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762) (post-norm).
        - [Xiong et al., 2020](https://arxiv.org/abs/2002.04745) (pre-norm).
    """

    def __init__(self, sublayer, norm="layer", norm_first=False, norm_kwargs=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(sublayer, dict):
            # Deserializing builds the sublayer; under this layer's name, its weights
            # keep the paths they had when the sublayer was built inside `build`.
            with keras.name_scope(self.name, caller=self):
                sublayer = keras.layers.deserialize(sublayer)
        if not isinstance(sublayer, keras.layers.Layer):
            raise TypeError(f"Expected `sublayer` to be a keras.layers.Layer. Received: {sublayer!r}")
        if norm_kwargs is not None and not isinstance(norm_kwargs, dict):
            raise TypeError(f"Expected `norm_kwargs` to be a dict or None. Received: {norm_kwargs!r}")
        self.sublayer = sublayer
        self.norm = norm
        self.norm_first = bool(norm_first)
        self.norm_kwargs = dict(norm_kwargs or {})
        self.norm_layer = registry.get_norm(norm, name="norm", **self.norm_kwargs)
        self.supports_masking = True

    def build(self, input_shape):
        self.norm_layer.build(input_shape)
        if not self.sublayer.built:
            self.sublayer.build(input_shape)

    def call(self, inputs, training=None, mask=None, **sublayer_kwargs):
        if self.norm_first:
            return inputs + self.sublayer(self._norm(inputs, training, mask), training=training, **sublayer_kwargs)
        return self._norm(inputs + self.sublayer(inputs, training=training, **sublayer_kwargs), training, mask)

    def _norm(self, x, training, mask):
        if mask is not None and registry.takes_mask(self.norm_layer):
            return self.norm_layer(x, training=training, mask=mask)
        return self.norm_layer(x, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {
            "sublayer": keras.layers.serialize(self.sublayer),
            "norm": registry.serializable(self.norm, self.norm_layer),
            "norm_first": self.norm_first,
            "norm_kwargs": self.norm_kwargs,
        }
        return {**super().get_config(), **config}

