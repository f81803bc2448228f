"""Benchmark kernorm's layers against Keras's own, and both against the memory-bandwidth limit.

For each case, kernorm's layer, the equivalent `keras.layers` layer and a
streaming pass over the same tensor (`x + 1` compiled by XLA, the practical
memory-bandwidth limit) are timed on the same data in the same process,
alternating call by call. Each row reports the medians over `--calls` calls
after warm-up, the ratio kernorm/Keras and the ratio kernorm/streaming pass.

    python scripts/bench.py                    # full run, prints the table
    python scripts/bench.py --quick            # a smaller run for CI-sized checks
    python scripts/bench.py --json bench.json  # also write the rows as JSON
    python scripts/bench.py --update-readme    # full run, rewrites README.md's table

Cases: LayerNormalization on (16, 512, 768) and (64, 128, 256), BatchNormalization
(NHWC) on (64, 32, 32, 64) and (32, 56, 56, 256) in training and inference, and
RMSNormalization on (16, 512, 768); each forward and forward plus backward
(gradients for the input and the weights), in a `tf.function` with and without
`jit_compile`. Then end-to-end training steps of `resnet20` (32x32x3 images,
batch 128) and `transformer_small` (128-token sequences, batch 32), each against
the same architecture built with `keras.layers` norms, and of `lstm_tiny` with
layer norm (128-token sequences, batch 64) against the same classifier built on
`keras.layers.LSTM`: the cost of normalizing every step.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import kernorm  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

LAYER_CASES = [
    # (norm, shape, phases)
    ("layer", (16, 512, 768), ("-",)),
    ("layer", (64, 128, 256), ("-",)),
    ("batch", (64, 32, 32, 64), ("train", "infer")),
    ("batch", (32, 56, 56, 256), ("train", "infer")),
    ("rms", (16, 512, 768), ("-",)),
]
QUICK_LAYER_CASES = [
    ("layer", (16, 512, 768), ("-",)),
    ("batch", (64, 32, 32, 64), ("train", "infer")),
    ("rms", (16, 512, 768), ("-",)),
]
MODEL_CASES = [
    # (model, batch size)
    ("resnet20", 128),
    ("transformer_small", 32),
    ("lstm_tiny", 64),
]


def make_layers(norm):
    """(kernorm layer, Keras layer) with the same configuration."""
    if norm == "layer":
        return kernorm.LayerNormalization(epsilon=1e-3), keras.layers.LayerNormalization(epsilon=1e-3)
    if norm == "batch":
        return (
            kernorm.BatchNormalization(momentum=0.99, epsilon=1e-3),
            keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3),
        )
    if norm == "rms":
        return kernorm.RMSNormalization(epsilon=1e-6), keras.layers.RMSNormalization(epsilon=1e-6)
    raise ValueError(norm)


def layer_function(layer, x, upstream, phase, backward, jit_compile):
    """A compiled function running `layer` on x: forward, or forward plus the gradients."""
    training = phase == "train"
    kwargs = {"training": training} if phase in ("train", "infer") else {}
    layer(x, **kwargs)  # build
    weights = list(layer.trainable_weights)

    def forward():
        return layer(x, **kwargs)

    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, **kwargs)
        return tape.gradient(y, [x] + weights, output_gradients=upstream)

    return tf.function(forward_backward if backward else forward, jit_compile=jit_compile, autograph=False)


def sync(outputs):
    """Waits for `outputs` (a no-op on CPU, where a tf.function call returns when it is done)."""
    for t in tf.nest.flatten(outputs):
        if tf.is_tensor(t) and "GPU" in (t.device or "").upper():
            tf.test.experimental.sync_devices()
            return


def time_alternating(functions, calls, warmup):
    """Median seconds per call of each function, calling them in turn (rotating the order)."""
    names = list(functions)
    for name in names:
        for _ in range(warmup):
            sync(functions[name]())
    times = {name: [] for name in names}
    for i in range(calls):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            sync(functions[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def layer_rows(cases, calls, warmup, modes, log):
    rng = np.random.default_rng(0)
    rows = []
    for norm, shape, phases in cases:
        x = tf.constant(rng.standard_normal(shape, dtype=np.float32))
        upstream = tf.constant(rng.standard_normal(shape, dtype=np.float32))
        for jit_compile in modes:
            stream = tf.function(lambda: x + 1.0, jit_compile=True, autograph=False)
            for phase in phases:
                for backward in (False, True):
                    ours, theirs = make_layers(norm)
                    functions = {
                        "kernorm": layer_function(ours, x, upstream, phase, backward, jit_compile),
                        "keras": layer_function(theirs, x, upstream, phase, backward, jit_compile),
                        "stream": stream,
                    }
                    medians = time_alternating(functions, calls, warmup)
                    row = {
                        "case": {"layer": "LayerNorm", "batch": "BatchNorm", "rms": "RMSNorm"}[norm],
                        "shape": list(shape),
                        "phase": phase,
                        "mode": "fwd+bwd" if backward else "fwd",
                        "xla": bool(jit_compile),
                        "kernorm_ms": medians["kernorm"] * 1e3,
                        "keras_ms": medians["keras"] * 1e3,
                        "stream_ms": medians["stream"] * 1e3,
                    }
                    row["kernorm/keras"] = row["kernorm_ms"] / row["keras_ms"]
                    row["kernorm/stream"] = row["kernorm_ms"] / row["stream_ms"]
                    rows.append(row)
                    log(format_row(row))
    return rows


def model_function(name, norm, batch_size, jit_compile, rng):
    """A compiled training step of the zoo model `name` with `norm`, and its data."""
    from kernorm import models

    if name.startswith("resnet"):
        model = models.get(name, input_shape=(32, 32, 3), num_classes=10, norm=norm)
        x = rng.standard_normal((batch_size, 32, 32, 3), dtype=np.float32)
        y = rng.integers(0, 10, (batch_size,))
    else:
        if norm is keras.layers.LSTM:
            model = keras_lstm_classifier(name, vocab_size=20000, num_classes=2)
        else:
            model = models.get(name, vocab_size=20000, sequence_length=128, num_classes=2, norm=norm)
        x = rng.integers(1, 20000, (batch_size, 128))
        y = rng.integers(0, 2, (batch_size,))
    if norm is not keras.layers.LSTM:
        expected = kernorm if isinstance(norm, str) else keras
        norms = [layer for layer in model._flatten_layers() if "Normalization" in type(layer).__name__]
        wrong = [type(layer) for layer in norms if not type(layer).__module__.startswith(expected.__name__)]
        if not norms or wrong:
            raise RuntimeError(f"{name} with norm={norm!r} holds the wrong norm layers: {wrong or 'none'}")
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    x, y = tf.constant(x), tf.constant(y)
    return lambda: model.train_on_batch(x, y)


def keras_lstm_classifier(name, vocab_size, num_classes):
    """The zoo's LSTM classifier `name` built on `keras.layers.LSTM`: the same sizes, no norm."""
    from kernorm import models

    config = models.registry.defaults(name)
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(vocab_size, config.get("embedding_dim") or config["units"], mask_zero=True)(tokens)
    x = keras.layers.Dropout(config["dropout"])(x)
    x = keras.layers.LSTM(config["units"], return_sequences=True)(x)
    x = models.MaskedGlobalAveragePooling1D()(x)  # the mask comes with the LSTM's outputs
    x = keras.layers.Dropout(config["dropout"])(x)
    return keras.Model(tokens, keras.layers.Dense(num_classes)(x))


