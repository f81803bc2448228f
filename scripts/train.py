"""Train a zoo model on a TensorFlow Datasets dataset and export a SavedModel.

    python scripts/train.py --model convnet --norm batch --dataset fashion_mnist --epochs 1 --out runs/fashion_convnet

The run folder (--out) holds:

    run.json               the arguments of the run that created it
    history.csv            one row per finished epoch (CSVLogger)
    logs/                  TensorBoard logs
    backup/                BackupAndRestore state: --resume continues from the last finished epoch
    checkpoints/best.keras ModelCheckpoint: the training model at its best validation accuracy
    model.keras            the serving model: raw input (uint8 image or string) -> class probabilities
    saved_model/           the same model exported for TF Serving: signature serving_default, one named
                           input ("image", or the dataset's text feature, "sentence" for SST-2) and one
                           output, "probabilities"
    model.tflite           with --tflite: the export converted to TFLite (runs in LiteRT)
    model.onnx             with --onnx: the export converted to ONNX by tf2onnx (runs in ONNX Runtime)
    vocabulary.json        text only: the tokens and how text becomes token ids, for runtimes without strings
    metrics.json           final loss and accuracy (train and validation), examples/second, wall time and
                           every argument; written last, so its presence means the run is complete

The exports fold batch norm into the convolution or Dense layer before it (kernorm.fold_batch_norm) unless
--no-fold-batch-norm; --recalibrate-batch-norm STEPS first recomputes its statistics (precise BN).

An existing run folder is refused unless --resume (continue it) or --overwrite (start again) is given.
Bad names exit with status 2 before any folder is created.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import csv  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import absl.logging  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import kernorm  # noqa: E402
from kernorm import models  # noqa: E402
from kernorm.models import data as datalib  # noqa: E402

DEFAULT_LEARNING_RATES = {"adamw": 1e-3, "sgd": 0.05}
# A run resumed with other values of these would not be the same run.
RESUME_MUST_MATCH = ("model", "norm", "norm_kwargs", "dataset", "max_train_examples", "vocab_size", "sequence_length")
_TEMP_PREFIX = ".tmp-"


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object such as \'{{"epsilon": 1e-5}}\', not {text!r}')
    return value


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a kernorm zoo model on a TFDS dataset; write model.keras, saved_model/, "
        "metrics.json and history.csv into the run folder.",
    )
    parser.add_argument("--model", required=True, choices=models.names(), help="zoo model name")
    parser.add_argument(
        "--norm",
        choices=kernorm.norm_names(),
        default=None,
        help="normalization for every norm layer of the model (default: the model's own)",
    )
    parser.add_argument(
        "--norm-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help='arguments for each norm layer, as a JSON object, e.g. \'{"momentum": 0.9}\'',
    )
    parser.add_argument("--dataset", required=True, help="TFDS name: fashion_mnist, mnist, cifar10, glue/sst2, ...")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data folder (default: $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument(
        "--max-train-examples", type=_positive_int, default=None, help="train on the first N examples only"
    )
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak learning rate (default: 1e-3 for adamw, 0.05 for sgd); cosine decay to 0 over the run",
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled weight decay (not on norms, biases)")
    parser.add_argument(
        "--warmup-steps", type=_non_negative_int, default=0, help="linear warm-up steps before the cosine decay"
    )
    parser.add_argument(
        "--mixed-precision",
        nargs="?",
        const="mixed_float16",
        default=None,
        choices=("mixed_float16", "mixed_bfloat16"),
        help="compute in float16 (or bfloat16) with float32 weights; the export still returns float32",
    )
    parser.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop with padding and flip for training images (default: on for cifar10 only)",
    )
    parser.add_argument(
        "--vocab-size", type=_positive_int, default=datalib.DEFAULT_VOCAB_SIZE, help="text: most tokens kept"
    )
    parser.add_argument(
        "--sequence-length",
        type=_positive_int,
        default=datalib.DEFAULT_SEQUENCE_LENGTH,
        help="text: tokens per example",
    )
    parser.add_argument(
        "--fold-batch-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold batch norm into the convolution or Dense layer before it in the exports (default: on)",
    )
    parser.add_argument(
        "--recalibrate-batch-norm",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="before the export, recompute the batch-norm statistics over STEPS training batches (precise BN)",
    )
    parser.add_argument("--tflite", action="store_true", help="also write model.tflite, for TFLite / LiteRT")
    parser.add_argument(
        "--onnx", action="store_true", help="also write model.onnx, for ONNX Runtime (needs tf2onnx: kernorm[onnx])"
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="MODEL.keras",
        help="start from the weights of this .keras model of the same architecture (scripts/convert.py makes one "
        "from pretrained weights); a head for another number of classes starts anew",
    )
    parser.add_argument("--out", required=True, help="the run folder")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    again.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    return parser


def main(argv=None, callbacks=()):
    """Runs train.py with `argv` (default: sys.argv). Returns the metrics dict.

    `callbacks` are extra Keras callbacks for `model.fit`, after the script's own.
    """
    started = time.perf_counter()
    absl.logging.set_verbosity(absl.logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or datalib.default_data_dir()
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATES[args.optimizer]
    run = pathlib.Path(args.out)
    _check_run_folder(parser, run, args)
    if importlib.util.find_spec("tensorboard") is None:
        parser.error("the TensorBoard callback needs the tensorboard package: pip install tensorboard")
    if args.onnx and importlib.util.find_spec("tf2onnx") is None:
        parser.error("--onnx needs the tf2onnx package: pip install 'kernorm[onnx]'")

    keras.backend.clear_session()
    keras.utils.set_random_seed(args.seed)
    policy = keras.config.dtype_policy()
    try:
        if args.mixed_precision:
            keras.config.set_dtype_policy(args.mixed_precision)
        try:
            data = datalib.load(
                args.dataset,
                data_dir=args.data_dir,
                batch_size=args.batch_size,
                max_train_examples=args.max_train_examples,
                augment=args.augment,
                seed=args.seed,
                vocab_size=args.vocab_size,
                sequence_length=args.sequence_length,
            )
        except (datalib.UnknownDatasetError, datalib.DatasetMissingError) as error:
            parser.error(str(error))
        train_model, serving_model, from_logits = _build_models(parser, args, data)
        _start_run_folder(run, args)
        return _train(args, run, data, train_model, serving_model, from_logits, callbacks, started)
    finally:
        keras.config.set_dtype_policy(policy)


def _check_run_folder(parser, run, args):
    """Refuses an existing run folder unless --resume or --overwrite; nothing is changed yet."""
    if not run.exists():
        return
    if not run.is_dir():
        parser.error(f"--out {run} exists and is not a folder")
    if not (args.resume or args.overwrite):
        parser.error(
            f"run folder {run} already exists: pass --resume to continue it or --overwrite to delete it and start again"
        )
    marker = run / "run.json"
    if args.overwrite and not marker.exists() and any(run.iterdir()):
        parser.error(f"--overwrite: refusing to delete {run}: it has no run.json, so it is not a run folder")
    if args.resume and marker.exists():
        before = json.loads(marker.read_text())
        changed = [
            f"--{key.replace('_', '-')} {before.get(key)!r} -> {getattr(args, key)!r}"
            for key in RESUME_MUST_MATCH
            if before.get(key) != getattr(args, key)
        ]
        if changed:
            parser.error(f"--resume: {run} was started with other arguments: {'; '.join(changed)}")


def _start_run_folder(run, args):
    if run.exists() and args.overwrite:
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    # Leftovers of a process killed while writing: never the real files, which are renamed into place.
    for stale in run.glob(_TEMP_PREFIX + "*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    if not (run / "run.json").exists():
        _write_json(run / "run.json", vars(args))


def _build_models(parser, args, data):
    """The zoo model, wrapped twice: for training (on the pipeline's inputs) and for serving (raw inputs)."""
    kwargs = {"num_classes": data.num_classes}
    if data.task == "image":
        kwargs["input_shape"] = data.input_shape
    else:
        kwargs.update(vocab_size=data.vocab_size, sequence_length=data.sequence_length)
    if args.norm is not None:
        kwargs["norm"] = args.norm
    if args.norm_kwargs:
        kwargs["norm_kwargs"] = args.norm_kwargs
    try:
        core = models.get(args.model, **kwargs)
    except (TypeError, ValueError) as error:
        parser.error(f"cannot build --model {args.model} for {data.task} dataset {args.dataset}: {error}")
    if args.init_from:
        _init_from(parser, core, args.init_from)
    expects_tokens = "int" in str(core.inputs[0].dtype)
    if expects_tokens != (data.task == "text"):
        parser.error(
            f"--model {args.model} takes {'token ids' if expects_tokens else 'images'}, "
            f"but --dataset {args.dataset} is a {data.task} dataset"
        )

    inputs = data.training_input()
    outputs = core(data.training_preprocess(inputs))
    train_model = keras.Model(inputs, outputs, name=f"{args.model}_training")
    if data.task == "image":
        raw, raw_outputs = inputs, outputs  # the training model already takes uint8 images
    else:
        raw = data.serving_input()
        raw_outputs = core(data.preprocess(raw))
    from_logits = not _ends_in_softmax(core)
    # float32 whatever the compute dtype, so the export returns float32 under mixed precision too.
    head = keras.layers.Softmax if from_logits else keras.layers.Identity
    probabilities = head(dtype="float32", name="probabilities")(raw_outputs)
    serving_model = keras.Model(raw, probabilities, name=args.model)
    return train_model, serving_model, from_logits


def _init_from(parser, core, path):
    """Copies the weights of the .keras model at `path` into `core`, layer by layer (`convert.transfer_weights`)."""
    try:
        kept = models.convert.transfer_weights(keras.saving.load_model(path), core)
    except (OSError, ValueError) as error:
        parser.error(f"--init-from {path}: {error}")
    if kept:
        print(f"--init-from {path}: {', '.join(kept)} starts anew (another shape)", flush=True)


def _ends_in_softmax(model):
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    return isinstance(last, keras.layers.Softmax) or getattr(activation, "__name__", "") == "softmax"


def _optimizer(args, total_steps):
    warmup = min(args.warmup_steps, total_steps)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else args.learning_rate,
        decay_steps=max(total_steps - warmup, 1),
        warmup_target=args.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    if args.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    else:
        optimizer = keras.optimizers.SGD(
            learning_rate=schedule, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
        )
    # Decay pulls norm scales towards 0 and shifts towards 0: not a regularizer they need.
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias", "scale"])
    return optimizer


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
    """Seconds spent on training steps (validation excluded) and the epochs this process ran."""

    def __init__(self):
        super().__init__()
        self.train_seconds = 0.0
        self.epochs = []
        self._began = None

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.perf_counter()

    def _stop(self):
        if self._began is not None:
            self.train_seconds += time.perf_counter() - self._began
            self._began = None

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()
        self.epochs.append(epoch)


def _train(args, run, data, train_model, serving_model, from_logits, extra_callbacks, started):
    steps_per_epoch = data.train_steps
    train_model.compile(
        optimizer=_optimizer(args, steps_per_epoch * args.epochs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
        jit_compile=args.jit_compile,
    )
    history_path = run / "history.csv"
    best_so_far = max((row["val_accuracy"] for row in _read_history(history_path)), default=None)
    throughput = Throughput()
    callbacks = [
        HistoryTrim(history_path),
        # Before BackupAndRestore: an epoch is logged, then backed up; HistoryTrim covers a kill in between.
        keras.callbacks.CSVLogger(str(history_path), append=True),
        # Kept after the run (delete_checkpoint=False): a process killed while exporting resumes with
        # nothing left to train, and a finished run can be extended with --resume --epochs N.
        keras.callbacks.BackupAndRestore(str(run / "backup"), double_checkpoint=True, delete_checkpoint=False),
        keras.callbacks.ModelCheckpoint(
            str(run / "checkpoints" / "best.keras"),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.TensorBoard(str(run / "logs")),
        throughput,
        *extra_callbacks,
    ]
    print(
        f"{args.model} (norm={args.norm or 'default'}) on {args.dataset}: {data.train_examples} training and "
        f"{data.validation_examples} validation ({data.validation_split}) examples, "
        f"{serving_model.count_params():,} parameters -> {run}",
        flush=True,
    )
    train_model.fit(
        data.train,
        validation_data=data.validation,
        epochs=args.epochs,
        callbacks=callbacks,
        shuffle=False,  # the pipeline shuffles
        verbose="auto",
    )

    history = _read_history(history_path)
    if not history:
        raise RuntimeError(f"{history_path} has no finished epoch")
    last = history[-1]
    recalibration = _recalibrate(args, data, train_model, last) if args.recalibrate_batch_norm else None
    _save_keras_atomically(serving_model, run / "model.keras")
    exported = _export(args, run, data, train_model, serving_model, from_logits)
    ran = len(throughput.epochs)
    metrics = {
        "model": args.model,
        "norm": args.norm,
        "dataset": args.dataset,
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
        "examples_per_second": (
            round(ran * min(data.train_examples, data.train_steps * args.batch_size) / throughput.train_seconds, 1)
            if throughput.train_seconds else None
        ),
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
        "args": vars(args),
        "versions": {
            "kernorm": kernorm.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tensorflow_datasets": tfds.__version__,
        },
    }
    _write_json(run / "metrics.json", metrics)
    print(
        f"val_accuracy {metrics['val_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}  "
        f"wall {metrics['wall_time_seconds']:.0f}s -> {run / 'saved_model'}",
        flush=True,
    )
    return metrics


def _read_history(path):
    """history.csv as a list of dicts of floats (epoch as int)."""
    if not pathlib.Path(path).exists():
        return []
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return [{key: int(value) if key == "epoch" else float(value) for key, value in row.items()} for row in rows]


def _recalibrate(args, data, train_model, last):
    """Precise BN over --recalibrate-batch-norm training batches; returns what metrics.json records,
    with the validation loss and accuracy before (the last epoch's) and after."""
    print(f"recalibrating batch norm over {args.recalibrate_batch_norm} training batches", flush=True)
    result = kernorm.recalibrate_batch_norm(train_model, data.train, steps=args.recalibrate_batch_norm)
    after = train_model.evaluate(data.validation, verbose=0, return_dict=True) if result["layers"] else {}
    return {
        **result,
        "val_loss_before": last["val_loss"],
        "val_accuracy_before": last["val_accuracy"],
        "val_loss_after": after.get("loss", last["val_loss"]),
        "val_accuracy_after": after.get("accuracy", last["val_accuracy"]),
    }


def _export(args, run, data, train_model, serving_model, from_logits):
    """Writes saved_model/ and, as asked, model.tflite, model.onnx and vocabulary.json; returns what
    metrics.json records about them.

    Batch norm is folded unless --no-fold-batch-norm. A text export also has the signature
    `tokens`, over token ids: TFLite and ONNX have no string ops, so they convert that one.
    """
    norms_before = _batch_norm_count(serving_model)
    signatures = {}
    if data.task == "text":
        head = keras.layers.Softmax if from_logits else keras.layers.Identity
        tokens = keras.Model(
            train_model.inputs[0], head(dtype="float32", name="probabilities")(train_model.outputs[0]), name=args.model
        )
        tokens = kernorm.fold_batch_norm(tokens) if args.fold_batch_norm else tokens
        raw = data.serving_input()
        model = keras.Model(raw, tokens(data.vectorizer(raw)), name=args.model)
        token_spec = tf.TensorSpec((None, data.sequence_length), tf.int32, name=tokens.inputs[0].name)
        signatures[TOKEN_SIGNATURE] = (tokens, token_spec)
        converted = TOKEN_SIGNATURE
    else:
        model = kernorm.fold_batch_norm(serving_model) if args.fold_batch_norm else serving_model
        converted = "serving_default"
    export_saved_model(model, data.serving_spec(), run / "saved_model", signatures)
    files = ["saved_model"]
    if args.tflite or args.onnx:
        # Converted from an export traced with kernorm's fast paths off: plain ops, which TFLite and
        # ONNX have (the fast paths use kernels such as EuclideanNorm that they lack).
        with tempfile.TemporaryDirectory(prefix=_TEMP_PREFIX + "portable-", dir=run) as portable:
            previous = kernorm.ops.set_fast_paths(False)
            try:
                export_saved_model(model, data.serving_spec(), pathlib.Path(portable) / "saved_model", signatures)
            finally:
                kernorm.ops.set_fast_paths(previous)
            source = str(pathlib.Path(portable) / "saved_model")
            if args.tflite:
                converter = tf.lite.TFLiteConverter.from_saved_model(source, signature_keys=[converted])
                _write_atomically(run / "model.tflite", converter.convert())
                files.append("model.tflite")
            if args.onnx:
                _write_onnx(source, converted, run / "model.onnx")
                files.append("model.onnx")
    if data.task == "text":
        _write_json(run / "vocabulary.json", _vocabulary(data, token_spec))
        files.append("vocabulary.json")
    return {
        "fold_batch_norm": args.fold_batch_norm,
        "batch_norms_folded": norms_before - _batch_norm_count(model),
        "signatures": sorted(["serving_default", *signatures]),
        "converted_signature": converted if args.tflite or args.onnx else None,
        "files": files,
    }


TOKEN_SIGNATURE = "tokens"
# Opset 17 runs in ONNX Runtime 1.13 and later.
ONNX_OPSET = 17


def _batch_norm_count(model):
    return sum(isinstance(layer, kernorm.folding.BATCH_NORMS) for layer in model._flatten_layers())


def _vocabulary(data, token_spec):
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


def _write_onnx(saved_model, signature, path):
    """Converts `signature` of the SavedModel to ONNX with tf2onnx, atomically."""
    import tf2onnx  # optional: kernorm[onnx]

    loaded = tf.saved_model.load(str(saved_model))  # kept: the signature's variables die with it
    function = loaded.signatures[signature]
    specs = [
        tf.TensorSpec(spec.shape, spec.dtype, name=name)
        for name, spec in function.structured_input_signature[1].items()
    ]
    proto, _ = tf2onnx.convert.from_function(tf.function(function), input_signature=specs, opset=ONNX_OPSET)
    _write_atomically(path, proto.SerializeToString())


def _probabilities(model):
    return lambda inputs: {"probabilities": model(inputs, training=False)}


def _write_atomically(path, content):
    staging = path.with_name(_TEMP_PREFIX + path.name)
    staging.write_bytes(content)
    os.replace(staging, path)


def export_saved_model(model, spec, path, signatures=None):
    """Exports `model` as a SavedModel at `path`, atomically.

    The signature `serving_default` takes one input named `spec.name` and
    returns `{"probabilities": ...}`; `signatures` maps more signature names to
    `(model, spec)` pairs of the same kind. It is written into a temporary
    folder next to `path` and renamed into place, so `path` is either the old
    complete export, the new complete one, or (for an instant) absent.
    """
    path = pathlib.Path(path)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX + path.name + "-", dir=path.parent))
    archive = keras.export.ExportArchive()
    endpoints = {"serving_default": (model, spec), **(signatures or {})}
    for name, (endpoint_model, endpoint_spec) in endpoints.items():
        archive.track(endpoint_model)
        archive.add_endpoint(name=name, fn=_probabilities(endpoint_model), input_signature=[endpoint_spec])
    archive.write_out(str(staging), verbose=False)
    if path.exists():
        old = staging.with_name(staging.name + "-old")
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old)
    else:
        os.replace(staging, path)


def _save_keras_atomically(model, path):
    staging = path.with_name(_TEMP_PREFIX + path.name)
    model.save(staging)
    os.replace(staging, path)


def _write_json(path, value):
    staging = path.with_name(_TEMP_PREFIX + path.name)
    staging.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(staging, path)


if __name__ == "__main__":
    main()
