"""scripts/train.py end to end: on TFDS mock data (fast) and on the real shared data (slow)."""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import real_data_dir
from script_runs import (  # noqa: F401
    IMAGE_ARGS,
    REPO,
    image_run,
    load_script,
    python_without_kernorm,
    run_main,
    serve,
    sigkill_when,
    text_run,
    train_mock,
)

from kernorm import export

METRIC_KEYS = {
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "examples_per_second",
    "wall_time_seconds",
    "train_seconds",
    "epochs_completed",
    "initial_epoch",
    "epochs_run",
    "train_examples",
    "validation_examples",
    "validation_split",
    "args",
}
CLI_ARGUMENTS = {
    "model", "norm", "norm_kwargs", "dataset", "data_dir", "batch_size", "epochs", "max_train_examples",
    "optimizer", "learning_rate", "warmup_steps", "mixed_precision", "jit_compile", "seed", "out", "resume",
    "overwrite",
}  # fmt: skip
WRAPPER = REPO / "tests" / "train_under_mock.py"


def _history(run):
    with open(run / "history.csv", newline="") as file:
        return list(csv.DictReader(file))


def _leftovers(run):
    return [path.name for path in run.iterdir() if path.name.startswith(".tmp-")]


def test_a_run_writes_every_file(image_run):
    for name in ("run.json", "history.csv", "model.keras", "metrics.json", "checkpoints/best.keras"):
        assert (image_run / name).is_file(), name
    assert (image_run / "saved_model" / "saved_model.pb").is_file()
    assert (image_run / "backup").is_dir()
    events = [path for path in (image_run / "logs").rglob("events.out.tfevents.*")]
    assert {path.parent.name for path in events} == {"train", "validation"}
    assert _leftovers(image_run) == []


def test_metrics_hold_the_final_epoch_and_every_argument(image_run):
    metrics = json.loads((image_run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert CLI_ARGUMENTS <= set(metrics["args"])
    rows = _history(image_run)
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    last = rows[-1]
    assert metrics["train_loss"] == pytest.approx(float(last["loss"]))
    assert metrics["train_accuracy"] == pytest.approx(float(last["accuracy"]))
    assert metrics["val_loss"] == pytest.approx(float(last["val_loss"]))
    assert metrics["val_accuracy"] == pytest.approx(float(last["val_accuracy"]))
    assert (metrics["epochs_completed"], metrics["initial_epoch"], metrics["epochs_run"]) == (2, 0, 2)
    assert metrics["examples_per_second"] > 0 and metrics["wall_time_seconds"] >= metrics["train_seconds"] > 0
    assert metrics["args"]["model"] == "convnet" and metrics["args"]["batch_size"] == 16
    assert metrics["serving_input"] == {"name": "image", "dtype": "uint8", "shape": [-1, 28, 28, 1]}


def test_model_keras_is_the_serving_model_and_matches_the_export(image_run):
    model = keras.saving.load_model(image_run / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1)).astype(np.uint8)
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    served = tf.saved_model.load(str(image_run / "saved_model")).signatures["serving_default"]
    np.testing.assert_allclose(served(image=tf.constant(images))["probabilities"].numpy(), probabilities, atol=1e-6)


def test_text_run_serves_raw_strings(text_run):
    metrics = json.loads((text_run / "metrics.json").read_text())
    assert metrics["serving_input"] == {"name": "sentence", "dtype": "string", "shape": [-1]}
    served = tf.saved_model.load(str(text_run / "saved_model")).signatures["serving_default"]
    out = served(sentence=tf.constant(["a moving film", "", "dull and far too long"]))["probabilities"].numpy()
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_an_existing_run_folder_is_refused(image_run):
    before = (image_run / "metrics.json").stat().st_mtime_ns
    status, _, err = run_main("train", [*IMAGE_ARGS, "--out", str(image_run)])
    assert status == 2
    assert "already exists" in err and "--resume" in err and "--overwrite" in err
    assert (image_run / "metrics.json").stat().st_mtime_ns == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    status, _, err = run_main("train", [*IMAGE_ARGS, "--out", str(tmp_path), "--overwrite"])
    assert status == 2 and "not a run folder" in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_resume_refuses_other_arguments(image_run):
    status, _, err = run_main("train", [*IMAGE_ARGS, "--out", str(image_run), "--resume", "--norm", "group"])
    assert status == 2 and "--norm 'batch' -> 'group'" in err


@pytest.mark.parametrize(
    "argument, value, listed",
    [
        ("--model", "convnett", "convnet"),
        ("--norm", "batchnorm", "layer"),
        ("--dataset", "fashion_mnistt", "fashion_mnist"),
        ("--optimizer", "adam", "adamw"),
        ("--norm-kwargs", "{epsilon: 1}", "not valid JSON"),
    ],
)
def test_bad_names_exit_2_listing_the_choices_and_create_no_folder(tmp_path, argument, value, listed):
    args = dict(zip(IMAGE_ARGS[::2], IMAGE_ARGS[1::2]))
    args[argument] = value
    out = tmp_path / "run"
    status, _, err = run_main("train", [*(item for pair in args.items() for item in pair), "--out", str(out)])
    assert status == 2
    assert value in err and listed in err
    assert not out.exists()


def test_bad_names_exit_2_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--model", "nope", "--dataset", "mnist", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "invalid choice: 'nope'" in result.stderr and "resnet20" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_norm_kwargs_exit_2_before_any_folder(tmp_path):
    out = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=8):
        status, _, err = run_main("train", [*IMAGE_ARGS, "--norm-kwargs", '{"no_such_argument": 1}', "--out", str(out)])
    assert status == 2 and "no_such_argument" in err
    assert not out.exists()


