"""The training library behind scripts/train.py and scripts/study.py: data, model, optimizer, callbacks, fit, export.

    from kernorm import training
    metrics = training.run(training.Config(model="convnet", dataset="fashion_mnist", epochs=1, out="runs/x"))

`run` trains a zoo model on a TFDS dataset into a run folder and returns the
metrics it also writes to `metrics.json`. The run folder holds:

    run.json               the configuration of the run that created it
    history.csv            one row per finished epoch (CSVLogger)
    logs/                  TensorBoard logs
    backup/                BackupAndRestore state: `resume=True` continues from the last finished epoch
    checkpoints/best.keras ModelCheckpoint: the training model at its best validation accuracy
    model.keras            the serving model: raw input (uint8 image or string) -> class probabilities
    saved_model/           the same model exported for TF Serving (kernorm.export.run_exports)
                           (model.keras and saved_model/ only with `export=True`, the default)
    model.tflite, model.onnx, vocabulary.json   as asked (tflite, onnx) and for text
    metrics.json           written last, so its presence means the run is complete

Every file is written atomically (kernorm.export). A configuration that cannot
run raises `ConfigError` before the run folder is created.

Under a `tf.distribute` strategy (`Config.strategy`, kernorm.distribute) only the
chief writes the run folder; the other workers keep their callbacks' files in a
folder of their own, which they delete at the end.
"""

import csv
import dataclasses
import importlib.util
import json
import pathlib
import shutil
import time

import keras
import tensorflow as tf
import tensorflow_datasets as tfds

import kernorm
from kernorm import distribute, export, models
from kernorm.models import data as datalib

DEFAULT_LEARNING_RATES = {"adamw": 1e-3, "sgd": 0.05}
OPTIMIZERS = tuple(DEFAULT_LEARNING_RATES)
# A run resumed with other values of these would not be the same run.
RESUME_MUST_MATCH = (
    "model", "norm", "norm_kwargs", "model_kwargs", "dataset", "max_train_examples", "vocab_size", "sequence_length",
)
# Weight decay pulls norm scales and shifts, and biases, towards 0: not a regularizer they need.
NO_WEIGHT_DECAY = ("gamma", "beta", "bias", "scale")


class ConfigError(ValueError):
    """A configuration that cannot run: an unknown name, a model that does not fit the data, a taken folder."""


@dataclasses.dataclass
class Config:
    """What a run trains and how; the fields are scripts/train.py's arguments.

    `learning_rate=None` means the optimizer's default (`DEFAULT_LEARNING_RATES`);
    `data_dir=None`, `TFDS_DATA_DIR` or else TFDS's default folder. `strategy` is one of
    `kernorm.distribute.STRATEGIES`; `batch_size` is the global batch, split evenly across the
    replicas, and with more than one replica `sync_batch_norm` makes batch norm take the
    statistics of the global batch (`kernorm.distribute.synchronize_batch_norms`). `model_kwargs` are
    more arguments for the zoo builder, e.g. `{"num_layers": 6, "norm_first": True}`.
    `export=False` skips model.keras and saved_model/ (scripts/study.py needs only
    the metrics). `verbose` is `model.fit`'s: 2 prints one line per epoch instead of
    a progress bar.
    """

    model: str
    dataset: str
    out: str
    norm: str | None = None
    norm_kwargs: dict = dataclasses.field(default_factory=dict)
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    batch_size: int = 64
    epochs: int = 10
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    optimizer: str = "adamw"
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    mixed_precision: str | None = None
    jit_compile: bool = False
    seed: int = 0
    augment: bool | None = None
    vocab_size: int = datalib.DEFAULT_VOCAB_SIZE
    sequence_length: int = datalib.DEFAULT_SEQUENCE_LENGTH
    init_from: str | None = None
    export: bool = True
    fold_batch_norm: bool = True
    recalibrate_batch_norm: int | None = None
    tflite: bool = False
    onnx: bool = False
    resume: bool = False
    overwrite: bool = False
    strategy: str = "auto"
    sync_batch_norm: bool = True
    verbose: str | int = "auto"

    @property
    def peak_learning_rate(self):
        return DEFAULT_LEARNING_RATES[self.optimizer] if self.learning_rate is None else self.learning_rate

    def norm_name(self):
        """The norm the model is built with: `norm`, else the zoo model's own default."""
        return self.norm if self.norm is not None else models.registry.default_norm(self.model)


