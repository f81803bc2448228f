"""The base classes of kernorm's normalization layers: what they do alike."""

import keras
import tensorflow as tf

from kernorm import ops, validation
from kernorm.layer_config import ArgumentsConfig


class NormalizationLayer(ArgumentsConfig, keras.layers.Layer):
    """A normalization layer with an `axis` argument.

    Its outputs have the inputs' shape (for any `axis` that fits the inputs'
    rank), it passes masks on, and float32 inputs are normalized as they are
    under a mixed policy: Keras would cast them to float16 first, where values
    beyond 65504 overflow. Its config is its constructor's arguments, named in
    `config_arguments` (see `kernorm.layer_config.ArgumentsConfig`).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.autocast = False

    def compute_output_shape(self, input_shape):
        validation.canonical_axes(self.axis, len(input_shape))
        return input_shape


class SampleNormalization(NormalizationLayer):
    """A normalization of each sample over `axis`, with weights shaped like those axes (layer and RMS norm).

    It takes inputs of any rank whose normalized axes have the sizes it was
    built with, and ragged inputs whose normalized axes are uniform. A subclass
    creates its weights in `_build_weights(shape)` and computes in
    `_normalize(values, axes)`, on dense values (a ragged input's flat values).
    """

    def build(self, input_shape):
        axes = validation.canonical_axes(self.axis, len(input_shape))
        self._sizes = validation.known_sizes(input_shape, axes, self)
        self._build_weights(self._sizes)

    def call(self, inputs):
        validation.float_inputs(inputs, self)
        axes = validation.canonical_axes(self.axis, inputs.shape.rank)
        validation.built_sizes(inputs.shape, axes, self._sizes, self)
        return tf.cast(ops.on_flat_values(self._normalize, inputs, axes), self.compute_dtype)

    def _build_weights(self, shape):
        raise NotImplementedError

    def _normalize(self, values, axes):
        raise NotImplementedError