def model_rows(cases, calls, warmup, modes, log):
    rng = np.random.default_rng(0)
    rows = []
    keras_norms = {
        "resnet": keras.layers.BatchNormalization,
        "transformer": keras.layers.LayerNormalization,
        "rnn": keras.layers.LSTM,  # no norm at all: the row shows what normalizing every step costs
    }
    for name, batch_size in cases:
        family = "resnet" if name.startswith("resnet") else "rnn" if "lstm" in name else "transformer"
        ours = "batch" if family == "resnet" else "layer"
        for jit_compile in modes:
            try:
                functions = {
                    "kernorm": model_function(name, ours, batch_size, jit_compile, rng),
                    "keras": model_function(name, keras_norms[family], batch_size, jit_compile, rng),
                }
                medians = time_alternating(functions, calls, warmup)
            except Exception as error:  # the zoo may lack a model; report it and go on
                log(f"  {name} (xla={jit_compile}) skipped: {type(error).__name__}: {error}")
                continue
            row = {
                "case": name,
                "shape": [batch_size],
                "phase": "train step",
                "mode": "fit step",
                "xla": bool(jit_compile),
                "kernorm_ms": medians["kernorm"] * 1e3,
                "keras_ms": medians["keras"] * 1e3,
                "stream_ms": None,
            }
            row["kernorm/keras"] = row["kernorm_ms"] / row["keras_ms"]
            row["kernorm/stream"] = None
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(row):
    shape = "x".join(str(s) for s in row["shape"])
    stream = "" if row["kernorm/stream"] is None else f"{row['kernorm/stream']:.2f}"
    phase = "" if row["phase"] == "-" else row["phase"]
    xla = "XLA" if row["xla"] else "graph"
    return (
        f"| {row['case']} | {shape} | {phase} | {row['mode']} | {xla} | {row['kernorm_ms']:.2f} | "
        f"{row['keras_ms']:.2f} | **{row['kernorm/keras']:.2f}** | {stream} |"
    )


