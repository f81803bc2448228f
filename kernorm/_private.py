"""The private APIs of TensorFlow and Keras that kernorm relies on, each behind a probe with a fallback.

No other module of the package imports a private module of TensorFlow or Keras
(`tensorflow.python...`, `keras.src...`), reads their private attributes, or
depends on an undocumented layout of their data. Each entry says what it relies
on and what happens when a release takes it away; tests/test_private.py runs
every fallback.

TensorFlow:

- `in_xla_context()` asks `tensorflow.python.ops.control_flow_util` whether the
  graph being traced, or a graph around it, is compiled by XLA
  (`tf.function(jit_compile=True)`). There is no public way to ask. Without it,
  every graph counts as compiled: `kernorm.ops` then takes only the paths that
  suit XLA, which give the same numbers outside it, only more slowly.
- The fused batch norm kernels (`tf.raw_ops.FusedBatchNormV3` and
  `FusedBatchNormGradV3`, in kernorm/ops/kernels.py) are used only as their op
  documentation describes them, never by their reserve spaces' layout (which
  differs between the CPU kernel and cuDNN, where the second reserve space holds
  the inverse variance):
  - in training, the three reserve spaces go from the forward kernel to the
    gradient kernel as they are, and are never read;
  - frozen (`is_training=False`), the gradient kernel takes the mean and the
    variance as reserve spaces 1 and 2, and an empty third;
  - the training kernel returns the unbiased batch variance, which
    `kernorm.ops` turns into the biased one itself.
  No probe is needed: these are the documented contracts, and the float64
  references of tests/test_fast_paths.py check every path that uses them.

Keras:

- `all_layers(model)`: `Layer._flatten_layers()`; without it, the public
  `layers` attribute of each nested model is walked.
- `is_functional(model)`: the unexported `keras.src.models.functional.Functional`;
  without it, the class names of the model's type.
- `rnn_loop()`: `keras.src.backend.rnn`, the loop of `keras.layers.RNN` (masks,
  unrolling); without it, `scan_rnn`, the same contract without those options.
- `layer_calls(layer)`: the layer's private `_inbound_nodes`, the calls that
  built the functional graphs it is part of; without them, None (unknown):
  `fold_batch_norm` then folds nothing, and each batch norm becomes a
  per-channel affine that computes the same function.

TensorFlow Lite:

- `tflite_op_counts(flatbuffer)`: `tf.lite.Interpreter._get_ops_details()`;
  without it, the op names `tf.lite.experimental.Analyzer` prints.

TensorFlow Datasets (passed in, so that `import kernorm` does not import TFDS):

- `tfds_default_data_dir(tfds)`: `tfds.core.constants`; without it,
  `~/tensorflow_datasets`, TFDS's documented default.
- `tfds_not_found_errors(tfds)`: `tfds.core.registered.DatasetNotFoundError`;
  without it, `ValueError` alone.

tests/test_private_apis.py runs these fallbacks.
"""

import os

import tensorflow as tf

try:
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext as _graph_in_xla_context
except ImportError:  # pragma: no cover (a TensorFlow release without it; tests/test_private.py runs the fallback)
    _graph_in_xla_context = None


def in_xla_context():
    """Whether ops are being traced for XLA: inside `tf.function(jit_compile=True)` or a function it calls.

    Returns:
        False when executing eagerly. In a graph, TensorFlow's private answer;
        True where it is not available, so that callers take only the paths
        that also compile under XLA.
    """
    if tf.executing_eagerly():
        return False
    if _graph_in_xla_context is not None:
        try:
            return bool(_graph_in_xla_context(tf.compat.v1.get_default_graph()))
        except AttributeError:  # a release that renamed the graph attributes it reads
            pass
    return True


