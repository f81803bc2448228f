"""Serving: train.py's exports (folded, recalibrated, TFLite, ONNX) and predict.py in each runtime.

Each runtime runs predict.py in a virtualenv of its own that has that runtime
and nothing else of the serving stack: TensorFlow without kernorm
(`python_without_kernorm`), `ai-edge-litert` alone, `onnxruntime` alone. The
last two are installed with pip once per session; without a package index the
tests that need them fail with pip's message (they are not real-data tests, so
they do not skip).
"""

import importlib.util
import json
import shutil
import subprocess
import venv

import keras
import numpy as np
import pytest
import tensorflow as tf
from script_runs import (  # noqa: F401
    IMAGE_ARGS,
    TEXT_ARGS,
    image_run,
    load_script,
    python_without_kernorm,
    run_main,
    serve,
    text_run,
    train_mock,
)

import kernorm  # noqa: F401  (registers the layers that model.keras names)

HAS_TF2ONNX = importlib.util.find_spec("tf2onnx") is not None
# How closely each runtime must give model.keras's probabilities (acceptance 4 of issue 17).
TOLERANCE = {"tf": 1e-5, "litert": 1e-4, "onnx": 1e-5}
RUNTIME_PACKAGES = {"litert": ("ai-edge-litert", "ai_edge_litert"), "onnx": ("onnxruntime", "onnxruntime")}
SENTENCES = [
    "A gripping, FUNNY film!",
    "dull",
    "",
    "the plot goes nowhere -- and the acting is worse\tthan the plot",
    "Café ÉTÉ naïve",
]


def _exported(run, tmp_path_factory, args, extra):
    """A copy of a finished run, exported again by `train.py --resume` with the flags `extra`."""
    copy = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(run, copy)
    metrics = train_mock([*args, "--out", str(copy), "--resume", *extra])
    return copy, metrics


CONVERT = ["--tflite", *(["--onnx"] if HAS_TF2ONNX else [])]


@pytest.fixture(scope="session")
def image_export(image_run, tmp_path_factory):
    return _exported(image_run, tmp_path_factory, IMAGE_ARGS, ["--recalibrate-batch-norm", "2", *CONVERT])


@pytest.fixture(scope="session")
def text_export(text_run, tmp_path_factory):
    return _exported(text_run, tmp_path_factory, TEXT_ARGS, CONVERT)


_RUNTIME_PYTHONS = {}


def _runtime_python(runtime, tmp_path_factory, python_without_kernorm):
    """A Python for `runtime`: TensorFlow without kernorm for "tf", else a fresh virtualenv with only the runtime."""
    if runtime == "onnx" and not HAS_TF2ONNX:
        pytest.fail("train.py --onnx needs tf2onnx, one of the test extras: pip install -e '.[test]'")
    if runtime == "tf":
        return python_without_kernorm
    if runtime not in _RUNTIME_PYTHONS:
        package, module = RUNTIME_PACKAGES[runtime]
        root = tmp_path_factory.mktemp(f"venv-{runtime}")
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
        python = root / "bin" / "python"
        install = subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", package],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if install.returncode != 0:
            _RUNTIME_PYTHONS[runtime] = f"pip could not install {package}: {install.stderr.strip()[-300:]}"
        else:
            probe = f"import {module}\ntry:\n    import tensorflow\nexcept ImportError:\n    print('clean')"
            result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
            assert result.stdout.strip() == "clean", f"the {runtime} virtualenv must have {module} and no TensorFlow"
            _RUNTIME_PYTHONS[runtime] = python
    if isinstance(_RUNTIME_PYTHONS[runtime], str):
        pytest.fail(_RUNTIME_PYTHONS[runtime])
    return _RUNTIME_PYTHONS[runtime]


