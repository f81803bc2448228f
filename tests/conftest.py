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


def real_data_dir(*names):
    """The TFDS data folder holding `names`, or skip the test naming `TFDS_DATA_DIR`."""
    data_dir = os.environ.get("TFDS_DATA_DIR")
    if not data_dir:
        pytest.skip("real-data test: set TFDS_DATA_DIR to a folder of prepared TFDS datasets")
    missing = [name for name in names if not (pathlib.Path(data_dir) / name).is_dir()]
    if missing:
        pytest.skip(f"real-data test: TFDS_DATA_DIR={data_dir} lacks {', '.join(missing)}")
    return data_dir
