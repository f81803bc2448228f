"""scripts/train.py under tf.distribute: two worker processes on 127.0.0.1 (`TF_CONFIG`), and two logical CPUs.

Every run trains the zoo's ConvNet with batch norm on 49 TFDS mock examples (tests/train_under_mock.py: each
process generates the same ones) with SGD, for two epochs of three global batches of 16. The reference is the
same command on one device, in this process. With synchronized batch norm, two replicas of 8 examples
compute what one device computes on 16, up to the order of float sums. With more than one replica,
validation takes the 48 examples of whole global batches.

The workers name only 127.0.0.1 in `TF_CONFIG`. TensorFlow's gRPC server listens on the wildcard address of
its port (its listener address is fixed in TensorFlow: there is no option to bind it to the loopback
interface), so the workers run in a network namespace of their own whose only interface is the loopback one
(`unshare --net`, entered with `nsenter`): no port of theirs is reachable from, or reaches, anything outside
127.0.0.1. Where the namespace cannot be made (no `unshare`, or no permission), they run in the machine's
network with a warning. Each process is waited for with a timeout and killed if it overruns it, so that no
test leaves a process behind.
"""

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import types
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from script_runs import REPO, load_script, run_main, train_mock

import kernorm
from kernorm import distribute, models, training

WRAPPER = REPO / "tests" / "train_under_mock.py"
EXAMPLES, BATCH = 49, 16
STEPS_PER_EPOCH = EXAMPLES // BATCH
WHOLE_BATCHES = STEPS_PER_EPOCH * BATCH
ARGS = [
    "--model", "convnet", "--norm", "batch", "--dataset", "fashion_mnist", "--epochs", "2",
    "--batch-size", str(BATCH), "--optimizer", "sgd", "--learning-rate", "0.01",
]  # fmt: skip
# Synchronized replicas against one device, largest absolute difference over every weight: measured
# 7.2e-7 (two workers), 6.6e-7 (mirrored). Without synchronization the weights move apart by 3.8e-3.
SAME = 1e-5
TIMEOUT = 300  # seconds that one process may take
KILL_DETECTED_WITHIN = 60  # seconds from the SIGKILL to the survivor's exit: TF's heartbeats time out in about 10


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LoopbackNetwork:
    """A network namespace whose only interface is the loopback one, held open by a sleeping process."""

    def __init__(self):
        self.holder, self.reason = None, None
        command = ["unshare", "--net", "sh", "-c", "ip link set lo up && echo ready && exec sleep 3600"]
        try:
            self.holder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            ready = self.holder.stdout.readline().strip() == b"ready"
        except OSError as error:
            ready, self.reason = False, str(error)
        if not ready:
            if self.holder is not None:
                self.close()
                self.reason = self.holder.stderr.read().decode(errors="replace").strip() or "unshare failed"
            self.holder = None
            warnings.warn(f"the workers run in the machine's network: no namespace of their own ({self.reason})")

    @property
    def prefix(self):
        """The command prefix that runs a program in the namespace."""
        return [] if self.holder is None else ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]

    def namespace(self, pid):
        return os.readlink(f"/proc/{pid}/ns/net")

    def interfaces(self):
        """The network interfaces of the namespace, from the kernel's own list."""
        lines = pathlib.Path(f"/proc/{self.holder.pid}/net/dev").read_text().splitlines()[2:]
        return sorted(line.split(":")[0].strip() for line in lines)

    def close(self):
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()


@pytest.fixture(scope="module", autouse=True)
def loopback_network():
    network = LoopbackNetwork()
    Workers.network = network
    yield network
    Workers.network = None
    network.close()


def _env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _tf_config(ports, index):
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


