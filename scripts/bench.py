"""Benchmark kernorm's layers against Keras's own, and both against the memory-bandwidth limit.

For each case, kernorm's layer, the equivalent `keras.layers` layer and a
streaming pass over the same tensor (`x + 1` compiled by XLA, the practical
memory-bandwidth limit) are timed on the same data in the same process, in
steady state: each function is called back to back for about `--seconds`
(as a training loop or a server calls it), the functions in turn, for
`--rounds` rounds. Each row reports the median time per call over the rounds
and each ratio as its median and range over the rounds (ratios are taken
round by round, so a slow spell of the machine moves both sides).

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
the same architecture built with `keras.layers` norms, and of `lstm_tiny`
(128-token sequences, batch 64) against the same classifier built on
`keras.layers.LSTM`: without a norm, like with like; with layer norm, in a
table of its own, the cost of normalizing every step.

Then the serving section: the exported SavedModel (`model.export`) of
`convnet`, `resnet20`, `resnet50` at 64x64 and `transformer_tiny`, at batch 1
and 32, with kernorm's norms (as they are, and folded by
`kernorm.fold_batch_norm`), with Keras's norms and the same weights, and with
no norm at all (the bound for folding). Each variant is called back to back,
as a server calls it, for about half a second per round, the variants in
turn; each ratio is given as its median and range over the rounds. Last, the
op counts of the TFLite models that `scripts/train.py --tflite` writes.
"""

import argparse
import datetime
import functools
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
from kernorm import _private  # noqa: E402

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
    # (model, batch size, kernorm's norm): each against the same model with Keras's norm; the LSTMs
    # against the same classifier on keras.layers.LSTM, which has no norm (see model_rows)
    ("resnet20", 128, "batch"),
    ("transformer_small", 32, "layer"),
    ("lstm_tiny", 64, None),
    ("lstm_tiny", 64, "layer"),
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


def layer_rows(cases, rounds, warmup, seconds, modes, log):
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
                    case = {"layer": "LayerNorm", "batch": "BatchNorm", "rms": "RMSNorm"}[norm]
                    row = timed_row(functions, rounds, warmup, seconds, case, list(shape), phase,
                                    "fwd+bwd" if backward else "fwd", jit_compile)
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
    if norm not in (keras.layers.LSTM, None):
        expected = kernorm if isinstance(norm, str) else keras
        norms = [layer for layer in _private.all_layers(model) if "Normalization" in type(layer).__name__]
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


def model_rows(cases, rounds, warmup, seconds, modes, log):
    """Training steps of kernorm's zoo models against the same models with Keras's norms. Keras has no
    normalized LSTM: `lstm_tiny` without a norm is timed against the classifier on `keras.layers.LSTM` (the
    same computation), and with layer norm against it too, a row marked `cost`: what normalizing every step
    costs, not a comparison of like with like."""
    rng = np.random.default_rng(0)
    rows = []
    keras_norms = {
        "resnet": keras.layers.BatchNormalization,
        "transformer": keras.layers.LayerNormalization,
        "rnn": keras.layers.LSTM,
    }
    for name, batch_size, norm in cases:
        family = "resnet" if name.startswith("resnet") else "rnn" if "lstm" in name else "transformer"
        phase = "train step" if family != "rnn" else f"train step, {norm or 'no'} norm"
        for jit_compile in modes:
            try:
                functions = {
                    "kernorm": model_function(name, norm, batch_size, jit_compile, rng),
                    "keras": model_function(name, keras_norms[family], batch_size, jit_compile, rng),
                }
                row = timed_row(functions, rounds, warmup, seconds, name, [batch_size], phase, "fit step", jit_compile)
            except Exception as error:  # the zoo may lack a model; report it and go on
                log(f"  {name} (xla={jit_compile}) skipped: {type(error).__name__}: {error}")
                continue
            row["cost"] = family == "rnn" and norm is not None
            rows.append(row)
            log(format_row(row))
    return rows


SERVING_CASES = [
    # (model, one example's shape: an image, or token ids)
    ("convnet", (28, 28, 1)),
    ("resnet20", (32, 32, 3)),
    ("resnet50", (64, 64, 3)),
    ("transformer_tiny", (64,)),
]
SERVING_BATCHES = (1, 32)
SERVING_START, SERVING_END = "<!-- serving:start -->", "<!-- serving:end -->"


