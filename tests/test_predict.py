"""scripts/predict.py: TF Serving JSON in and out, served without kernorm; saved_model_cli and TFLite on the export.

Where kernorm is not installed: see `script_runs.python_without_kernorm`.
"""

import base64
import json
import pathlib
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from script_runs import PREDICT, image_run, python_without_kernorm, run_main, serve, text_run  # noqa: F401

import kernorm  # noqa: F401  (registers the layers that model.keras names)

SENTENCES = ["a gripping , funny film", "dull", "", "the plot goes nowhere and the acting is worse"]


def _images(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28, 1)).astype(np.uint8)


def test_image_predictions_without_kernorm_equal_model_predict(image_run, python_without_kernorm, tmp_path):
    images = _images(4)
    result = serve(python_without_kernorm, image_run / "saved_model", {"instances": images.tolist()}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = np.array(json.loads(result.stdout)["predictions"])
    expected = keras.saving.load_model(image_run / "model.keras").predict(images, verbose=0)
    assert predictions.shape == (4, 10)
    np.testing.assert_allclose(predictions, expected, atol=1e-5, rtol=0)


def test_text_predictions_without_kernorm_equal_model_predict(text_run, python_without_kernorm, tmp_path):
    result = serve(python_without_kernorm, text_run / "saved_model", {"instances": SENTENCES}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = np.array(json.loads(result.stdout)["predictions"])
    expected = keras.saving.load_model(text_run / "model.keras").predict(tf.constant(SENTENCES), verbose=0)
    assert predictions.shape == (4, 2)
    np.testing.assert_allclose(predictions, expected, atol=1e-5, rtol=0)


def test_a_bad_request_is_one_line_without_a_traceback(image_run, python_without_kernorm, tmp_path):
    body = {"instances": _images(2)[..., 0].tolist()}  # (2, 28, 28): the channel axis is missing
    result = serve(python_without_kernorm, image_run / "saved_model", body, tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("predict.py: error: input 'image'")
    assert "shape [-1, 28, 28, 1] and dtype uint8" in last and "got shape [2, 28, 28]" in last
    assert result.stdout == ""


def test_columnar_request_and_file_input(image_run, tmp_path):
    images = _images(3, seed=1)
    rows = run_main("predict", [str(image_run / "saved_model")], stdin=json.dumps({"instances": images.tolist()}))
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": {"image": images.tolist()}}))
    columns = run_main("predict", [str(image_run / "saved_model"), "--input", str(request)])
    assert rows[0] == 0 and columns[0] == 0, rows[2] + columns[2]
    assert set(json.loads(columns[1])) == {"outputs"}
    np.testing.assert_array_equal(json.loads(columns[1])["outputs"], json.loads(rows[1])["predictions"])


def test_row_instances_may_name_the_input_and_strings_may_be_base64(text_run):
    plain = run_main("predict", [str(text_run / "saved_model")], stdin=json.dumps({"instances": SENTENCES[:2]}))
    named = [{"sentence": {"b64": base64.b64encode(text.encode()).decode()}} for text in SENTENCES[:2]]
    encoded = run_main("predict", [str(text_run / "saved_model")], stdin=json.dumps({"instances": named}))
    columnar = run_main("predict", [str(text_run / "saved_model")], stdin=json.dumps({"inputs": SENTENCES[:2]}))
    assert plain[0] == encoded[0] == columnar[0] == 0, plain[2] + encoded[2] + columnar[2]
    assert json.loads(plain[1])["predictions"] == json.loads(encoded[1])["predictions"]
    assert json.loads(plain[1])["predictions"] == json.loads(columnar[1])["outputs"]


def test_signature_name_from_the_body_or_the_flag(image_run):
    body = json.dumps({"signature_name": "classify", "instances": _images(1).tolist()})
    status, _, err = run_main("predict", [str(image_run / "saved_model")], stdin=body)
    assert status == 1 and "no signature 'classify'; it has: serving_default" in err
    status, out, err = run_main("predict", [str(image_run / "saved_model"), "--signature", "serving_default"], stdin=body)
    assert status == 0, err
    assert len(json.loads(out)["predictions"]) == 1


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"instances": np.zeros((1, 28, 28, 1)).tolist()}, "dtype uint8 (-1: any size); got shape [1, 28, 28, 1] of floats"),
        ({"instances": [[[[256]] * 28] * 28]}, "got values outside [0, 255]"),
        ({"instances": [[[["a"]] * 28] * 28]}, "of strings"),
        ({"instances": [[[[1]] * 28] * 28, [[[1]] * 27] * 28]}, "not a rectangular array"),
        ({"inputs": {"pixels": [[[[1]] * 28] * 28]}}, "has the inputs 'pixels'; the signature takes 'image'"),
        ({"instances": []}, "non-empty list"),
        ({"examples": []}, 'either "instances" (rows) or "inputs" (columns)'),
        ("{not json", "not valid JSON"),
    ],
)
def test_requests_that_do_not_fit_get_one_line(image_run, body, expected):
    text = body if isinstance(body, str) else json.dumps(body)
    status, out, err = run_main("predict", [str(image_run / "saved_model")], stdin=text)
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("predict.py: error: ")
    assert expected in err
    if "dtype" in expected:
        assert "shape [-1, 28, 28, 1]" in err


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"instances": [1, 2]}, "expects shape [-1] and dtype string (-1: any size); got shape [2] of int values"),
        ({"inputs": [["nested"], ["lists"]]}, "got shape [2, 1]"),
    ],
)
def test_text_requests_that_do_not_fit_get_one_line(text_run, body, expected):
    status, out, err = run_main("predict", [str(text_run / "saved_model")], stdin=json.dumps(body))
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err


def test_missing_saved_model_is_one_line(tmp_path):
    status, _, err = run_main("predict", [str(tmp_path / "nothing")], stdin='{"instances": [1]}')
    assert status == 1 and "no SavedModel at" in err and len(err.strip().splitlines()) == 1


def test_predict_py_does_not_import_kernorm():
    source = PREDICT.read_text()
    assert "kernorm" not in "".join(line for line in source.splitlines() if line.lstrip().startswith(("import", "from")))


def test_saved_model_cli_lists_serving_default_with_a_named_input(image_run):
    cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
    result = subprocess.run(
        [cli, "show", "--dir", str(image_run / "saved_model"), "--all"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "signature_def['serving_default']" in result.stdout
    assert "inputs['image'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 28, 28, 1)" in result.stdout
    assert "outputs['probabilities'] tensor_info:\n        dtype: DT_FLOAT" in result.stdout


def test_text_export_signature_takes_named_strings(text_run):
    signature = tf.saved_model.load(str(text_run / "saved_model")).signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert list(signature.structured_input_signature[1]) == ["sentence"]
    assert (spec.dtype, spec.shape.as_list()) == (tf.string, [None])
    assert list(signature.structured_outputs) == ["probabilities"]


def test_tflite_converts_the_image_export_and_matches(image_run):
    converter = tf.lite.TFLiteConverter.from_saved_model(str(image_run / "saved_model"))
    flatbuffer = converter.convert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice that LiteRT replaces it
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    runner = interpreter.get_signature_runner("serving_default")
    images = _images(6, seed=2)
    out = runner(image=images)["probabilities"]
    expected = keras.saving.load_model(image_run / "model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)

