"""Argument checks and the classification head shared by the zoo's builders."""

import numbers

import keras


def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int. Received: {name}={value!r}")
    return int(value)


def int_tuple(value, name, length=None):
    """A tuple of positive ints from an int or a sequence (an int is repeated `length` times)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and length is not None:
        value = (value,) * length
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        expected = f"{length} positive ints" if length else "a sequence of positive ints"
        raise ValueError(f"Expected `{name}` to be {expected}. Received: {name}={value!r}")
    return tuple(positive_int(v, name) for v in value)


def image_shape(input_shape):
    """Checks a channels-last image shape (height, width, channels)."""
    if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 3:
        raise ValueError(
            f"Expected `input_shape` to be (height, width, channels). Received: input_shape={input_shape!r}"
        )
    return int_tuple(input_shape, "input_shape")


def dropout_rate(value, name="dropout"):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"Expected `{name}` to be a float in [0, 1). Received: {name}={value!r}")
    return float(value)


def head(x, num_classes, classifier_activation=None, name="head"):
    """The classifier: a Dense layer giving logits (or `classifier_activation` of them)."""
    return keras.layers.Dense(
        positive_int(num_classes, "num_classes"), activation=classifier_activation, name=name
    )(x)
