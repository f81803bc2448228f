"""The study: measured figures behind the rules that batch-norm and layer-norm users repeat.

    python scripts/study.py --out runs/study            # the default study: 50 min on 2 busy cores
    python scripts/study.py --quick --out runs/quick    # every experiment, small: 1 to 3 min on 2 cores
    python scripts/study.py --out docs/study --update-readme   # redraw the committed run, rewrite the README block

Measured on 2 CPU cores shared with other work (load average 4 to 8): the default study took 50 min
of wall time and 38 min of CPU time, so it fits an hour on 2 idle cores; --quick took 69 s at a
load of 2 and 3 min at a load of 7.

Every cell trains through `kernorm.training.run`, the library behind scripts/train.py, for one
pass over the same number of training examples whatever its batch size, with the learning rate
scaled linearly with the batch size (as the Group Normalization paper does). The experiments:

1. batch_size: ConvNet on Fashion-MNIST, each norm (batch, batch renorm, ghost batch, group,
   layer, instance, none) at batch sizes 2 to 64, two seeds.
2. online: batch size 1; where batch norm gets one value per channel (after a Dense layer) it
   raises kernorm's error, and the cell is recorded as "cannot train".
3. inference: in the batch-norm cells of 1 and 2, the validation accuracy with the moving
   statistics, with the batch statistics, and after `kernorm.recalibrate_batch_norm`.
4. transformer: a 6-block `transformer_classifier` on SST-2, norm (layer, rms, batch, none) x
   post-norm / pre-norm x without / with warm-up; and (gradients) the gradient norm of each
   block's parameters at initialization, with each block's output RMS.
5. rnn: `lstm_tiny` on SST-2 with norm layer, batch and none.

The study folder (--out) holds:

    study.json            the scale it was started with (a rerun must use the same)
    results.csv           one row per finished cell, written atomically when the cell ends
    cells/KEY/            each cell's run folder (history.csv, metrics.json, TensorBoard logs)
    *.png                 the figures
    report.md             each rule, the measured figures and a verdict

Running the same command again skips the cells already in results.csv, so a killed study
resumes where it stopped; with every cell done it only redraws the figures and the report.
"""