def all_layers(model):
    """Every layer inside `model`, nested models' layers included, each once.

    Keras's `Layer._flatten_layers()` (private) walks the tree; without it, the
    public `layers` attribute of each model is walked instead, which reaches the
    same layers in a functional or sequential model.
    """
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        try:
            return list(flatten(include_self=False))
        except TypeError:  # a release with another signature
            pass
    found, stack = [], list(reversed(getattr(model, "layers", [])))
    while stack:
        layer = stack.pop()
        if any(layer is seen for seen in found):
            continue
        found.append(layer)
        stack.extend(reversed(getattr(layer, "layers", [])))
    return found


def is_functional(model):
    """Whether `model` is a functional Keras model (not a Sequential one, which holds one), whose layer
    graph can be rebuilt.

    Keras does not export its `Functional` class (`keras.src.models.functional`);
    without it, the class names along the model's type hierarchy tell.
    """
    try:
        from keras.src.models.functional import Functional
    except ImportError:
        return any(cls.__name__ == "Functional" for cls in type(model).__mro__)
    return isinstance(model, Functional)


def layer_calls(layer):
    """`[(inputs, outputs), ...]`: the flat lists of input and output tensors of each call of `layer` in the
    functional graphs it is part of, or None where they are not known.

    Keras keeps them in the layer's private `_inbound_nodes`. Without it, None:
    the public `layer.input` and `layer.output` give only the first call, and
    cannot tell a layer called once from one called several times.
    """
    try:
        return [(list(node.input_tensors), list(node.output_tensors)) for node in layer._inbound_nodes]
    except AttributeError:  # a release without them, or whose nodes name them otherwise
        return None


def tflite_op_counts(flatbuffer):
    """`collections.Counter` of the builtin op names in a TFLite model (`bytes`).

    `tf.lite.Interpreter._get_ops_details()` (private) lists them; without it,
    the op names that the public `tf.lite.experimental.Analyzer` prints are
    counted.
    """
    import collections
    import contextlib
    import io
    import re
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice that LiteRT replaces it
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    details = getattr(interpreter, "_get_ops_details", None)
    if details is not None:
        names = [op["op_name"] for op in details()]
    else:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            tf.lite.experimental.Analyzer.analyze(model_content=flatbuffer)
        names = re.findall(r"^\s*Op#\d+ (\w+)\(", printed.getvalue(), re.MULTILINE)
    return collections.Counter(names)


def rnn_loop():
    """Keras's RNN loop, `keras.src.backend.rnn(step, inputs, initial_states, ...)`: what `keras.layers.RNN`
    runs, masks and unrolling included. Without it, `scan_rnn`: the same contract, without `mask` and `unroll`."""
    try:
        from keras.src.backend import rnn
    except ImportError:
        return scan_rnn
    return rnn


def scan_rnn(step, inputs, initial_states, go_backwards=False, return_all_outputs=True, **unused):
    """`(last_output, outputs, states)` of `step(input_t, states) -> (output_t, states)` over axis 1 of `inputs`."""
    del unused
    steps = tf.unstack(inputs, axis=1)
    if go_backwards:
        steps = steps[::-1]
    states, outputs = list(initial_states), []
    for step_input in steps:
        output, states = step(step_input, states)
        states = tf.nest.flatten(states)
        outputs.append(output)
    stacked = tf.stack(outputs, axis=1) if return_all_outputs else outputs[-1][:, tf.newaxis]
    return outputs[-1], stacked, states


def tfds_default_data_dir(tfds):
    """TFDS's default data folder (`tfds.core.constants`), else the documented `~/tensorflow_datasets`."""
    try:
        return tfds.core.constants.get_default_data_dir()
    except AttributeError:
        return os.path.expanduser("~/tensorflow_datasets")


def tfds_not_found_errors(tfds):
    """The exceptions `tfds.builder` raises for an unknown name: `ValueError`, and TFDS's own
    `DatasetNotFoundError` (in `tfds.core.registered`) where it has one."""
    error = getattr(getattr(getattr(tfds, "core", None), "registered", None), "DatasetNotFoundError", None)
    return (ValueError,) if error is None else (ValueError, error)