def run(config, callbacks=()):
    """Trains `config` into its run folder and returns the metrics (also in metrics.json).

    `callbacks` are extra Keras callbacks for `model.fit`, after the library's own.

    Raises:
        ConfigError: before anything is written, for a configuration that cannot run.
        kernorm.distribute.WorkerLostError: another worker of a multi-worker run stopped.
    """
    started = time.perf_counter()
    check(config)
    # First: a multi-worker strategy must be made before TensorFlow runs anything.
    cluster = distribute.Cluster.make(config.strategy)
    if config.batch_size % cluster.replicas:
        raise ConfigError(
            f"--batch-size {config.batch_size} does not split evenly across {cluster.replicas} replicas "
            f"(--strategy {cluster.name}): take a multiple of {cluster.replicas}"
        )
    if cluster.name == "multi-worker":
        _check_run_folder_on_the_chief(cluster, config)
    config = dataclasses.replace(config, learning_rate=config.peak_learning_rate)
    run_folder = pathlib.Path(config.out)
    folder = run_folder if cluster.chief else distribute.worker_folder(run_folder)
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    policy = keras.config.dtype_policy()
    try:
        if config.mixed_precision:
            keras.config.set_dtype_policy(config.mixed_precision)
        data = load_data(config)
        if cluster.replicas > 1:
            data = _whole_validation_batches(data, config)
        if cluster.workers > 1:
            data = dataclasses.replace(
                data, train=distribute.shard_by_data(data.train), validation=distribute.shard_by_data(data.validation)
            )
        if cluster.name == "one-device":
            # Under a strategy, Keras's fit reads a batch of a new pass to build the model before it
            # trains, which moves the shuffle on by one pass. One device starts and drops a pass too,
            # so that a seed gives the same batches whatever the strategy.
            iter(data.train)
        with cluster.strategy.scope():
            train_model, serving_model, from_logits = build_models(config, data)
        if cluster.replicas > 1 and config.sync_batch_norm and "synchronized" not in config.norm_kwargs:
            distribute.synchronize_batch_norms(train_model)
        if cluster.chief:
            start_run_folder(run_folder, config)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # what a killed worker left
            folder.mkdir(parents=True)
        if cluster.workers > 1:
            distribute.copy_from_chief(cluster, run_folder / "backup", folder / "backup")
        return _fit_and_export(
            config, folder, data, train_model, serving_model, from_logits, callbacks, started, cluster
        )
    except distribute.LOST_WORKER_ERRORS as error:
        if cluster.workers < 2:
            raise
        raise distribute.lost_worker_error(error, run_folder) from None
    finally:
        keras.config.set_dtype_policy(policy)
        if not cluster.chief:
            shutil.rmtree(folder, ignore_errors=True)


def check(config):
    """Raises `ConfigError` for names that do not exist, missing optional packages, an unusable `TF_CONFIG`, or
    a taken run folder (under a multi-worker strategy, `run` has the chief check it once every worker has joined)."""
    for argument, value, choices in (
        ("model", config.model, models.names()),
        ("norm", config.norm, (None, *kernorm.norm_names())),
        ("optimizer", config.optimizer, OPTIMIZERS),
    ):
        if value not in choices:
            shown = ", ".join(choice for choice in choices if choice is not None)
            raise ConfigError(f"argument --{argument}: invalid choice: {value!r} (choose from {shown})")
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("the TensorBoard callback needs the tensorboard package: pip install tensorboard")
    if (config.tflite or config.onnx) and not config.export:
        raise ConfigError("tflite and onnx convert the export: they cannot be asked for with export=False")
    if config.onnx and importlib.util.find_spec("tf2onnx") is None:
        raise ConfigError("onnx export needs the tf2onnx package: pip install 'kernorm[onnx]'")
    try:
        strategy = distribute.resolve(config.strategy)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if strategy != "multi-worker":  # else the chief checks it once every worker has joined (run)
        check_run_folder(pathlib.Path(config.out), config)


