"""Helpers for the script tests: load scripts/*.py as modules, and train small runs once per session.

Training is the slow part, so the runs that several tests read (an image run
and a text run, on `tfds.testing.mock_data`) are trained once and shared by
test_train.py and test_predict.py.
"""

import contextlib
import importlib.util
import io
import pathlib
import sys

import pytest
import tensorflow_datasets as tfds

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
MOCK_EXAMPLES = 48

IMAGE_ARGS = ["--model", "convnet", "--norm", "batch", "--dataset", "fashion_mnist", "--epochs", "2", "--batch-size", "16"]
TEXT_ARGS = [
    "--model", "transformer_tiny", "--norm", "layer", "--dataset", "glue/sst2",
    "--epochs", "1", "--batch-size", "16", "--sequence-length", "16",
]  # fmt: skip


def load_script(name):
    """scripts/NAME.py as a module (the scripts folder is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_main(script, argv, stdin=None):
    """Runs SCRIPT.main(argv) in this process: (exit status, stdout, stderr)."""
    module = load_script(script)
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        old_stdin = sys.stdin
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        try:
            result = module.main(argv)
            if isinstance(result, int):
                status = result
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else 1
        finally:
            sys.stdin = old_stdin
    return status, out.getvalue(), err.getvalue()


def train_mock(argv, num_examples=MOCK_EXAMPLES):
    """train.main(argv) on TFDS mock data; returns the metrics dict."""
    train = load_script("train")
    with tfds.testing.mock_data(num_examples=num_examples):
        return train.main(argv)


_RUNS = {}


def trained_run(kind, tmp_path_factory):
    """The folder of a finished mock-data run, "image" or "text", trained once per session."""
    if kind not in _RUNS:
        run = tmp_path_factory.mktemp(f"{kind}-run") / "run"
        args = IMAGE_ARGS if kind == "image" else TEXT_ARGS
        train_mock([*args, "--out", str(run)])
        _RUNS[kind] = run
    return _RUNS[kind]


@pytest.fixture(scope="session")
def image_run(tmp_path_factory):
    return trained_run("image", tmp_path_factory)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    return trained_run("text", tmp_path_factory)
