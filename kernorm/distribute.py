"""Training on several devices or machines with `tf.distribute`: the strategy, synchronized batch norm,
sharded input, and what each worker writes.

`kernorm.training.run` trains under the strategy that `Config.strategy` names (scripts/train.py --strategy):

- "one-device": TensorFlow's default strategy: one device, as without `tf.distribute`.
- "mirrored": `tf.distribute.MirroredStrategy` over the GPUs of this machine, or over its logical CPUs
  where it has no GPU.
- "multi-worker": `tf.distribute.MultiWorkerMirroredStrategy` over the machines that `TF_CONFIG` names.
- "auto": "multi-worker" where `TF_CONFIG` names more than one worker, else "mirrored" where there is
  more than one GPU, else "one-device".

Each replica trains on an equal share of every global batch and the gradients are summed across replicas,
so the weights stay the same everywhere. Only the chief (the task "chief", else worker 0) writes the run
folder; the other workers write what Keras's callbacks need into a folder of their own (`worker_folder`)
and delete it at the end. A multi-worker strategy must be made before TensorFlow runs anything else in
the process.

    cluster = distribute.Cluster.make("auto")
    with cluster.strategy.scope():
        model = ...
    distribute.synchronize_batch_norms(model)
"""

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import tarfile
import tempfile

import numpy as np
import tensorflow as tf

from kernorm import _private

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")
# The jobs of a TF_CONFIG cluster that train (an "evaluator" or a "ps" task does not).
_TRAINING_JOBS = ("chief", "worker")
# Collectives carry no 8- or 16-bit integers; Keras 3 reduces uint8 image batches.
_NARROW_INTEGERS = (tf.uint8, tf.int8, tf.uint16, tf.int16)
#: What a collective raises when a worker is gone: its peers stop answering (the coordination
#: service's heartbeats, or a refused connection), or a collective times out.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)


class WorkerLostError(RuntimeError):
    """Another worker of a multi-worker run stopped; the run can only go on when every worker restarts."""


def tf_config():
    """`TF_CONFIG` as a dict, `{}` when it is unset.

    Raises:
        ValueError: `TF_CONFIG` is not a JSON object, or its cluster or task is malformed.
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text!r}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
        raise ValueError(f'TF_CONFIG must be a JSON object {{"cluster": {{...}}, "task": {{...}}}}, not {text!r}')
    task = config.get("task", {})
    if config.get("cluster") and not (isinstance(task, dict) and task.get("type") in config["cluster"]):
        raise ValueError(f"TF_CONFIG's task {task!r} names no job of its cluster {sorted(config['cluster'])}")
    return config


def worker_count():
    """How many tasks of `TF_CONFIG`'s cluster train (its "chief" and "worker" jobs); 0 without `TF_CONFIG`."""
    cluster = tf_config().get("cluster", {})
    return sum(len(cluster.get(job, ())) for job in _TRAINING_JOBS)


def task():
    """`(type, index)` of this process's task in `TF_CONFIG`; `("chief", 0)` without one."""
    config = tf_config()
    if not config.get("cluster"):
        return "chief", 0
    return config["task"]["type"], int(config["task"].get("index", 0))


def is_chief():
    """Whether this process is the chief of its `TF_CONFIG` cluster: its task is "chief", or it is worker 0
    of a cluster without one (TensorFlow's rule). True without `TF_CONFIG`."""
    kind, index = task()
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in tf_config()["cluster"])


def resolve(name):
    """The strategy that `name` stands for here: "auto" becomes one of the others.

    Raises:
        ValueError: an unknown name, a malformed `TF_CONFIG`, or "multi-worker" without `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"argument --strategy: invalid choice: {name!r} (choose from {', '.join(STRATEGIES)})")
    workers = worker_count()
    if name == "auto":
        if workers > 1:
            return "multi-worker"
        return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "one-device"
    if name == "multi-worker" and workers == 0:
        raise ValueError(
            "--strategy multi-worker needs TF_CONFIG, which names the workers and this process's task "
            '(README, "Several machines")'
        )
    return name


@dataclasses.dataclass
class Cluster:
    """The strategy of a run and this process's place in it.

    Attributes:
        name: the strategy's name in `STRATEGIES`, never "auto".
        strategy: the `tf.distribute.Strategy`.
        workers: processes that train together (1 unless multi-worker).
        chief: whether this process writes the run folder.
    """

    name: str
    strategy: tf.distribute.Strategy
    workers: int
    chief: bool

    @classmethod
    def make(cls, name):
        """Resolves `name` (`resolve`) and makes its strategy; before anything else runs in TensorFlow."""
        name = resolve(name)
        if name == "one-device":
            return cls(name, tf.distribute.get_strategy(), 1, True)
        if name == "mirrored":
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            return cls(name, tf.distribute.MirroredStrategy([device.name for device in devices]), 1, True)
        return cls(name, MultiWorkerMirroredStrategy(), worker_count(), is_chief())

    @property
    def replicas(self):
        return self.strategy.num_replicas_in_sync


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3's `fit` gives it.

    Keras 3 asks the strategy to reduce values that TensorFlow's collectives do not take
    (keras-team/keras#20585): the first batch, a tuple with uint8 images in it, to build the
    model; and the scalar logs of every step with `axis=0`. Here each tensor of a nested value is
    reduced on its own, 8- and 16-bit integers travel as int32, and a scalar is reduced across
    replicas whatever the axis. Everything else is TensorFlow's.
    """

    def reduce(self, reduce_op, value, axis=None):
        return tf.nest.map_structure(lambda tensor: self._reduce_one(reduce_op, tensor, axis), value)

    def _reduce_one(self, reduce_op, value, axis):
        local = self.experimental_local_results(value)[0]
        if local.shape.rank == 0:
            axis = None
        if local.dtype not in _NARROW_INTEGERS:
            return super().reduce(reduce_op, value, axis)
        wide = self.run(tf.cast, args=(value, tf.int32))
        return tf.cast(super().reduce(reduce_op, wide, axis), local.dtype)


