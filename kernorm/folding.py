"""Batch norm for serving: fold it into the layer before it, and recompute its statistics.

- `fold_batch_norm(model)` returns an inference-only copy of a functional
  model in which each batch norm that directly follows a convolution or a
  Dense layer is folded into that layer's kernel and bias, as TensorFlow's
  graph transform `fold_batch_norms`, the TFLite converter and PyTorch's
  `fuse_conv_bn_eval` do.
- `recalibrate_batch_norm(model, dataset, steps)` replaces the moving
  statistics of every batch norm by the exact statistics of its inputs over
  `steps` batches ("precise BN": PyTorch's `torch.optim.swa_utils.update_bn`,
  pycls's `compute_precise_bn_stats`; Wu and Johnson, 2021).

Both work on `kernorm.BatchNormalization` and `keras.layers.BatchNormalization`.
"""

import itertools
import warnings

import keras
import numpy as np
import tensorflow as tf

from kernorm import _private, ops, validation
from kernorm.batch_normalization import BatchNormalization

__all__ = ["fold_batch_norm", "recalibrate_batch_norm"]

BATCH_NORMS = (BatchNormalization, keras.layers.BatchNormalization)
# Layers whose output channels a batch norm on their channel axis can be folded into.
FOLDABLE = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D,
    keras.layers.Dense,
)


def fold_batch_norm(model):
    """Folds batch normalization into the layer before it, for serving.

    Each batch norm that directly follows a `Conv1D`, `Conv2D`, `Conv3D`,
    `DepthwiseConv2D` or `Dense` layer (no activation in that layer, no op in
    between, and no other use of that layer or of its output) disappears into
    that layer's kernel and bias. With `scale = gamma / sqrt(moving_variance +
    epsilon)` per channel:

        kernel = kernel * scale          (on the output-channel axis)
        bias = (bias - moving_mean) * scale + beta

    computed in float64, then cast to the weights' dtype. A batch norm that
    cannot be folded becomes a fixed per-channel affine `x * scale + shift`: a
    `keras.layers.BatchNormalization` with `trainable=False`, zero mean, unit
    variance and `epsilon=0`. The copy holds only Keras layers in place of the
    batch norms, so it saves as `.keras` and serves without kernorm (other
    kernorm layers, such as layer norm, stay as they are).

    Layers without weights are shared with `model`; every other layer is a copy
    with the same weights. Nested functional and Sequential models are folded
    too. The batch norms inside a subclassed layer or model are left alone.

    The copy is for inference only: it computes `model(x, training=False)`.
    Inputs whose batch-norm inputs have a mean far larger than their spread
    lose the precision that kernorm's centred inference keeps, as any folded
    model does.

    Args:
        model: a functional or Sequential `keras.Model`.

    Returns:
        A new functional `keras.Model` with the same inputs, outputs and layer
        names, or `model` itself when it holds no batch norm to fold (a no-op).

    Raises:
        TypeError: `model` is not a Keras model, or is subclassed (its graph of
            layers is not known).
        ValueError: a Sequential model without a known input shape, or a batch
            norm over several axes that cannot be folded.

    Example:

    >>> model = kernorm.models.resnet(20, (32, 32, 3), 10)
    >>> folded = kernorm.fold_batch_norm(model)
    >>> folded.export("serving/resnet20")

    Reference:
        - [Jacob et al., 2018](https://arxiv.org/abs/1712.05877), section 3.2
          (batch-norm folding).
    """
    model = _as_functional(model, "model")
    if not any(isinstance(layer, BATCH_NORMS) for layer in _graph_layers(model)):
        return model
    return _fold(model)


def _as_functional(model, name):
    """`model` as a functional model: Sequential models are wrapped; anything else is a TypeError."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected `{name}` to be a keras.Model. Received: {name} of type {type(model).__name__}")
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise ValueError(
                f"The Sequential model {model.name!r} has no known input shape: start it with `keras.Input(...)` "
                "or build it before folding its batch norms."
            )
        if len(model.inputs) > 1:
            return keras.Model(model.inputs, model.outputs, name=model.name)
        return keras.Model(model.inputs[0], model.outputs[0], name=model.name)
    if not _private.is_functional(model):
        raise TypeError(
            f"fold_batch_norm needs a functional or Sequential keras.Model, whose graph of layers it can "
            f"rewrite; {model.name!r} is a subclassed model ({type(model).__name__}). Build it with "
            "`keras.Model(inputs, outputs)`, or fold the functional model it wraps."
        )
    return model


def _graph_layers(model):
    """Every layer of a functional model's graph, nested functional and Sequential models included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Sequential) or _private.is_functional(layer):
            yield from _graph_layers(layer)


