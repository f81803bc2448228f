"""A multilayer perceptron and a plain ConvNet, each with the norm as a constructor argument."""

import keras

from . import common, norms


def mlp(
    input_shape,
    num_classes,
    hidden_units=(256, 128),
    norm="batch",
    dropout=0.0,
    norm_kwargs=None,
    activation="relu",
    classifier_activation=None,
    name="mlp",
):
    """A multilayer perceptron: Dense -> norm -> activation per hidden layer, then a Dense head.

    The classic `Linear, BatchNorm1d, ReLU` stack. Inputs of any shape are
    flattened first. A Dense layer followed by a norm has no bias (the norm's
    offset takes its place).

    Args:
        input_shape: shape of one sample, e.g. `(28, 28, 1)` or `(784,)`.
        num_classes: number of output logits.
        hidden_units: widths of the hidden layers.
        norm: a name from `kernorm.norm_names()`, a Layer class, a callable
            returning a layer, a Keras config dict, or None. On a feature
            vector, "instance" is the same as "layer", and "group" uses up to
            32 groups of at least 8 features.
        dropout: dropout rate after each hidden activation.
        norm_kwargs: dict of extra arguments for every norm layer.
        activation: the hidden activation.
        classifier_activation: activation of the head; None gives logits.
        name: the model's name.

    Returns:
        A functional `keras.Model` mapping float inputs to `(batch, num_classes)`.
    """
    hidden_units = common.int_tuple(hidden_units, "hidden_units")
    dropout = common.dropout_rate(dropout)
    input_shape = common.int_tuple(input_shape, "input_shape")
    inputs = keras.Input(input_shape, name="inputs")
    x = keras.layers.Flatten(name="flatten")(inputs) if len(input_shape) > 1 else inputs
    use_bias = norms.is_identity(norm)
    for i, units in enumerate(hidden_units, start=1):
        x = keras.layers.Dense(units, use_bias=use_bias, name=f"dense{i}")(x)
        x = norms.vector_norm(norm, units, norm_kwargs, name=f"norm{i}")(x)
        x = keras.layers.Activation(activation, name=f"act{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout{i}")(x)
    outputs = common.head(x, num_classes, classifier_activation)
    return keras.Model(inputs, outputs, name=name)


def convnet(
    input_shape,
    num_classes,
    filters=(32, 64, 128),
    norm="batch",
    norm_kwargs=None,
    dropout=0.0,
    activation="relu",
    classifier_activation=None,
    name="convnet",
):
    """A plain ConvNet: per entry of `filters`, Conv3x3 -> norm -> activation -> 2x2 max pool;
    then global average pooling and a Dense head.

    Convolutions followed by a norm have no bias.

    Args:
        input_shape: `(height, width, channels)` of float images.
        num_classes: number of output logits.
        filters: the number of filters of each block.
        norm: a name from `kernorm.norm_names()` (see `kernorm.models.norms`
            for what each normalizes over in a CNN), a Layer class, a callable
            returning a layer, a Keras config dict, or None.
        norm_kwargs: dict of extra arguments for every norm layer.
        dropout: dropout rate before the head.
        activation: the activation after each norm.
        classifier_activation: activation of the head; None gives logits.
        name: the model's name.

    Returns:
        A functional `keras.Model` mapping `(batch, *input_shape)` to `(batch, num_classes)`.
    """
    input_shape = common.image_shape(input_shape)
    filters = common.int_tuple(filters, "filters")
    dropout = common.dropout_rate(dropout)
    inputs = keras.Input(input_shape, name="inputs")
    x = inputs
    use_bias = norms.is_identity(norm)
    for i, width in enumerate(filters, start=1):
        x = keras.layers.Conv2D(
            width, 3, padding="same", use_bias=use_bias, kernel_initializer="he_normal", name=f"conv{i}"
        )(x)
        x = norms.image_norm(norm, width, norm_kwargs, name=f"norm{i}")(x)
        x = keras.layers.Activation(activation, name=f"act{i}")(x)
        if x.shape[1] > 1 and x.shape[2] > 1:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = common.head(x, num_classes, classifier_activation)
    return keras.Model(inputs, outputs, name=name)