def synchronize_batch_norms(model):
    """Sets `synchronized=True` on every layer of `model` that takes it (kernorm's and Keras's batch norm).

    They then normalize with the mean and variance of the global batch, summed across replicas at each
    training step, as one device would over the whole batch. Returns how many layers changed.
    A layer without the argument (the zoo's `RecurrentBatchNormalization`) keeps per-replica statistics.
    """
    layers = [layer for layer in _private.all_layers(model) if getattr(layer, "synchronized", None) is False]
    for layer in layers:
        layer.synchronized = True
    return len(layers)


def has_synchronized_batch_norm(model):
    """Whether a layer of `model` takes its batch statistics across replicas."""
    return any(getattr(layer, "synchronized", None) is True for layer in _private.all_layers(model))


def shard_by_data(dataset):
    """`dataset` with tf.data's auto-shard policy DATA: each worker keeps its share of every global batch.

    TFDS reads a small dataset from one file, which the default policy (by file, else by data) cannot
    split by file; DATA says so up front. A pipeline that drops the remainder gives every worker the
    same number of steps per epoch.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def worker_folder(run_folder):
    """Where a worker other than the chief writes what Keras's callbacks need while it trains.

    A folder of the temporary directory, named after the task and the run folder, so that a worker
    restarted after a crash finds and replaces what the crashed one left there.
    """
    kind, index = task()
    digest = hashlib.sha1(str(pathlib.Path(run_folder).resolve()).encode()).hexdigest()[:12]
    return pathlib.Path(tempfile.gettempdir()) / f"kernorm-{kind}-{index}-{digest}"


def from_chief(cluster, payload):
    """The chief's `payload` (bytes) on every worker, sent by the strategy's collectives.

    Every worker must call it at the same point; what the others pass is ignored. No file system need be
    shared, and a verdict of the chief reaches the workers that would otherwise wait for it.
    """
    size = int(_from_chief(cluster.strategy, tf.constant([len(payload)], tf.int64))[0])
    if size == 0:
        return b""
    words = -(-size // 8)  # int64 words: collectives carry no bytes, and a sum with zeros is exact
    local = np.frombuffer(payload.ljust(8 * words, b"\0"), np.int64) if cluster.chief else np.zeros(words, np.int64)
    return _from_chief(cluster.strategy, tf.constant(local)).numpy().tobytes()[:size]


def copy_from_chief(cluster, chief_folder, folder):
    """Makes `folder` of every other worker a copy of `chief_folder` of the chief (`from_chief`).

    A worker's `BackupAndRestore` then restores the chief's last backup, so that all of them resume
    from the same epoch with the same weights and optimizer state.
    """
    payload = from_chief(cluster, _pack(chief_folder) if cluster.chief else b"")
    if not cluster.chief:
        shutil.rmtree(folder, ignore_errors=True)
        if payload:
            _unpack(payload, folder)


def _from_chief(strategy, value):
    """`value` as the chief holds it, on every worker: a sum to which only replica 0, the chief's first, adds."""
    zeros = tf.zeros_like(value)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: value if context.replica_id_in_sync_group == 0 else zeros
    )
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


def _pack(folder):
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return b""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


def _unpack(payload, folder):
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
        # The "data" filter (Python 3.12, back-ported to 3.10.12 and 3.11.4) keeps members inside the folder.
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(folder, **kwargs)


def lost_worker_error(error, run_folder):
    """A `WorkerLostError` that says which worker is gone, if the TensorFlow `error` tells, and how to go on."""
    own = "/job:{}/replica:0/task:{}".format(*task())
    gone = sorted({name for name in re.findall(r"/job:\w+/replica:\d+/task:\d+", error.message) if name != own})
    who = f"{', '.join(gone)} stopped answering" if gone else "another worker stopped answering"
    return WorkerLostError(
        f"training stopped: {who} ({type(error).__name__}). Restart every worker with the same command and "
        f"--resume: training continues from the last finished epoch, which the chief keeps in {run_folder}/backup."
    )
