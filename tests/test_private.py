"""kernorm/_private.py: each private API of TensorFlow or Keras behind a probe, and its fallback.

Each probe is checked twice: it answers right on this TensorFlow (so that a
release that removes the private API fails here, not silently elsewhere), and
its fallback, forced, keeps the package correct.
"""

import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
import tolerances
from kernorm import _private, ops


def _xla_answers():
    """`in_xla_context()` eagerly, in a tf.function, under jit_compile, and in a function called from one."""
    answers = {"eager": _private.in_xla_context()}

    def probe(name):
        answers[name] = _private.in_xla_context()
        return tf.zeros([])

    tf.function(lambda: probe("function"), autograph=False)()
    inner = tf.function(lambda: probe("called from XLA"), autograph=False)
    tf.function(lambda: (probe("xla"), inner())[1], jit_compile=True, autograph=False)()
    return answers


def test_the_xla_probe_tells_a_compiled_graph_from_a_plain_one():
    assert _private._graph_in_xla_context is not None, "TensorFlow no longer has control_flow_util's XLA probe"
    assert _xla_answers() == {"eager": False, "function": False, "xla": True, "called from XLA": True}


@pytest.mark.parametrize("probe", [None, "broken"])
def test_without_the_xla_probe_every_graph_counts_as_compiled(probe, monkeypatch):
    """The probe missing (an import that failed) or raising (a renamed graph attribute)."""

    def broken(graph):
        raise AttributeError("_get_control_flow_context")

    monkeypatch.setattr(_private, "_graph_in_xla_context", broken if probe else None)
    assert _xla_answers() == {"eager": False, "function": True, "xla": True, "called from XLA": True}


def test_without_the_xla_probe_ops_keep_their_numbers(monkeypatch, rng):
    """With every graph counted as compiled, a plain tf.function takes the paths meant for XLA
    (no row kernel, no frozen kernel), which give the reference numbers there too."""
    monkeypatch.setattr(_private, "_graph_in_xla_context", None)
    x = tf.constant(rng.normal(1.0, 2.0, (4, 3, 3, 8)).astype("float32"))
    upstream = tf.constant(rng.normal(size=x.shape).astype("float32"))
    mean, variance = tf.constant(rng.normal(size=8).astype("float32")), tf.ones([8])

    def step(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            outputs = [ops.layer_norm(x, [3]), ops.batch_norm(x, [0, 1, 2])[0], ops.normalize(x, mean, variance)]
        return outputs, [tape.gradient(y, x, output_gradients=upstream) for y in outputs]

    function = tf.function(step, autograph=False)
    graph = function.get_concrete_function(x).graph
    kinds = {op.type for op in graph.get_operations()}
    assert "EuclideanNorm" not in kinds  # the row kernel runs outside XLA only
    frozen = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3" and not op.get_attr("is_training")]
    assert not frozen
    (layer, batch, frozen_outputs), (d_layer, d_batch, _) = function(x)
    x64, upstream64 = np.asarray(x, np.float64), np.asarray(upstream, np.float64)
    expected_layer, expected_layer_grads = ref.layer_norm(x64, [3], None, None, 1e-3, upstream64)
    expected_batch, expected_batch_grads, _, _ = ref.batch_norm(x64, -1, None, None, 1e-3, upstream64)
    ref.assert_close(layer, expected_layer, tolerances.FLOAT32, "layer norm")
    ref.assert_close(d_layer, expected_layer_grads[0], tolerances.FLOAT32, "layer norm d_x")
    ref.assert_close(batch, expected_batch, tolerances.FLOAT32, "batch norm")
    ref.assert_close(d_batch, expected_batch_grads[0], tolerances.FLOAT32, "batch norm d_x")
    expected_frozen = (x64 - np.asarray(mean, np.float64)) / np.sqrt(1.0 + 1e-3)
    ref.assert_close(frozen_outputs, expected_frozen, tolerances.FLOAT32, "normalize")
