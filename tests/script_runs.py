"""Helpers for the script tests: load scripts/*.py as modules, and train small runs once per session.

Training is the slow part, so the runs that several tests read (an image run
and a text run, on `tfds.testing.mock_data`) are trained once and shared by
test_train.py and test_predict.py.
"""

import contextlib
import importlib.util
import io
import json
import pathlib
import signal
import subprocess
import sys
import sysconfig
import time
import venv

import pytest
import tensorflow_datasets as tfds

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
PREDICT = SCRIPTS / "predict.py"
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


@pytest.fixture(scope="session")
def python_without_kernorm(tmp_path_factory):
    """A Python whose environment has TensorFlow but not kernorm.

    A real virtual environment, made with `venv` and no packages of its own. A
    .pth line adds one folder to its path: links to every entry of this
    environment's site-packages except kernorm's (the package, its metadata and
    an editable install's .pth and finder). So TensorFlow and NumPy import as
    here, kernorm does not, whether it is installed editable or not. The fixture
    checks that `import kernorm` fails there before any test trusts it. Scripts
    run with a temporary working directory, so the repository's own kernorm/
    folder is out of reach too.
    """
    root = tmp_path_factory.mktemp("venv-without-kernorm")
    venv.EnvBuilder(with_pip=False, clear=True).create(root)
    python = root / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    mirror = root / "parent-site-packages"
    mirror.mkdir()
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in pathlib.Path(folder).iterdir():
            if "kernorm" not in entry.name.lower() and not (mirror / entry.name).exists():
                (mirror / entry.name).symlink_to(entry)
    pathlib.Path(site, "parent-site-packages.pth").write_text(f"{mirror}\n")
    probe = subprocess.run(
        [python, "-c", "import kernorm"], capture_output=True, text=True, cwd=root, timeout=60
    )
    assert probe.returncode != 0 and "No module named 'kernorm'" in probe.stderr, "kernorm must not be importable"
    return python


def serve(python, saved_model, body, cwd, *args):
    """scripts/predict.py in its own process with `python`, fed `body` as JSON on standard input."""
    return subprocess.run(
        [python, str(PREDICT), str(saved_model), *args],
        input=json.dumps(body), capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


def sigkill_when(process, ready, what, timeout):
    """Waits until `ready()` is true, lets `process` run one second more, then kills it with SIGKILL and
    checks that the signal is what ended it. Fails with `process`'s standard error if it exits first, and
    says that `what` never began if `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"{what} never began"
            time.sleep(0.1)
        time.sleep(1.0)  # into it
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