import argparse
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import shutil
import sys
import time

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
README_START, README_END = "<!-- study:start -->", "<!-- study:end -->"
EXPERIMENTS = ("batch_size", "online", "transformer", "gradients", "rnn")
CNN_NORMS = ("batch", "renorm", "ghost", "group", "layer", "instance", "none")
BATCH_NORMS = ("batch", "renorm", "ghost")
#: Ghost batch norm normalizes each run of this many examples on its own (Hoffer et al. 2017);
#: at batch sizes up to it, it is batch norm itself, so it has cells only above it.
GHOST_BATCH = 8
#: Batch renorm's clipping, the end of Ioffe's schedule (rmax 1 -> 3, dmax 0 -> 5).
RENORM_CLIPPING = {"rmax": 3.0, "dmax": 5.0}
#: SGD's peak learning rate per 32 examples in a batch (the GN paper's 0.1 per 32 images), linear in the batch.
SGD_RATE_PER_32 = 0.1
TRANSFORMER_NORMS = ("layer", "rms", "batch", "none")
RNN_NORMS = ("layer", "batch", "none")
STATUS_OK, STATUS_CANNOT_TRAIN, STATUS_DIVERGED = "ok", "cannot train", "diverged"
COLUMNS = (
    "experiment", "cell", "model", "dataset", "arm", "norm", "norm_first", "warmup_steps", "batch_size", "seed",
    "optimizer", "learning_rate", "train_examples", "validation_examples", "steps", "parameters", "status",
    "train_accuracy", "train_loss", "val_accuracy", "val_loss", "val_accuracy_batch_stats", "val_loss_batch_stats",
    "val_accuracy_recalibrated", "val_loss_recalibrated", "block_grad_norms", "block_output_rms",
    "examples_per_second", "wall_seconds", "error",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big the study is: the grids, the seeds and the examples each cell trains on.

    Why the default sizes: the whole study must run in an hour on 2 CPU cores. A batch-2 step of the
    ConvNet takes about 10 ms there, so 6,144 examples (3,072 steps) cost about half a minute, and
    the 78 cells of the batch-size grid about 20 minutes. The ConvNet on Fashion-MNIST reaches about
    83% in that budget; ResNet-20 costs about five times more per CIFAR-10 image and stays near 40%,
    too close to chance for norms to differ. The Transformer has 6 blocks, the depth at which
    Xiong et al. see post-norm need warm-up, and its 16 arms take one seed (about 40 s each); the
    text cells see 8,192 SST-2 sentences, enough for 75% or so.
    """

    name: str
    seeds: tuple
    batch_sizes: tuple
    cnn_norms: tuple
    online_norms: tuple
    online_mlp_norms: tuple
    cnn_examples: int  # training examples per image cell, whatever its batch size
    image_eval_examples: int
    recalibration_examples: int
    text_examples: int
    text_eval_examples: int | None
    sequence_length: int
    text_batch_size: int
    transformer_layers: int
    transformer_norms: tuple
    transformer_seeds: tuple
    warmup_fraction: float
    text_learning_rate: float
    rnn_norms: tuple
    gradient_batches: int


DEFAULT = Scale(
    name="default",
    seeds=(0, 1),
    batch_sizes=(2, 4, 8, 16, 32, 64),
    cnn_norms=CNN_NORMS,
    online_norms=("batch", "group", "layer", "instance"),
    online_mlp_norms=("batch", "layer"),
    cnn_examples=6144,
    image_eval_examples=2000,
    recalibration_examples=2048,
    text_examples=8192,
    text_eval_examples=None,  # all 872 SST-2 validation sentences
    sequence_length=32,
    text_batch_size=32,
    transformer_layers=6,
    transformer_norms=TRANSFORMER_NORMS,
    transformer_seeds=(0,),
    warmup_fraction=0.1,
    text_learning_rate=2e-3,
    rnn_norms=RNN_NORMS,
    gradient_batches=4,
)
QUICK = Scale(
    name="quick",
    seeds=(0,),
    batch_sizes=(2, 16),
    cnn_norms=("batch", "ghost", "layer"),
    online_norms=("batch", "layer"),
    online_mlp_norms=("batch",),
    cnn_examples=512,
    image_eval_examples=256,
    recalibration_examples=128,
    text_examples=512,
    text_eval_examples=256,
    sequence_length=16,
    text_batch_size=32,
    transformer_layers=2,
    transformer_norms=("layer",),
    transformer_seeds=(0,),
    warmup_fraction=0.1,
    text_learning_rate=2e-3,
    rnn_norms=("layer", "batch"),
    gradient_batches=1,
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run (or one gradient measurement) of the study, for one seed."""

    experiment: str
    arm: str  # the norm as the study names it: "renorm" and "ghost" are batch norm with an option
    model: str
    dataset: str
    batch_size: int
    seed: int
    optimizer: str
    learning_rate: float
    examples: int
    norm_first: bool | None = None
    warmup: bool = False

    @property
    def key(self):
        parts = [self.experiment, self.model, self.arm]
        if self.norm_first is not None:
            parts.append("pre" if self.norm_first else "post")
            if self.experiment == "transformer":
                parts.append("warmup" if self.warmup else "nowarmup")
        return "/".join([*parts, f"b{self.batch_size}", f"s{self.seed}"])

    @property
    def norm(self):
        return "batch" if self.arm in BATCH_NORMS else self.arm

    @property
    def norm_kwargs(self):
        if self.arm == "renorm":
            return {"renorm": True, "renorm_clipping": RENORM_CLIPPING}
        if self.arm == "ghost":
            return {"virtual_batch_size": GHOST_BATCH}
        return {}

    @property
    def is_batch_norm(self):
        return self.norm == "batch"

    @property
    def steps(self):
        return max(1, self.examples // self.batch_size)


def sgd_rate(batch_size):
    """The linear scaling rule: `SGD_RATE_PER_32` for every 32 examples in a batch."""
    return SGD_RATE_PER_32 * batch_size / 32


def plan(scale, experiments=EXPERIMENTS):
    """Every cell of the study at `scale`, for the chosen `experiments`, in the order they run."""
    cells = []

    def image(experiment, model, arm, batch_size, seed):
        cells.append(
            Cell(
                experiment, arm, model, "fashion_mnist", batch_size, seed, "sgd", sgd_rate(batch_size),
                scale.cnn_examples,
            )
        )

    def text(experiment, model, arm, seed, norm_first=None, warmup=False):
        cells.append(
            Cell(
                experiment, arm, model, "glue/sst2", scale.text_batch_size, seed, "adamw", scale.text_learning_rate,
                scale.text_examples, norm_first, warmup,
            )
        )  # fmt: skip

    # Seed by seed: a study stopped early has every experiment for its first seeds.
    for seed in sorted({*scale.seeds, *scale.transformer_seeds}):
        if "batch_size" in experiments and seed in scale.seeds:
            for batch_size in scale.batch_sizes:
                for arm in scale.cnn_norms:
                    if arm != "ghost" or batch_size > GHOST_BATCH:
                        image("batch_size", "convnet", arm, batch_size, seed)
        if "online" in experiments and seed in scale.seeds:
            for arm in scale.online_norms:
                image("online", "convnet", arm, 1, seed)
            # After a Dense layer batch norm has one value per feature at batch size 1; layer norm does not care.
            for arm in scale.online_mlp_norms:
                image("online", "mlp", arm, 1, seed)
        if "transformer" in experiments and seed in scale.transformer_seeds:
            for arm in scale.transformer_norms:
                for norm_first in (False, True):
                    for warmup in (False, True):
                        text("transformer", "transformer_tiny", arm, seed, norm_first, warmup)
        if "gradients" in experiments and seed in scale.seeds:
            for norm_first in (False, True):
                text("gradients", "transformer_tiny", "layer", seed, norm_first)
        if "rnn" in experiments and seed in scale.seeds:
            for arm in scale.rnn_norms:
                text("rnn", "lstm_tiny", arm, seed)
    return cells


def config_for(cell, scale, out, data_dir):
    """The `training.Config` of a cell (imported late: TensorFlow loads only after the arguments parse)."""
    from kernorm import training

    text = cell.dataset == "glue/sst2"
    model_kwargs = {}
    if cell.model == "transformer_tiny":
        model_kwargs = {"num_layers": scale.transformer_layers, "norm_first": cell.norm_first}
    warmup_steps = round(scale.warmup_fraction * cell.steps) if cell.warmup else 0
    recalibrate = None
    if cell.is_batch_norm:
        recalibrate = max(1, min(cell.steps, scale.recalibration_examples // cell.batch_size))
    return training.Config(
        model=cell.model,
        dataset=cell.dataset,
        out=str(out),
        norm=cell.norm,
        norm_kwargs=cell.norm_kwargs,
        model_kwargs=model_kwargs,
        data_dir=data_dir,
        batch_size=cell.batch_size,
        epochs=1,
        max_train_examples=cell.examples,
        max_eval_examples=scale.text_eval_examples if text else scale.image_eval_examples,
        optimizer=cell.optimizer,
        learning_rate=cell.learning_rate,
        warmup_steps=warmup_steps,
        seed=cell.seed,
        sequence_length=scale.sequence_length,
        export=False,
        recalibrate_batch_norm=recalibrate,
        overwrite=True,
        verbose=2,  # one line per cell, not a progress bar
    )


# ---------------------------------------------------------------------------------------------
# Running the cells


def batch_statistics_callback(validation, batch_size):
    """A Keras callback that, when training ends, evaluates the model with batch statistics.

    Each validation batch of `batch_size` examples (the training batch size) is normalized with its
    own statistics, as in training (`training=True`); the moving statistics are put back afterwards.
    The result is in the callback's `result` (accuracy and loss).
    """
    import keras
    import tensorflow as tf

    class BatchStatistics(keras.callbacks.Callback):
        result = None

        def on_train_end(self, logs=None):
            model = self.model
            saved = [variable.numpy() for variable in model.non_trainable_variables]
            forward = tf.function(lambda images: model(images, training=True))
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
            correct = total = count = 0.0
            for images, labels in validation.unbatch().batch(batch_size, drop_remainder=True):
                logits = forward(images)
                correct += float(tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == tf.cast(labels, tf.int64), tf.float32)))
                total += float(loss(labels, logits))
                count += int(labels.shape[0])
            for variable, value in zip(model.non_trainable_variables, saved):
                variable.assign(value)
            self.result = {"accuracy": correct / count, "loss": total / count} if count else None

    return BatchStatistics()


def cannot_train_message(error):
    """kernorm's sentence from batch norm's error for one value per channel (Keras wraps it in its own
    text); any other error is raised again, since it is not a finding but a fault."""
    text = " ".join(str(error).split())
    found = text.find("got one value per channel")
    if found < 0:
        raise error
    start = text.rfind("Layer '", 0, found)
    end = text.find(" Remedies", found)
    return text[max(start, 0) : end if end > 0 else None]


def train_cell(cell, scale, folder, data_dir):
    """Trains one cell through `training.run`; returns its results row."""
    import keras
    import tensorflow as tf

    from kernorm import training

    config = config_for(cell, scale, folder, data_dir)
    callbacks = [keras.callbacks.TerminateOnNaN()]
    batch_statistics = None
    if cell.is_batch_norm and cell.dataset == "fashion_mnist":  # the text models have dropout too
        validation = training.load_data(config).validation
        batch_statistics = batch_statistics_callback(validation, cell.batch_size)
        callbacks.append(batch_statistics)
    row = {"learning_rate": config.learning_rate, "warmup_steps": config.warmup_steps}
    try:
        metrics = training.run(config, callbacks=callbacks)
    except (ValueError, tf.errors.InvalidArgumentError) as error:
        return {**row, "status": STATUS_CANNOT_TRAIN, "error": cannot_train_message(error)}
    row.update(
        status=STATUS_DIVERGED if not math.isfinite(metrics["train_loss"]) else STATUS_OK,
        train_accuracy=metrics["train_accuracy"],
        train_loss=metrics["train_loss"],
        val_accuracy=metrics["val_accuracy"],
        val_loss=metrics["val_loss"],
        train_examples=metrics["train_examples"],
        validation_examples=metrics["validation_examples"],
        parameters=metrics["parameters"],
        examples_per_second=metrics["examples_per_second"],
    )
    if batch_statistics is not None and batch_statistics.result:
        row.update(
            val_accuracy_batch_stats=batch_statistics.result["accuracy"],
            val_loss_batch_stats=batch_statistics.result["loss"],
        )
    recalibrated = metrics.get("recalibrate_batch_norm")
    if recalibrated and recalibrated["layers"]:  # none in lstm_tiny: its per-step batch norm is a layer of its own
        row.update(
            val_accuracy_recalibrated=recalibrated["val_accuracy_after"],
            val_loss_recalibrated=recalibrated["val_loss_after"],
        )
    return row


def gradient_cell(cell, scale, data_dir):
    """The gradient norm of each encoder block's parameters at initialization, and the RMS of each
    block's output over the real tokens (the measurements behind Xiong et al. 2020's argument).

    The model and data come from the training library; the values are means over
    `scale.gradient_batches` training batches, with dropout on, as in the first training steps.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from kernorm import training

    config = config_for(cell, scale, "unused", data_dir)
    keras.backend.clear_session()
    keras.utils.set_random_seed(cell.seed)
    data = training.load_data(config)
    train_model, _, from_logits = training.build_models(config, data)
    core = next(layer for layer in train_model.layers if isinstance(layer, keras.Model))
    blocks = [core.get_layer(f"block{i}") for i in range(1, scale.transformer_layers + 1)]
    probe = keras.Model(core.inputs, [block.output for block in blocks])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    norms, rms = [], []
    for tokens, labels in data.train.take(scale.gradient_batches):
        with tf.GradientTape() as tape:
            value = loss(labels, train_model(tokens, training=True))
        weights = [block.trainable_weights for block in blocks]
        gradients = tape.gradient(value, weights)
        norms.append([float(tf.linalg.global_norm(g)) for g in gradients])
        real = tf.cast(tokens != 0, tf.float32)[..., None]
        outputs = probe(tokens, training=True)
        rms.append([float(tf.sqrt(tf.reduce_sum(real * o**2) / (tf.reduce_sum(real) * o.shape[-1]))) for o in outputs])
    return {
        "status": STATUS_OK,
        "parameters": train_model.count_params(),
        "train_examples": data.train_examples,
        "block_grad_norms": " ".join(f"{v:.6g}" for v in np.mean(norms, axis=0)),
        "block_output_rms": " ".join(f"{v:.6g}" for v in np.mean(rms, axis=0)),
    }


def run_cell(cell, scale, out, data_dir):
    """Runs one cell and returns its complete results row; the cell's folder keeps only its records."""
    started = time.perf_counter()
    folder = out / "cells" / cell.key.replace("/", "_")
    if cell.experiment == "gradients":
        row = gradient_cell(cell, scale, data_dir)
    else:
        row = train_cell(cell, scale, folder, data_dir)
        # The checkpoints are the study's bulk and nothing reads them.
        for bulky in ("backup", "checkpoints"):
            shutil.rmtree(folder / bulky, ignore_errors=True)
    return {
        "experiment": cell.experiment,
        "cell": cell.key,
        "model": cell.model,
        "dataset": cell.dataset,
        "arm": cell.arm,
        "norm": cell.norm,
        "norm_first": "" if cell.norm_first is None else cell.norm_first,
        "batch_size": cell.batch_size,
        "seed": cell.seed,
        "optimizer": cell.optimizer,
        "learning_rate": cell.learning_rate,
        "steps": cell.steps,
        **row,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------------------------------------
# results.csv


def read_results(path):
    """The rows of results.csv as dicts of strings; [] if it does not exist."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def add_result(path, row):
    """Adds `row` to results.csv, replacing a row of the same cell, in one atomic rename.

    A process killed at any moment leaves the file as it was before or after, never a half row, so
    each finished cell is in it exactly once.
    """
    from kernorm import export

    rows = [old for old in read_results(path) if old["cell"] != row["cell"]] + [row]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _csv_value(value) for key, value in r.items()} for r in rows)
    with export.replacing(path) as staging:
        staging.write_text(buffer.getvalue())


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


class Progress:
    """Prints "cell k of n", the time so far and an estimate of the time left (the mean time of the
    cells this process ran, times the cells left)."""

    def __init__(self, total, done):
        self.total = total
        self.done = done
        self.ran = 0
        self.started = time.perf_counter()

    def begin(self, cell):
        print(f"[{self.done + 1}/{self.total}] {cell.key}", flush=True)

    def end(self, row):
        self.done += 1
        self.ran += 1
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.ran * (self.total - self.done)
        outcome = row["status"]
        if row.get("val_accuracy") not in (None, ""):
            outcome = f"val_accuracy {float(row['val_accuracy']):.4f}"
        print(
            f"[{self.done}/{self.total}] {row['cell']}: {outcome} ({row['wall_seconds']:.0f} s); "
            f"elapsed {_duration(elapsed)}, about {_duration(left)} left",
            flush=True,
        )


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


# ---------------------------------------------------------------------------------------------
# Analysis: means, noise and verdicts, from results.csv only


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class Estimate:
    """The mean of a metric over seeds and its standard error.

    The error is the larger of the spread between seeds and the binomial error of an accuracy
    measured on `n` validation examples.
    """

    values: list
    n: int

    @property
    def mean(self):
        return sum(self.values) / len(self.values)

    @property
    def se(self):
        k = len(self.values)
        binomial = self.mean * (1 - self.mean) / (self.n * k) if self.n else 0.0
        spread = sum((v - self.mean) ** 2 for v in self.values) / (k - 1) / k if k > 1 else 0.0
        return math.sqrt(max(binomial, spread))


@dataclasses.dataclass
class Gap:
    """A difference of two estimates and its standard error."""

    mean: float
    se: float


def estimate(rows, column="val_accuracy", **where):
    """The `Estimate` of `column` over the rows matching `where` (all seeds); None if there is none."""
    chosen = [r for r in rows if all(str(r[k]) == str(v) for k, v in where.items()) and r["status"] == STATUS_OK]
    values = [_number(r[column]) for r in chosen if _number(r[column]) is not None]
    if not values:
        return None
    return Estimate(values, int(_number(chosen[0]["validation_examples"]) or 0))


def compare(a, b):
    """+1 if `a` is above `b` by more than twice the standard error of the difference, -1 if below, else 0.

    `a` and `b` are `Estimate`s or `Gap`s.
    """
    difference = a.mean - b.mean
    if abs(difference) > 2 * math.hypot(a.se, b.se):
        return 1 if difference > 0 else -1
    return 0


def _pct(x):
    return f"{100 * x:.1f}%"


HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolvable at this scale"


@dataclasses.dataclass
class Verdict:
    rule: str
    evidence: str  # one line of measured figures, for the table
    verdict: str
    detail: str = ""  # more figures and reasoning, for report.md


def _norm_label(arm):
    return {"renorm": "batch renorm", "ghost": f"ghost batch ({GHOST_BATCH})", "none": "no norm"}.get(arm, arm)


def by_batch_size(rows, arm):
    """{batch size: Estimate} of one norm's ConvNet cells in the batch_size experiment."""
    sizes = sorted({int(r["batch_size"]) for r in rows if r["experiment"] == "batch_size" and r["arm"] == arm})
    found = {b: estimate(rows, experiment="batch_size", arm=arm, batch_size=b) for b in sizes}
    return {b: e for b, e in found.items() if e}


def _best(points):
    """(batch size, Estimate) of the highest mean."""
    return max(points.items(), key=lambda item: item[1].mean)


def cnn_verdict(rows):
    """Rule: batch norm for CNNs.

    Each norm at its best batch size: with the examples fixed, large batches take few steps, and
    norms differ in how many steps they need, so one batch size for all would favour some.
    """
    rule = "Batch norm for CNNs"
    best = {}
    for arm in ("batch", "group", "layer", "instance", "none"):
        points = by_batch_size(rows, arm)
        if points:
            best[arm] = _best(points)
    if "batch" not in best or len(best) < 2:
        return None
    bn = best["batch"][1]
    outcome = {_norm_label(a): compare(bn, e) for a, (_, e) in best.items() if a != "batch"}
    ranked = sorted(best.items(), key=lambda item: -item[1][1].mean)
    evidence = "ConvNet, best validation accuracy over the batch sizes: " + ", ".join(
        f"{_norm_label(a)} {_pct(e.mean)} (b{b})" for a, (b, e) in ranked
    )
    if any(v < 0 for v in outcome.values()):
        verdict = FAILS
    elif all(v > 0 for v in outcome.values()):
        verdict = HOLDS
    else:
        verdict = UNRESOLVED
    return Verdict(rule, evidence, verdict, _standing("Batch norm", outcome))


def _standing(subject, outcome):
    """"SUBJECT is ahead of ..., behind ... and within the noise of ..." from {norm: compare(subject, norm)}."""
    groups = [(1, "ahead of {} beyond the noise"), (-1, "behind {}"), (0, "within the noise of {}")]
    parts = [text.format(", ".join(a for a, v in outcome.items() if v == sign)) for sign, text in groups
             if sign in outcome.values()]  # fmt: skip
    return f"{subject} is {'; '.join(parts)}."


def small_batch_verdicts(rows):
    """Rules: batch norm loses accuracy at small batches (Wu and He 2018); layer norm does not.

    Each norm at the smallest batch size against its own best: with the examples fixed, smaller
    batches take more steps, so a norm that does not care about the batch size does best at small
    batches, and one that suffers from them loses there what the extra steps gain.
    """
    found = []
    for arm, rule in (
        ("batch", "Batch norm loses accuracy at small batches"),
        ("layer", "Layer norm does not lose accuracy at small batches"),
    ):
        points = by_batch_size(rows, arm)
        if len(points) < 2:
            continue
        small = min(points)
        best_size, best = _best(points)
        lost = compare(best, points[small]) > 0
        others = {a: by_batch_size(rows, a).get(small) for a in ("batch", "group", "layer", "instance") if a != arm}
        others = ", ".join(f"{a} {_pct(e.mean)}" for a, e in others.items() if e)
        evidence = (
            f"{arm} norm at batch {small}: {_pct(points[small].mean)}, at its best (b{best_size}): "
            f"{_pct(best.mean)}; at batch {small}, {others}"
        )
        verdict = (HOLDS if lost else FAILS) if arm == "batch" else (FAILS if lost else HOLDS)
        gap = Gap(best.mean - points[small].mean, math.hypot(best.se, points[small].se))
        detail = (
            f"The loss at batch {small} is {100 * gap.mean:.1f} points; twice its standard error is "
            f"{200 * gap.se:.1f} points, so an effect of the size Wu and He report for batch norm (11.1 points "
            "at 2 images per GPU against 32) would show."
        )
        found.append(Verdict(rule, evidence, verdict, detail))
    return found


def setting_rows(rows, experiment, arm):
    """{(norm_first, warmup): rows} of one norm's cells in a text experiment; the LSTM's one setting is
    (None, False)."""
    found = {}
    for r in rows:
        if r["experiment"] == experiment and r["arm"] == arm:
            key = ({"True": True, "False": False}.get(str(r["norm_first"])), r["warmup_steps"] not in ("0", ""))
            found.setdefault(key, []).append(r)
    return found


def settings(rows, experiment, arm, column="val_accuracy"):
    """{(norm_first, warmup): Estimate or None} of `column` for one norm's cells in a text experiment."""
    return {key: estimate(chosen, column) for key, chosen in setting_rows(rows, experiment, arm).items()}


def text_norm_verdict(rows, experiment, rule, model_label):
    """Rule: layer norm for Transformers / RNNs: each norm at its best setting, layer against the others."""
    best = {}
    for arm in TRANSFORMER_NORMS if experiment == "transformer" else RNN_NORMS:
        found = {key: e for key, e in settings(rows, experiment, arm).items() if e}
        if found:
            best[arm] = max(found.items(), key=lambda item: item[1].mean)
    if "layer" not in best or len(best) < 2:
        return None
    layer = best["layer"][1]
    outcome = {_norm_label(a): compare(layer, e) for a, (_, e) in best.items() if a != "layer"}
    ranked = sorted(best.items(), key=lambda item: -item[1][1].mean)
    figures = ", ".join(f"{_norm_label(a)} {_pct(e.mean)}" for a, (_, e) in ranked)
    which = " (each norm at its best position and warm-up)" if experiment == "transformer" else ""
    evidence = f"{model_label}, SST-2 validation accuracy{which}: {figures}"
    versus_batch = outcome.get("batch", 0)
    verdict = HOLDS if versus_batch > 0 else FAILS if versus_batch < 0 else UNRESOLVED
    detail = _standing("Layer norm", outcome)
    if "batch" in best:
        key, batch = best["batch"]
        trained = settings(rows, experiment, "batch", "train_accuracy")[key]
        recalibrated = settings(rows, experiment, "batch", "val_accuracy_recalibrated")[key]
        if trained and compare(trained, batch) > 0:
            detail += (
                f" Batch norm fits its training batches better than it validates (training accuracy "
                f"{_pct(trained.mean)}, validation {_pct(batch.mean)}): at inference its moving statistics are "
                "not the statistics it trained with."
            )
        if recalibrated:
            detail += f" With its statistics recalibrated after training, batch norm reaches {_pct(recalibrated.mean)}."
    failed = sorted({r["arm"] for r in rows if r["experiment"] == experiment and r["status"] != STATUS_OK})
    if failed:
        detail += f" Cells that did not finish training: {', '.join(failed)}."
    return Verdict(rule, evidence, verdict, detail)


def online_verdicts(rows):
    """Rules: batch norm cannot train on one example at a time; layer norm (and group, instance) can."""
    online = [r for r in rows if r["experiment"] == "online"]
    if not online:
        return []
    verdicts = []
    mlp_bn = [r for r in online if r["model"] == "mlp" and r["arm"] == "batch"]
    if mlp_bn:
        refused = all(r["status"] == STATUS_CANNOT_TRAIN for r in mlp_bn)
        verdicts.append(
            Verdict(
                "Batch norm cannot train on one example at a time (after a Dense layer)",
                f"MLP, batch 1: batch norm {'cannot train (kernorm raises)' if refused else 'trains'} in "
                f"{len(mlp_bn)} of {len(mlp_bn)} seeds",
                HOLDS if refused else FAILS,
                f"kernorm's error: \"{mlp_bn[0]['error']}\"" if refused and mlp_bn[0]["error"] else "",
            )
        )
    conv_bn = estimate(rows, experiment="online", model="convnet", arm="batch")
    conv_bn_rows = [r for r in online if r["model"] == "convnet" and r["arm"] == "batch"]
    if conv_bn_rows:
        trains = conv_bn is not None and compare(conv_bn, Estimate([0.1], conv_bn.n)) > 0
        verdicts.append(
            Verdict(
                "Batch norm cannot train on one example at a time (in a CNN)",
                f"ConvNet, batch 1: batch norm reaches {_pct(conv_bn.mean)}"
                if conv_bn
                else "ConvNet, batch 1: batch norm did not train",
                FAILS if trains else HOLDS,
                "In a CNN each channel has H x W values per image, so batch norm's statistics exist at "
                "batch size 1 (they are the image's own, as in instance norm during training); inference uses "
                "the moving statistics.",
            )
        )
    others = {}
    for model, arms in (("convnet", ("layer", "group", "instance")), ("mlp", ("layer",))):
        for arm in arms:
            found = estimate(rows, experiment="online", model=model, arm=arm)
            if found:
                others[f"{model} {arm}"] = found
    if others:
        all_train = all(compare(e, Estimate([0.1], e.n)) > 0 for e in others.values())
        verdicts.append(
            Verdict(
                "Layer, group and instance norm train at batch size 1",
                "batch 1 validation accuracy: " + ", ".join(f"{k} {_pct(e.mean)}" for k, e in others.items()),
                HOLDS if all_train else FAILS,
            )
        )
    return verdicts


def batch_norm_inference(rows, arm="batch"):
    """{batch size: (moving, batch statistics, recalibrated)} Estimates (or None) of a batch-norm arm's ConvNet
    cells, in the batch_size and online experiments."""
    sizes = sorted({int(r["batch_size"]) for r in rows if r["arm"] == arm and r["model"] == "convnet"})
    found = {}
    for batch_size in sizes:
        where = dict(model="convnet", arm=arm, batch_size=batch_size)
        columns = ("val_accuracy", "val_accuracy_batch_stats", "val_accuracy_recalibrated")
        found[batch_size] = tuple(estimate(rows, column, **where) for column in columns)
    return {b: values for b, values in found.items() if values[0]}


def _steps(rows, batch_size):
    return next((r["steps"] for r in rows if r["model"] == "convnet" and r["batch_size"] == str(batch_size)), "?")


def inference_verdict(rows):
    """Rule: batch norm behaves differently in training and inference."""
    found = {b: (moving, batch) for b, (moving, batch, _) in batch_norm_inference(rows).items() if batch}
    if not found:
        return None
    resolved = [b for b, (moving, batch) in found.items() if compare(batch, moving) != 0]
    evidence = "ConvNet, accuracy with batch statistics / with moving statistics: " + ", ".join(
        f"b{b} {_pct(batch.mean)} / {_pct(moving.mean)}" for b, (moving, batch) in found.items()
    )
    detail = f"The two differ beyond the noise at batch sizes {', '.join(map(str, resolved)) or 'none'}."
    if 1 in resolved:
        detail += (
            " At batch size 1 a training step normalizes each image with its own statistics, and inference with "
            "the statistics of all images: two different functions."
        )
    lagging = [b for b in resolved if b > 1]
    if lagging:
        detail += (
            f" At batch sizes {', '.join(map(str, lagging))} the runs take only "
            f"{', '.join(_steps(rows, b) for b in lagging)} steps, too few for moving averages of momentum 0.99 "
            "(a memory of about 100 steps) to forget their start and follow the weights."
        )
    return Verdict("Batch norm behaves differently in training and inference", evidence,
                   HOLDS if resolved else UNRESOLVED, detail)  # fmt: skip


def recalibration_verdict(rows):
    """Precise BN: does recomputing the statistics after training recover the accuracy of the batch statistics?"""
    found = {b: (moving, recalibrated) for b, (moving, _, recalibrated) in batch_norm_inference(rows).items()
             if recalibrated}  # fmt: skip
    if not found:
        return None
    outcomes = {b: compare(recalibrated, moving) for b, (moving, recalibrated) in found.items()}
    verdict = FAILS if any(o < 0 for o in outcomes.values()) else HOLDS if any(outcomes.values()) else UNRESOLVED
    evidence = "ConvNet, accuracy after recalibration / with moving statistics: " + ", ".join(
        f"b{b} {_pct(recalibrated.mean)} / {_pct(moving.mean)}" for b, (moving, recalibrated) in found.items()
    )
    better = [b for b, o in outcomes.items() if o > 0]
    detail = (
        f"Recalibration helps beyond the noise at batch sizes {', '.join(map(str, better)) or 'none'}: where the "
        "moving averages lagged. It cannot help where training itself normalized differently (batch size 1: "
        "each image by its own statistics)."
    )
    renorm = batch_norm_inference(rows, "renorm")
    worse = [b for b, (moving, _, recalibrated) in renorm.items() if recalibrated and compare(recalibrated, moving) < 0]
    if worse:
        detail += (
            f" For batch renorm it lowers the accuracy (batch sizes {', '.join(map(str, worse))}): renorm trains on "
            "inputs normalized by its own moving statistics, so the population statistics are not what it learned "
            "with."
        )
    return Verdict("Recalibrating batch norm's statistics (precise BN) recovers inference accuracy", evidence,
                   verdict, detail)  # fmt: skip


def _floats(text):
    return [float(v) for v in str(text).split()] if text else []


def gradient_profile(rows, norm_first):
    """Mean gradient norm and output RMS per block over seeds, for post-norm (False) or pre-norm (True)."""
    chosen = [r for r in rows if r["experiment"] == "gradients" and str(r["norm_first"]) == str(norm_first)]
    if not chosen:
        return None, None
    grads = [_floats(r["block_grad_norms"]) for r in chosen]
    rms = [_floats(r["block_output_rms"]) for r in chosen]
    return [sum(c) / len(c) for c in zip(*grads)], [sum(c) / len(c) for c in zip(*rms)]


def add_norm_verdict(rows):
    """Rule: "Add & Norm" is LayerNorm(x + Sublayer(x)): each block's output is normalized (post-norm)."""
    _, post_rms = gradient_profile(rows, False)
    _, pre_rms = gradient_profile(rows, True)
    if not post_rms or not pre_rms:
        return None
    normalized = all(abs(v - 1) < 0.05 for v in post_rms)
    return Verdict(
        "\"Add & Norm\" is LayerNorm(x + Sublayer(x))",
        f"output RMS of blocks 1..{len(post_rms)} at initialization: post-norm "
        f"{' '.join(f'{v:.2f}' for v in post_rms)}; pre-norm {' '.join(f'{v:.2f}' for v in pre_rms)}",
        HOLDS if normalized else FAILS,
        "True of post-norm, the original Transformer's block: every block's output is a layer norm's, so its RMS "
        "is 1 whatever the depth. Pre-norm blocks (x + Sublayer(LayerNorm(x)), as in GPT-2 and ViT) leave the "
        "residual stream unnormalized, and its RMS grows with depth.",
    )


def _chance(found):
    """Whether an SST-2 accuracy is within the noise of 50%, what a constant guess gets."""
    return compare(found, Estimate([0.5], found.n)) == 0


def _per_norm(rows, setting_a, setting_b):
    """"layer a / b, rms a / b, ..." for two (norm_first, warmup) settings of every transformer norm."""
    parts = []
    for arm in TRANSFORMER_NORMS:
        found = settings(rows, "transformer", arm)
        a, b = found.get(setting_a), found.get(setting_b)
        if a and b:
            parts.append(f"{_norm_label(arm)} {_pct(a.mean)} / {_pct(b.mean)}")
    return ", ".join(parts)


def pre_norm_verdicts(rows):
    """Rules: pre-norm trains more easily than post-norm; post-norm needs warm-up (with the gradient profile)."""
    verdicts = []
    found = settings(rows, "transformer", "layer")
    post, pre, post_warm = found.get((False, False)), found.get((True, False)), found.get((False, True))
    if post and pre:
        outcome = compare(pre, post)
        verdicts.append(
            Verdict(
                "Pre-norm trains more easily than post-norm",
                f"layer norm, no warm-up, SST-2 validation accuracy: pre-norm {_pct(pre.mean)}, "
                f"post-norm {_pct(post.mean)}",
                HOLDS if outcome > 0 else FAILS if outcome < 0 else UNRESOLVED,
                f"Every norm, pre-norm / post-norm without warm-up: {_per_norm(rows, (True, False), (False, False))}. "
                "Without a norm the two are one network, and their equal results show that a seed repeats a run.",
            )
        )
    if post and post_warm:
        outcome = compare(post_warm, post)
        detail = f"Every norm, post-norm with / without warm-up: {_per_norm(rows, (False, True), (False, False))}."
        if outcome == 0 and _chance(post) and _chance(post_warm):
            detail += (
                " Both post-norm runs stay at chance (a constant guess): a linear warm-up over the first tenth of "
                "the steps did not rescue post-norm at this learning rate and budget, so the study cannot tell "
                "whether warm-up is what it lacks."
            )
        verdicts.append(
            Verdict(
                "Post-norm needs warm-up (Xiong et al.)",
                f"post-norm, layer norm: with warm-up {_pct(post_warm.mean)}, without {_pct(post.mean)}",
                HOLDS if outcome > 0 else FAILS if outcome < 0 else UNRESOLVED,
                detail,
            )
        )
    post_grads, _ = gradient_profile(rows, False)
    pre_grads, _ = gradient_profile(rows, True)
    if post_grads and pre_grads:
        profile = (
            f"Gradient norm of each block's parameters, block 1 (next to the embeddings) to {len(post_grads)}: "
            f"post-norm {' '.join(f'{v:.2f}' for v in post_grads)}; pre-norm {' '.join(f'{v:.2f}' for v in pre_grads)} "
            "(means over seeds and batches, dropout on)."
        )
        verdicts.append(
            Verdict(
                "At initialization post-norm's gradient near the output is larger than pre-norm's (Xiong et al.)",
                f"gradient norm of the last block: post-norm {post_grads[-1]:.2f}, pre-norm {pre_grads[-1]:.2f}",
                HOLDS if post_grads[-1] > pre_grads[-1] else FAILS,
                f"{profile} Xiong et al.'s Theorem 1: post-norm's gradient at the last layer does not shrink with "
                "depth, pre-norm's does.",
            )
        )
        post_ratio, pre_ratio = post_grads[-1] / post_grads[0], pre_grads[-1] / pre_grads[0]
        # "Level": within a quarter either way.
        level = 0.8 <= pre_ratio <= 1.25
        verdicts.append(
            Verdict(
                "Post-norm's gradients grow from the first block to the last; pre-norm's stay level (Xiong et al.)",
                f"gradient norm of the last block over the first: post-norm {post_ratio:.2f}, pre-norm {pre_ratio:.2f}",
                HOLDS if post_ratio > 1 and level else FAILS,
                f"{profile} Xiong et al.'s Figure 3 shows post-norm's gradient norm rising with the layer and "
                "pre-norm's level; \"level\" here means the last block within a quarter of the first.",
            )
        )
    return verdicts


def verdicts(rows):
    """Every rule the results can speak to, in the order of the issue's list."""
    found = [
        cnn_verdict(rows),
        text_norm_verdict(rows, "transformer", "Layer norm for Transformers", "Transformer"),
        text_norm_verdict(rows, "rnn", "Layer norm for RNNs", "LSTM"),
        *small_batch_verdicts(rows),
        *online_verdicts(rows),
        inference_verdict(rows),
        recalibration_verdict(rows),
        add_norm_verdict(rows),
        *pre_norm_verdicts(rows),
    ]
    return [v for v in found if v is not None]


def verdict_table(rows):
    """The verdict table in Markdown (report.md and the README's Evidence section)."""
    lines = ["| rule | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {v.rule} | {v.evidence} | {v.verdict} |" for v in verdicts(rows)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    from kernorm import export

    with export.replacing(path) as staging:
        figure.savefig(staging, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)


def _error_by_batch(rows, arm, column="val_accuracy"):
    """{batch size: (mean error, min error, max error)} in percent over seeds, for the ConvNet."""
    points = {}
    for r in rows:
        if r["model"] == "convnet" and r["arm"] == arm and r["status"] == STATUS_OK and _number(r[column]) is not None:
            points.setdefault(int(r["batch_size"]), []).append(100 * (1 - float(r[column])))
    return {b: (sum(v) / len(v), min(v), max(v)) for b, v in sorted(points.items())}


def plot_batch_size(rows, path):
    """Validation error against batch size per norm, with the seeds' spread (the GN paper's Figure 1)."""
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
    drawn = False
    for arm in CNN_NORMS:
        points = _error_by_batch(rows, arm)
        if not points:
            continue
        sizes = list(points)
        axis.plot(sizes, [points[b][0] for b in sizes], marker="o", label=_norm_label(arm))
        axis.fill_between(sizes, [points[b][1] for b in sizes], [points[b][2] for b in sizes], alpha=0.2)
        drawn = True
    return _finish_batch_axes(
        figure, axis, drawn, rows, path, "batch size (examples per step)",
        "ConvNet on Fashion-MNIST: same examples per run, learning rate linear in the batch", legend_size=8,
    )  # fmt: skip


def plot_inference(rows, path):
    """Batch-norm cells: error with moving, batch and recalibrated statistics against batch size."""
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
    drawn = False
    for arm, style in (("batch", "-"), ("renorm", "--"), ("ghost", ":")):
        for column, label, color in (
            ("val_accuracy", "moving statistics", "C0"),
            ("val_accuracy_batch_stats", "batch statistics", "C1"),
            ("val_accuracy_recalibrated", "recalibrated", "C2"),
        ):
            points = _error_by_batch(rows, arm, column)
            if points:
                sizes = list(points)
                axis.plot(sizes, [points[b][0] for b in sizes], style, marker="o", color=color,
                          label=f"{_norm_label(arm)}: {label}")  # fmt: skip
                drawn = True
    return _finish_batch_axes(
        figure, axis, drawn, rows, path, "batch size (training, and the batches whose statistics are used)",
        "Batch norm at inference: which statistics", legend_size=7,
    )  # fmt: skip


def _finish_batch_axes(figure, axis, drawn, rows, path, xlabel, title, legend_size):
    """Validation error against the ConvNet's batch sizes, large batches on the left as in the GN paper; saves.

    Returns whether it saved the figure: where nothing was `drawn`, it closes the figure and returns False.
    """
    if not drawn:
        _pyplot().close(figure)
        return False
    axis.set_xscale("log", base=2)
    axis.invert_xaxis()
    sizes = sorted({int(r["batch_size"]) for r in rows if r["model"] == "convnet"}, reverse=True)
    axis.set_xticks(sizes, [str(b) for b in sizes])
    axis.set_xlabel(xlabel)
    axis.set_ylabel("validation error (%)")
    axis.set_title(title)
    axis.legend(fontsize=legend_size)
    axis.grid(alpha=0.3)
    _save(figure, path)
    return True


def plot_transformer(rows, path):
    """Bars: SST-2 validation accuracy of every transformer arm, and of the LSTM arms."""
    plt = _pyplot()
    labels, means, spreads = [], [], []
    for arm in TRANSFORMER_NORMS:
        found = settings(rows, "transformer", arm)
        for norm_first, warmup in sorted(found):
            estimate_ = found[(norm_first, warmup)]
            labels.append(f"{arm}\n{'pre' if norm_first else 'post'}{'+wu' if warmup else ''}")
            means.append(100 * estimate_.mean if estimate_ else 0.0)
            spreads.append(200 * estimate_.se if estimate_ else 0.0)
    for arm in RNN_NORMS:
        found = estimate(rows, experiment="rnn", arm=arm)
        if found:
            labels.append(f"LSTM\n{arm}")
            means.append(100 * found.mean)
            spreads.append(200 * found.se)
    if not labels:
        return False
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(labels)), 4.5))
    colors = ["C3" if label.startswith("LSTM") else "C0" if "pre" in label else "C1" for label in labels]
    axis.bar(range(len(labels)), means, yerr=spreads, color=colors, capsize=3)
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.axhline(50, color="gray", linewidth=0.8, linestyle="--")
    axis.set_ylim(40, max(means) + 10)
    axis.set_ylabel("SST-2 validation accuracy (%)")
    axis.set_title("Transformer (post-norm orange, pre-norm blue, +wu: warm-up) and LSTM (red); bars: 2 s.e.")
    axis.grid(axis="y", alpha=0.3)
    _save(figure, path)
    return True


def plot_gradients(rows, path):
    """Gradient norm of each block's parameters at initialization, post-norm against pre-norm."""
    plt = _pyplot()
    post, post_rms = gradient_profile(rows, False)
    pre, pre_rms = gradient_profile(rows, True)
    if not post or not pre:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    blocks = range(1, len(post) + 1)
    for axis, (a, b), label in ((left, (post, pre), "gradient norm of the block's parameters"),
                                (right, (post_rms, pre_rms), "RMS of the block's output")):  # fmt: skip
        axis.plot(blocks, a, marker="o", color="C1", label="post-norm")
        axis.plot(blocks, b, marker="o", color="C0", label="pre-norm")
        axis.set_xlabel("block (1 = next to the embeddings)")
        axis.set_ylabel(label)
        axis.set_xticks(list(blocks))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Transformer with layer norm at initialization (Xiong et al. 2020, Figure 3)")
    _save(figure, path)
    return True


FIGURES = {
    "batch_size.png": plot_batch_size,
    "inference.png": plot_inference,
    "transformer.png": plot_transformer,
    "gradients.png": plot_gradients,
}


# ---------------------------------------------------------------------------------------------
# The report


def _scale_text(rows, scale):
    def first(**where):
        return next((r for r in rows if all(str(r[k]) == str(v) for k, v in where.items()) and r["parameters"]), None)

    lines = []
    conv = first(experiment="batch_size", arm="batch") or first(model="convnet")
    if conv:
        lines.append(
            f"- CNN: the zoo's `convnet` (three 3x3 convolutions, {int(float(conv['parameters'])):,} parameters) on "
            f"Fashion-MNIST, {scale.cnn_examples:,} training examples per cell whatever the batch size (one pass; "
            f"{scale.cnn_examples / 60000:.0%} of the training set), validated on the first "
            f"{conv['validation_examples']} test images. SGD with Nesterov momentum 0.9, peak learning rate "
            f"{SGD_RATE_PER_32} x batch / 32, cosine decay, weight decay 1e-4 (not on norms). Seeds: "
            f"{', '.join(map(str, scale.seeds))}."
        )
    transformer = first(experiment="transformer")
    if transformer:
        lines.append(
            f"- Transformer: `transformer_tiny` (d_model 64, 4 heads, feed-forward 128, dropout 0.1) with "
            f"{scale.transformer_layers} blocks, {int(float(transformer['parameters'])):,} parameters, on SST-2: "
            f"{scale.text_examples:,} training sentences, {scale.sequence_length} tokens, batch "
            f"{scale.text_batch_size}, AdamW at {scale.text_learning_rate:g}, warm-up (where on) over the "
            f"first {scale.warmup_fraction:.0%} of the steps; validation on {transformer['validation_examples']} "
            f"sentences. Seeds: {', '.join(map(str, scale.transformer_seeds))}."
        )
    lstm = first(experiment="rnn")
    if lstm:
        lines.append(
            f"- LSTM: `lstm_tiny` (64 units, {int(float(lstm['parameters'])):,} parameters), same data and optimizer."
        )
    lines.append(
        "- A difference counts when it is larger than twice its standard error; a cell's error is the larger of "
        "the spread between its seeds and the binomial error of an accuracy on that many validation examples. "
        "This is a CPU-sized study: the published effects were measured on ImageNet-sized problems, and an "
        "effect that does not show here may still hold there."
    )
    return "\n".join(lines)


ANCHORS = """Published figures to compare with (not measured here):

- Wu and He 2018 (Group Normalization), ResNet-50 on ImageNet, top-1 error at 32 / 16 / 8 / 4 / 2 images per
  GPU: BN 23.6 / 23.7 / 24.8 / 27.3 / 34.7, GN 24.1 / 24.2 / 24.0 / 24.2 / 24.1; at 32: LN 25.3, IN 28.4.
- Xiong et al. 2020: post-LN Transformers need a learning-rate warm-up; pre-LN ones train without it, and at
  initialization post-LN's gradient near the output is large while pre-LN's does not grow with the layer.
- Ba et al. 2016: layer norm in LSTMs. Ioffe 2017: batch renorm at small batches. Hoffer et al. 2017: ghost
  batch norm.
"""


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _batch_size_table(rows):
    sizes = sorted({int(r["batch_size"]) for r in rows if r["model"] == "convnet"}, reverse=True)
    body = []
    for arm in CNN_NORMS:
        points = _error_by_batch(rows, arm)
        refused = {int(r["batch_size"]) for r in rows if r["model"] == "convnet" and r["arm"] == arm
                   and r["status"] == STATUS_CANNOT_TRAIN}  # fmt: skip
        if points or refused:
            cells = [f"{points[b][0]:.1f}" if b in points else "cannot train" if b in refused else "" for b in sizes]
            body.append([_norm_label(arm), *cells])
    return _table(["norm", *[f"b{b}" for b in sizes]], body) if body else ""


def _inference_table(rows):
    body = []
    for arm in BATCH_NORMS:
        for batch_size in sorted({int(r["batch_size"]) for r in rows if r["arm"] == arm and r["model"] == "convnet"}):
            where = dict(model="convnet", arm=arm, batch_size=batch_size)
            found = [estimate(rows, column, **where) for column in
                     ("val_accuracy_batch_stats", "val_accuracy", "val_accuracy_recalibrated")]  # fmt: skip
            if any(found):
                body.append([_norm_label(arm), batch_size, *(_pct(e.mean) if e else "" for e in found)])
    return _table(["norm", "batch", "batch statistics", "moving statistics", "recalibrated"], body) if body else ""


def _text_table(rows):
    body = []
    for r in sorted((r for r in rows if r["experiment"] in ("transformer", "rnn")), key=lambda r: r["cell"]):
        position = {"True": "pre", "False": "post"}.get(str(r["norm_first"]), "")
        accuracy = _pct(float(r["val_accuracy"])) if _number(r["val_accuracy"]) is not None else r["status"]
        recalibrated = _number(r["val_accuracy_recalibrated"])
        body.append([
            r["model"], r["arm"], position, r["warmup_steps"], r["seed"], accuracy,
            _pct(recalibrated) if recalibrated is not None else "", r["status"],
        ])  # fmt: skip
    header = ["model", "norm", "position", "warm-up steps", "seed", "validation accuracy", "recalibrated BN", "status"]
    return _table(header, body)


def render_report(rows, scale, figures):
    """report.md: the scale, the verdict table, each rule with its figures, and the tables behind them."""
    parts = [
        "# The study: batch norm and layer norm, measured",
        "",
        f"Written by `scripts/study.py{' --quick' if scale.name == 'quick' else ''}` from `results.csv` "
        f"({len(rows)} cells). Scale:",
        "",
        _scale_text(rows, scale),
        "",
        "## Verdicts",
        "",
        verdict_table(rows),
    ]
    for verdict in verdicts(rows):
        parts += [f"### {verdict.rule}", "", f"{verdict.evidence}.", ""]
        if verdict.detail:
            parts += [verdict.detail, ""]
        parts += [f"Verdict: **{verdict.verdict}**.", ""]
    parts += ["## Validation error (%) by batch size, ConvNet, mean over seeds", "", _batch_size_table(rows), ""]
    parts += ["## Batch norm at inference: validation accuracy", "", _inference_table(rows), ""]
    parts += ["## Text models", "", _text_table(rows), ""]
    parts += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + ["", ANCHORS]
    return "\n".join(parts)


def evidence_block(rows, folder):
    """The README's Evidence block: the scale, the figures and the verdict table, every number from `rows`.

    `folder` is where the figures are, relative to the README (docs/study for the committed run).
    """

    def first(column, **where):
        row = next((r for r in rows if all(r[k] == v for k, v in where.items()) and r[column]), None)
        return int(float(row[column])) if row else 0

    image = dict(experiment="batch_size", arm="batch")
    text = dict(experiment="transformer", arm="layer")
    sizes = sorted({int(r["batch_size"]) for r in rows if r["experiment"] == "batch_size"})
    seeds = sorted({r["seed"] for r in rows if r["experiment"] == "batch_size"})
    minutes = sum(_number(r["wall_seconds"]) or 0 for r in rows) / 60
    lines = [
        f"The run committed in [`{folder}/`]({folder}/) ([`report.md`]({folder}/report.md) has every measured "
        f"figure, the reasoning behind each verdict and the published figures to compare with): {len(rows)} cells, "
        f"whose wall times add up to {minutes:.0f} minutes on 2 CPU cores shared with other work. The zoo's "
        f"`convnet` ({first('parameters', **image):,} parameters) on Fashion-MNIST, one pass over "
        f"{first('train_examples', **image):,} training images per cell whatever the batch size "
        f"({first('steps', **image, batch_size=str(sizes[-1])):,} steps at batch {sizes[-1]}, "
        f"{first('steps', **image, batch_size=str(sizes[0])):,} at batch {sizes[0]}), validated on "
        f"{first('validation_examples', **image):,} test images, seeds {' and '.join(seeds)}; `transformer_tiny` "
        f"made deeper ({first('parameters', **text):,} parameters) and `lstm_tiny` "
        f"({first('parameters', experiment='rnn', arm='layer'):,}) on {first('train_examples', **text):,} SST-2 "
        f"sentences, validated on {first('validation_examples', **text):,}. A difference counts when it is larger "
        "than twice its standard error.",
        "",
        *(f"![{name[:-4]}]({folder}/{name})" for name in FIGURES),
        "",
        verdict_table(rows).rstrip("\n"),
    ]
    return "\n".join(lines)


def update_readme(text, readme=README):
    """Replaces README.md's block between `README_START` and `README_END` by `text`."""
    content = readme.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(content):
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} block to update")
    readme.write_text(pattern.sub(lambda _: f"{README_START}\n{text}\n{README_END}", content, count=1))


