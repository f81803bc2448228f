"""Runs scripts/study.py in its own process on `tfds.testing.mock_data`, for tests that need a process to kill.

    python tests/study_under_mock.py NUM_EXAMPLES [study.py arguments ...]

A process does not see the mock of the test that starts it, so this wrapper enters the mock and then calls
`study.main`. With STUDY_CELL_LOG=FILE, each cell that begins appends its key to FILE, so a test can tell
which cells ran.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
import sys  # noqa: E402

import tensorflow_datasets as tfds  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import study  # noqa: E402


def main():
    log = os.environ.get("STUDY_CELL_LOG")
    if log:
        begin = study.Progress.begin

        def logged_begin(self, cell):
            with open(log, "a") as file:
                file.write(cell.key + "\n")
            begin(self, cell)

        study.Progress.begin = logged_begin
    with tfds.testing.mock_data(num_examples=int(sys.argv[1])):
        study.main(sys.argv[2:])


if __name__ == "__main__":
    main()
