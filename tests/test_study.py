"""scripts/study.py: the plan, results.csv, the verdicts, the README's Evidence section, and a killed
quick study on TFDS mock data that resumes without redoing its finished cells."""

import json
import math
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from script_runs import REPO, load_script, run_main, sigkill_when

import kernorm
from kernorm import training

study = load_script("study")
WRAPPER = REPO / "tests" / "study_under_mock.py"
DOCS = REPO / "docs" / "study"


def test_the_default_plan_is_the_issues_grid():
    cells = study.plan(study.DEFAULT)
    assert len({cell.key for cell in cells}) == len(cells)
    grid = {(c.arm, c.batch_size, c.seed) for c in cells if c.experiment == "batch_size"}
    expected = {
        (arm, batch_size, seed)
        for arm in study.CNN_NORMS
        for batch_size in (2, 4, 8, 16, 32, 64)
        for seed in (0, 1)
        if arm != "ghost" or batch_size > study.GHOST_BATCH
    }
    assert grid == expected
    image = [c for c in cells if c.dataset == "fashion_mnist"]
    # The same examples for every image cell, and the learning rate linear in the batch size.
    assert {c.examples for c in image} == {study.DEFAULT.cnn_examples}
    assert [c.learning_rate / c.batch_size for c in image] == pytest.approx([study.SGD_RATE_PER_32 / 32] * len(image))
    online = {(c.model, c.arm) for c in cells if c.experiment == "online"}
    convnet = {("convnet", arm) for arm in ("batch", "layer", "group", "instance")}
    assert {("mlp", "batch"), ("mlp", "layer")} | convnet <= online
    transformer = {(c.arm, c.norm_first, c.warmup) for c in cells if c.experiment == "transformer"}
    both = (False, True)
    assert transformer == {(a, f, w) for a in ("layer", "rms", "batch", "none") for f in both for w in both}
    assert {c.arm for c in cells if c.experiment == "rnn"} == {"layer", "batch", "none"}


def test_each_cell_becomes_a_training_config():
    cells = {c.key: c for c in study.plan(study.DEFAULT)}
    renorm = study.config_for(cells["batch_size/convnet/renorm/b2/s1"], study.DEFAULT, "x", None)
    assert (renorm.norm, renorm.norm_kwargs["renorm"], renorm.batch_size, renorm.seed) == ("batch", True, 2, 1)
    assert renorm.learning_rate == pytest.approx(0.1 * 2 / 32)
    assert renorm.recalibrate_batch_norm == study.DEFAULT.recalibration_examples // 2
    assert renorm.max_train_examples == study.DEFAULT.cnn_examples and not renorm.export
    ghost = study.config_for(cells["batch_size/convnet/ghost/b64/s0"], study.DEFAULT, "x", None)
    assert ghost.norm_kwargs == {"virtual_batch_size": study.GHOST_BATCH}
    layer = study.config_for(cells["batch_size/convnet/layer/b64/s0"], study.DEFAULT, "x", None)
    assert layer.recalibrate_batch_norm is None and layer.norm_kwargs == {}
    post = study.config_for(cells["transformer/transformer_tiny/rms/post/warmup/b32/s0"], study.DEFAULT, "x", None)
    assert post.model_kwargs == {"num_layers": study.DEFAULT.transformer_layers, "norm_first": False}
    steps = study.DEFAULT.text_examples // study.DEFAULT.text_batch_size
    assert post.warmup_steps == round(study.DEFAULT.warmup_fraction * steps) > 0


def test_model_kwargs_reach_the_builder_and_resume_checks_them(tmp_path):
    config = training.Config(
        model="transformer_tiny", dataset="glue/sst2", out=str(tmp_path / "run"), sequence_length=8,
        model_kwargs={"num_layers": 3, "norm_first": True},
    )  # fmt: skip
    with tfds.testing.mock_data(num_examples=8):
        _, serving, _ = training.build_models(config, training.load_data(config))
    core = next(layer for layer in serving.layers if isinstance(layer, keras.Model))
    names = {layer.name for layer in core.layers}
    assert {"block3", "final_norm"} <= names and "block4" not in names
    # A run folder from before model_kwargs existed resumes with the default and refuses any other.
    run = tmp_path / "old"
    run.mkdir()
    before = {"model": "mlp", "norm": None, "norm_kwargs": {}, "dataset": "mnist", "max_train_examples": None,
              "vocab_size": 20000, "sequence_length": 64}  # fmt: skip
    (run / "run.json").write_text(json.dumps(before))
    old = training.Config(model="mlp", dataset="mnist", out=str(run), resume=True)
    training.check_run_folder(run, old)
    with pytest.raises(training.ConfigError, match="--model-kwargs"):
        training.check_run_folder(run, training.Config(model="mlp", dataset="mnist", out=str(run), resume=True,
                                                       model_kwargs={"hidden_units": [8]}))  # fmt: skip
    with pytest.raises(training.ConfigError, match="export=False"):
        training.check(
            training.Config(model="mlp", dataset="mnist", out=str(tmp_path / "x"), export=False, tflite=True)
        )


