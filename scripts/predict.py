"""Serve a SavedModel on a TF Serving REST request body, without kernorm.

    python scripts/predict.py runs/fashion_convnet/saved_model --input request.json
    echo '{"instances": ["a gripping, funny film"]}' | python scripts/predict.py runs/sst2/saved_model

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

Only TensorFlow is imported: the SavedModel must carry everything it needs.
A request that does not fit the signature gets a one-line error naming the
expected shape and dtype, and exit status 1.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import base64  # noqa: E402
import binascii  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

DEFAULT_SIGNATURE = "serving_default"


class RequestError(ValueError):
    """The request does not fit the model; the message is one line for the user."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Run a SavedModel on a TF Serving REST request body (JSON) and print the TF Serving response.",
    )
    parser.add_argument("saved_model", help="the SavedModel folder, e.g. runs/NAME/saved_model")
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
        loaded = _load(args.saved_model)
        response = predict(_signature(loaded, signature_name), body, signature_name)
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


def _load(path):
    # Imported here so that a malformed request fails fast, before TensorFlow loads.
    import tensorflow as tf

    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise RequestError(f"no SavedModel at {path} (no saved_model.pb there)")
    return tf.saved_model.load(path)


def _signature(loaded, name):
    # The caller keeps `loaded`: its variables die with it.
    if name not in loaded.signatures:
        raise RequestError(
            f"the SavedModel has no signature {name!r}; it has: {', '.join(sorted(loaded.signatures)) or 'none'}"
        )
    return loaded.signatures[name]


def input_specs(signature):
    """{name: tf.TensorSpec} of a signature's inputs."""
    _, specs = signature.structured_input_signature
    return dict(specs)


def predict(signature, body, signature_name=DEFAULT_SIGNATURE):
    """Runs `signature` on a TF Serving request `body`; returns the response dict."""
    specs = input_specs(signature)
    rows = "instances" in body
    columns = _columns_from_rows(body["instances"], specs) if rows else _columns(body["inputs"], specs)
    feeds = {name: _tensor(name, value, specs[name], signature_name) for name, value in columns.items()}
    if rows:
        sizes = {name: feed.shape[0] if feed.ndim else None for name, feed in feeds.items()}
        if len(set(sizes.values())) > 1:
            raise RequestError(f"the instances give different numbers of examples per input: {sizes}")
    try:
        outputs = signature(**feeds)
    except Exception as error:  # TF reports bad values (e.g. wrong size) as InvalidArgumentError
        message = getattr(error, "message", None) or str(error)
        raise RequestError(f"the model rejected the request: {message.strip().splitlines()[0]}") from None
    outputs = {name: _json_value(tensor.numpy()) for name, tensor in outputs.items()}
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
    shape = [-1 if dim is None else dim for dim in spec.shape.as_list()]
    return f"shape {shape} and dtype {spec.dtype.name}"


def _tensor(name, value, spec, signature_name):
    """The request's value for input `name` as an array of the spec's dtype, or a RequestError."""
    expected = f"input {name!r} of signature {signature_name!r} expects {_describe(spec)} (-1: any size)"
    dtype = spec.dtype
    try:
        if dtype.name == "string":
            array = np.asarray(_strings(value), dtype=object)
        else:
            array = np.asarray(value)
    except (ValueError, TypeError):
        raise RequestError(f"{expected}; the request's value is not a rectangular array") from None
    got = f"got shape {list(array.shape)} of {_kind(array)}"
    if array.dtype == object and dtype.name != "string":
        raise RequestError(f"{expected}; {got}") from None
    if not spec.shape.is_compatible_with(array.shape):
        raise RequestError(f"{expected}; {got}")
    if dtype.name == "string":
        if array.size and not all(isinstance(item, bytes) for item in array.flat):
            raise RequestError(f"{expected}; {got}")
        return array
    if dtype.is_bool:
        if array.dtype != bool:
            raise RequestError(f"{expected}; {got}")
        return array
    if dtype.is_integer:
        if array.dtype.kind not in "iu":
            raise RequestError(f"{expected}; {got}")
        if array.size and (array.min() < dtype.min or array.max() > dtype.max):
            raise RequestError(f"{expected}; got values outside [{dtype.min}, {dtype.max}]")
        return array.astype(dtype.as_numpy_dtype)
    if dtype.is_floating:
        if array.dtype.kind not in "iuf":
            raise RequestError(f"{expected}; {got}")
        return array.astype(dtype.as_numpy_dtype)
    raise RequestError(f"input {name!r} has dtype {dtype.name}, which JSON requests cannot carry")


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
