"""kernorm.models recurrent cells, recurrent batch norm and rnn_classifier: references, Keras parity, padding."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import real_data_dir
from modes import compiled
from script_runs import load_script, python_without_kernorm, serve, train_mock  # noqa: F401

import kernorm
import numpy_reference as ref
import zoo_checks
from kernorm import models

CELLS = {"lstm": models.NormalizedLSTMCell, "gru": models.NormalizedGRUCell}
REFERENCE_NORMS = ["layer", "rms", "none", "batch"]
NUM_CLASSES = 3
VOCAB = 30
LENGTH = 8
TOLERANCE = 1e-5


# --- float64 NumPy references, written from the papers' equations -------------------------------------------
#
# LSTM (Ba et al. 2016, eq. for the layer-normalized LSTM; Cooijmans et al. 2016 for batch norm), gates i, f, g, o:
#     [i, f, g, o] = N1(W x_t) + N2(U h_{t-1}) + b
#     c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g),    h_t = sigmoid(o) tanh(N3(c_t))
# GRU (Ba et al. 2016), in Keras's convention (z keeps the old state), gates z, r and candidate n:
#     [z, r] = sigmoid(N1(W_zr x_t) + N2(U_zr h_{t-1}) + b_x,zr + b_h,zr)
#     n = tanh(N3(W_n x_t) + b_x,n + r (N4(U_n h_{t-1}) + b_h,n)),    h_t = z h_{t-1} + (1 - z) n
# A padded step keeps h and c and repeats the last output.


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


class _Norms:
    """The norms N1, N2, ... of one cell: weights by name, and for batch norm the statistics of each step."""

    def __init__(self, kind, params, epsilons, training=True, max_steps=None, momentum=None, moving=None):
        self.kind, self.params, self.epsilons, self.training = kind, params, epsilons, training
        self.max_steps, self.momentum = max_steps, momentum
        self.moving = {key: value.copy() for key, value in (moving or {}).items()}

    def __call__(self, name, a, t, real):
        if self.kind == "none":
            return a
        epsilon = self.epsilons[name]
        gamma = self.params.get(f"{name}/gamma", self.params.get(f"{name}/scale"))
        beta = self.params.get(f"{name}/beta", 0.0)
        if self.kind == "rms":
            return a / np.sqrt(np.mean(a**2, axis=-1, keepdims=True) + epsilon) * gamma
        if self.kind == "layer":
            mean = a.mean(axis=-1, keepdims=True)
            variance = ((a - mean) ** 2).mean(axis=-1, keepdims=True)
            return (a - mean) / np.sqrt(variance + epsilon) * gamma + beta
        # Batch norm: statistics of this step over the real samples, moving statistics kept per step.
        slot = min(t, self.max_steps - 1)
        if self.training:
            mean, variance = a[real].mean(axis=0), a[real].var(axis=0)
            for key, value in (("mean", mean), ("variance", variance)):
                moving = self.moving[f"{name}/moving_{key}"]
                moving[slot] = moving[slot] * self.momentum + value * (1 - self.momentum)
        else:
            mean, variance = self.moving[f"{name}/moving_mean"][slot], self.moving[f"{name}/moving_variance"][slot]
        return (a - mean) / np.sqrt(variance + epsilon) * gamma + beta


def lstm_reference(params, x, mask, norm):
    kernel, recurrent_kernel, bias = params["kernel"], params["recurrent_kernel"], params["bias"]
    batch, length, _ = x.shape
    h = np.zeros((batch, recurrent_kernel.shape[0]))
    c = np.zeros_like(h)
    outputs = []
    for t in range(length):
        real = mask[:, t]
        gates = norm("input_norm", x[:, t] @ kernel, t, real) + norm("recurrent_norm", h @ recurrent_kernel, t, real) + bias
        i, f, g, o = np.split(gates, 4, axis=1)
        c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h_new = _sigmoid(o) * np.tanh(norm("cell_norm", c_new, t, real))
        h = np.where(real[:, None], h_new, h)
        c = np.where(real[:, None], c_new, c)
        outputs.append(h)
    return np.stack(outputs, axis=1)


def gru_reference(params, x, mask, norm):
    kernel, recurrent_kernel = params["kernel"], params["recurrent_kernel"]
    input_bias, recurrent_bias = params["bias"]
    batch, length, _ = x.shape
    units = recurrent_kernel.shape[0]
    h = np.zeros((batch, units))
    outputs = []
    for t in range(length):
        real = mask[:, t]
        xw, hu = x[:, t] @ kernel, h @ recurrent_kernel
        gates = _sigmoid(
            norm("input_gate_norm", xw[:, : 2 * units], t, real) + norm("recurrent_gate_norm", hu[:, : 2 * units], t, real)
            + input_bias[: 2 * units] + recurrent_bias[: 2 * units]
        )
        z, r = gates[:, :units], gates[:, units:]
        candidate = np.tanh(
            norm("input_candidate_norm", xw[:, 2 * units:], t, real) + input_bias[2 * units:]
            + r * (norm("recurrent_candidate_norm", hu[:, 2 * units:], t, real) + recurrent_bias[2 * units:])
        )
        h = np.where(real[:, None], z * h + (1 - z) * candidate, h)
        outputs.append(h)
    return np.stack(outputs, axis=1)


REFERENCES = {"lstm": lstm_reference, "gru": gru_reference}


def _norm_layers(cell):
    return {name: layer for name, layer in vars(cell).items() if name.endswith("_norm")}


def _params(cell, trainable=True):
    """The cell's weights as float64 arrays: "kernel", ..., and "NORM/WEIGHT" for the norms'."""
    params = {name: getattr(cell, name).numpy().astype(np.float64) for name in ("kernel", "recurrent_kernel", "bias")}
    for norm_name, layer in _norm_layers(cell).items():
        for weight in layer.trainable_weights if trainable else layer.non_trainable_weights:
            params[f"{norm_name}/{weight.name}"] = weight.numpy().astype(np.float64)
    return params


def _randomize(layer, rng, scale=0.5):
    """Random weights around each initial value (scales stay near 1), so every term of the equations shows."""
    for weight in layer.trainable_weights:
        weight.assign(weight.numpy() + rng.normal(0.0, scale, weight.shape).astype("float32"))


def _sequences(rng, batch=6, length=5, features=3):
    x = rng.normal(size=(batch, length, features)).astype("float32")
    lengths = np.array([length, 3, length - 1, 1, length, 2])[:batch]  # sample 0 is real at every step
    mask = np.arange(length)[None, :] < lengths[:, None]
    return x, mask


def _finite_differences(function, params, delta=1e-6):
    """Central differences of a float64 scalar function of a dict of arrays."""
    gradients = {}
    for name, value in params.items():
        gradient = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            saved = value[index]
            value[index] = saved + delta
            up = function(params)
            value[index] = saved - delta
            down = function(params)
            value[index] = saved
            gradient[index] = (up - down) / (2 * delta)
        gradients[name] = gradient
    return gradients


def _rnn(kind, norm, units=4, **cell_kwargs):
    return models.MaskedRNN(CELLS[kind](units, norm=norm, **cell_kwargs), return_sequences=True)


# Acceptance 1: each cell with each norm against the papers' equations, outputs and gradients.


@pytest.mark.parametrize(
    "kind, norm, mode",
    [(kind, norm, mode) for kind in CELLS for norm in REFERENCE_NORMS for mode in ("eager", "function")]
    # The per-step statistics under XLA, once: the GRU's run the same code.
    + [("lstm", "batch", "xla")],
)
def test_cell_matches_reference(kind, norm, mode, rng):
    x, mask = _sequences(rng)
    momentum = 0.8
    layer = _rnn(kind, norm, max_steps=3, norm_kwargs={"momentum": momentum} if norm == "batch" else None)
    layer.build(x.shape)
    _randomize(layer, rng)
    cell = layer.cell
    upstream = rng.normal(size=(*x.shape[:2], 4)).astype("float32")
    epsilons = {name: layer.epsilon for name, layer in _norm_layers(cell).items() if hasattr(layer, "epsilon")}
    moving = _params(cell, trainable=False)

    def outputs_and_gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, mask=tf.constant(mask), training=True)
            loss = tf.reduce_sum(outputs * upstream)
        return outputs, tape.gradient(loss, [x, *layer.trainable_weights])

    outputs, gradients = compiled(outputs_and_gradients, mode)(tf.constant(x))

    def reference(params, training=True, moving=moving):
        params = dict(params)
        inputs = params.pop("x")
        norms = _Norms(norm, params, epsilons, training, 3, momentum, moving)
        return REFERENCES[kind](params, inputs, mask, norms), norms.moving

    params = {"x": x.astype(np.float64), **_params(cell)}
    expected, expected_moving = reference(params)
    ref.assert_close(outputs, expected, TOLERANCE, "outputs")
    expected_gradients = _finite_differences(lambda p: float(np.sum(reference(p)[0] * upstream)), params)
    # XLA reorders the float32 sums of the loop's gradient: about 1.3e-5 off here, and 1e-9 in float64.
    tolerance = 3e-5 if mode == "xla" else TOLERANCE
    names = ["x"] + [name for name in params if name != "x"]
    assert len(gradients) == len(names)
    for name, gradient in zip(names, gradients):
        ref.assert_close(gradient, expected_gradients[name], tolerance, f"gradient of {name}")
    if norm == "batch":
        # Steps 0, 1 and 2, 3, 4 (sharing the last of max_steps=3 slots) each moved the statistics once.
        for name, value in _params(cell, trainable=False).items():
            ref.assert_close(value, expected_moving[name], TOLERANCE, name)
        inference, _ = reference(params, training=False, moving=expected_moving)
        ref.assert_close(layer(x, mask=mask, training=False), inference, TOLERANCE, "inference outputs")


# Acceptance 2: with norm="none" the cells are Keras's LSTM and GRU.


@pytest.mark.parametrize("go_backwards", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize(
    "kind, keras_layer, count",
    [("lstm", keras.layers.LSTM, 4 * (5 * (3 + 5) + 5)), ("gru", keras.layers.GRU, 3 * 5 * (3 + 5) + 2 * 3 * 5)],
)
def test_none_is_keras(kind, keras_layer, count, go_backwards, rng):
    x, mask = _sequences(rng)
    theirs = keras_layer(5, return_sequences=True, go_backwards=go_backwards)
    ours = models.MaskedRNN(CELLS[kind](5, norm="none"), return_sequences=True, go_backwards=go_backwards)
    theirs.build(x.shape)
    ours.build(x.shape)
    assert ours.count_params() == theirs.count_params() == count
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    _randomize(theirs, rng)
    ours.set_weights(theirs.get_weights())
    for kwargs in ({}, {"mask": mask}):
        np.testing.assert_allclose(ours(x, **kwargs), theirs(x, **kwargs), rtol=1e-6, atol=1e-6)


def test_lstm_bias_starts_like_keras():
    """unit_forget_bias: the forget gate's bias starts at 1, the others at 0, as in keras.layers.LSTMCell."""
    cell = models.NormalizedLSTMCell(3)
    cell.build((None, 2))
    np.testing.assert_array_equal(cell.bias.numpy(), [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])


