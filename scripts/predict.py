"""Serve an exported model on a TF Serving REST request body, without kernorm, in one of three runtimes.

    python scripts/predict.py runs/fashion_convnet --input request.json                 # TensorFlow
    python scripts/predict.py runs/fashion_convnet --runtime litert --input request.json  # model.tflite
    python scripts/predict.py runs/fashion_convnet --runtime onnx --input request.json    # model.onnx
    echo '{"instances": ["a gripping, funny film"]}' | python scripts/predict.py runs/sst2/saved_model

MODEL is a run folder of scripts/train.py (the runtime picks saved_model/, model.tflite or model.onnx in
it), a SavedModel folder, a .tflite file or a .onnx file. Each runtime imports only its own package:

- `tf`: TensorFlow (`tf.saved_model.load`), the default for a run or SavedModel folder;
- `litert`: `ai-edge-litert` (or `tflite-runtime`), the default for a .tflite file;
- `onnx`: `onnxruntime`, the default for a .onnx file.

The request is what TF Serving's `POST /v1/models/NAME:predict` takes, and the
response is what it returns:

- row format: `{"instances": [row, ...]}` -> `{"predictions": [row, ...]}`. With
  one input, a row is that input's value for one example (or `{"NAME": value}`);
  with several, a row is `{"NAME": value, ...}`.
- columnar format: `{"inputs": value}` or `{"inputs": {"NAME": value, ...}}` ->
  `{"outputs": value}` (one output) or `{"outputs": {"NAME": value, ...}}`.
- `"signature_name"` in the body picks the signature, as in TF Serving;
  `--signature` overrides it. The default is `serving_default`.
- String values may be given as `{"b64": "..."}`, as in TF Serving.

Text: TFLite and ONNX have no string ops, so a text model's .tflite and .onnx
files take token ids (the export's signature `tokens`). Given strings, as in
the `tf` runtime, predict.py turns them into token ids itself, as the export's
`TextVectorization` does, with the `vocabulary.json` that train.py writes next
to the model; `--signature tokens` sends token ids as they are.

The model must carry everything it needs: kernorm is never imported. A request
that does not fit the model gets a one-line error naming the expected shape and
dtype, and exit status 1.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import base64  # noqa: E402
import binascii  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

DEFAULT_SIGNATURE = "serving_default"
RUNTIMES = ("tf", "litert", "onnx")
# The file each runtime reads in a run folder.
RUN_FILES = {"tf": "saved_model", "litert": "model.tflite", "onnx": "model.onnx"}
VOCABULARY = "vocabulary.json"
# Keras's TextVectorization: "lower_and_strip_punctuation" lower-cases ASCII letters and deletes these
# characters; "whitespace" splits on runs of ASCII whitespace.
_PUNCTUATION = re.compile(rb'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']')
_WHITESPACE = re.compile(rb"[ \t\n\v\f\r]+")
_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


class RequestError(ValueError):
    """The request does not fit the model; the message is one line for the user."""


class Spec:
    """One input of a model: its shape (None for any size) and the name of its dtype ("uint8", "string", ...)."""

    def __init__(self, shape, dtype):
        self.shape = [None if dim is None or int(dim) < 0 else int(dim) for dim in shape]
        self.dtype = dtype

    def fits(self, shape):
        return len(shape) == len(self.shape) and all(d is None or d == s for d, s in zip(self.shape, shape))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Run an exported model on a TF Serving REST request body (JSON) and print the TF Serving "
        "response, in TensorFlow, LiteRT or ONNX Runtime.",
    )
    parser.add_argument(
        "model",
        help="a run folder (runs/NAME), a SavedModel folder (runs/NAME/saved_model), a .tflite or a .onnx file",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="tf (TensorFlow), litert (ai-edge-litert) or onnx (onnxruntime); default: from the model's file, "
        "tf for a folder",
    )
    parser.add_argument(
        "--input", "-i", default="-", help="file holding the request body (default: standard input)"
    )
    parser.add_argument(
        "--signature",
        default=None,
        help=f"signature to run (default: the body's signature_name, else {DEFAULT_SIGNATURE})",
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        body = _read_body(args.input)
        signature_name = args.signature or body.get("signature_name") or DEFAULT_SIGNATURE
        model = load(args.model, args.runtime, signature_name)
        response = predict(model, body, signature_name)
    except RequestError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 1
    json.dump(response, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _read_body(path):
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as error:
        raise RequestError(f"cannot read the request {path}: {error.strerror}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"the request is not valid JSON: {error}") from None
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise RequestError('the request must be a JSON object with either "instances" (rows) or "inputs" (columns)')
    return body


def load(path, runtime=None, signature_name=DEFAULT_SIGNATURE):
    """The model at `path` (see MODEL above) in `runtime`, ready to run `signature_name`.

    Returns an object with `specs` ({input name: Spec}) that is called with
    {input name: numpy array} and returns {output name: numpy array}.
    """
    if runtime is None:
        runtime = {".tflite": "litert", ".onnx": "onnx"}.get(os.path.splitext(path)[1], "tf")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        if not os.path.exists(os.path.join(path, RUN_FILES[runtime])):
            if runtime == "tf":
                raise RequestError(f"no SavedModel at {path} (no saved_model.pb there)")
            flag = "--tflite" if runtime == "litert" else "--onnx"
            raise RequestError(f"no {RUN_FILES[runtime]} in {path}: train.py writes it with {flag}")
        path = os.path.join(path, RUN_FILES[runtime])
    elif runtime != "tf" and os.path.isdir(path):
        raise RequestError(f"--runtime {runtime} reads a {RUN_FILES[runtime]} file or a run folder, not a SavedModel")
    if runtime == "tf":
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise RequestError(f"no SavedModel at {path} (no saved_model.pb there)")
        return _TensorFlowModel(path, signature_name)
    if not os.path.isfile(path):
        raise RequestError(f"no model file at {path}")
    model = _LiteRTModel(path, signature_name) if runtime == "litert" else _OnnxModel(path)
    return _with_text_input(model, os.path.join(folder, VOCABULARY), signature_name)


class _TensorFlowModel:
    def __init__(self, path, signature_name):
        # Imported here so that a malformed request fails fast, before TensorFlow loads.
        try:
            import tensorflow as tf
        except ImportError:
            raise RequestError("--runtime tf needs TensorFlow: pip install tensorflow") from None

        self._loaded = tf.saved_model.load(path)  # kept: the signature's variables die with it
        if signature_name not in self._loaded.signatures:
            raise RequestError(
                f"the SavedModel has no signature {signature_name!r}; it has: "
                f"{', '.join(sorted(self._loaded.signatures)) or 'none'}"
            )
        self._signature = self._loaded.signatures[signature_name]
        _, specs = self._signature.structured_input_signature
        self.specs = {name: Spec(spec.shape.as_list(), spec.dtype.name) for name, spec in specs.items()}

    def __call__(self, feeds):
        return {name: tensor.numpy() for name, tensor in self._signature(**feeds).items()}


class _LiteRTModel:
    def __init__(self, path, signature_name):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter
            except ImportError:
                raise RequestError("--runtime litert needs LiteRT: pip install ai-edge-litert") from None
        self._interpreter = Interpreter(model_path=path)
        signatures = self._interpreter.get_signature_list()
        # A text model's file holds its token signature only; the strings of serving_default become token ids.
        only = next(iter(signatures)) if len(signatures) == 1 else None
        name = only if signature_name == DEFAULT_SIGNATURE and signature_name not in signatures else signature_name
        if name not in signatures:
            raise RequestError(
                f"the TFLite model has no signature {signature_name!r}; it has: {', '.join(sorted(signatures))}"
            )
        self.signature_name = name
        self._runner = self._interpreter.get_signature_runner(name)
        self.specs = {
            name: Spec(list(detail["shape_signature"]), np.dtype(detail["dtype"]).name)
            for name, detail in self._runner.get_input_details().items()
        }

    def __call__(self, feeds):
        return self._runner(**feeds)


class _OnnxModel:
    _DTYPES = {
        "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
        "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64",
        "tensor(bool)": "bool", "tensor(string)": "string",
    }  # fmt: skip

    def __init__(self, path):
        try:
            import onnxruntime
        except ImportError:
            raise RequestError("--runtime onnx needs ONNX Runtime: pip install onnxruntime") from None
        self._session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.signature_name = None
        self.specs = {
            node.name: Spec([dim if isinstance(dim, int) else None for dim in node.shape], self._DTYPES[node.type])
            for node in self._session.get_inputs()
        }

    def __call__(self, feeds):
        names = [node.name for node in self._session.get_outputs()]
        return dict(zip(names, self._session.run(names, feeds)))


def _with_text_input(model, vocabulary_path, signature_name):
    """`model`, taking strings where it takes the token ids of a text export (unless they are asked for)."""
    vocabulary = None
    if os.path.isfile(vocabulary_path):
        with open(vocabulary_path, encoding="utf-8") as file:
            vocabulary = json.load(file)
    if vocabulary is None or vocabulary["token_input"] not in model.specs:
        if isinstance(model, _OnnxModel) and signature_name != DEFAULT_SIGNATURE:
            raise RequestError(f"the ONNX model has one signature, {DEFAULT_SIGNATURE!r}; not {signature_name!r}")
        return model
    if signature_name == vocabulary["signature"]:
        return model
    if signature_name != DEFAULT_SIGNATURE:
        raise RequestError(
            f"the model has the signatures {DEFAULT_SIGNATURE!r} (strings) and {vocabulary['signature']!r} "
            f"(token ids); not {signature_name!r}"
        )
    return _TextModel(model, vocabulary)


class _TextModel:
    """A model over token ids that takes strings, tokenized as the export's `TextVectorization` does."""

    def __init__(self, model, vocabulary):
        if vocabulary["standardize"] != "lower_and_strip_punctuation" or vocabulary["split"] != "whitespace":
            raise RequestError(
                f"{VOCABULARY}: only the standardize 'lower_and_strip_punctuation' and split 'whitespace' of "
                "train.py's exports are known here; serve this model with --runtime tf"
            )
        self._model = model
        self._vocabulary = vocabulary
        self._ids = {token.encode("utf-8"): index for index, token in enumerate(vocabulary["tokens"])}
        self.specs = {vocabulary["input"]: Spec([None], "string")}

    def __call__(self, feeds):
        (texts,) = feeds.values()
        token_input = self._vocabulary["token_input"]
        return self._model({token_input: token_ids(texts, self._ids, self._vocabulary)})