def serving_variants(name, shape, rng):
    """{variant: keras.Model} of the zoo model `name`, one architecture with the same weights: kernorm's
    norms ("kernorm"), the same folded ("folded"; batch norm only), Keras's ("keras") and none ("norm-free")."""
    from kernorm import models

    text = name.startswith("transformer")

    def build(norm):
        if text:
            return models.get(name, vocab_size=20000, sequence_length=shape[0], num_classes=2, norm=norm)
        return models.get(name, input_shape=shape, num_classes=10, norm=norm)

    ours = build("layer" if text else "batch")
    for layer in _private.all_layers(ours):  # statistics away from 0 and 1, as after training
        if isinstance(layer, kernorm.BatchNormalization):
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.2, size))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size))
    # Keras's layer with the epsilon the zoo gives its own (1e-5 in the ResNets, where Keras's default is 1e-3).
    kinds = (kernorm.BatchNormalization, kernorm.LayerNormalization)
    epsilon = next(layer.epsilon for layer in _private.all_layers(ours) if isinstance(layer, kinds))
    keras_norm = keras.layers.LayerNormalization if text else keras.layers.BatchNormalization
    theirs = build(functools.partial(keras_norm, epsilon=epsilon))
    theirs.set_weights(ours.get_weights())
    variants = {"kernorm": ours, "keras": theirs, "norm-free": build(None)}
    if not text:
        variants["folded"] = kernorm.fold_batch_norm(ours)
    return variants


def serving_inputs(name, shape, batch, rng):
    if name.startswith("transformer"):
        return tf.constant(rng.integers(1, 20000, (batch, *shape)), tf.int32)
    return tf.constant(rng.standard_normal((batch, *shape), dtype=np.float32))


def exported(model, spec, folder):
    """`model.export`ed as a SavedModel under `folder` and loaded back, as a server loads it."""
    path = str(pathlib.Path(folder) / model.name)
    model.export(path, verbose=False, input_signature=[spec])
    return tf.saved_model.load(path)


def time_steady(functions, rounds, warmup, seconds):
    """Seconds per call of each function in each round: in a round each function runs back to back for about
    `seconds` (the count set from its warm-up calls), the functions in turn, the order rotated each round."""
    names = list(functions)
    counts = {}
    for name in names:
        start = time.perf_counter()
        for _ in range(warmup):
            sync(functions[name]())
        counts[name] = max(3, min(500, round(seconds * warmup / max(time.perf_counter() - start, 1e-6))))
    per_round = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            start = time.perf_counter()
            for _ in range(counts[name]):
                sync(functions[name]())
            per_round[name].append((time.perf_counter() - start) / counts[name])
    return per_round


def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def timed_row(functions, rounds, warmup, seconds, case, shape, phase, mode, jit_compile):
    """A table row from timing `functions` ("kernorm", "keras" and optionally "stream") in steady state."""
    per_round = time_steady(functions, rounds, warmup, seconds)
    row = {"case": case, "shape": shape, "phase": phase, "mode": mode, "xla": bool(jit_compile), "rounds": rounds}
    for name in ("kernorm", "keras", "stream"):
        row[f"{name}_ms"] = statistics.median(per_round[name]) * 1e3 if name in per_round else None
    for name in ("keras", "stream"):
        row[f"kernorm/{name}"] = (
            _spread([k / t for k, t in zip(per_round["kernorm"], per_round[name])]) if name in per_round else None
        )
    return row


def serving_rows(cases, rounds, warmup, seconds, log):
    """One row per model and batch size: each variant's ms, and its ratios to Keras's export per round."""
    import tempfile

    rng = np.random.default_rng(0)
    rows = []
    for name, shape in cases:
        variants = serving_variants(name, shape, rng)
        dtype = tf.int32 if name.startswith("transformer") else tf.float32
        with tempfile.TemporaryDirectory() as folder:
            spec = tf.TensorSpec((None, *shape), dtype)
            loaded = {variant: exported(model, spec, f"{folder}/{variant}") for variant, model in variants.items()}
            for batch in SERVING_BATCHES:
                x = serving_inputs(name, shape, batch, rng)
                expected = variants["keras"](x, training=False)
                for variant in ("kernorm", "folded"):
                    if variant in loaded:  # the exports compute the same function as Keras's
                        error = np.max(np.abs(loaded[variant].serve(x) - expected)) / np.max(np.abs(expected))
                        if error > 1e-4:
                            raise RuntimeError(f"{name} {variant} export differs from Keras's by {error:.2g}")
                functions = {variant: (lambda m=model: m.serve(x)) for variant, model in loaded.items()}
                per_round = time_steady(functions, rounds, warmup, seconds)
                row = {"case": name, "shape": list(shape), "batch": batch, "rounds": rounds}
                for variant, times in per_round.items():
                    row[f"{variant}_ms"] = _spread([t * 1e3 for t in times])
                    ratios = [t / k for t, k in zip(times, per_round["keras"])]
                    row[f"{variant}/keras"] = _spread(ratios)
                if "folded" in per_round:
                    row["folded/norm-free"] = _spread(
                        [f / n for f, n in zip(per_round["folded"], per_round["norm-free"])]
                    )
                rows.append(row)
                log(format_serving_row(row))
    return rows


