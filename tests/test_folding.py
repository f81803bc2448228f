"""kernorm.fold_batch_norm and kernorm.recalibrate_batch_norm; what TFLite makes of batch norm, folded or not."""

import collections
import io
import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import kernorm
import numpy_reference as ref
from kernorm import _private, models

FOLD_TOLERANCE = 1e-5


def _randomize(model, rng):
    """Moving statistics and affine weights away from their initial values, so folding has something to fold."""
    for layer in model._flatten_layers():
        if isinstance(layer, (kernorm.BatchNormalization, keras.layers.BatchNormalization)):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.5, shape))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, shape))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0.0, 0.3, shape))
    for layer in model._flatten_layers():
        if getattr(layer, "bias", None) is not None and isinstance(layer, kernorm.folding.FOLDABLE):
            layer.bias.assign(rng.normal(0.0, 0.3, layer.bias.shape))
    return model


def _layer_kinds(model):
    return [type(layer) for layer in model._flatten_layers() if not isinstance(layer, keras.Model)]


def _norms(model):
    return [layer for layer in model._flatten_layers() if "Normalization" in type(layer).__name__]


def _every_kind_of_pair():
    """Each foldable layer type followed by a batch norm, and batch norms that cannot fold."""
    image = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(image)
    x = kernorm.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)  # with its own bias
    x = keras.layers.BatchNormalization(epsilon=1e-5)(x)
    x = keras.layers.Conv2D(6, 1, activation="relu")(x)
    x = kernorm.BatchNormalization(center=False)(x)  # after an activation: becomes an affine
    branch = keras.layers.Conv2D(6, 1)(x)
    x = kernorm.BatchNormalization(scale=False)(branch)
    x = keras.layers.Add()([x, branch])  # the convolution's output has another use: an affine
    x = keras.layers.GlobalAveragePooling2D()(x)

    sequence = keras.Input((5, 4), name="sequence")
    y = keras.layers.Conv1D(3, 2, padding="same")(sequence)
    y = kernorm.BatchNormalization()(y)
    y = keras.layers.Dense(6)(y)  # on a rank-3 input
    y = kernorm.BatchNormalization(momentum=0.9)(y)
    y = keras.layers.Flatten()(y)

    volume = keras.Input((3, 3, 3, 2), name="volume")
    z = keras.layers.Conv3D(3, 2)(volume)
    z = kernorm.BatchNormalization()(z)
    z = keras.layers.Flatten()(z)

    merged = keras.layers.Concatenate()([x, y, z])
    merged = keras.layers.Dense(8, use_bias=False)(merged)
    merged = kernorm.BatchNormalization()(merged)
    outputs = keras.layers.Dense(3)(keras.layers.ReLU()(merged))
    return keras.Model([image, sequence, volume], outputs)


def _inputs_for(model, rng, batch=4):
    return [rng.normal(size=(batch, *tensor.shape[1:])).astype("float32") for tensor in model.inputs]


def test_folding_every_layer_type_matches_the_unfolded_model(rng):
    model = _randomize(_every_kind_of_pair(), rng)
    folded = kernorm.fold_batch_norm(model)
    inputs = _inputs_for(model, rng)
    expected = model(inputs, training=False)
    ref.assert_close(folded(inputs), expected, FOLD_TOLERANCE, "folded outputs")
    # Two of the eight batch norms cannot fold; they become Keras affines, frozen in training too.
    affines = _norms(folded)
    assert len(affines) == 2 and all(type(layer) is keras.layers.BatchNormalization for layer in affines)
    assert all(not layer.trainable and layer.epsilon == 0.0 for layer in affines)
    ref.assert_close(folded(inputs, training=True), expected, FOLD_TOLERANCE, "folded outputs, training=True")
    assert all(kind.__module__.startswith("keras.") for kind in _layer_kinds(folded))
    # The original is untouched, and the copy owns its weights.
    ref.assert_close(model(inputs, training=False), expected, 0.0, "original outputs")
    assert not {id(v) for v in folded.weights} & {id(v) for v in model.weights}


def test_folding_is_exact_in_float64(rng):
    """The folded weights are computed in float64: a float64 model folds to within float64 rounding."""
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        inputs = keras.Input((5, 5, 2))
        outputs = kernorm.BatchNormalization()(keras.layers.Conv2D(3, 3)(inputs))
        model = _randomize(keras.Model(inputs, outputs), rng)
        x = rng.normal(size=(2, 5, 5, 2))
        folded = kernorm.fold_batch_norm(model)
        ref.assert_close(folded(x), model(x, training=False), 1e-12, "float64 folded outputs")
    finally:
        keras.config.set_dtype_policy(policy)