def test_a_model_for_another_kind_of_data_exits_2(tmp_path):
    out = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=8):
        status, _, err = run_main(
            "train", ["--model", "transformer_tiny", "--dataset", "mnist", "--epochs", "1", "--out", str(out)]
        )
    assert status == 2 and "transformer_tiny" in err and "image dataset mnist" in err
    assert not out.exists()


def test_missing_dataset_names_the_folder_and_tfds_data_dir(tmp_path):
    data_dir, out = tmp_path / "empty", tmp_path / "run"
    data_dir.mkdir()
    status, _, err = run_main("train", [*IMAGE_ARGS, "--data-dir", str(data_dir), "--out", str(out)])
    assert status == 2
    assert str(data_dir) in err and "TFDS_DATA_DIR" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert list(data_dir.iterdir()) == []


def test_overwrite_replaces_a_run_and_options_train(tmp_path):
    """--overwrite starts again; SGD, warm-up, XLA and mixed precision train and export float32."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "stale.txt").write_text("from an older run")
    args = [
        "--model", "mlp", "--norm", "rms", "--dataset", "mnist", "--epochs", "1", "--batch-size", "16",
        "--optimizer", "sgd", "--warmup-steps", "2", "--jit-compile", "--mixed-precision", "mixed_bfloat16",
        "--norm-kwargs", '{"epsilon": 1e-5}', "--out", str(run), "--overwrite",
    ]  # fmt: skip
    metrics = train_mock(args)
    assert not (run / "stale.txt").exists()
    assert json.loads((run / "run.json").read_text())["optimizer"] == "sgd"
    assert np.isfinite(metrics["train_loss"])
    assert keras.config.dtype_policy().name == "float32", "train.main leaves the global policy as it found it"
    served = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"]
    out = served(image=tf.zeros((2, 28, 28, 1), tf.uint8))["probabilities"]
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy().sum(axis=1), 1.0, rtol=1e-2)


def test_export_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous export whole and no half-written saved_model/."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    spec = tf.TensorSpec((None, 3), tf.float32, name="features")
    target = tmp_path / "saved_model"
    export.saved_model(model, spec, target)
    first = (target / "saved_model.pb").read_bytes()

    def crash(self, filepath, **kwargs):
        os.makedirs(os.path.join(filepath, "variables"))
        with open(os.path.join(filepath, "partial"), "w") as file:
            file.write("half")
        raise KeyboardInterrupt("killed while writing")

    # ExportArchive() builds an instance of the backend's subclass: patch that one.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", crash)
    with pytest.raises(KeyboardInterrupt):
        export.saved_model(model, spec, target)
    assert (target / "saved_model.pb").read_bytes() == first
    assert not (target / "partial").exists()
    monkeypatch.undo()
    loaded = tf.saved_model.load(str(target)).signatures["serving_default"]
    assert list(loaded.structured_input_signature[1]) == ["features"]


def test_sigkill_in_the_second_epoch_then_resume_continues(tmp_path):
    """Acceptance 3: SIGKILL during epoch 2, rerun with --resume: epochs 2 and 3 run, epoch 1 does not."""
    run, first_log, second_log = tmp_path / "run", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    command = [
        sys.executable, str(WRAPPER), "48", "--model", "mlp", "--norm", "batch", "--dataset", "fashion_mnist",
        "--epochs", "3", "--batch-size", "8", "--out", str(run),
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    slow = {"TRAIN_EPOCH_LOG": str(first_log), "TRAIN_STEP_SLEEP_FROM_EPOCH": "1", "TRAIN_STEP_SLEEP": "2"}
    process = subprocess.Popen(command, env={**env, **slow}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Killed one second into epoch 2's steps, each of which sleeps 2 s.
    sigkill_when(process, lambda: first_log.exists() and '"epoch": 1' in first_log.read_text(), "epoch 2", 240)
    assert [int(row["epoch"]) for row in _history(run)] == [0]
    assert not (run / "metrics.json").exists() and not (run / "saved_model").exists()

    result = subprocess.run(
        [*command, "--resume"], env={**env, "TRAIN_EPOCH_LOG": str(second_log)}, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [json.loads(line) for line in second_log.read_text().splitlines()]
    steps_per_epoch = 48 // 8
    assert resumed == [{"epoch": 1, "steps": steps_per_epoch}, {"epoch": 2, "steps": 2 * steps_per_epoch}], (
        "the resumed run starts at epoch 2 with the optimizer state of epoch 1"
    )
    assert [int(row["epoch"]) for row in _history(run)] == [0, 1, 2]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["epochs_completed"], metrics["initial_epoch"], metrics["epochs_run"]) == (3, 1, 2)
    assert METRIC_KEYS <= set(metrics)
    assert _leftovers(run) == []
    served = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"]
    assert served(image=tf.zeros((1, 28, 28, 1), tf.uint8))["probabilities"].shape == (1, 10)


# Real data: one image model and one text model, on the prepared TFDS folder.


def _train_real(tmp_path, data_dir, args):
    run = tmp_path / "run"
    metrics = load_script("train").main([*args, "--data-dir", data_dir, "--out", str(run)])
    print(json.dumps({key: metrics[key] for key in METRIC_KEYS - {"args"}}, indent=1))
    return metrics


@pytest.mark.slow
def test_real_fashion_mnist_convnet_batch_norm_one_epoch(tmp_path):
    data_dir = real_data_dir("fashion_mnist")
    metrics = _train_real(
        tmp_path,
        data_dir,
        ["--model", "convnet", "--norm", "batch", "--dataset", "fashion_mnist", "--epochs", "1"],
    )
    assert metrics["validation_split"] == "test" and metrics["validation_examples"] == 10000
    assert metrics["val_accuracy"] >= 0.85


@pytest.mark.slow
def test_real_sst2_transformer_tiny_layer_norm(tmp_path, python_without_kernorm):
    data_dir = real_data_dir("glue/sst2")
    metrics = _train_real(
        tmp_path,
        data_dir,
        ["--model", "transformer_tiny", "--norm", "layer", "--dataset", "glue/sst2", "--epochs", "1", "--batch-size", "128"],
    )
    assert metrics["validation_split"] == "validation" and metrics["validation_examples"] == 872
    assert metrics["val_accuracy"] >= 0.75

    # The export serves raw validation sentences without kernorm, as model.predict does.
    builder = tfds.builder("glue/sst2", data_dir=data_dir)
    sentences = [example["sentence"].decode() for example in tfds.as_numpy(builder.as_dataset(split="validation").take(16))]
    result = serve(python_without_kernorm, tmp_path / "run" / "saved_model", {"instances": sentences}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = keras.saving.load_model(tmp_path / "run" / "model.keras").predict(tf.constant(sentences), verbose=0)
    np.testing.assert_allclose(json.loads(result.stdout)["predictions"], expected, atol=1e-5, rtol=0)