TABLE_HEADER = (
    "| case | shape | phase | pass | compiled | kernorm ms | Keras ms | kernorm/Keras | kernorm/stream |\n"
    "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"
)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = tf.config.list_logical_devices("GPU")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": [d.name for d in gpus],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": datetime.date.today().isoformat(),
        "load_average": _load_average(),
    }


def _load_average():
    """The 1-minute load average, a sign of other work sharing the cores (None where unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def markdown(rows, info, args):
    command = "python scripts/bench.py" + (" --quick" if args.quick else "")
    device = f"{info['cores']} CPU cores ({info['cpu']})" + (f", {len(info['gpus'])} GPU" if info["gpus"] else "")
    load = info.get("load_average_end", info["load_average"])
    busy = "" if load is None else f" (load average {info['load_average']} at the start, {load} at the end)"
    lines = [
        f"Measured {info['date']} on {device}{busy}, TensorFlow {info['tensorflow']}, Keras {info['keras']}, "
        f"float32, by `{command}`; medians over {args.calls} calls after {args.warmup} warm-up calls "
        f"({args.model_calls} training steps for the models).",
        "",
        TABLE_HEADER,
        *(format_row(row) for row in rows),
    ]
    return "\n".join(lines)


def update_readme(text):
    content = README.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(content):
        raise SystemExit(f"README.md has no {START} ... {END} block to update")
    README.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", content, count=1))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and calls: a CI-sized check")
    parser.add_argument("--json", metavar="PATH", help="write the rows (and the machine) as JSON to PATH")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--calls", type=int, help="timed calls per function (default 30; 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3; 2 with --quick and for models)")
    parser.add_argument("--model-calls", type=int, help="timed training steps (default 20; 3 with --quick)")
    parser.add_argument("--no-layers", action="store_true", help="skip the layer cases")
    parser.add_argument("--no-models", action="store_true", help="skip the end-to-end training steps")
    parser.add_argument(
        "--models", nargs="+", metavar="NAME", help=f"only these training steps, of {', '.join(n for n, _ in MODEL_CASES)}"
    )
    parser.add_argument("--no-xla", action="store_true", help="only time tf.function without jit_compile")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models or ()) - {name for name, _ in MODEL_CASES})
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(n for n, _ in MODEL_CASES)}")
    args.calls = args.calls or (5 if args.quick else 30)
    args.warmup = args.warmup or (2 if args.quick else 3)
    args.model_calls = args.model_calls or (3 if args.quick else 20)
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    info = machine()
    modes = (False,) if args.no_xla else (False, True)

    def log(line):
        print(line, flush=True)

    log(f"kernorm bench on {info['cores']} cores ({info['cpu']}), TF {info['tensorflow']}, Keras {info['keras']}")
    log(TABLE_HEADER)
    rows = []
    if not args.no_layers:
        cases = QUICK_LAYER_CASES if args.quick else LAYER_CASES
        rows += layer_rows(cases, args.calls, args.warmup, modes, log)
    if not args.no_models:
        cases = MODEL_CASES[:1] if args.quick else MODEL_CASES
        if args.models:
            cases = [case for case in MODEL_CASES if case[0] in args.models]
        rows += model_rows(cases, args.model_calls, min(args.warmup, 2), modes, log)
    elapsed = time.perf_counter() - start
    info["load_average_end"] = _load_average()
    log(f"done in {elapsed:.0f} s")
    if args.json:
        payload = {"machine": info, "calls": args.calls, "warmup": args.warmup, "quick": args.quick,
                   "seconds": elapsed, "rows": rows}
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.update_readme:
        update_readme(markdown(rows, info, args))
        log(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
