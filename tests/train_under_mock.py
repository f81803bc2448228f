"""Runs scripts/train.py in its own process on `tfds.testing.mock_data`, for tests that need a process to kill.

    python tests/train_under_mock.py NUM_EXAMPLES [train.py arguments ...]

A process does not see the mock of the test that starts it, so this wrapper enters
the mock and then calls `train.main`. Environment variables help the tests:

- TRAIN_EPOCH_LOG=FILE: each epoch that begins appends a JSON line to FILE with
  the epoch number and the optimizer's step count at that moment.
- TRAIN_STEP_SLEEP_FROM_EPOCH=N: from epoch N on, each training step sleeps
  TRAIN_STEP_SLEEP seconds (default 0.5), so a test can kill the process mid-epoch.
- TRAIN_LOGICAL_CPUS=N: the CPU becomes N logical devices before TensorFlow starts,
  for `--strategy mirrored` on a machine without GPUs.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import train  # noqa: E402


class EpochProbe(keras.callbacks.Callback):
    def __init__(self, log, sleep_from_epoch, sleep):
        super().__init__()
        self.log = log
        self.sleep_from_epoch = sleep_from_epoch
        self.sleep = sleep
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.log:
            with open(self.log, "a") as file:
                file.write(json.dumps({"epoch": epoch, "steps": int(self.model.optimizer.iterations.numpy())}) + "\n")

    def on_train_batch_end(self, batch, logs=None):
        if self.sleep_from_epoch is not None and self.epoch >= self.sleep_from_epoch:
            time.sleep(self.sleep)


def main():
    if os.environ.get("TRAIN_LOGICAL_CPUS"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        devices = [tf.config.LogicalDeviceConfiguration()] * int(os.environ["TRAIN_LOGICAL_CPUS"])
        tf.config.set_logical_device_configuration(cpu, devices)
    num_examples = int(sys.argv[1])
    sleep_from = os.environ.get("TRAIN_STEP_SLEEP_FROM_EPOCH")
    probe = EpochProbe(
        os.environ.get("TRAIN_EPOCH_LOG"),
        int(sleep_from) if sleep_from else None,
        float(os.environ.get("TRAIN_STEP_SLEEP", "0.5")),
    )
    with tfds.testing.mock_data(num_examples=num_examples):
        train.main(sys.argv[2:], callbacks=[probe])


if __name__ == "__main__":
    main()
