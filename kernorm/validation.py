"""Argument and input checks shared by kernorm's layers.

Each check raises a `ValueError` or `TypeError` that names the argument and
what was expected, before any TensorFlow op can fail with an internal error.
"""

import numbers

import tensorflow as tf


def axis_argument(axis):
    """Validates an `axis` constructor argument: an int or a list/tuple of ints."""
    if isinstance(axis, bool) or not isinstance(axis, (numbers.Integral, list, tuple)):
        raise TypeError(
            f"Expected an int or a list/tuple of ints for the argument 'axis' (`axis`). Received: axis={axis!r}"
        )
    if isinstance(axis, numbers.Integral):
        return int(axis)
    if not axis or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in axis):
        raise TypeError(
            "Expected an int or a non-empty list/tuple of ints for the argument 'axis' (`axis`). "
            f"Received: axis={axis!r}"
        )
    return [int(a) for a in axis]


def canonical_axes(axis, ndim, name="axis"):
    """Turns an int or list of axes into a sorted tuple of non-negative axes of a rank-`ndim` input."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}`={axis!r} is out of range for an input of rank {ndim}: "
                f"expected values in [{-ndim}, {ndim - 1}]."
            )
    positive = [a % ndim for a in axes]
    if len(set(positive)) != len(positive):
        raise ValueError(f"`{name}`={axis!r} names the same input axis twice.")
    return tuple(sorted(positive))


def non_negative(value, name):
    """Checks a float argument such as `epsilon` is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected `{name}` to be a number. Received: {name}={value!r}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"Expected `{name}` to be a finite number >= 0. Received: {name}={value!r}")
    return float(value)


def momentum(value, name="momentum"):
    """Checks a moving-average momentum lies in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected `{name}` to be a number in [0, 1). Received: {name}={value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Expected `{name}` to be in [0, 1). Received: {name}={value!r}")
    return float(value)


def positive_int_or_none(value, name):
    """Checks an optional size argument such as `virtual_batch_size`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int or None. Received: {name}={value!r}")
    return int(value)


def float_inputs(inputs, layer):
    """Rejects integer, boolean and string inputs: normalization needs floats."""
    dtype = tf.as_dtype(getattr(inputs, "dtype", tf.float32))
    if not dtype.is_floating:
        raise TypeError(
            f"Layer '{layer.name}' expected floating-point `inputs` "
            f"(float16, bfloat16, float32 or float64). Received: inputs.dtype={dtype.name}. "
            "Cast the inputs (e.g. with keras.layers.Rescaling) before normalizing."
        )


def known_sizes(input_shape, axes, layer):
    """The sizes of `axes` in `input_shape`; they must be known to create the weights."""
    sizes = tuple(input_shape[a] for a in axes)
    if any(size is None for size in sizes):
        raise ValueError(
            f"Layer '{layer.name}' needs a known size on the normalized axes {list(axes)}: the input "
            "tensor should have a defined dimension but the layer received an input with shape "
            f"{tuple(input_shape)}."
        )
    return sizes


def built_sizes(input_shape, axes, sizes, layer):
    """Checks that an input of any rank has the sizes the layer was built with on `axes`."""
    for axis, size in zip(axes, sizes):
        if input_shape[axis] is not None and input_shape[axis] != size:
            raise ValueError(
                f"Layer '{layer.name}' expected axis {axis} of input shape to have value {size}, "
                f"but received input with shape {tuple(input_shape)}: its weights were built for that size."
            )


def broadcast_mask(mask, inputs):
    """Returns `mask` in a shape that broadcasts against `inputs`.

    A mask may have the input's rank, or one less (Keras's convention: a
    `(batch, time)` mask for `(batch, time, features)` inputs, expanded on the
    last axis). Its known sizes must match the input's or be 1.
    """
    if mask is None:
        return None
    mask = tf.convert_to_tensor(mask)
    input_shape, mask_shape = inputs.shape, mask.shape
    received_shape = tuple(mask_shape)
    if mask_shape.rank == input_shape.rank - 1:
        mask = mask[..., tf.newaxis]
        mask_shape = mask.shape
    fits = mask_shape.rank == input_shape.rank and all(
        m is None or i is None or m in (1, i) for m, i in zip(mask_shape, input_shape)
    )
    if not fits:
        raise ValueError(
            f"Expected `mask` with the shape of the inputs {tuple(input_shape)} or of all but "
            f"their last axis {tuple(input_shape[:-1])}. Received: mask.shape={received_shape}"
        )
    return mask


def more_than_one_value(inputs, axes, layer):
    """Refuses a batch norm's training batch with one value per channel over `axes`: its variance is 0, not
    a statistic.

    With the sizes known, a ValueError now; otherwise (a graph traced for any
    batch size) an assertion that fails when the batch arrives, before the
    moving statistics are touched. Returns `inputs`, tied to that assertion.
    """
    if not axes:
        return inputs
    message = (
        f"Layer '{layer.name}' got one value per channel in training mode (`axis`={layer.axis}): "
        "batch statistics of a single value are meaningless (the variance is 0), so the layer "
        "neither normalizes with them nor updates its moving statistics. Remedies: batch the "
        "data with `drop_remainder=True` (a last batch of one sample is the usual cause), use a "
        "larger batch, or use a norm that does not need the batch (LayerNormalization, "
        "GroupNormalization); training=False uses the moving statistics."
    )
    sizes = [inputs.shape[a] for a in axes]
    if None not in sizes:
        if all(size == 1 for size in sizes):
            raise ValueError(f"{message} Received: inputs.shape={tuple(inputs.shape)}")
        return inputs
    values = tf.reduce_prod(tf.gather(tf.shape(inputs, out_type=tf.int64), axes))
    # Exactly one: an empty batch counts nothing and leaves the moving statistics alone.
    check = tf.debugging.assert_none_equal(values, tf.constant(1, tf.int64), message=message)
    with tf.control_dependencies([check] if check is not None else []):
        return tf.identity(inputs)