def tflite_op_counts(cases, log):
    """{model: {variant: {op: count}}} of the TFLite models converted as `scripts/train.py --tflite` does
    (from an export traced with kernorm's fast paths off)."""
    import tempfile

    rng = np.random.default_rng(1)
    counts = {}
    for name, shape in cases:
        variants = serving_variants(name, shape, rng)
        dtype = tf.int32 if name.startswith("transformer") else tf.float32
        counts[name] = {}
        for variant, model in variants.items():
            previous = kernorm.ops.set_fast_paths(False)
            try:
                with tempfile.TemporaryDirectory() as folder:
                    model.export(folder, verbose=False, input_signature=[tf.TensorSpec((None, *shape), dtype)])
                    flatbuffer = tf.lite.TFLiteConverter.from_saved_model(folder).convert()
            finally:
                kernorm.ops.set_fast_paths(previous)
            counts[name][variant] = dict(_private.tflite_op_counts(flatbuffer).most_common())
        log(format_tflite_row(name, counts[name]))
    return counts


def _ratio(spread):
    return f"{spread['median']:.2f} ({spread['min']:.2f}–{spread['max']:.2f})"


def _bold_if_faster(ratio, text):
    """Bold marks where kernorm is at least as fast as the comparison (a ratio of at most 1)."""
    return f"**{text}**" if ratio <= 1.0 else text


def format_serving_row(row):
    folded = row.get("folded/keras")
    return (
        f"| {row['case']} | {'x'.join(map(str, row['shape']))} | {row['batch']} | "
        f"{row['kernorm_ms']['median']:.2f} | {row['keras_ms']['median']:.2f} | "
        f"{_bold_if_faster(row['kernorm/keras']['median'], _ratio(row['kernorm/keras']))} | "
        f"{'' if folded is None else _bold_if_faster(folded['median'], _ratio(folded))} | {_ratio(row['norm-free/keras'])} | "
        f"{'' if folded is None else _ratio(row['folded/norm-free'])} |"
    )


SERVING_HEADER = (
    "| model | example | batch | kernorm ms | Keras ms | kernorm/Keras | folded/Keras | norm-free/Keras "
    "| folded/norm-free |\n"
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)
TFLITE_VARIANTS = ("kernorm", "folded", "keras", "norm-free")


def format_tflite_row(name, counts):
    def cell(variant):
        ops = counts.get(variant)
        if ops is None:
            return ""
        top = ", ".join(f"{op} {count}" for op, count in list(ops.items())[:4])
        return f"{sum(ops.values())} ({top}{', ...' if len(ops) > 4 else ''})"

    return f"| {name} | " + " | ".join(cell(variant) for variant in TFLITE_VARIANTS) + " |"


TFLITE_HEADER = (
    "| model | kernorm | kernorm folded | Keras | norm-free |\n"
    "| --- | --- | --- | --- | --- |"
)


def serving_markdown(rows, counts, info, args):
    lines = [
        measured(info, args, "each export called back to back") + " Bold: kernorm at least as fast as Keras.",
        "",
        SERVING_HEADER,
        *(format_serving_row(row) for row in rows),
    ]
    if counts:
        lines += ["", "TFLite ops (as `scripts/train.py --tflite` converts):", "", TFLITE_HEADER]
        lines += [format_tflite_row(name, model_counts) for name, model_counts in counts.items()]
    return "\n".join(lines)