@pytest.mark.parametrize("name, kwargs", [
    ("resnet20", {"input_shape": (16, 16, 3)}),
    ("convnet", {"input_shape": (12, 12, 1)}),
    ("mlp", {"input_shape": (10,)}),
])
def test_zoo_models_fold_completely(name, kwargs, rng):
    model = _randomize(models.get(name, num_classes=5, **kwargs), rng)
    folded = kernorm.fold_batch_norm(model)
    x = rng.normal(size=(3, *kwargs["input_shape"])).astype("float32")
    ref.assert_close(folded(x), model(x, training=False), FOLD_TOLERANCE, f"{name} folded outputs")
    assert _norms(model) and not _norms(folded)
    assert [layer.name for layer in folded.layers if layer.weights] == [
        layer.name for layer in model.layers if layer.weights and layer not in _norms(model)
    ]


def test_a_nested_model_and_a_sequential_model_fold(rng):
    core = _randomize(models.get("convnet", input_shape=(8, 8, 1), num_classes=3, filters=(4,)), rng)
    raw = keras.Input((8, 8, 1), dtype="uint8", name="image")
    serving = keras.Model(raw, keras.layers.Softmax()(core(keras.layers.Rescaling(1 / 255)(raw))))
    images = rng.integers(0, 256, (3, 8, 8, 1)).astype("uint8")
    folded = kernorm.fold_batch_norm(serving)
    ref.assert_close(folded(images), serving(images, training=False), FOLD_TOLERANCE, "nested")
    assert not _norms(folded)

    sequential = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), kernorm.BatchNormalization()])
    _randomize(sequential, rng)
    x = rng.normal(size=(2, 6)).astype("float32")
    ref.assert_close(kernorm.fold_batch_norm(sequential)(x), sequential(x, training=False), FOLD_TOLERANCE, "seq")


def test_folded_model_saves_and_loads_as_keras_layers(rng, tmp_path):
    model = _randomize(_every_kind_of_pair(), rng)
    folded = kernorm.fold_batch_norm(model)
    folded.save(tmp_path / "folded.keras")
    loaded = keras.saving.load_model(tmp_path / "folded.keras", safe_mode=True)
    inputs = _inputs_for(model, rng)
    ref.assert_close(loaded(inputs), folded(inputs), 0.0, "loaded outputs")


def test_folding_a_model_without_batch_norm_is_a_no_op():
    model = models.get("convnet", input_shape=(8, 8, 1), num_classes=3, norm=None)
    assert kernorm.fold_batch_norm(model) is model


def test_folding_refuses_what_it_cannot_rewrite():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.norm = kernorm.BatchNormalization()

        def call(self, inputs):
            return self.norm(inputs)

    with pytest.raises(TypeError, match="functional or Sequential keras.Model.*subclassed"):
        kernorm.fold_batch_norm(Subclassed())
    with pytest.raises(TypeError, match="`model` to be a keras.Model"):
        kernorm.fold_batch_norm(kernorm.BatchNormalization())
    with pytest.raises(ValueError, match="no known input shape"):
        kernorm.fold_batch_norm(keras.Sequential([keras.layers.Dense(2), kernorm.BatchNormalization()]))


# --- precise BN -------------------------------------------------------------------------


def _two_norm_model():
    inputs = keras.Input((6, 6, 2))
    first = keras.layers.Conv2D(3, 3, padding="same")(inputs)
    x = keras.layers.ReLU()(kernorm.BatchNormalization(momentum=0.9, name="first_norm")(first))
    second = keras.layers.Conv2D(4, 3, padding="same")(x)
    outputs = keras.layers.BatchNormalization(name="second_norm")(second)
    return keras.Model(inputs, outputs), keras.Model(inputs, [first, second])


def _pooled_reference(features):
    """Float64 mean and biased variance per channel of every value of every batch."""
    values = np.concatenate([np.asarray(f, np.float64).reshape(-1, f.shape[-1]) for f in features])
    return values.mean(0), values.var(0)


def test_recalibration_gives_the_population_statistics_of_the_batches(rng):
    model, features = _two_norm_model()
    x = (rng.normal(size=(40, 6, 6, 2)) * 3.0 + 5.0).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(40))).batch(16)  # 16, 16, 8: unequal batches
    kernels = [w.numpy() for w in model.trainable_weights]
    # The features each batch norm sees in training: the first one normalizes with batch statistics.
    seen = [features(batch, training=True) for batch, _ in dataset]
    result = kernorm.recalibrate_batch_norm(model, dataset, steps=3, verbose=0)
    assert result == {"steps": 3, "examples": 40, "layers": 2}
    for index, name in enumerate(["first_norm", "second_norm"]):
        mean, variance = _pooled_reference([batch[index] for batch in seen])
        layer = model.get_layer(name)
        ref.assert_close(layer.moving_mean.numpy(), mean, 1e-5, f"{name} mean")
        ref.assert_close(layer.moving_variance.numpy(), variance, 1e-5, f"{name} variance")
    # The pooled variance, not the mean of the batch variances (which misses the spread of the batch means).
    batch_variances = np.mean([np.asarray(batch[0], np.float64).reshape(-1, 3).var(0) for batch in seen], 0)
    assert ref.relative_error(model.get_layer("first_norm").moving_variance.numpy(), batch_variances) > 1e-3
    for before, after in zip(kernels, model.trainable_weights):
        np.testing.assert_array_equal(after.numpy(), before)


