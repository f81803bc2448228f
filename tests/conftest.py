"""Shared test set-up: quiet TensorFlow, fixed seeds, and the real-data folder."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Each test starts from the same seeds and the float32 policy."""
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


REAL_DATA = "real-data test"


def real_data_dir(*names):
    """The TFDS data folder holding `names`, or skip the test naming `TFDS_DATA_DIR`."""
    data_dir = os.environ.get("TFDS_DATA_DIR")
    if not data_dir:
        pytest.skip(f"{REAL_DATA}: set TFDS_DATA_DIR to a folder of prepared TFDS datasets")
    missing = [name for name in names if not (pathlib.Path(data_dir) / name).is_dir()]
    if missing:
        pytest.skip(f"{REAL_DATA}: TFDS_DATA_DIR={data_dir} lacks {', '.join(missing)}")
    return data_dir


def pytest_terminal_summary(terminalreporter):
    """Ends the run with one clear line when real-data tests were skipped (README command 2 without
    the datasets): the summary's count of skips is otherwise the only sign."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if REAL_DATA in reason:
            reason = reason.split(f"{REAL_DATA}: ", 1)[1]
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        count = sum(reasons.values())
        terminalreporter.write_sep("=", f"{count} real-data test{'s' if count > 1 else ''} skipped", yellow=True)
        for reason, number in sorted(reasons.items()):
            terminalreporter.write_line(f"{number} skipped: {reason}", yellow=True)
        terminalreporter.write_line(
            "They train on real datasets (fashion_mnist, glue/sst2): point TFDS_DATA_DIR at a folder of prepared "
            "TFDS datasets (export TFDS_DATA_DIR=/path/to/tensorflow_datasets) and run pytest again.",
            yellow=True,
        )