def format_row(row):
    shape = "x".join(str(s) for s in row["shape"])
    stream = "" if row["kernorm/stream"] is None else f"{row['kernorm/stream']['median']:.2f}"
    phase = "" if row["phase"] == "-" else row["phase"]
    xla = "XLA" if row["xla"] else "graph"
    return (
        f"| {row['case']} | {shape} | {phase} | {row['mode']} | {xla} | {row['kernorm_ms']:.2f} | "
        f"{row['keras_ms']:.2f} | {_bold_if_faster(row['kernorm/keras']['median'], _ratio(row['kernorm/keras']))} | {stream} |"
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


def measured(info, args, what):
    """The line above a table: the machine, the versions, the command and how it timed `what`."""
    command = "python scripts/bench.py" + (" --quick" if args.quick else "")
    command += " --only-serving" if args.only_serving else ""
    if args.rounds != (3 if args.quick else 9):
        command += f" --rounds {args.rounds}"
    device = f"{info['cores']} CPU cores ({info['cpu']})" + (f", {len(info['gpus'])} GPU" if info["gpus"] else "")
    load = info.get("load_average_end", info["load_average"])
    busy = "" if load is None else f" (load average {info['load_average']} at the start, {load} at the end)"
    return (
        f"Measured {info['date']} on {device}{busy}, TensorFlow {info['tensorflow']}, Keras {info['keras']}, "
        f"float32, by `{command}`: {what} for about {args.seconds:g} s per round (at least 3 calls), "
        f"{args.rounds} rounds in turn, after {args.warmup} warm-up calls; times are medians over the rounds, "
        "ratios the median (min–max) of the rounds' ratios."
        + (" A --quick run is short: its ratios move by 0.1 or more from run to run." if args.quick else "")
    )


def markdown(rows, info, args):
    lines = [
        measured(info, args, "each function called back to back") + " Bold: kernorm at least as fast as Keras.",
        "",
        TABLE_HEADER,
        *(format_row(row) for row in rows if not row.get("cost")),
    ]
    costs = [row for row in rows if row.get("cost")]
    if costs:
        lines += [
            "",
            "The cost of a norm at every step (Keras has no normalized LSTM: the same classifier on "
            "`keras.layers.LSTM`, without a norm, is the comparison):",
            "",
            TABLE_HEADER.replace("kernorm/Keras", "kernorm/Keras (no norm)"),
            *(format_row(row) for row in costs),
        ]
    return "\n".join(lines)


def update_readme(text, start=START, end=END):
    content = README.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        raise SystemExit(f"README.md has no {start} ... {end} block to update")
    README.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content, count=1))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and calls: a CI-sized check")
    parser.add_argument("--json", metavar="PATH", help="write the rows (and the machine) as JSON to PATH")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--rounds", type=int, help="rounds, each function in turn (default 9; 3 with --quick)")
    parser.add_argument(
        "--seconds", type=float, help="seconds of back-to-back calls per function and round (default 0.5; 0.2 with --quick)"
    )
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3; 2 with --quick and for models)")
    parser.add_argument("--no-layers", action="store_true", help="skip the layer cases")
    parser.add_argument("--no-models", action="store_true", help="skip the end-to-end training steps")
    parser.add_argument(
        "--models", nargs="+", metavar="NAME", help=f"only these training steps, of {', '.join(sorted({case[0] for case in MODEL_CASES}))}"
    )
    parser.add_argument("--no-xla", action="store_true", help="only time tf.function without jit_compile")
    serving = parser.add_mutually_exclusive_group()
    serving.add_argument("--no-serving", action="store_true", help="skip the serving section")
    serving.add_argument("--only-serving", action="store_true", help="only the serving section")
    args = parser.parse_args(argv)
    names = sorted({case[0] for case in MODEL_CASES})
    unknown = sorted(set(args.models or ()) - set(names))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.seconds = args.seconds or (0.2 if args.quick else 0.5)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: the tables report the spread over the rounds")
    if args.only_serving:
        args.no_layers = args.no_models = True
    args.warmup = args.warmup or (2 if args.quick else 3)
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
        rows += layer_rows(cases, args.rounds, args.warmup, args.seconds, modes, log)
    if not args.no_models:
        cases = MODEL_CASES[:1] if args.quick else MODEL_CASES
        if args.models:
            cases = [case for case in MODEL_CASES if case[0] in args.models]
        rows += model_rows(cases, args.rounds, min(args.warmup, 2), args.seconds, modes, log)
    serving, op_counts = [], {}
    if not args.no_serving:
        cases = SERVING_CASES[1:2] if args.quick else SERVING_CASES
        log("\nServing: exported SavedModels, called back to back")
        log(SERVING_HEADER)
        serving = serving_rows(cases, args.rounds, args.warmup, args.seconds, log)
        if not args.quick:
            log(TFLITE_HEADER)
            op_counts = tflite_op_counts(cases, log)
    elapsed = time.perf_counter() - start
    info["load_average_end"] = _load_average()
    log(f"done in {elapsed:.0f} s")
    if args.json:
        payload = {"machine": info, "rounds": args.rounds, "seconds_per_round": args.seconds, "warmup": args.warmup,
                   "quick": args.quick, "elapsed_s": elapsed, "rows": rows, "serving": serving, "tflite_ops": op_counts}
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.update_readme:
        if rows:
            update_readme(markdown(rows, info, args))
        if serving:
            update_readme(serving_markdown(serving, op_counts, info, args), SERVING_START, SERVING_END)
        log(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
