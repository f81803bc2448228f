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
"""

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
