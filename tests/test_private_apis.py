"""kernorm/_private.py, the Keras and TFDS entries: each private API, and the fallback that runs without it.

(The TensorFlow entry, the XLA-context probe, is tested in tests/test_private.py.)
"""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from kernorm import _private
from kernorm.models import convnet, resnet


@pytest.mark.parametrize("build", [lambda: resnet(20, (16, 16, 3), 3, base_filters=4), lambda: convnet((8, 8, 1), 3)])
def test_all_layers_and_its_fallback(build, monkeypatch):
    model = build()
    expected = model._flatten_layers(include_self=False)
    assert [id(layer) for layer in _private.all_layers(model)] == [id(layer) for layer in expected]
    # Without Keras's private walk: the public `layers` tree reaches the same layers.
    monkeypatch.setattr(type(model), "_flatten_layers", None, raising=False)
    assert {id(layer) for layer in _private.all_layers(model)} == {id(layer) for layer in expected}


def test_is_functional_and_its_fallback(monkeypatch):
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    cases = [
        convnet((8, 8, 1), 3),
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]),
        Subclassed(),
        keras.layers.Dense(2),
    ]
    expected = [True, False, False, False]  # a Sequential model holds a functional one
    assert [_private.is_functional(case) for case in cases] == expected
    import keras.src.models.functional as functional_module

    monkeypatch.delattr(functional_module, "Functional")
    assert [_private.is_functional(case) for case in cases] == expected


def test_scan_rnn_keeps_the_contract_of_keras_rnn_loop(rng):
    inputs = tf.constant(rng.normal(size=(2, 5, 3)).astype("float32"))
    kernel = tf.constant(rng.normal(size=(3, 4)).astype("float32"))

    def step(x, states):
        (state,) = states
        new = tf.tanh(x @ kernel + state)
        return new * 2.0, [new]

    initial = [tf.zeros((2, 4))]
    for backwards in (False, True):
        for all_outputs in (True, False):
            options = {"go_backwards": backwards, "return_all_outputs": all_outputs}
            theirs = _private.rnn_loop()(step, inputs, initial, **options)
            ours = _private.scan_rnn(step, inputs, initial, **options)
            for a, b in zip(tf.nest.flatten(ours), tf.nest.flatten(theirs)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_tfds_probes_and_their_fallbacks():
    import tensorflow_datasets as tfds

    assert _private.tfds_default_data_dir(tfds) == tfds.core.constants.get_default_data_dir()
    assert tfds.core.registered.DatasetNotFoundError in _private.tfds_not_found_errors(tfds)
    bare = types.SimpleNamespace()
    assert _private.tfds_default_data_dir(bare).endswith("tensorflow_datasets")
    assert _private.tfds_not_found_errors(bare) == (ValueError,)


def _chain_with_a_shared_layer():
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, name="once")
    shared = keras.layers.Dense(3, name="shared")
    x = dense(inputs)
    return keras.Model(inputs, shared(shared(x))), dense, shared


def test_layer_calls_and_its_fallback():
    model, dense, shared = _chain_with_a_shared_layer()
    (inputs, outputs), = _private.layer_calls(dense)
    assert inputs[0] is model.inputs[0] and len(outputs) == 1
    calls = _private.layer_calls(shared)
    assert len(calls) == 2 and calls[0][1][0] is calls[1][0][0] and calls[1][1][0] is model.outputs[0]
    # Without Keras's private nodes: unknown (the public `input` and `output` tell only the first call).
    assert _private.layer_calls(types.SimpleNamespace(input=dense.input, output=dense.output)) is None


def test_folding_folds_nothing_where_the_calls_are_unknown(monkeypatch):
    import kernorm

    inputs = keras.Input((5, 5, 2))
    x = kernorm.BatchNormalization()(keras.layers.Conv2D(3, 3, use_bias=False)(inputs))
    model = keras.Model(inputs, x)
    model.layers[-1].moving_variance.assign([0.5, 2.0, 4.0])
    images = np.random.default_rng(0).standard_normal((2, 5, 5, 2)).astype("float32")
    folded = kernorm.fold_batch_norm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    for layer in model.layers:  # as a Keras release without the private nodes
        monkeypatch.delattr(layer, "_inbound_nodes")
    unfolded = kernorm.fold_batch_norm(model)  # the batch norm stays, as a fixed per-channel affine
    assert [type(layer).__name__ for layer in unfolded.layers][-1] == "BatchNormalization"
    expected = model(images, training=False)
    for result in (folded, unfolded):
        np.testing.assert_allclose(result(images), expected, rtol=1e-5, atol=1e-5)


def test_tflite_op_counts_and_its_fallback(monkeypatch):
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(2, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, keras.layers.Dense(3)(x))).convert()
    counts = _private.tflite_op_counts(flatbuffer)
    assert counts["CONV_2D"] == 1 and counts["FULLY_CONNECTED"] == 1 and sum(counts.values()) >= 3
    # Without the interpreter's private op list: the names the public Analyzer prints.
    monkeypatch.setattr(tf.lite.Interpreter, "_get_ops_details", None)
    assert _private.tflite_op_counts(flatbuffer) == counts