def _fold(model):
    """The folded copy of a functional `model` (see `fold_batch_norm`)."""
    pairs = _foldable_pairs(model)
    folded_norms = {id(norm) for _, norm in pairs.values()}
    norm_of = {id(layer): norm for layer, norm in pairs.values()}
    copies = []  # (original, copy) of the layers whose weights the copy takes

    def clone(layer):
        if isinstance(layer, keras.Model):
            try:
                functional = _as_functional(layer, "layer")
            except (TypeError, ValueError):
                return layer  # a subclassed inner model: shared, as it is
            return _fold(functional)
        if id(layer) in folded_norms:
            return layer  # never called: `call` skips it
        if isinstance(layer, BATCH_NORMS):
            copy = _affine(layer)
        elif id(layer) in norm_of:
            copy = type(layer).from_config({**layer.get_config(), "use_bias": True})
        elif not layer.weights:
            return layer
        else:
            copy = type(layer).from_config(layer.get_config())
        copies.append((layer, copy))
        return copy

    def call(layer, *args, **kwargs):
        if id(layer) in folded_norms:
            return args[0]
        return layer(*args, **kwargs)

    folded = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer, copy in copies:
        if isinstance(layer, BATCH_NORMS):
            scale, shift = _scale_and_shift(layer)
            _assign(copy, gamma=scale, beta=shift)
        elif id(layer) in norm_of:
            _assign(copy, **_folded_weights(layer, norm_of[id(layer)]))
        else:
            copy.set_weights(layer.get_weights())
    return folded


def _foldable_pairs(model):
    """{id(norm): (layer, norm)} for each batch norm of `model`'s own graph that folds into the layer before it.

    Nothing folds where the graph's calls are not all known (see `_private.layer_calls`): a batch norm that is
    not folded still computes the same function, as a per-channel affine."""
    calls = {id(layer): _private.layer_calls(layer) for layer in model.layers}
    if any(layer_calls is None for layer_calls in calls.values()):
        return {}
    uses = {}  # id(tensor): how many calls take it, the model's outputs included
    for layer_calls in calls.values():
        for inputs, _ in layer_calls:
            for tensor in inputs:
                uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    for tensor in model.outputs:
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    producers = {
        id(tensor): layer for layer in model.layers if len(calls[id(layer)]) == 1 for tensor in calls[id(layer)][0][1]
    }
    pairs = {}
    for norm in model.layers:
        if not isinstance(norm, BATCH_NORMS) or len(calls[id(norm)]) != 1 or len(calls[id(norm)][0][0]) != 1:
            continue
        tensor = calls[id(norm)][0][0][0]
        layer = producers.get(id(tensor))
        foldable = (
            isinstance(layer, FOLDABLE)
            and uses[id(tensor)] == 1  # the batch norm is the only use of the layer's output
            and layer.activation in (None, keras.activations.linear)
            and getattr(layer, "quantization_mode", None) is None
            and not getattr(layer, "lora_enabled", False)
            and _norm_axes(norm, len(tensor.shape)) == [_channel_axis(layer, len(tensor.shape))]
        )
        if foldable:
            pairs[id(norm)] = (layer, norm)
    return pairs


def _norm_axes(norm, rank):
    """The channel axes of a batch norm on rank-`rank` inputs, each in [0, rank)."""
    axes = norm.axis if isinstance(norm.axis, (list, tuple)) else [norm.axis]
    return sorted(axis % rank for axis in axes)