def token_ids(texts, ids, vocabulary):
    """A batch of byte strings as int32 token ids `(batch, sequence_length)`, as Keras's TextVectorization
    with `lower_and_strip_punctuation`, `whitespace` and an output sequence length gives them."""
    length = vocabulary["sequence_length"]
    result = np.full((len(texts), length), vocabulary["padding_id"], np.int32)
    for row, text in enumerate(texts):
        words = [word for word in _WHITESPACE.split(_PUNCTUATION.sub(b"", text.translate(_ASCII_LOWER))) if word]
        result[row, : min(len(words), length)] = [ids.get(word, vocabulary["oov_id"]) for word in words[:length]]
    return result


def input_specs(model):
    """{name: Spec} of a loaded model's inputs."""
    return dict(model.specs)


def predict(model, body, signature_name=DEFAULT_SIGNATURE):
    """Runs a `load`ed model on a TF Serving request `body`; returns the response dict."""
    specs = input_specs(model)
    rows = "instances" in body
    columns = _columns_from_rows(body["instances"], specs) if rows else _columns(body["inputs"], specs)
    feeds = {name: _tensor(name, value, specs[name], signature_name) for name, value in columns.items()}
    if rows:
        sizes = {name: feed.shape[0] if feed.ndim else None for name, feed in feeds.items()}
        if len(set(sizes.values())) > 1:
            raise RequestError(f"the instances give different numbers of examples per input: {sizes}")
    try:
        outputs = model(feeds)
    except RequestError:
        raise
    except Exception as error:  # each runtime reports bad values (e.g. wrong size) its own way
        message = getattr(error, "message", None) or str(error)
        raise RequestError(f"the model rejected the request: {message.strip().splitlines()[0]}") from None
    outputs = {name: _json_value(np.asarray(value)) for name, value in outputs.items()}
    if not rows:
        return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    count = len(next(iter(outputs.values())))
    return {"predictions": [{name: value[i] for name, value in outputs.items()} for i in range(count)]}