def test_batch_statistics_callback_matches_training_mode_and_restores_the_moving_statistics(rng):
    inputs = keras.Input((4, 4, 3))
    x = kernorm.BatchNormalization(momentum=0.5)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.layers[1].moving_mean.assign([5.0, -5.0, 1.0])
    images = rng.normal(size=(10, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, size=10)
    validation = tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)  # rebatched to 4: 2 batches
    before = [v.numpy() for v in model.non_trainable_variables]
    callback = study.batch_statistics_callback(validation, batch_size=4)
    callback.set_model(model)
    callback.on_train_end()
    for variable, value in zip(model.non_trainable_variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)
    expected_correct, expected_loss = 0, 0.0
    for start in (0, 4):
        batch = images[start : start + 4]
        # float64 reference: normalize with the batch's own statistics, then the layers after the norm.
        norm = model.layers[1]
        mean = batch.astype("float64").mean(axis=(0, 1, 2))
        var = batch.astype("float64").var(axis=(0, 1, 2))
        normalized = (batch - mean) / np.sqrt(var + norm.epsilon) * norm.gamma.numpy() + norm.beta.numpy()
        kernel, bias = model.layers[-1].get_weights()
        logits = normalized.mean(axis=(1, 2)) @ kernel + bias
        expected_correct += int((logits.argmax(-1) == labels[start : start + 4]).sum())
        shifted = logits - logits.max(-1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        expected_loss -= log_probabilities[np.arange(4), labels[start : start + 4]].sum()
    assert callback.result["accuracy"] == pytest.approx(expected_correct / 8)
    assert callback.result["loss"] == pytest.approx(expected_loss / 8, rel=1e-4)


def test_add_result_keeps_one_row_per_cell(tmp_path):
    path = tmp_path / "results.csv"
    study.add_result(path, {"cell": "a", "status": "ok", "val_accuracy": 0.5})
    study.add_result(path, {"cell": "b", "status": "cannot train", "error": "one value per channel"})
    study.add_result(path, {"cell": "a", "status": "ok", "val_accuracy": 0.75})
    rows = study.read_results(path)
    assert [(r["cell"], r["val_accuracy"]) for r in rows] == [("b", ""), ("a", "0.75")]
    assert list(rows[0]) == list(study.COLUMNS)
    with pytest.raises(ValueError):
        study.add_result(path, {"cell": "c", "no_such_column": 1})
    assert [r["cell"] for r in study.read_results(path)] == ["b", "a"]
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def _rows(accuracies, experiment="batch_size", n=2000, **fixed):
    """Rows of results.csv: `accuracies` maps (arm, batch size) to one accuracy per seed."""
    return [
        {
            "experiment": experiment, "cell": f"{arm}/{batch_size}/{seed}", "model": "convnet", "arm": arm,
            "norm": arm, "batch_size": str(batch_size), "seed": str(seed), "status": "ok",
            "val_accuracy": str(value), "validation_examples": str(n), **fixed,
        }
        for (arm, batch_size), values in accuracies.items()
        for seed, value in enumerate(values)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "batch_at_2, verdict",
    [(0.85, study.HOLDS), (0.902, study.FAILS), (0.95, study.FAILS)],
)
def test_the_small_batch_verdicts_follow_the_numbers(batch_at_2, verdict):
    rows = _rows({
        ("batch", 32): [0.90, 0.90], ("batch", 8): [0.91, 0.91], ("batch", 2): [batch_at_2, batch_at_2],
        ("layer", 32): [0.80, 0.80], ("layer", 2): [0.88, 0.88],
    })  # fmt: skip
    bn, ln = study.small_batch_verdicts(rows)
    assert bn.verdict == verdict
    assert f"batch norm at batch 2: {100 * batch_at_2:.1f}%" in bn.evidence and "layer 88.0%" in bn.evidence
    # Layer norm's best is at batch 2, so it loses nothing there.
    assert ln.verdict == study.HOLDS


def test_the_noise_counts_the_seeds_spread_and_the_validation_size():
    # 2000 examples at 0.9: binomial s.e. 0.0067 per seed, so 2 points apart is resolved...
    assert study.compare(study.Estimate([0.92], 2000), study.Estimate([0.90], 2000)) == 1
    # ...but not with 200 examples, nor when the seeds disagree by more than that.
    assert study.compare(study.Estimate([0.92], 200), study.Estimate([0.90], 200)) == 0
    assert study.compare(study.Estimate([0.96, 0.88], 2000), study.Estimate([0.90, 0.90], 2000)) == 0
    assert study.Estimate([0.5], 100).se == pytest.approx(math.sqrt(0.25 / 100))


def test_online_verdicts_record_cannot_train():
    rows = _rows({("layer", 1): [0.8, 0.8]}, experiment="online")
    rows += [
        {**rows[0], "arm": "batch", "model": "mlp", "status": "cannot train", "val_accuracy": "",
         "error": "Layer 'norm1' got one value per channel in training mode"},
        {**rows[0], "arm": "batch", "model": "convnet", "val_accuracy": "0.75"},
    ]  # fmt: skip
    found = {v.rule: v for v in study.online_verdicts(rows)}
    mlp = found["Batch norm cannot train on one example at a time (after a Dense layer)"]
    assert mlp.verdict == study.HOLDS and "one value per channel" in mlp.detail
    assert found["Batch norm cannot train on one example at a time (in a CNN)"].verdict == study.FAILS
    assert found["Layer, group and instance norm train at batch size 1"].verdict == study.HOLDS


def test_bad_arguments_exit_2(tmp_path):
    status, _, err = run_main("study", ["--experiments", "batch_size,nope", "--out", str(tmp_path / "s")])
    assert status == 2 and "--experiments" in err and "nope" in err and "rnn" in err
    assert not (tmp_path / "s").exists()
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "study.json").write_text('{"scale": "quick"}')
    status, _, err = run_main("study", ["--out", str(tmp_path / "q"), "--experiments", "rnn"])
    assert status == 2 and "quick" in err