# Acceptance 3: padding changes neither the outputs at real tokens, nor the pooled output, nor the statistics.


def _tokens(rng, batch=8, length=LENGTH, min_length=1):
    tokens = rng.integers(1, VOCAB, size=(batch, length)).astype("int32")
    lengths = rng.integers(min_length, length + 1, size=batch)
    lengths[0] = length
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return tokens


def _model(norm="layer", cell="lstm", bidirectional=False, sequence_length=LENGTH, **kwargs):
    config = dict(units=6, embedding_dim=5)
    config.update(kwargs)
    return models.rnn_classifier(
        VOCAB, sequence_length, NUM_CLASSES, cell=cell, bidirectional=bidirectional, norm=norm, **config
    )


def _probe(model):
    outputs = [model.get_layer("sequence_output").output, model.get_layer("pool").output, model.output]
    return keras.Model(model.input, outputs)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("cell, bidirectional", [("lstm", False), ("gru", True)], ids=["lstm", "bigru"])
def test_appending_padding_changes_nothing(cell, bidirectional, norm, training, rng):
    # Two layers show that the mask reaches the second; one bidirectional layer shows the backward direction.
    num_layers = 1 if bidirectional else 2
    model = _model(
        norm, cell, bidirectional, num_layers=num_layers, norm_kwargs={"momentum": 0.5} if norm == "batch" else None
    )
    probe = _probe(model)
    tokens = _tokens(rng)
    real = tokens != 0
    padded = np.concatenate([tokens, np.zeros((len(tokens), 5), "int32")], axis=1)
    # Moving statistics other than their initial zeros and ones make inference a real test.
    model(_tokens(rng), training=True)
    before = [w.numpy().copy() for w in model.non_trainable_weights]

    short = [np.asarray(t) for t in probe(tokens, training=training)]
    after_short = [w.numpy().copy() for w in model.non_trainable_weights]
    for weight, value in zip(model.non_trainable_weights, before):
        weight.assign(value)
    long = [np.asarray(t) for t in probe(padded, training=training)]
    after_long = [w.numpy().copy() for w in model.non_trainable_weights]

    np.testing.assert_allclose(long[0][:, :LENGTH][real], short[0][real], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(long[1], short[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(long[2], short[2], rtol=1e-5, atol=1e-6)
    # Cells of one or two layers and directions, 3 (LSTM) or 4 (GRU) norms of two moving statistics each.
    cells = num_layers * (2 if bidirectional else 1)
    assert len(after_short) == (0 if norm == "layer" else cells * {"lstm": 3, "gru": 4}[cell] * 2)
    for moved_short, moved_long, initial in zip(after_short, after_long, before):
        np.testing.assert_allclose(moved_long, moved_short, rtol=1e-5, atol=1e-6)
        assert training == (not np.allclose(moved_short, initial))


def test_batch_statistics_count_only_real_tokens(rng):
    """The first step's moving mean of the input norm is the mean over the samples whose first token is real."""
    model = _model("batch", norm_kwargs={"momentum": 0.0})
    tokens = _tokens(rng)
    tokens[3:5, :] = 0  # two sequences of padding only
    cell = model.get_layer("lstm1").cell
    embedded = keras.Model(model.input, model.get_layer("token_embedding").output)(tokens)
    model(tokens, training=True)
    projected = np.asarray(embedded)[:, 0] @ cell.kernel.numpy()
    real = tokens[:, 0] != 0
    np.testing.assert_allclose(cell.input_norm.moving_mean.numpy()[0], projected[real].mean(axis=0), rtol=2e-7, atol=2e-8)
    np.testing.assert_allclose(cell.input_norm.moving_variance.numpy()[0], projected[real].var(axis=0), rtol=2e-7, atol=2e-8)


# Recurrent batch norm on its own.


def test_recurrent_batch_norm_keeps_statistics_per_step(rng):
    layer = models.RecurrentBatchNormalization(max_steps=2, momentum=0.5, epsilon=0.0, center=False)
    x = rng.normal(3.0, 2.0, size=(6, 4)).astype("float32")
    mask = np.array([True, True, True, False, False, True])
    outputs = layer(x, step=0, training=True, mask=mask)
    np.testing.assert_allclose(layer.moving_mean.numpy()[0], 0.5 * x[mask].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy()[0], 0.5 + 0.5 * x[mask].var(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean.numpy()[1], 0.0)  # another step's statistics stay
    np.testing.assert_allclose(np.asarray(outputs)[mask].mean(axis=0), 0.0, atol=1e-6)
    # Steps from max_steps - 1 on share the last statistics; a step with no real sample moves nothing.
    layer(x, step=5, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy()[1], 0.5 * x.mean(axis=0), rtol=1e-5)
    before = layer.moving_mean.numpy().copy()
    layer(x, step=1, training=True, mask=np.zeros(6, bool))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)
    # Inference normalizes with the step's moving statistics.
    mean, variance = layer.moving_mean.numpy()[1], layer.moving_variance.numpy()[1]
    np.testing.assert_allclose(layer(x, step=7, training=False), (x - mean) / np.sqrt(variance), rtol=1e-6, atol=1e-6)


def test_cells_leave_out_the_redundant_offsets():
    """Given by name, the pre-activation norms have no offset (the bias is theirs); batch norm starts at 0.1."""
    lstm = models.NormalizedLSTMCell(4, norm="batch")
    lstm.build((None, 3))
    assert lstm.input_norm.beta is None and lstm.recurrent_norm.beta is None and lstm.cell_norm.beta is not None
    np.testing.assert_array_equal(lstm.input_norm.gamma.numpy(), np.float32(0.1))
    gru = models.NormalizedGRUCell(4, norm="layer")
    gru.build((None, 3))
    assert all(layer.beta is None for layer in _norm_layers(gru).values())
    assert [type(layer) for layer in _norm_layers(gru).values()] == [kernorm.LayerNormalization] * 4
    assert [layer.gamma.shape for layer in _norm_layers(gru).values()] == [(8,), (8,), (4,), (4,)]


# Keras's RNN machinery: keras.layers.RNN, Bidirectional, stateful, return_state.


def test_cells_run_in_keras_rnn(rng):
    x, mask = _sequences(rng)
    layer = _rnn("lstm", "layer")
    plain = keras.layers.RNN(layer.cell, return_sequences=True)
    np.testing.assert_allclose(plain(x, mask=mask), layer(x, mask=mask), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="MaskedRNN"):
        keras.layers.RNN(models.NormalizedGRUCell(4, norm="batch"))(x)


def test_stateful_and_return_state(rng):
    x, _ = _sequences(rng)
    layer = models.MaskedRNN(models.NormalizedLSTMCell(4), return_sequences=True, return_state=True, stateful=True)
    whole, h, c = layer(x)
    np.testing.assert_array_equal(h, whole[:, -1])
    layer.reset_state()
    first = layer(x[:, :2])[0]
    second = layer(x[:, 2:])[0]
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=1e-6, atol=1e-6)


# Acceptance 5: the models save to .keras (safe_mode) and export.


def test_rnn_classifier(rng, tmp_path):
    tokens = _tokens(rng, min_length=2)
    labels = np.arange(8) % NUM_CLASSES
    zoo_checks.check_builder(_model("layer", "lstm"), tokens, labels, NUM_CLASSES, tmp_path)


@pytest.mark.parametrize(
    "norm, cell, bidirectional",
    [("batch", "gru", False), ("batch", "lstm", True), ("group", "gru", False), (kernorm.RMSNormalization, "lstm", False)],
    ids=["batch-gru", "batch-bilstm", "group-gru", "class-lstm"],
)
def test_rnn_classifier_saves(norm, cell, bidirectional, rng, tmp_path):
    model = _model(norm, cell, bidirectional, norm_kwargs={"epsilon": 1e-4})
    tokens = _tokens(rng, min_length=2)
    model(tokens, training=True)  # moves the batch norm statistics away from their initial values
    zoo_checks.check_inference(model, tokens, NUM_CLASSES)
    zoo_checks.check_round_trips(model, tokens, tmp_path)


def test_layers_round_trip_their_configs():
    for layer in [
        models.NormalizedLSTMCell(4, norm="rms", norm_kwargs={"epsilon": 1e-4}, max_steps=9, unit_forget_bias=False),
        models.NormalizedGRUCell(4, norm=kernorm.LayerNormalization, recurrent_activation="hard_sigmoid"),
        models.RecurrentBatchNormalization(5, momentum=0.9, center=False),
        models.MaskedRNN(models.NormalizedGRUCell(3, norm="batch"), go_backwards=True),
    ]:
        # Registered, so that `import kernorm` (which imports the zoo) loads them from .keras files.
        assert keras.saving.get_registered_name(type(layer)) == f"kernorm>{type(layer).__name__}"
        config = json.loads(json.dumps(layer.get_config()))
        assert type(layer).from_config(json.loads(json.dumps(config))).get_config() == config


# The builder and the registry.


def test_registry_entries():
    assert {"lstm_tiny", "gru_tiny", "bilstm_tiny"} <= set(models.names())
    model = models.get("bilstm_tiny", vocab_size=500, sequence_length=32, num_classes=3, norm="batch", name="custom")
    assert model.name == "custom" and model.output.shape == (None, 3)
    layer = model.get_layer("bilstm1")
    assert isinstance(layer, keras.layers.Bidirectional)
    assert layer.forward_layer.cell.input_norm.max_steps == 32
    assert isinstance(models.get("gru_tiny").get_layer("gru1").cell, models.NormalizedGRUCell)
    assert isinstance(models.get("lstm_tiny").get_layer("lstm1").cell.input_norm, kernorm.LayerNormalization)
    assert np.all(np.isfinite(model(np.array([[5, 6, 0, 0], [1, 2, 3, 4]], "int32"), training=False)))


def test_parameter_count():
    model = _model("layer", "lstm", num_layers=2)
    lstm1 = 4 * 6 * (5 + 6 + 1) + 4 * 6 + 4 * 6 + 2 * 6
    lstm2 = 4 * 6 * (6 + 6 + 1) + 4 * 6 + 4 * 6 + 2 * 6
    assert zoo_checks.trainable_count(model) == VOCAB * 5 + lstm1 + lstm2 + 6 * NUM_CLASSES + NUM_CLASSES


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        (dict(cell="rnn"), ValueError, "Unknown cell 'rnn'. Known cells: lstm, gru"),
        (dict(units=0), ValueError, "units"),
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(norm="weight"), ValueError, "Unknown norm 'weight'"),
        (dict(bidirectional="yes"), TypeError, "bidirectional"),
        (dict(sequence_length=0), ValueError, "sequence_length"),
    ],
)
def test_bad_arguments(arguments, error, match):
    with pytest.raises(error, match=match):
        _model(**arguments)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="max_steps"):
        models.RecurrentBatchNormalization(0)
    with pytest.raises(ValueError, match="one time step"):
        models.RecurrentBatchNormalization(4)(np.zeros((2, 3, 4), "float32"), step=0)
    with pytest.raises(ValueError, match="needs `step`"):
        models.RecurrentBatchNormalization(4)(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="units"):
        models.NormalizedLSTMCell(-1)


