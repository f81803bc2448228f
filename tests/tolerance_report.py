"""A pytest plugin that measures how much room each tolerance leaves: `pytest -p tolerance_report tests/...`.

Every `numpy_reference.assert_close` and `np.testing.assert_allclose` that runs is
recorded with the error it saw. At the end, each call site gets one line: the
tolerance, the largest and the smallest error measured there over the test cases
that reached it, and the headroom (tolerance / error) of the case with the most.
The constants in `tests/tolerances.py` were set from this report, and the
README's promise that no tolerance is more than 100x above the error the code
achieves is checked with it: a headroom above 100 is a tolerance to tighten.
`KERNORM_TOLERANCE_REPORT=FILE` also writes every record as JSON lines.
"""

import collections
import json
import os
import sys

import numpy as np
import pytest

import numpy_reference

_RECORDS = []
_CURRENT = {"test": None}


def _site():
    """`file:line` of the test code that asked for the comparison (outside this file and NumPy)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.endswith(".py") and "/tests/" in name and not name.endswith(("tolerance_report.py", "numpy_reference.py")):
            return f"{os.path.basename(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _record(kind, error, tolerance):
    _RECORDS.append({"test": _CURRENT["test"], "site": _site(), "kind": kind, "error": error, "tolerance": tolerance})


def _wrap_assert_close(original):
    def assert_close(actual, expected, tolerance, what="value"):
        _record("relative", numpy_reference.relative_error(actual, expected), tolerance)
        return original(actual, expected, tolerance, what)

    return assert_close


def _wrap_allclose(original):
    def assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        actual64 = np.asarray(actual, np.float64)
        desired64 = np.broadcast_to(np.asarray(desired, np.float64), actual64.shape)
        difference = np.abs(actual64 - desired64)
        allowed = atol + rtol * np.abs(desired64)
        finite = np.isfinite(difference)
        # The share of the allowance the worst element used: error / tolerance as one number.
        used = float(np.max(difference[finite] / np.maximum(allowed[finite], 1e-300))) if finite.any() else 0.0
        _record("allclose", used, 1.0)
        return original(actual, desired, rtol, atol, *args, **kwargs)

    return assert_allclose


def pytest_configure(config):
    numpy_reference.assert_close = _wrap_assert_close(numpy_reference.assert_close)
    np.testing.assert_allclose = _wrap_allclose(np.testing.assert_allclose)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CURRENT["test"] = item.nodeid


def pytest_terminal_summary(terminalreporter):
    path = os.environ.get("KERNORM_TOLERANCE_REPORT")
    if path:
        with open(path, "w") as file:
            for record in _RECORDS:
                file.write(json.dumps(record) + "\n")
    sites = collections.defaultdict(list)
    for record in _RECORDS:
        sites[record["site"], record["tolerance"]].append(record)
    write = terminalreporter.write_line
    write("")
    write("tolerance report: headroom = tolerance / largest error of one case (allclose: 1 / share of the allowance)")
    rows = []
    for (site, tolerance), records in sites.items():
        errors = [r["error"] for r in records]
        worst = max(records, key=lambda r: r["tolerance"] / max(r["error"], 1e-300))
        headroom = worst["tolerance"] / max(worst["error"], 1e-300)
        rows.append((headroom, site, tolerance, max(errors), min(errors), len(records), worst["test"]))
    for headroom, site, tolerance, largest, smallest, count, test in sorted(rows, reverse=True):
        write(f"{headroom:10.3g}  {site:40s} tol {tolerance:<8.3g} errors {smallest:.2g}..{largest:.2g} ({count})  {test}")