def _columns_from_rows(instances, specs):
    if not isinstance(instances, list) or not instances:
        raise RequestError('"instances" must be a non-empty list of examples')
    names = list(specs)
    columns = {name: [] for name in names}
    for index, instance in enumerate(instances):
        by_name = isinstance(instance, dict) and "b64" not in instance
        if len(names) > 1 and not by_name:
            raise RequestError(
                f"instance {index} must be an object with the inputs {', '.join(names)}, as the signature has several"
            )
        if by_name:
            _check_names(instance, names, f"instance {index}")
            for name in names:
                columns[name].append(instance[name])
        else:
            columns[names[0]].append(instance)
    return columns


def _columns(inputs, specs):
    names = list(specs)
    if isinstance(inputs, dict) and "b64" not in inputs:
        _check_names(inputs, names, '"inputs"')
        return inputs
    if len(names) > 1:
        raise RequestError(f'"inputs" must be an object with the inputs {", ".join(names)}')
    return {names[0]: inputs}


def _check_names(given, names, where):
    missing = [name for name in names if name not in given]
    unknown = [name for name in given if name not in names]
    if missing or unknown:
        raise RequestError(
            f"{where} has the inputs {', '.join(map(repr, given)) or 'none'}; the signature takes "
            f"{', '.join(map(repr, names))}"
        )