# scripts/train.py: the text pipeline, training, and an export that serves raw strings.


def test_train_script_exports_a_string_model(tmp_path):
    run = tmp_path / "run"
    args = ["--model", "bilstm_tiny", "--norm", "batch", "--dataset", "glue/sst2", "--epochs", "1",
            "--batch-size", "16", "--sequence-length", "12", "--out", str(run)]  # fmt: skip
    metrics = train_mock(args)
    assert metrics["serving_input"] == {"name": "sentence", "dtype": "string", "shape": [-1]}
    sentences = tf.constant(["a moving film", "", "dull and far too long, and then some more words than fit"])
    served = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"]
    expected = keras.saving.load_model(run / "model.keras").predict(sentences, verbose=0)
    np.testing.assert_allclose(served(sentence=sentences)["probabilities"].numpy(), expected, atol=1e-6)


@pytest.mark.slow
def test_real_sst2_lstm_tiny_layer_norm(tmp_path, python_without_kernorm):
    """Acceptance 4: one epoch of lstm_tiny with layer norm reaches 0.77, and serves without kernorm."""
    data_dir = real_data_dir("glue/sst2")
    run = tmp_path / "run"
    metrics = load_script("train").main(
        ["--model", "lstm_tiny", "--norm", "layer", "--dataset", "glue/sst2", "--epochs", "1", "--batch-size", "128",
         "--data-dir", data_dir, "--out", str(run)]
    )  # fmt: skip
    print(json.dumps({key: metrics[key] for key in ("val_accuracy", "train_seconds", "wall_time_seconds")}))
    assert metrics["validation_split"] == "validation" and metrics["validation_examples"] == 872
    assert metrics["val_accuracy"] >= 0.77

    builder = tfds.builder("glue/sst2", data_dir=data_dir)
    sentences = [example["sentence"].decode() for example in tfds.as_numpy(builder.as_dataset(split="validation").take(16))]
    result = serve(python_without_kernorm, run / "saved_model", {"instances": sentences}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = keras.saving.load_model(run / "model.keras").predict(tf.constant(sentences), verbose=0)
    np.testing.assert_allclose(json.loads(result.stdout)["predictions"], expected, atol=1e-5, rtol=0)