def check_run_folder(run_folder, config):
    """Refuses an existing run folder unless `resume` or `overwrite`; changes nothing."""
    if not run_folder.exists():
        return
    if not run_folder.is_dir():
        raise ConfigError(f"--out {run_folder} exists and is not a folder")
    if not (config.resume or config.overwrite):
        raise ConfigError(
            f"run folder {run_folder} already exists: pass --resume to continue it or --overwrite to delete it "
            "and start again"
        )
    marker = run_folder / "run.json"
    if config.overwrite and not marker.exists() and any(run_folder.iterdir()):
        raise ConfigError(f"--overwrite: refusing to delete {run_folder}: it has no run.json, so it is not a run folder")
    if config.resume and marker.exists():
        before = json.loads(marker.read_text())
        # A run.json written before a field existed holds that field's default.
        defaults = dataclasses.asdict(Config(model="", dataset="", out=""))
        changed = [
            f"--{key.replace('_', '-')} {before.get(key, defaults[key])!r} -> {getattr(config, key)!r}"
            for key in RESUME_MUST_MATCH
            if before.get(key, defaults[key]) != getattr(config, key)
        ]
        if changed:
            raise ConfigError(f"--resume: {run_folder} was started with other arguments: {'; '.join(changed)}")


def _check_run_folder_on_the_chief(cluster, config):
    """`check_run_folder` on the chief, whose refusal stops every worker: a worker that stops before all
    have joined leaves the others waiting for it (TensorFlow waits an hour)."""
    refusal = ""
    if cluster.chief:
        try:
            check_run_folder(pathlib.Path(config.out), config)
        except ConfigError as error:
            refusal = str(error)
    refusal = distribute.from_chief(cluster, refusal.encode()).decode()
    if refusal:
        raise ConfigError(refusal if cluster.chief else f"the chief refused to start: {refusal}")


def _whole_validation_batches(data, config):
    """`data` with validation in whole global batches only, for more than one replica.

    A last, smaller batch would leave some replicas an empty share, on which TensorFlow's oneDNN
    convolution (CPU) returns a tensor of the wrong shape; the few examples it held go unvalidated.
    """
    batches = data.validation_examples // config.batch_size
    if batches == 0:
        raise ConfigError(
            f"--batch-size {config.batch_size}: with more than one replica, validation takes whole batches, and "
            f"{data.validation_examples} validation examples make none: take a smaller batch"
        )
    return dataclasses.replace(
        data, validation=data.validation.take(batches), validation_examples=batches * config.batch_size
    )


def load_data(config):
    """The dataset's pipelines (`kernorm.models.data.load`); an unknown or missing dataset is a `ConfigError`."""
    try:
        return datalib.load(
            config.dataset,
            data_dir=config.data_dir,
            batch_size=config.batch_size,
            max_train_examples=config.max_train_examples,
            max_eval_examples=config.max_eval_examples,
            augment=config.augment,
            seed=config.seed,
            vocab_size=config.vocab_size,
            sequence_length=config.sequence_length,
        )
    except (datalib.UnknownDatasetError, datalib.DatasetMissingError) as error:
        raise ConfigError(str(error)) from None


def start_run_folder(run_folder, config):
    if run_folder.exists() and config.overwrite:
        shutil.rmtree(run_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    export.remove_leftovers(run_folder)
    if not (run_folder / "run.json").exists():
        export.write_json(run_folder / "run.json", dataclasses.asdict(config))


def build_models(config, data):
    """The zoo model, wrapped twice: for training (on the pipeline's inputs) and for serving (raw inputs).

    Returns `(train_model, serving_model, from_logits)`.
    """
    kwargs = {"num_classes": data.num_classes}
    if data.task == "image":
        kwargs["input_shape"] = data.input_shape
    else:
        kwargs.update(vocab_size=data.vocab_size, sequence_length=data.sequence_length)
    if config.norm is not None:
        kwargs["norm"] = config.norm
    if config.norm_kwargs:
        kwargs["norm_kwargs"] = config.norm_kwargs
    kwargs.update(config.model_kwargs)
    try:
        core = models.get(config.model, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"cannot build --model {config.model} for {data.task} dataset {config.dataset}: {error}")
    if config.init_from:
        _init_from(core, config.init_from)
    expects_tokens = "int" in str(core.inputs[0].dtype)
    if expects_tokens != (data.task == "text"):
        raise ConfigError(
            f"--model {config.model} takes {'token ids' if expects_tokens else 'images'}, "
            f"but --dataset {config.dataset} is a {data.task} dataset"
        )

    inputs = data.training_input()
    outputs = core(data.training_preprocess(inputs))
    train_model = keras.Model(inputs, outputs, name=f"{config.model}_training")
    if data.task == "image":
        raw, raw_outputs = inputs, outputs  # the training model already takes uint8 images
    else:
        raw = data.serving_input()
        raw_outputs = core(data.preprocess(raw))
    from_logits = not _ends_in_softmax(core)
    # float32 whatever the compute dtype, so the export returns float32 under mixed precision too.
    serving_model = keras.Model(raw, export.probabilities_head(from_logits)(raw_outputs), name=config.model)
    return train_model, serving_model, from_logits


def _init_from(core, path):
    """Copies the weights of the .keras model at `path` into `core`, layer by layer (`convert.transfer_weights`)."""
    try:
        kept = models.convert.transfer_weights(keras.saving.load_model(path), core)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--init-from {path}: {error}") from None
    if kept:
        print(f"--init-from {path}: {', '.join(kept)} starts anew (another shape)", flush=True)


def _ends_in_softmax(model):
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    return isinstance(last, keras.layers.Softmax) or getattr(activation, "__name__", "") == "softmax"


def optimizer(config, total_steps):
    """AdamW or SGD (Nesterov momentum 0.9) with decoupled weight decay except on `NO_WEIGHT_DECAY` weights,
    and a learning rate that warms up linearly for `warmup_steps`, then follows a cosine to 0 at `total_steps`."""
    warmup = min(config.warmup_steps, total_steps)
    peak = config.peak_learning_rate
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=max(total_steps - warmup, 1),
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )
    if config.optimizer == "adamw":
        result = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    else:
        result = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    result.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return result