def _graph_ops(saved_model):
    """Every op type in a SavedModel's graphs, its functions included."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((saved_model / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def test_the_export_is_folded_and_recalibrated_and_records_it(image_export):
    run, metrics = image_export
    recalibration = metrics["recalibrate_batch_norm"]
    assert recalibration["steps"] == 2 and recalibration["layers"] == 3 and recalibration["examples"] == 32
    assert set(recalibration) >= {"val_accuracy_before", "val_accuracy_after", "val_loss_before", "val_loss_after"}
    export = metrics["export"]
    assert export["fold_batch_norm"] is True and export["batch_norms_folded"] == 3
    assert export["files"] == ["saved_model", "model.tflite", *(["model.onnx"] if HAS_TF2ONNX else [])]
    assert json.loads((run / "metrics.json").read_text())["export"] == export
    # Folded: no batch norm op is left in the served graph, and it computes the recalibrated model.
    assert not {op for op in _graph_ops(run / "saved_model") if "BatchNorm" in op}
    images = np.random.default_rng(3).integers(0, 256, (5, 28, 28, 1)).astype(np.uint8)
    served = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"]
    expected = keras.saving.load_model(run / "model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(served(image=images)["probabilities"], expected, atol=1e-5, rtol=0)



def test_model_keras_holds_the_recalibrated_statistics(image_run, image_export):
    def statistics(run):
        model = keras.saving.load_model(run / "model.keras")
        norms = [layer for layer in model._flatten_layers() if isinstance(layer, kernorm.BatchNormalization)]
        return [weight.numpy() for norm in norms for weight in (norm.moving_mean, norm.moving_variance)]

    before, after = statistics(image_run), statistics(image_export[0])
    assert len(before) == len(after) == 6
    assert all(not np.allclose(b, a) for b, a in zip(before, after))


def test_no_fold_batch_norm_keeps_the_inference_batch_norm(image_run, tmp_path_factory):
    run, metrics = _exported(image_run, tmp_path_factory, IMAGE_ARGS, ["--no-fold-batch-norm"])
    assert metrics["export"]["fold_batch_norm"] is False and metrics["export"]["batch_norms_folded"] == 0
    assert metrics["recalibrate_batch_norm"] is None
    ops = _graph_ops(run / "saved_model")
    assert "FusedBatchNormV3" in ops and "Tile" not in ops
    images = np.random.default_rng(4).integers(0, 256, (3, 28, 28, 1)).astype(np.uint8)
    served = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"]
    expected = keras.saving.load_model(run / "model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(served(image=images)["probabilities"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("runtime", ["tf", "litert", "onnx"])
def test_each_runtime_serves_the_image_export(
    runtime, image_export, tmp_path_factory, python_without_kernorm, tmp_path
):
    python = _runtime_python(runtime, tmp_path_factory, python_without_kernorm)
    run, _ = image_export
    images = np.random.default_rng(5).integers(0, 256, (4, 28, 28, 1)).astype(np.uint8)
    result = serve(python, run, {"instances": images.tolist()}, tmp_path, "--runtime", runtime)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = np.array(json.loads(result.stdout)["predictions"])
    expected = keras.saving.load_model(run / "model.keras").predict(images, verbose=0)
    assert predictions.shape == (4, 10)
    np.testing.assert_allclose(predictions, expected, atol=TOLERANCE[runtime], rtol=0)


@pytest.mark.parametrize("runtime", ["tf", "litert", "onnx"])
def test_each_runtime_serves_the_text_export_from_strings(
    runtime, text_export, tmp_path_factory, python_without_kernorm, tmp_path
):
    python = _runtime_python(runtime, tmp_path_factory, python_without_kernorm)
    run, metrics = text_export
    assert metrics["export"]["signatures"] == ["serving_default", "tokens"]
    model_file = {"tf": "saved_model", "litert": "model.tflite", "onnx": "model.onnx"}[runtime]
    result = serve(python, run / model_file, {"instances": SENTENCES}, tmp_path)  # the runtime from the file
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = np.array(json.loads(result.stdout)["predictions"])
    expected = keras.saving.load_model(run / "model.keras").predict(tf.constant(SENTENCES), verbose=0)
    np.testing.assert_allclose(predictions, expected, atol=TOLERANCE[runtime], rtol=0)


def test_the_token_signature_takes_token_ids(text_export):
    run, _ = text_export
    vocabulary = json.loads((run / "vocabulary.json").read_text())
    vectorizer = keras.saving.load_model(run / "model.keras").get_layer("text_vectorization")
    assert vocabulary["tokens"] == vectorizer.get_vocabulary()
    ids = np.asarray(vectorizer(tf.constant(SENTENCES)), np.int32)
    body = json.dumps({"signature_name": "tokens", "inputs": {"token_ids": ids.tolist()}})
    tokens = run_main("predict", [str(run)], stdin=body)
    strings = run_main("predict", [str(run)], stdin=json.dumps({"instances": SENTENCES}))
    assert tokens[0] == strings[0] == 0, tokens[2] + strings[2]
    np.testing.assert_allclose(json.loads(tokens[1])["outputs"], json.loads(strings[1])["predictions"], atol=1e-6)


def test_predict_tokenizes_as_text_vectorization():
    predict = load_script("predict")
    corpus = ["The film, the PLOT!", "a b c d e f g", "naïve café", "it's 'quoted' (really)"]
    vectorizer = keras.layers.TextVectorization(max_tokens=12, output_sequence_length=5)
    vectorizer.adapt(corpus)
    vocabulary = {
        "sequence_length": 5, "padding_id": 0, "oov_id": 1, "standardize": "lower_and_strip_punctuation",
        "split": "whitespace", "tokens": vectorizer.get_vocabulary(),
    }  # fmt: skip
    texts = [*corpus, "", "   ", "ÉTÉ The\tfilm\nthe\u00a0plot", "unknown words only here now please", "a-b_c.d"]
    ids = {token.encode("utf-8"): index for index, token in enumerate(vocabulary["tokens"])}
    ours = predict.token_ids([text.encode("utf-8") for text in texts], ids, vocabulary)
    np.testing.assert_array_equal(ours, np.asarray(vectorizer(tf.constant(texts))))


def test_a_runtime_without_its_file_or_package_is_one_line(image_run, tmp_path):
    status, out, err = run_main("predict", [str(image_run), "--runtime", "litert"], stdin='{"instances": [1]}')
    assert status == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "no model.tflite in" in err and "--tflite" in err
    saved_model = str(image_run / "saved_model")
    status, _, err = run_main("predict", [saved_model, "--runtime", "onnx"], stdin='{"instances": [1]}')
    assert status == 1 and "--runtime onnx reads a model.onnx file or a run folder" in err
    status, _, err = run_main("predict", [str(image_run), "--runtime", "jax"], stdin="{}")
    assert status == 2 and "invalid choice: 'jax'" in err


def test_onnx_needs_tf2onnx_before_any_folder(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else find_spec(name, *a))
    status, _, err = run_main("train", [*IMAGE_ARGS, "--onnx", "--out", str(tmp_path / "run")])
    assert status == 2 and "needs the tf2onnx package: pip install 'kernorm[onnx]'" in err
    assert not (tmp_path / "run").exists()


# --- the serving section of scripts/bench.py: its plumbing, not its timings ------------------------


def test_bench_serving_rows_time_every_variant_and_rewrite_their_own_block(tmp_path, monkeypatch):
    bench = load_script("bench")
    lines = []
    rows = bench.serving_rows([("convnet", (8, 8, 1))], rounds=3, warmup=1, seconds=0.01, log=lines.append)
    assert [row["batch"] for row in rows] == list(bench.SERVING_BATCHES) and len(lines) == 2
    for row in rows:
        for variant in ("kernorm", "folded", "keras", "norm-free"):
            spread = row[f"{variant}/keras"]
            assert spread["min"] <= spread["median"] <= spread["max"]
        assert row["keras/keras"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{bench.START}\nlayers\n{bench.END}\n{bench.SERVING_START}\nold\n{bench.SERVING_END}\n")
    monkeypatch.setattr(bench, "README", readme)
    bench.update_readme("new", bench.SERVING_START, bench.SERVING_END)
    assert readme.read_text() == f"a\n{bench.START}\nlayers\n{bench.END}\n{bench.SERVING_START}\nnew\n{bench.SERVING_END}\n"