def test_the_readme_evidence_is_the_committed_study():
    """Every number of the README's Evidence block comes from docs/study/results.csv (the block is what
    `study.py --out docs/study --update-readme` writes), and report.md is the one it gives."""
    rows = study.read_results(DOCS / "results.csv")
    assert rows, "docs/study/results.csv is missing"
    readme = (REPO / "README.md").read_text()
    section = re.search(r"<!-- section:evidence -->(.*?)<!-- /section:evidence -->", readme, re.S)
    assert section, "README.md has no Evidence section"
    markers = re.escape(study.README_START) + r"\n(.*?)\n" + re.escape(study.README_END)
    block = re.search(markers, section.group(1), re.S)
    assert block and block.group(1) == study.evidence_block(rows, "docs/study")
    assert "python scripts/study.py --out runs/study" in section.group(1)
    figures = [name for name in study.FIGURES if (DOCS / name).is_file()]
    assert figures == list(study.FIGURES)
    assert (DOCS / "report.md").read_text() == study.render_report(rows, study.DEFAULT, figures)
    assert {row["cell"] for row in rows} == {cell.key for cell in study.plan(study.DEFAULT)}, "a finished study"


def test_update_readme_rewrites_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{study.README_START}\nold\n{study.README_END}\n\nafter\n")
    study.update_readme("new | table", readme)
    assert readme.read_text() == f"# x\n\n{study.README_START}\nnew | table\n{study.README_END}\n\nafter\n"
    readme.write_text("no block")
    with pytest.raises(SystemExit, match="no <!-- study:start -->"):
        study.update_readme("new", readme)


@pytest.mark.slow
def test_a_killed_quick_study_resumes_without_redoing_finished_cells(tmp_path):
    """Acceptance 1 and 3: the quick study on mock data, SIGKILLed in its third cell, then run again."""
    out, first_log, second_log = tmp_path / "study", tmp_path / "first.log", tmp_path / "second.log"
    command = [sys.executable, str(WRAPPER), "48", "--quick", "--out", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(
        command, env={**env, "STUDY_CELL_LOG": str(first_log)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    sigkill_when(process, lambda: first_log.exists() and len(first_log.read_text().split()) >= 3, "the third cell", 300)
    finished = [row["cell"] for row in study.read_results(out / "results.csv")]
    started = first_log.read_text().split()
    assert finished == started[:2], "two cells finished, the third was killed"

    result = subprocess.run(
        command, env={**env, "STUDY_CELL_LOG": str(second_log)}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rerun = second_log.read_text().split()
    planned = [cell.key for cell in study.plan(study.QUICK)]
    assert rerun == planned[2:], "the rerun starts at the killed cell and skips the finished ones"
    assert f"2 already in {out / 'results.csv'}" in result.stdout
    assert re.search(rf"\[{len(planned)}/{len(planned)}\] .* elapsed \d+m\d\ds, about 0m00s left", result.stdout)

    rows = study.read_results(out / "results.csv")
    assert sorted(row["cell"] for row in rows) == sorted(planned), "each cell once"
    by_cell = {row["cell"]: row for row in rows}
    refused = by_cell["online/mlp/batch/b1/s0"]
    assert refused["status"] == study.STATUS_CANNOT_TRAIN
    assert refused["error"].startswith("Layer '") and "one value per channel" in refused["error"]
    trained = by_cell["batch_size/convnet/batch/b2/s0"]
    for column in ("val_accuracy", "val_accuracy_batch_stats", "val_accuracy_recalibrated", "examples_per_second"):
        assert 0 <= float(trained[column]) and (column == "examples_per_second" or float(trained[column]) <= 1)
    gradients = by_cell["gradients/transformer_tiny/layer/post/b32/s0"]
    assert len(gradients["block_grad_norms"].split()) == study.QUICK.transformer_layers
    # Post-norm: every block's output is a layer norm's output.
    assert [float(v) for v in gradients["block_output_rms"].split()] == pytest.approx([1.0, 1.0], abs=0.01)
    for name in study.FIGURES:
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "| Batch norm loses accuracy at small batches |" in report
    assert not [path for path in out.rglob(".tmp-*")]
