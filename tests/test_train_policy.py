"""What the README promises of a scripts/train.py run, checked by what the runs produce (on TFDS mock data).

The optimizer policy (weight decay skips norm weights and biases), the learning-rate schedule
(the peak, a linear warm-up, a cosine decay to 0 at the last step), `--seed`, the resume rules,
the best checkpoint, and the atomic writes of model.keras and metrics.json. Small MLP runs of a
few steps, each made once per module and shared by the tests that read it.
"""

import json
import math
import pathlib
import shutil

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds
from script_runs import IMAGE_ARGS, MOCK_EXAMPLES, image_run, load_script, run_main, train_mock  # noqa: F401

from kernorm import training
from kernorm.models import data as datalib

BATCH = 16
STEPS_PER_EPOCH = MOCK_EXAMPLES // BATCH
# Large enough that one step of decoupled decay shows (weights times 1 - 0.1 * 0.5); SGD's
# default peak (0.05) in the run that takes the defaults.
PEAK, DECAY, SGD_PEAK = 0.1, 0.5, 0.05
NOT_DECAYED = ("gamma", "beta", "scale", "bias")


def _args(out, seed=3, norm="rms", optimizer="adamw", epochs=2, warmup=0, peak=PEAK):
    return [
        "--model", "mlp", "--norm", norm, "--dataset", "fashion_mnist", "--batch-size", str(BATCH),
        "--epochs", str(epochs), "--seed", str(seed), "--optimizer", optimizer, "--weight-decay", str(DECAY),
        "--warmup-steps", str(warmup), "--out", str(out), *(["--learning-rate", str(peak)] if peak else []),
    ]  # fmt: skip


class Probe(keras.callbacks.Callback):
    """Records the initial weights, the weight decay of one step, and the learning rate of every step.

    At the start of training, one optimizer step with zero gradients at the peak learning rate
    shows the decay alone: decayed weights shrink by `PEAK * DECAY`, the others stay the same
    bits. The step count then goes back to 0 (with zero gradients the moments stay 0 too).
    """

    def __init__(self, peak_step=0):
        super().__init__()
        self.peak_step = peak_step
        self.rates = []

    def on_train_begin(self, logs=None):
        optimizer, weights = self.model.optimizer, self.model.trainable_weights
        self.initial = {w.path: w.numpy().copy() for w in weights}
        optimizer.iterations.assign(self.peak_step)
        self.decay_rate = float(optimizer.learning_rate)
        optimizer.apply([keras.ops.zeros_like(w) for w in weights], weights)
        self.after_decay = {w.path: w.numpy().copy() for w in weights}
        optimizer.iterations.assign(0)

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate))

    def on_train_end(self, logs=None):
        self.final_rate = float(self.model.optimizer.learning_rate)
        self.steps = int(self.model.optimizer.iterations.numpy())


class LastEpochForgets(keras.callbacks.Callback):
    """Zeroes every trainable weight before the last epoch's validation: that epoch's model
    predicts one class, worse than the first epoch's, so the best checkpoint is not the last model."""

    def on_epoch_begin(self, epoch, logs=None):
        self.last = epoch == self.params["epochs"] - 1

    def on_test_begin(self, logs=None):
        if self.last:
            for weight in self.model.trainable_weights:
                weight.assign(keras.ops.zeros_like(weight))