class Workers:
    """Two train.py processes of one cluster, in `network`; output to files, each waited for with a timeout."""

    network = None  # the module's LoopbackNetwork

    def __init__(self, folder, name, outs, args, env=None, envs=(None, None)):
        ports = _free_ports(2)
        self.logs = [folder / f"{name}-worker{index}.log" for index in range(2)]
        self.processes = []
        for index, (out, log) in enumerate(zip(outs, self.logs)):
            command = [*self.network.prefix, sys.executable, str(WRAPPER), str(EXAMPLES), *args, "--out", str(out)]
            command += ["--strategy", "multi-worker"]
            with open(log, "w") as file:
                process_env = _env(TF_CONFIG=_tf_config(ports, index), **(env or {}), **(envs[index] or {}))
                self.processes.append(subprocess.Popen(command, env=process_env, stdout=file, stderr=subprocess.STDOUT))

    def output(self, index):
        return self.logs[index].read_text()

    def wait(self, timeout=TIMEOUT):
        """Waits for both; returns their exit codes. Kills both and fails if one overruns `timeout`."""
        deadline = time.monotonic() + timeout
        try:
            for index, process in enumerate(self.processes):
                try:
                    process.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"worker {index} still runs after {timeout} s:\n{self.output(index)[-3000:]}")
        finally:
            self.kill()
        return [process.returncode for process in self.processes]

    def kill(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def check_success(self):
        codes = self.wait()
        for index, code in enumerate(codes):
            assert code == 0, f"worker {index} exited with {code}:\n{self.output(index)[-3000:]}"


def _weights(run):
    return [weight.numpy() for weight in keras.saving.load_model(run / "model.keras").weights]


def _largest_difference(a, b):
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def _epochs(run):
    with open(run / "history.csv", newline="") as file:
        return [int(row["epoch"]) for row in csv.DictReader(file)]


def _worker_folders(temp):
    """The folders of `distribute.worker_folder` in a worker's temporary directory (TFDS's mock leaves its own)."""
    return [path for path in temp.iterdir() if path.name.startswith("kernorm-")]


def _epoch_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference: the same run on one device, in this process."""
    run = tmp_path_factory.mktemp("one-device") / "run"
    metrics = train_mock([*ARGS, "--strategy", "one-device", "--out", str(run)], num_examples=EXAMPLES)
    assert (metrics["strategy"], metrics["replicas"], metrics["sync_batch_norm"]) == ("one-device", 1, False)
    assert metrics["validation_examples"] == EXAMPLES
    return _weights(run)


def _two_workers(tmp_path_factory, name, *extra):
    """A two-worker run; worker 1 is given its own --out, which it must never create (only the chief writes)."""
    folder = tmp_path_factory.mktemp(name)
    chief_run, other_run, temp = folder / "run", folder / "worker1-run", folder / "tmp"
    temp.mkdir()
    logs = [folder / "epochs0.jsonl", folder / "epochs1.jsonl"]
    workers = Workers(
        folder, name, [chief_run, other_run], [*ARGS, *extra], env={"TMPDIR": str(temp)},
        envs=[{"TRAIN_EPOCH_LOG": str(log)} for log in logs],
    )  # fmt: skip
    workers.check_success()
    return types.SimpleNamespace(
        run=chief_run, other_run=other_run, temp=temp, workers=workers, epochs=[_epoch_log(log) for log in logs]
    )


@pytest.fixture(scope="module")
def synchronized(tmp_path_factory):
    return _two_workers(tmp_path_factory, "synchronized")


@pytest.mark.slow
def test_two_workers_with_synchronized_batch_norm_train_as_one_device(synchronized, one_device):
    """Acceptance 1: the chief's weights after 6 steps equal one device's on the same global batches."""
    difference = _largest_difference(_weights(synchronized.run), one_device)
    print(f"two synchronized workers against one device: largest weight difference {difference:.2e}")
    assert difference <= SAME
    metrics = _metrics(synchronized.run)
    assert (metrics["strategy"], metrics["replicas"], metrics["workers"]) == ("multi-worker", 2, 2)
    assert metrics["validation_examples"] == WHOLE_BATCHES
    assert metrics["sync_batch_norm"] is True and metrics["args"]["sync_batch_norm"] is True
    assert "batch norm statistics synchronized" in synchronized.workers.output(0)


@pytest.mark.slow
def test_each_worker_takes_its_half_of_every_global_batch(synchronized):
    """Sharded by data: both workers take 3 steps an epoch (not 6, as two copies of the whole data would)."""
    expected = [{"epoch": 0, "steps": 0}, {"epoch": 1, "steps": STEPS_PER_EPOCH}]
    assert synchronized.epochs == [expected, expected]
    assert _epochs(synchronized.run) == [0, 1]


@pytest.mark.slow
def test_only_the_chief_writes_and_the_other_worker_cleans_up(synchronized):
    for name in ("run.json", "history.csv", "metrics.json", "model.keras", "checkpoints/best.keras"):
        assert (synchronized.run / name).is_file(), name
    assert (synchronized.run / "saved_model" / "saved_model.pb").is_file()
    assert not synchronized.other_run.exists(), "worker 1 wrote into its --out"
    assert _worker_folders(synchronized.temp) == [], "worker 1 left its temporary folder"


@pytest.mark.slow
def test_without_synchronized_batch_norm_each_replica_normalizes_its_half(tmp_path_factory, one_device):
    """Acceptance 2: --no-sync-batch-norm normalizes each half-batch on its own: other weights."""
    unsynchronized = _two_workers(tmp_path_factory, "unsynchronized", "--no-sync-batch-norm")
    difference = _largest_difference(_weights(unsynchronized.run), one_device)
    print(f"two unsynchronized workers against one device: largest weight difference {difference:.2e}")
    assert difference > 100 * SAME
    metrics = _metrics(unsynchronized.run)
    assert metrics["sync_batch_norm"] is False and metrics["replicas"] == 2
    assert "batch norm statistics per replica" in unsynchronized.workers.output(0)


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_trains_as_one_device(tmp_path, one_device):
    """Acceptance 4: --strategy mirrored over two logical CPUs of one process."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(WRAPPER), str(EXAMPLES), *ARGS, "--strategy", "mirrored", "--out", str(run)],
        env=_env(TRAIN_LOGICAL_CPUS="2"), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(run)
    assert (metrics["strategy"], metrics["replicas"], metrics["workers"], metrics["sync_batch_norm"]) == (
        "mirrored", 2, 1, True,
    )  # fmt: skip
    assert metrics["validation_examples"] == WHOLE_BATCHES
    difference = _largest_difference(_weights(run), one_device)
    print(f"mirrored on two logical CPUs against one device: largest weight difference {difference:.2e}")
    assert difference <= SAME


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_epoch_stops_the_other_then_both_resume(tmp_path):
    """Acceptance 3: SIGKILL worker 1 in epoch 2; the chief stops with a message in bounded time and writes
    no result. Restarted without --resume, the chief refuses the folder and worker 1 stops with it (it does
    not wait for the chief); with --resume both continue from epoch 2, and history.csv has each epoch once."""
    run, other_run, temp = tmp_path / "run", tmp_path / "worker1-run", tmp_path / "tmp"
    temp.mkdir()
    first = [tmp_path / "first0.jsonl", tmp_path / "first1.jsonl"]
    slow = {"TRAIN_STEP_SLEEP_FROM_EPOCH": "1", "TRAIN_STEP_SLEEP": "2", "TMPDIR": str(temp)}
    workers = Workers(
        tmp_path, "killed", [run, other_run], ARGS, env=slow, envs=[{"TRAIN_EPOCH_LOG": str(log)} for log in first]
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (first[1].exists() and '"epoch": 1' in first[1].read_text()):
            for index, process in enumerate(workers.processes):
                assert process.poll() is None, workers.output(index)[-3000:]
            assert time.monotonic() < deadline, "epoch 2 never began"
            time.sleep(0.1)
        if workers.network.holder is not None:  # both workers in the loopback-only namespace
            expected = workers.network.namespace(workers.network.holder.pid)
            assert [workers.network.namespace(p.pid) for p in workers.processes] == [expected, expected]
            assert expected != workers.network.namespace(os.getpid())
        time.sleep(1.0)  # into epoch 2's steps, each of which sleeps 2 s
        workers.processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        chief = workers.processes[0]
        chief.wait(timeout=KILL_DETECTED_WITHIN)
        stopped_after = time.monotonic() - killed
    finally:
        workers.kill()
    print(f"the chief stopped {stopped_after:.1f} s after worker 1 was killed")
    output = workers.output(0)
    assert chief.returncode == 1, output[-3000:]
    assert "training stopped: /job:worker/replica:0/task:1 stopped answering" in output
    assert "Restart every worker with the same command and --resume" in output
    assert "Traceback" not in output
    assert _epochs(run) == [0]
    assert not (run / "metrics.json").exists() and not (run / "saved_model").exists()
    assert len(_worker_folders(temp)) == 1, "the killed worker's folder is left until it restarts"

    forgot = Workers(tmp_path, "without-resume", [run, other_run], ARGS, env={"TMPDIR": str(temp)})
    assert forgot.wait() == [2, 2]
    assert "already exists: pass --resume" in forgot.output(0)
    assert "the chief refused to start: run folder" in forgot.output(1)

    second = [tmp_path / "second0.jsonl", tmp_path / "second1.jsonl"]
    resumed = Workers(
        tmp_path, "resumed", [run, other_run], [*ARGS, "--resume"], env={"TMPDIR": str(temp)},
        envs=[{"TRAIN_EPOCH_LOG": str(log)} for log in second],
    )  # fmt: skip
    resumed.check_success()
    # Worker 1 had no backup of its own: it took the chief's, epoch and optimizer steps included.
    expected = [{"epoch": 1, "steps": STEPS_PER_EPOCH}]
    assert [_epoch_log(log) for log in second] == [expected, expected]
    assert _epochs(run) == [0, 1]
    metrics = _metrics(run)
    assert (metrics["epochs_completed"], metrics["initial_epoch"], metrics["epochs_run"]) == (2, 1, 1)
    assert not other_run.exists() and _worker_folders(temp) == []


# Fast checks: the flags, the choice of strategy, the checks before anything runs.


def test_the_workers_name_only_127_0_0_1_in_a_network_of_the_loopback_interface_alone(loopback_network):
    for index in range(2):
        config = json.loads(_tf_config([1234, 1235], index))
        assert all(address.startswith("127.0.0.1:") for address in config["cluster"]["worker"])
    if loopback_network.holder is None:
        warnings.warn(f"no network namespace for the workers: {loopback_network.reason}")
        return
    assert loopback_network.interfaces() == ["lo"]
    probe = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print(socket.gethostbyname('localhost'))"
    result = subprocess.run([*loopback_network.prefix, sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "127.0.0.1", result.stderr


def test_the_flags_and_their_defaults_are_config_s():
    parser = load_script("train").build_parser()
    args = parser.parse_args(["--model", "mlp", "--dataset", "mnist", "--out", "run"])
    config = training.Config(model="mlp", dataset="mnist", out="run")
    assert (args.strategy, args.sync_batch_norm) == (config.strategy, config.sync_batch_norm) == ("auto", True)
    off = parser.parse_args(["--model", "mlp", "--dataset", "mnist", "--out", "run", "--no-sync-batch-norm"])
    assert off.sync_batch_norm is False
    strategy = next(action for action in parser._actions if action.dest == "strategy")
    assert tuple(strategy.choices) == distribute.STRATEGIES


@pytest.mark.parametrize(
    "tf_config, expected",
    [
        (None, "one-device"),
        ({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}, "one-device"),
        ({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}},
         "multi-worker"),
        ({"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}, "task": {"type": "chief"}}, "multi-worker"),
    ],
)
def test_auto_takes_multi_worker_when_tf_config_names_more_than_one_worker(monkeypatch, tf_config, expected):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert not tf.config.list_physical_devices("GPU"), "on a machine with several GPUs auto means mirrored"
    assert distribute.resolve("auto") == expected


@pytest.mark.parametrize(
    "cluster, task, chief",
    [
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
        ({"chief": ["a:1"], "worker": ["b:1"]}, {"type": "chief", "index": 0}, True),
        ({"chief": ["a:1"], "worker": ["b:1"]}, {"type": "worker", "index": 0}, False),
    ],
)
def test_the_chief_is_the_chief_task_else_worker_0(monkeypatch, cluster, task, chief):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert distribute.is_chief() is chief


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, "--strategy multi-worker needs TF_CONFIG"),
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps"}}', "names no job of its cluster"),
    ],
)
def test_multi_worker_without_a_usable_tf_config_exits_2_before_any_folder(monkeypatch, tmp_path, tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    out = tmp_path / "run"
    status, _, err = run_main("train", [*ARGS, "--strategy", "multi-worker", "--out", str(out)])
    assert status == 2 and message in err
    assert not out.exists()


def test_a_batch_that_does_not_split_evenly_across_replicas_exits_2_before_any_folder(monkeypatch, tmp_path):
    two_replicas = distribute.Cluster("mirrored", types.SimpleNamespace(num_replicas_in_sync=2), 1, True)
    monkeypatch.setattr(distribute.Cluster, "make", classmethod(lambda cls, name: two_replicas))
    out = tmp_path / "run"
    status, _, err = run_main("train", [*ARGS, "--batch-size", "15", "--out", str(out)])
    assert status == 2 and "--batch-size 15 does not split evenly across 2 replicas" in err
    assert not out.exists()


def test_validation_needs_one_whole_global_batch_with_more_than_one_replica(monkeypatch, tmp_path):
    two_replicas = distribute.Cluster("mirrored", types.SimpleNamespace(num_replicas_in_sync=2), 1, True)
    monkeypatch.setattr(distribute.Cluster, "make", classmethod(lambda cls, name: two_replicas))
    out = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=EXAMPLES):
        status, _, err = run_main("train", [*ARGS, "--max-eval-examples", "15", "--out", str(out)])
    assert status == 2 and "15 validation examples make none: take a smaller batch" in err
    assert not out.exists()


def test_synchronize_batch_norms_sets_every_batch_norm_of_a_zoo_model():
    model = models.convnet((8, 8, 1), 3, filters=(4, 8), norm="batch")
    assert not distribute.has_synchronized_batch_norm(model)
    assert distribute.synchronize_batch_norms(model) == 2
    assert distribute.has_synchronized_batch_norm(model)
    norms = [layer for layer in model.layers if isinstance(layer, kernorm.BatchNormalization)]
    assert [layer.get_config()["synchronized"] for layer in norms] == [True, True]
    assert distribute.synchronize_batch_norms(models.convnet((8, 8, 1), 3, filters=(4, 8), norm="group")) == 0


def test_a_lost_worker_names_the_worker_and_how_to_resume(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], 0))
    error = tf.errors.UnavailableError(
        None, None, "Collective ops is aborted by: The following tasks are unhealthy (stopped sending heartbeats):\n"
        "/job:worker/replica:0/task:1\nThe tasks have crashed. [from /job:worker/replica:0/task:0]",
    )  # fmt: skip
    message = str(distribute.lost_worker_error(error, "runs/x"))
    assert message.startswith("training stopped: /job:worker/replica:0/task:1 stopped answering (UnavailableError)")
    assert "--resume" in message and "runs/x/backup" in message
