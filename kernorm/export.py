"""Writing a trained model out: SavedModel, TFLite, ONNX, `.keras` and JSON, each atomically.

Every writer stages the file (or folder) next to its destination under a name
that starts with `TEMP_PREFIX` and renames it into place, so a crash leaves the
old complete file, the new complete one, or a staging leftover that
`remove_leftovers` deletes, never a half-written file.

    from kernorm import export
    export.saved_model(model, tf.TensorSpec((None, 28, 28, 1), tf.uint8, name="image"), "runs/x/saved_model")
"""

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

import keras
import tensorflow as tf

import kernorm
from kernorm import _private

TEMP_PREFIX = ".tmp-"
#: The extra signature of a text export, over token ids: TFLite and ONNX have no string ops.
TOKEN_SIGNATURE = "tokens"
# Opset 17 runs in ONNX Runtime 1.13 and later.
ONNX_OPSET = 17


@contextlib.contextmanager
def replacing(path):
    """Yields a staging path next to `path` to write a file or a folder to; then renames it into place.

    If the block raises, the staging path is removed and `path` is untouched.
    """
    path = pathlib.Path(path)
    staging = path.with_name(TEMP_PREFIX + path.name)
    _remove(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if path.is_dir():
        old = path.with_name(TEMP_PREFIX + path.name + "-old")
        _remove(old)
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old)
    else:
        os.replace(staging, path)


def remove_leftovers(folder):
    """Deletes what a process killed while writing into `folder` left behind."""
    for stale in pathlib.Path(folder).glob(TEMP_PREFIX + "*"):
        _remove(stale)


def _remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_json(path, value):
    with replacing(path) as staging:
        staging.write_text(json.dumps(value, indent=2, default=str) + "\n")


def write_bytes(path, content):
    with replacing(path) as staging:
        staging.write_bytes(content)


def save_keras(model, path):
    """`model.save(path)`, atomically (the staging name keeps the `.keras` ending Keras asks for)."""
    with replacing(path) as staging:
        model.save(staging)


def saved_model(model, spec, path, signatures=None):
    """Exports `model` as a SavedModel at `path`, atomically.

    The signature `serving_default` takes one input named `spec.name` and
    returns `{"probabilities": ...}`; `signatures` maps more signature names to
    `(model, spec)` pairs of the same kind.
    """
    archive = keras.export.ExportArchive()
    endpoints = {"serving_default": (model, spec), **(signatures or {})}
    for name, (endpoint_model, endpoint_spec) in endpoints.items():
        archive.track(endpoint_model)
        archive.add_endpoint(name=name, fn=_probabilities(endpoint_model), input_signature=[endpoint_spec])
    with replacing(path) as staging:
        archive.write_out(str(staging), verbose=False)


def _probabilities(model):
    return lambda inputs: {"probabilities": model(inputs, training=False)}


def probabilities_head(from_logits):
    """The serving head: softmax of logits (or the probabilities as they are), always in float32."""
    head = keras.layers.Softmax if from_logits else keras.layers.Identity
    return head(dtype="float32", name="probabilities")


def run_exports(run, data, train_model, serving_model, from_logits, fold=True, tflite=False, onnx=False, name=None):
    """Writes a run's `saved_model/` and, as asked, `model.tflite`, `model.onnx` and (text) `vocabulary.json`.

    Batch norm is folded into the layer before it unless `fold` is False. A text
    export also has the signature `TOKEN_SIGNATURE`, over token ids, which is the
    one TFLite and ONNX convert. Returns what `metrics.json` records about it.
    """
    run = pathlib.Path(run)
    norms_before = _batch_norm_count(serving_model)
    signatures = {}
    if data.task == "text":
        tokens = keras.Model(
            train_model.inputs[0], probabilities_head(from_logits)(train_model.outputs[0]), name=name
        )
        tokens = kernorm.fold_batch_norm(tokens) if fold else tokens
        raw = data.serving_input()
        model = keras.Model(raw, tokens(data.vectorizer(raw)), name=name)
        token_spec = tf.TensorSpec((None, data.sequence_length), tf.int32, name=tokens.inputs[0].name)
        signatures[TOKEN_SIGNATURE] = (tokens, token_spec)
        converted = TOKEN_SIGNATURE
    else:
        model = kernorm.fold_batch_norm(serving_model) if fold else serving_model
        converted = "serving_default"
    saved_model(model, data.serving_spec(), run / "saved_model", signatures)
    files = ["saved_model"]
    if tflite or onnx:
        # Converted from an export traced with kernorm's fast paths off: plain ops, which TFLite and
        # ONNX have (the fast paths use kernels such as EuclideanNorm that they lack).
        with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX + "portable-", dir=run) as portable:
            previous = kernorm.ops.set_fast_paths(False)
            try:
                saved_model(model, data.serving_spec(), pathlib.Path(portable) / "saved_model", signatures)
            finally:
                kernorm.ops.set_fast_paths(previous)
            source = str(pathlib.Path(portable) / "saved_model")
            if tflite:
                converter = tf.lite.TFLiteConverter.from_saved_model(source, signature_keys=[converted])
                write_bytes(run / "model.tflite", converter.convert())
                files.append("model.tflite")
            if onnx:
                write_onnx(source, converted, run / "model.onnx")
                files.append("model.onnx")
    if data.task == "text":
        write_json(run / "vocabulary.json", vocabulary(data, token_spec))
        files.append("vocabulary.json")
    return {
        "fold_batch_norm": fold,
        "batch_norms_folded": norms_before - _batch_norm_count(model),
        "signatures": sorted(["serving_default", *signatures]),
        "converted_signature": converted if tflite or onnx else None,
        "files": files,
    }


def _batch_norm_count(model):
    return sum(isinstance(layer, kernorm.folding.BATCH_NORMS) for layer in _private.all_layers(model))


def vocabulary(data, token_spec):
    """What vocabulary.json holds: the tokens (index = token id) and how the export turns text into ids,
    so that a runtime without string ops can do it (scripts/predict.py does)."""
    config = data.vectorizer.get_config()
    return {
        "input": data.input_name,
        "signature": TOKEN_SIGNATURE,
        "token_input": token_spec.name,
        "sequence_length": data.sequence_length,
        "standardize": config["standardize"],
        "split": config["split"],
        "padding_id": 0,
        "oov_id": 1,
        "tokens": [str(token) for token in data.vectorizer.get_vocabulary()],
    }


def write_onnx(saved_model_path, signature, path):
    """Converts `signature` of the SavedModel to ONNX with tf2onnx, atomically."""
    import tf2onnx  # optional: kernorm[onnx]

    loaded = tf.saved_model.load(str(saved_model_path))  # kept: the signature's variables die with it
    function = loaded.signatures[signature]
    specs = [
        tf.TensorSpec(spec.shape, spec.dtype, name=name)
        for name, spec in function.structured_input_signature[1].items()
    ]
    proto, _ = tf2onnx.convert.from_function(tf.function(function), input_signature=specs, opset=ONNX_OPSET)
    write_bytes(path, proto.SerializeToString())