def _channel_axis(layer, rank):
    """The output-channel axis of a convolution or Dense output of rank `rank`."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return rank - 1


def _statistics(norm):
    """A batch norm's inference statistics and weights as float64 vectors."""
    def vector(weight, default):
        if weight is None:
            return np.full(norm.moving_mean.shape, default, np.float64)
        return np.asarray(weight, np.float64)

    return (
        vector(norm.moving_mean, 0.0),
        vector(norm.moving_variance, 1.0),
        vector(getattr(norm, "gamma", None), 1.0),
        vector(getattr(norm, "beta", None), 0.0),
    )


def _scale_and_shift(norm):
    """`(scale, shift)` with `norm(x, training=False) == x * scale + shift`, in float64."""
    mean, variance, gamma, beta = (tf.constant(vector) for vector in _statistics(norm))
    return tuple(value.numpy() for value in ops.inference_affine(mean, variance, gamma, beta, norm.epsilon))


def _folded_weights(layer, norm):
    """`{"kernel": ..., "bias": ...}` of `layer` with `norm` folded in, in float64."""
    scale, shift = _scale_and_shift(norm)
    kernel = np.asarray(layer.kernel, np.float64)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        # Output channel c * depth_multiplier + m comes from kernel[..., c, m].
        kernel = (kernel.reshape(*kernel.shape[:-2], -1) * scale).reshape(kernel.shape)
    else:
        kernel = kernel * scale
    bias = np.asarray(layer.bias, np.float64) if layer.use_bias else 0.0
    return {"kernel": kernel, "bias": bias * scale + shift}


def _affine(norm):
    """A Keras batch norm that computes `x * scale + shift` in every mode, for a batch norm that does not fold."""
    axes = norm.axis if isinstance(norm.axis, (list, tuple)) else [norm.axis]
    if len(axes) != 1:
        raise ValueError(
            f"Cannot fold batch norm {norm.name!r} over the axes {axes}: only a batch norm over one channel "
            "axis becomes a Keras layer when it does not follow a convolution or Dense layer."
        )
    return keras.layers.BatchNormalization(
        axis=axes[0], epsilon=0.0, trainable=False, name=norm.name, dtype=norm.dtype_policy
    )


def _assign(layer, **values):
    for name, value in values.items():
        variable = getattr(layer, name)
        variable.assign(np.asarray(value).astype(variable.dtype))