def _describe(spec):
    shape = [-1 if dim is None else dim for dim in spec.shape]
    return f"shape {shape} and dtype {spec.dtype}"


def _tensor(name, value, spec, signature_name):
    """The request's value for input `name` as an array of the spec's dtype, or a RequestError."""
    expected = f"input {name!r} of signature {signature_name!r} expects {_describe(spec)} (-1: any size)"
    try:
        if spec.dtype == "string":
            array = np.asarray(_strings(value), dtype=object)
        else:
            array = np.asarray(value)
    except (ValueError, TypeError):
        raise RequestError(f"{expected}; the request's value is not a rectangular array") from None
    got = f"got shape {list(array.shape)} of {_kind(array)}"
    if array.dtype == object and spec.dtype != "string":
        raise RequestError(f"{expected}; {got}") from None
    if not spec.fits(array.shape):
        raise RequestError(f"{expected}; {got}")
    if spec.dtype == "string":
        if array.size and not all(isinstance(item, bytes) for item in array.flat):
            raise RequestError(f"{expected}; {got}")
        return array
    try:
        dtype = np.dtype(spec.dtype)
    except TypeError:
        raise RequestError(f"input {name!r} has dtype {spec.dtype}, which JSON requests cannot carry") from None
    if dtype == bool:
        if array.dtype != bool:
            raise RequestError(f"{expected}; {got}")
        return array
    if dtype.kind in "iu":
        if array.dtype.kind not in "iu":
            raise RequestError(f"{expected}; {got}")
        limits = np.iinfo(dtype)
        if array.size and (array.min() < limits.min or array.max() > limits.max):
            raise RequestError(f"{expected}; got values outside [{limits.min}, {limits.max}]")
        return array.astype(dtype)
    if dtype.kind == "f":
        if array.dtype.kind not in "iuf":
            raise RequestError(f"{expected}; {got}")
        return array.astype(dtype)
    raise RequestError(f"input {name!r} has dtype {spec.dtype}, which JSON requests cannot carry")


def _kind(array):
    if array.dtype == object:
        kinds = sorted({type(item).__name__ for item in array.flat})
        return f"{'/'.join(kinds) or 'no'} values"
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "strings"}.get(
        array.dtype.kind, array.dtype.name
    )


def _strings(value):
    """Nested lists of str / {"b64": ...} -> the same nesting of bytes; other leaves stay as they are."""
    if isinstance(value, list):
        return [_strings(item) for item in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and set(value) == {"b64"}:
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, TypeError):
            raise RequestError(f"not valid base64: {value['b64']!r}") from None
    return value


def _json_value(array):
    if array.dtype == object or array.dtype.kind == "S":
        return np.vectorize(lambda item: item.decode("utf-8", "replace"), otypes=[object])(array).tolist()
    return array.tolist()


if __name__ == "__main__":
    sys.exit(main())
