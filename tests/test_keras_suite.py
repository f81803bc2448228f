"""Keras's own normalization tests, run against kernorm's layers.

The test files are copied at test time from the installed keras package, so a Keras
upgrade re-checks the drop-in promise. In each copy, `layers` (the module the tests
build their layers from) is replaced by a namespace that answers kernorm's class for
the four normalization layers and Keras's for everything else. The copies run in a
subprocess with pytest, as Keras runs them.
"""

import os
import pathlib
import re
import subprocess
import sys

import keras

SUITES = (
    "batch_normalization_test.py",
    "layer_normalization_test.py",
    "rms_normalization_test.py",
    "group_normalization_test.py",
)
KERAS_TESTS = pathlib.Path(keras.__file__).parent / "src" / "layers" / "normalization"

SHIM = '''\
"""keras.src.layers with kernorm's normalization layers in place of Keras's."""
import types

import kernorm
from keras.src import layers as _keras_layers

SWAPPED = ("BatchNormalization", "LayerNormalization", "RMSNormalization", "GroupNormalization")


class _Layers(types.ModuleType):
    def __getattr__(self, name):
        if name in SWAPPED:
            return getattr(kernorm, name)
        return getattr(_keras_layers, name)


layers = _Layers("layers")
'''

IMPORT = "from keras.src import layers\n"


def _copy_suite(name, folder):
    source = (KERAS_TESTS / name).read_text()
    assert source.count(IMPORT) == 1, f"{name}: the layers import moved; update this runner"
    (folder / name).write_text(source.replace(IMPORT, "from kernorm_swapped_layers import layers\n"))


def test_keras_normalization_suites_pass_on_kernorm(tmp_path):
    (tmp_path / "kernorm_swapped_layers.py").write_text(SHIM)
    for name in SUITES:
        _copy_suite(name, tmp_path)
    # Proof that the copies test kernorm: the shim answers kernorm's classes.
    probe = subprocess.run(
        [sys.executable, "-c", "import kernorm_swapped_layers as s; print(s.layers.LayerNormalization.__module__)"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    assert probe.stdout.strip().startswith("kernorm"), probe.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *SUITES],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert result.returncode == 0 and passed and not re.search(r"failed|error|skipped", summary), (
        f"Keras's normalization suites on kernorm: {summary}\n{result.stdout[-6000:]}"
    )
    # Keras 3.15 has 56 tests in these files; a newer Keras may add some, never fewer are expected.
    assert int(passed.group(1)) >= 56, summary