def write_outputs(out, scale):
    """Draws the figures and writes report.md from results.csv; returns the figure names."""
    from kernorm import export

    rows = read_results(out / "results.csv")
    figures = [name for name, draw in FIGURES.items() if draw(rows, out / name)]
    with export.replacing(out / "report.md") as staging:
        staging.write_text(render_report(rows, scale, figures))
    return figures


# ---------------------------------------------------------------------------------------------
# The command line


def build_parser():
    parser = argparse.ArgumentParser(
        prog="study.py",
        description="Measure the rules about batch norm and layer norm: train every cell through kernorm.training, "
        "append it to results.csv, then draw the figures and write report.md. Rerun the same command to resume.",
    )
    parser.add_argument("--out", default="runs/study", help="the study folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a small version of every experiment (a few minutes)")
    parser.add_argument(
        "--experiments",
        default=",".join(EXPERIMENTS),
        help="comma-separated subset of: " + ", ".join(EXPERIMENTS) + " (default: all)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="TFDS data folder (default: $TFDS_DATA_DIR, else TFDS's default)"
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="rewrite README.md's Evidence block from this study (its figures linked from --out, relative to the "
        "repository: docs/study for the committed run)",
    )
    return parser


def _check_scale(out, scale, parser):
    """Records the scale in study.json, or refuses a folder started at another scale."""
    from kernorm import export

    marker = out / "study.json"
    if marker.exists():
        before = json.loads(marker.read_text()).get("scale")
        if before != scale.name:
            parser.error(
                f"{out} holds a {before} study; run it with{' --quick' if before == 'quick' else 'out --quick'}, "
                "or choose another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        export.write_json(marker, {"scale": scale.name, "settings": dataclasses.asdict(scale)})


def main(argv=None):
    """Runs the study with `argv` (default: sys.argv); returns the rows of results.csv."""
    parser = build_parser()
    args = parser.parse_args(argv)
    experiments = tuple(name.strip() for name in args.experiments.split(",") if name.strip())
    unknown = [name for name in experiments if name not in EXPERIMENTS]
    if unknown or not experiments:
        parser.error(
            f"argument --experiments: unknown {', '.join(unknown) or 'empty list'} "
            f"(choose from {', '.join(EXPERIMENTS)})"
        )
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("the figures need matplotlib: pip install 'kernorm[plots]'")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    scale = QUICK if args.quick else DEFAULT
    out = pathlib.Path(args.out)
    _check_scale(out, scale, parser)
    results = out / "results.csv"
    cells = plan(scale, experiments)
    finished = {row["cell"] for row in read_results(results)}
    todo = [cell for cell in cells if cell.key not in finished]
    print(
        f"study ({scale.name}): {len(cells)} cells, {len(cells) - len(todo)} already in {results}, {len(todo)} to run",
        flush=True,
    )
    progress = Progress(len(cells), len(cells) - len(todo))
    try:
        for cell in todo:
            progress.begin(cell)
            row = run_cell(cell, scale, out, args.data_dir)
            add_result(results, row)
            progress.end(row)
    except KeyboardInterrupt:
        print(f"\nstudy.py: interrupted. Run the same command again to continue ({results} keeps the finished cells).",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    figures = write_outputs(out, scale)
    print(f"{results}: {len(read_results(results))} cells; wrote {', '.join(figures) or 'no figures'} and "
          f"{out / 'report.md'}", flush=True)  # fmt: skip
    rows = read_results(results)
    if args.update_readme:
        update_readme(evidence_block(rows, args.out))
        print(f"updated {README}", flush=True)
    return rows


if __name__ == "__main__":
    main()