def test_recalibration_counts_only_unmasked_tokens(rng):
    tokens = keras.Input((7,), dtype="int32")
    embedded = keras.layers.Embedding(20, 4, mask_zero=True)(tokens)
    norm = kernorm.BatchNormalization()
    model = keras.Model(tokens, norm(embedded))
    ids = rng.integers(1, 20, (12, 7))
    ids[:, 4:] = 0  # padding
    ids[0, :] = rng.integers(1, 20, 7)
    kernorm.recalibrate_batch_norm(model, tf.data.Dataset.from_tensor_slices(ids).batch(5), verbose=0)
    vectors = np.asarray(model.layers[1](ids), np.float64)[ids != 0]
    ref.assert_close(norm.moving_mean.numpy(), vectors.mean(0), 1e-5, "masked mean")
    ref.assert_close(norm.moving_variance.numpy(), vectors.var(0), 1e-5, "masked variance")


def test_recalibration_shows_progress_and_warns_when_the_data_runs_out(rng):
    model, _ = _two_norm_model()
    batches = [rng.normal(size=(4, 6, 6, 2)).astype("float32") for _ in range(2)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.warns(UserWarning, match="ran out after 2 batches"):
        result = kernorm.recalibrate_batch_norm(model, batches, steps=5, verbose=1)
    assert result["steps"] == 2 and "2/5" in out.getvalue()


def test_recalibration_rejects_bad_arguments():
    model, _ = _two_norm_model()
    with pytest.raises(ValueError, match="`steps` to be a positive int"):
        kernorm.recalibrate_batch_norm(model, [], steps=0)
    with pytest.raises(TypeError, match="`dataset` to be a tf.data.Dataset"):
        kernorm.recalibrate_batch_norm(model, 3)
    with pytest.raises(ValueError, match="gave no batch"):
        kernorm.recalibrate_batch_norm(model, [], verbose=0)
    free = models.get("mlp", input_shape=(4,), num_classes=2, norm=None)
    assert kernorm.recalibrate_batch_norm(free, [np.ones((2, 4))], verbose=0)["layers"] == 0


# --- TFLite --------------------------------------------------------------------------------


def _three_conv_network(norm):
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for filters in (8, 16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=norm is None)(x)
        x = x if norm is None else norm()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def _tflite_ops(model):
    return _private.tflite_op_counts(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def test_tflite_folds_kernorm_batch_norm_as_it_folds_keras_batch_norm(rng):
    ours = _randomize(_three_conv_network(kernorm.BatchNormalization), rng)
    theirs = _three_conv_network(keras.layers.BatchNormalization)
    theirs.set_weights(ours.get_weights())
    free = _three_conv_network(None)
    counts = {name: _tflite_ops(model) for name, model in [("kernorm", ours), ("keras", theirs), ("free", free)]}
    assert sum(counts["kernorm"].values()) <= sum(counts["keras"].values()), counts
    # Folded into the convolutions: the same ops as the network without norms.
    assert _tflite_ops(kernorm.fold_batch_norm(ours)) == counts["free"], counts
    assert counts["free"]["CONV_2D"] == 3 and not {"MUL", "ADD", "SUB", "TILE", "RESHAPE"} & set(counts["free"])


def test_grappler_fuses_inference_batch_norm_into_the_convolution(rng):
    """What a served SavedModel runs on CPU: Grappler's remapper turns each convolution with kernorm's batch
    norm (and its ReLU) into one `_FusedConv2D`, where Keras's batch norm stays a multiply and an add."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import cluster, tf_optimizer

    def optimized_ops(model):
        function = tf.function(lambda x: model(x, training=False), autograph=False)
        concrete = function.get_concrete_function(tf.TensorSpec((None, 16, 16, 3)))
        graph_def = concrete.graph.as_graph_def(add_shapes=True)
        for node in graph_def.node:
            node.device = "/job:localhost/replica:0/task:0/device:CPU:0"
        meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=graph_def, graph=concrete.graph)
        meta_graph.collection_def["train_op"].node_list.value.extend(t.op.name for t in concrete.outputs)
        optimized = tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta_graph, cluster=cluster.Cluster())
        return collections.Counter(node.op for node in optimized.node)

    ours = optimized_ops(_randomize(_three_conv_network(kernorm.BatchNormalization), rng))
    theirs = optimized_ops(_three_conv_network(keras.layers.BatchNormalization))
    assert ours["_FusedConv2D"] == 3 and not ours["Conv2D"] and not ours["FusedBatchNormV3"], ours
    assert theirs["Conv2D"] == 3 and theirs["Mul"] >= 3, theirs