def _train(args, *callbacks):
    train = load_script("train")
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        return train.main(args, callbacks=callbacks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished runs: "a" and "b" alike (seed 3, RMS norm, AdamW), "c" with seed 4, batch norm,
    SGD at its default learning rate and 2 warm-up steps, whose last epoch forgets what it learnt;
    each with its Probe."""
    root = tmp_path_factory.mktemp("policy")
    configs = {"a": {}, "b": {}, "c": {"seed": 4, "norm": "batch", "optimizer": "sgd", "warmup": 2, "peak": None}}
    result = {}
    for name, config in configs.items():
        probe = Probe(peak_step=config.get("warmup", 0))
        metrics = _train(_args(root / name, **config), probe, *([LastEpochForgets()] if name == "c" else []))
        result[name] = (root / name, probe, metrics, config)
    return result


def _weights(path):
    return keras.saving.load_model(path).get_weights()


@pytest.mark.parametrize("name", ["a", "c"])
def test_weight_decay_skips_norm_weights_and_biases(runs, name):
    _, probe, _, config = runs[name]
    peak = config.get("peak", PEAK) or SGD_PEAK
    assert probe.decay_rate == pytest.approx(peak)
    kinds = set()
    for path, before in probe.initial.items():
        after = probe.after_decay[path]
        if path.rsplit("/", 1)[-1] in NOT_DECAYED:
            np.testing.assert_array_equal(after, before, err_msg=path)
            kinds.add(path.rsplit("/", 1)[-1])
        else:
            np.testing.assert_allclose(after, before * (1.0 - peak * DECAY), rtol=1e-6, err_msg=path)
            kinds.add("decayed")
    # RMS norm has a scale, batch norm a gamma and a beta; the head has a bias and a kernel.
    assert kinds == ({"scale", "bias", "decayed"} if name == "a" else {"gamma", "beta", "bias", "decayed"})


@pytest.mark.parametrize("name", ["a", "c"])
def test_the_learning_rate_warms_up_then_follows_a_cosine_to_zero_at_the_last_step(runs, name):
    _, probe, metrics, config = runs[name]
    warmup, peak = config.get("warmup", 0), config.get("peak", PEAK) or SGD_PEAK
    assert metrics["args"]["learning_rate"] == peak
    total = 2 * STEPS_PER_EPOCH
    expected = [
        peak * step / warmup if step < warmup else peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        for step in range(total)
    ]
    np.testing.assert_allclose(probe.rates, expected, rtol=1e-6, atol=1e-9)
    assert probe.steps == total and probe.final_rate == 0.0


def test_the_same_seed_gives_the_same_run_and_another_seed_another(runs):
    (run_a, probe_a, metrics_a, _), (run_b, probe_b, metrics_b, _) = runs["a"], runs["b"]
    assert probe_a.initial.keys() == probe_b.initial.keys()
    for path in probe_a.initial:
        np.testing.assert_array_equal(probe_a.initial[path], probe_b.initial[path], err_msg=path)
    assert (run_a / "history.csv").read_text() == (run_b / "history.csv").read_text()
    for a, b in zip(_weights(run_a / "model.keras"), _weights(run_b / "model.keras")):
        np.testing.assert_array_equal(a, b)
    assert metrics_a["train_loss"] == metrics_b["train_loss"]
    # Seed 4: other initial weights (the first Dense kernel has the same shape whatever the norm).
    first = next(path for path in probe_a.initial if path.endswith("dense1/kernel"))
    assert not np.array_equal(probe_a.initial[first], runs["c"][1].initial[first])


def test_best_keras_holds_the_best_validation_accuracy(runs):
    """The checkpoint is the training model (uint8 images in) of the epoch with the best val_accuracy,
    here the first: the last epoch of run "c" validates a model without its weights."""
    run = runs["c"][0]
    accuracies = [row["val_accuracy"] for row in training.read_history(run / "history.csv")]
    assert accuracies[0] > accuracies[-1], accuracies
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        validation = datalib.load("fashion_mnist", batch_size=BATCH).validation
        model = keras.saving.load_model(run / "checkpoints" / "best.keras")
        predicted = np.concatenate([np.argmax(model.predict(x, verbose=0), -1) for x, _ in validation])
        labels = np.concatenate([y.numpy() for _, y in validation])
    assert np.mean(predicted == labels) == pytest.approx(accuracies[0], abs=1e-6)


def test_the_defaults_are_the_readme_s(image_run):  # noqa: F811
    args = load_script("train").build_parser().parse_args(["--model", "mlp", "--dataset", "mnist", "--out", "run"])
    defaults = {
        "norm": None, "norm_kwargs": {}, "batch_size": 64, "epochs": 10, "max_train_examples": None,
        "optimizer": "adamw", "weight_decay": 1e-4, "warmup_steps": 0, "mixed_precision": None,
        "jit_compile": False, "seed": 0, "augment": None, "vocab_size": 20000, "sequence_length": 64,
    }  # fmt: skip
    assert {key: getattr(args, key) for key in defaults} == defaults
    # The script parses; the library runs: both have the same defaults.
    config = training.Config(model="mlp", dataset="mnist", out="run")
    assert {key: getattr(config, key) for key in vars(args)} == vars(args)
    assert load_script("train").build_parser().parse_args(
        ["--model", "mlp", "--dataset", "mnist", "--out", "run", "--mixed-precision"]
    ).mixed_precision == "mixed_float16"
    # AdamW's peak learning rate, as a run records it (SGD's: run "c" above).
    assert json.loads((image_run / "metrics.json").read_text())["args"]["learning_rate"] == 1e-3


# --- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argument, value, shown",
    [
        ("--model", "mlp", "--model 'convnet' -> 'mlp'"),
        ("--dataset", "mnist", "--dataset 'fashion_mnist' -> 'mnist'"),
        ("--max-train-examples", "16", "--max-train-examples None -> 16"),
        ("--norm-kwargs", '{"epsilon": 0.01}', "--norm-kwargs {} -> {'epsilon': 0.01}"),
        ("--sequence-length", "8", "--sequence-length 64 -> 8"),
    ],
)
def test_resume_refuses_other_model_or_data_arguments(image_run, argument, value, shown):  # noqa: F811
    before = {path.name: path.stat().st_mtime_ns for path in image_run.iterdir()}
    status, _, err = run_main("train", [*IMAGE_ARGS, argument, value, "--out", str(image_run), "--resume"])
    assert status == 2 and shown in err, err
    assert {path.name: path.stat().st_mtime_ns for path in image_run.iterdir()} == before


def test_resume_with_more_epochs_extends_a_finished_run(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["a"][0], run)
    probe = Probe()
    probe.on_train_begin = lambda logs=None: None  # only the learning rates of the steps run
    metrics = _train([*_args(run, epochs=3), "--resume"], probe)
    history = training.read_history(run / "history.csv")
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert (metrics["epochs_completed"], metrics["initial_epoch"], metrics["epochs_run"]) == (3, 2, 1)
    # The third epoch continues the optimizer's steps, on the cosine of a 3-epoch run.
    total = 3 * STEPS_PER_EPOCH
    expected = [PEAK * 0.5 * (1 + math.cos(math.pi * step / total)) for step in range(2 * STEPS_PER_EPOCH, total)]
    np.testing.assert_allclose(probe.rates, expected, rtol=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(run / "model.keras"), _weights(runs["a"][0] / "model.keras")))


# --- atomic writes ------------------------------------------------------------------------------


def _finished_copy(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["b"][0], run)
    return run, {name: (run / name).read_bytes() for name in ("model.keras", "metrics.json")}


def test_a_crash_while_writing_model_keras_leaves_the_old_one(runs, tmp_path, monkeypatch):
    """The run is resumed with nothing left to train; saving the serving model fails half-way."""
    run, old = _finished_copy(runs, tmp_path)

    def crash(self, filepath, *args, **kwargs):
        pathlib.Path(filepath).write_bytes(b"half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        _train([*_args(run), "--resume"])
    assert (run / "model.keras").read_bytes() == old["model.keras"]
    assert (run / "metrics.json").read_bytes() == old["metrics.json"]


def test_a_crash_while_writing_metrics_json_leaves_the_old_one(runs, tmp_path, monkeypatch):
    run, old = _finished_copy(runs, tmp_path)
    write_text = pathlib.Path.write_text

    def crash(self, text, *args, **kwargs):
        if self.name.endswith("metrics.json"):
            write_text(self, text[: len(text) // 2])
            raise OSError("disk full")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        _train([*_args(run), "--resume"])
    assert (run / "metrics.json").read_bytes() == old["metrics.json"]
    json.loads((run / "metrics.json").read_text())


# --- the dataset error ---------------------------------------------------------------------------


def test_an_unknown_dataset_lists_the_datasets_prepared_in_the_data_folder(tmp_path):
    for name in ("mnist/3.0.1", "glue/sst2/2.0.0"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "dataset_info.json").write_text("{}")
    out = tmp_path / "run"
    args = [*_args(out), "--dataset", "fashion_mnistt", "--data-dir", str(tmp_path / "data")]
    status, _, err = run_main("train", args)
    assert status == 2 and "fashion_mnistt" in err
    assert f"Datasets prepared in {tmp_path / 'data'}: glue/sst2, mnist." in err
    assert not out.exists()