class HistoryTrim(keras.callbacks.Callback):
    """Keeps history.csv to one row per epoch when a run resumes.

    A process killed after CSVLogger wrote an epoch's row but before
    BackupAndRestore saved that epoch repeats the epoch on resume; its old row
    goes. The file is cut in place, so CSVLogger's append handle stays valid.
    """

    def __init__(self, path):
        super().__init__()
        self.path = pathlib.Path(path)
        self.done = False

    def on_epoch_begin(self, epoch, logs=None):
        if self.done or not self.path.exists():
            self.done = True
            return
        self.done = True
        with open(self.path, "r+", newline="") as file:
            lines = file.read().splitlines(keepends=True)
            kept = lines[:1] + [line for line in lines[1:] if _row_epoch(line) is not None and _row_epoch(line) < epoch]
            file.seek(0)
            file.write("".join(kept))
            file.truncate()


def _row_epoch(line):
    try:
        return int(line.split(",", 1)[0])
    except ValueError:
        return None


class Throughput(keras.callbacks.Callback):
    """Seconds spent on training steps (validation excluded) and the epochs this process ran; says when
    validation starts, which on a large split takes a while."""

    def __init__(self, validation_examples=None):
        super().__init__()
        self.train_seconds = 0.0
        self.epochs = []
        self.validation_examples = validation_examples
        self._began = None

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.perf_counter()

    def _stop(self):
        if self._began is not None:
            self.train_seconds += time.perf_counter() - self._began
            self._began = None

    def on_test_begin(self, logs=None):
        self._stop()
        if self.validation_examples and self.params.get("verbose"):
            print(f"validating on {self.validation_examples} examples ...", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        self._stop()
        self.epochs.append(epoch)


def fit_callbacks(run_folder, throughput, extra=()):
    """The callbacks of a run: history.csv, backup for resuming, the best checkpoint, TensorBoard, timing."""
    history_path = run_folder / "history.csv"
    best_so_far = max((row["val_accuracy"] for row in read_history(history_path)), default=None)
    return [
        HistoryTrim(history_path),
        # Before BackupAndRestore: an epoch is logged, then backed up; HistoryTrim covers a kill in between.
        keras.callbacks.CSVLogger(str(history_path), append=True),
        # Kept after the run (delete_checkpoint=False): a process killed while exporting resumes with
        # nothing left to train, and a finished run can be extended with --resume --epochs N.
        keras.callbacks.BackupAndRestore(str(run_folder / "backup"), double_checkpoint=True, delete_checkpoint=False),
        keras.callbacks.ModelCheckpoint(
            str(run_folder / "checkpoints" / "best.keras"),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.TensorBoard(str(run_folder / "logs")),
        throughput,
        *extra,
    ]


def _fit_and_export(
    config, run_folder, data, train_model, serving_model, from_logits, extra_callbacks, started, cluster
):
    with cluster.strategy.scope():
        train_model.compile(
            optimizer=optimizer(config, data.train_steps * config.epochs),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
            metrics=["accuracy"],
            jit_compile=config.jit_compile,
        )
    throughput = Throughput(data.validation_examples)
    print(
        f"{config.model} (norm={config.norm_name()}) on {config.dataset}: {data.train_examples} training and "
        f"{data.validation_examples} validation ({data.validation_split}) examples, "
        f"{serving_model.count_params():,} parameters -> {run_folder}",
        flush=True,
    )
    if cluster.replicas > 1:
        norms = "synchronized" if distribute.has_synchronized_batch_norm(train_model) else "per replica"
        print(
            f"--strategy {cluster.name}: {cluster.replicas} replicas"
            f"{f' on {cluster.workers} workers' if cluster.workers > 1 else ''}, "
            f"{config.batch_size // cluster.replicas} examples each per step; batch norm statistics {norms}",
            flush=True,
        )
    train_model.fit(
        data.train,
        validation_data=data.validation,
        epochs=config.epochs,
        callbacks=fit_callbacks(run_folder, throughput, extra_callbacks),
        shuffle=False,  # the pipeline shuffles
        verbose=config.verbose,
    )

    history_path = run_folder / "history.csv"
    history = read_history(history_path)
    if not history:
        raise RuntimeError(f"{history_path} has no finished epoch")
    last = history[-1]
    recalibration = _recalibrate(config, data, train_model, last) if config.recalibrate_batch_norm else None
    exported = None
    if config.export and cluster.chief:
        export.save_keras(serving_model, run_folder / "model.keras")
        exported = export.run_exports(
            run_folder, data, train_model, serving_model, from_logits,
            fold=config.fold_batch_norm, tflite=config.tflite, onnx=config.onnx, name=config.model,
        )  # fmt: skip
    ran = len(throughput.epochs)
    trained_per_epoch = min(data.train_examples, data.train_steps * config.batch_size)
    metrics = {
        "model": config.model,
        "norm": config.norm_name(),
        "dataset": config.dataset,
        "data_dir": data.data_dir,
        "train_loss": last["loss"],
        "train_accuracy": last["accuracy"],
        "val_loss": last["val_loss"],
        "val_accuracy": last["val_accuracy"],
        "validation_split": data.validation_split,
        "epochs_completed": len(history),
        "initial_epoch": throughput.epochs[0] if ran else len(history),
        "epochs_run": ran,
        "train_examples": data.train_examples,
        "validation_examples": data.validation_examples,
        "examples_per_second": round(ran * trained_per_epoch / throughput.train_seconds, 1)
        if throughput.train_seconds else None,
        "train_seconds": round(throughput.train_seconds, 3),
        "wall_time_seconds": round(time.perf_counter() - started, 3),
        "num_classes": data.num_classes,
        "parameters": serving_model.count_params(),
        "serving_input": {
            "name": data.input_name,
            "dtype": data.serving_spec().dtype.name,
            "shape": [-1 if d is None else d for d in data.serving_spec().shape.as_list()],
        },
        "recalibrate_batch_norm": recalibration,
        "export": exported,
        "strategy": cluster.name,
        "replicas": cluster.replicas,
        "workers": cluster.workers,
        "sync_batch_norm": cluster.replicas > 1 and distribute.has_synchronized_batch_norm(train_model),
        "args": dataclasses.asdict(config),
        "versions": {
            "kernorm": kernorm.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tensorflow_datasets": tfds.__version__,
        },
    }
    export.write_json(run_folder / "metrics.json", metrics)
    print(
        f"val_accuracy {metrics['val_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}  "
        f"wall {metrics['wall_time_seconds']:.0f}s -> {run_folder / 'saved_model' if exported else run_folder}",
        flush=True,
    )
    return metrics


def read_history(path):
    """history.csv as a list of dicts of floats (epoch as int)."""
    if not pathlib.Path(path).exists():
        return []
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return [{key: int(value) if key == "epoch" else float(value) for key, value in row.items()} for row in rows]


def _recalibrate(config, data, train_model, last):
    """Precise BN over `recalibrate_batch_norm` training batches; returns what metrics.json records,
    with the validation loss and accuracy before (the last epoch's) and after."""
    print(f"recalibrating batch norm over {config.recalibrate_batch_norm} training batches", flush=True)
    result = kernorm.recalibrate_batch_norm(
        train_model, data.train, steps=config.recalibrate_batch_norm, verbose=0 if config.verbose in (0, 2) else "auto"
    )
    after = train_model.evaluate(data.validation, verbose=0, return_dict=True) if result["layers"] else {}
    return {
        **result,
        "val_loss_before": last["val_loss"],
        "val_accuracy_before": last["val_accuracy"],
        "val_loss_after": after.get("loss", last["val_loss"]),
        "val_accuracy_after": after.get("accuracy", last["val_accuracy"]),
    }