def recalibrate_batch_norm(model, dataset, steps=None, verbose="auto"):
    """Recomputes every batch norm's moving statistics over batches of training data ("precise BN").

    The exponential moving averages that batch norm keeps in training lag
    behind the weights and weigh the last batches most. This replaces them by
    the exact statistics of each batch norm's inputs over `steps` batches, with
    the weights frozen: the population mean, and the variance from the pooled
    second moments (the biased variance of all the values, not the mean of the
    batch variances). Run it after training and before `fold_batch_norm` or an
    export.

    The model runs as in training (`training=True`), as PyTorch's `update_bn`
    and pycls's precise BN run it: each batch norm normalizes with its batch's
    statistics, so each one sees the inputs it saw in training. Only trainable
    batch norms are recalibrated (a frozen one normalizes with its moving
    statistics in training too). A mask counts as in training.

    Args:
        model: a `keras.Model` (functional, Sequential or subclassed).
        dataset: a `tf.data.Dataset` or an iterable of batches: inputs, or
            `(inputs, targets)` / `(inputs, targets, sample_weights)` tuples as
            `model.fit` takes them; targets are ignored.
        steps: how many batches to read; None reads the whole dataset, which
            must then be finite.
        verbose: "auto" or 1 shows a progress bar, 0 shows nothing.

    Returns:
        A dict with `"steps"` (the batches read), `"examples"` (the samples in
        them) and `"layers"` (the batch norms recalibrated).

    Raises:
        TypeError: `model` is not a Keras model or `dataset` not iterable.
        ValueError: `steps` is not a positive int, or the dataset gives no batch.

    Example:

    >>> kernorm.recalibrate_batch_norm(model, train_dataset, steps=200)
    {'steps': 200, 'examples': 12800, 'layers': 19}

    Reference:
        - [Wu and Johnson, 2021: Rethinking "Batch" in BatchNorm](https://arxiv.org/abs/2105.07576),
          section 3 (precise BN).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected `model` to be a keras.Model. Received: model of type {type(model).__name__}")
    steps = validation.positive_int_or_none(steps, "steps")
    try:
        batches = iter(dataset)
    except TypeError:
        raise TypeError(
            f"Expected `dataset` to be a tf.data.Dataset or an iterable of batches. Received: dataset of type "
            f"{type(dataset).__name__}"
        ) from None
    norms = [layer for layer in _private.all_layers(model) if isinstance(layer, BATCH_NORMS) and layer.trainable]
    if not norms:
        return {"steps": 0, "examples": 0, "layers": 0}
    saved = [[variable.numpy() for variable in norm.non_trainable_variables] for norm in norms]
    records = {}
    for norm in norms:
        object.__setattr__(norm, "call", _recording_call(norm, records))
    try:
        totals = _accumulate(model, batches, steps, records, norms, verbose)
    except BaseException:
        for norm, values in zip(norms, saved):
            for variable, value in zip(norm.non_trainable_variables, values):
                variable.assign(value)
        raise
    finally:
        for norm in norms:
            object.__delattr__(norm, "call")
    count_batches, examples, pooled = totals
    for norm, values, (count, mean, squares) in zip(norms, saved, pooled):
        # A channel that no value reached (all masked) keeps the statistics it had; the training
        # pass above moved them, so they come from before it.
        before = dict(zip((id(v) for v in norm.non_trainable_variables), values))
        seen = count > 0
        mean = np.where(seen, mean, before[id(norm.moving_mean)])
        variance = np.where(seen, squares / np.maximum(count, 1.0), before[id(norm.moving_variance)])
        _assign(norm, moving_mean=mean, moving_variance=variance)
        if getattr(norm, "moving_stddev", None) is not None:
            _assign(norm, moving_stddev=ops.stddev_from_variance(variance, norm.epsilon))
    return {"steps": count_batches, "examples": examples, "layers": len(norms)}


def _accumulate(model, batches, steps, records, norms, verbose):
    """Runs `model` in training mode on up to `steps` batches; returns `(batches, examples, pooled)`
    with, per batch norm, the float64 `(count, mean, sum of squared deviations)` of its inputs."""

    @tf.function(reduce_retracing=True)
    def forward(inputs):
        records.clear()
        model(inputs, training=True)
        # A batch norm that this input does not reach records nothing.
        return [records.get(id(norm), ()) for norm in norms]

    pooled = [[tf.zeros(norm.moving_mean.shape, tf.float64)] * 3 for norm in norms]
    progress = keras.utils.Progbar(steps, verbose=1 if verbose == "auto" else verbose, unit_name="step")
    count_batches = examples = 0
    for batch in itertools.islice(batches, steps):
        inputs = keras.utils.unpack_x_y_sample_weight(batch)[0]
        for index, record in enumerate(forward(inputs)):
            if record:
                pooled[index] = ops.merge_moments(*pooled[index], *(tf.cast(value, tf.float64) for value in record))
        count_batches += 1
        examples += int(tf.shape(tf.nest.flatten(inputs)[0])[0])
        progress.update(count_batches)
    if steps is None or count_batches < steps:
        progress.update(count_batches, finalize=True)
    if count_batches == 0:
        raise ValueError("`dataset` gave no batch: recalibrate_batch_norm needs at least one batch of training data.")
    if steps is not None and count_batches < steps:
        warnings.warn(
            f"`dataset` ran out after {count_batches} batches of the `steps`={steps} asked for; the statistics "
            f"cover those {count_batches} batches.",
            stacklevel=3,
        )
    return count_batches, examples, [tuple(value.numpy() for value in values) for values in pooled]


def _recording_call(norm, records):
    """`norm.call` that also records the per-channel mean, variance and count of its inputs."""
    call = norm.call

    def call_and_record(inputs, training=None, mask=None):
        outputs = call(inputs, training=training, mask=mask)
        axes = [axis for axis in range(len(inputs.shape)) if axis not in _norm_axes(norm, len(inputs.shape))]
        mask = None if mask is None else validation.broadcast_mask(mask, inputs)
        mean, variance, count = ops.moments(inputs, axes, mask=mask, keepdims=False)
        shape = norm.moving_mean.shape
        records[id(norm)] = tuple(tf.broadcast_to(tf.cast(s, tf.float32), shape) for s in (count, mean, variance))
        return outputs

    return call_and_record
