"""The tolerances the tests hold, in one place, each set from the error the code achieves.

Errors are relative, as `numpy_reference.relative_error` measures them: the largest
absolute difference from the float64 reference over the largest reference value.
Each constant covers one class of cases (a dtype, a path); the comment gives the
largest error measured over that class (outputs and gradients, eager, tf.function
and XLA, on CPU) and the margin the constant leaves above it. No constant is more
than 100x above the errors of the cases it covers: a looser one would let a bug of
that size through. To measure again:

    pytest -p tolerance_report tests/test_fast_paths.py tests/test_precision.py ...

(run from the repository with `PYTHONPATH=tests`; see tests/tolerance_report.py).
"""

import tensorflow as tf

# float32 against the float64 reference, every path: largest error 8.7e-7 (group
# norm gradients under XLA), most cases 1e-7 to 5e-7; margin 6.
FLOAT32 = 5e-6
# float32 against Keras's own layers and training steps (another order of the same
# sums, and an optimizer step on top): largest 2.1e-6 (moving statistics after fit).
KERAS = 1e-5
# float64 policy against the float64 reference: largest 2.9e-16; margin 35.
FLOAT64 = 1e-14
# float16 inputs, statistics in float32, outputs and gradients rounded to float16
# (unit roundoff 4.9e-4): largest 9e-4 (group norm gradient), with |mean| / std up
# to 100; margin 2.2.
FLOAT16 = 2e-3
# bfloat16 (unit roundoff 3.9e-3): largest 6e-3 (batch and group norm gradients),
# with |mean| / std up to 10. Statistics taken in bfloat16 instead of float32 give
# 1.9e-2 on the outputs and 6e-2 on the gradients of rows with mean 10 and std 1.
BFLOAT16 = 1e-2
# float32 inputs with mean 1e4 and std 1e-2, where a float32 mean alone is off by a
# tenth of the spread: outputs and gradients up to 2.3e-7, the moving variance of
# XLA's batch norm 3.5e-6; margin 2.9. Without the large-mean correction: 0.03 to 1.
LARGE_MEAN = 1e-5

BY_DTYPE = {tf.float32: FLOAT32, tf.float16: FLOAT16, tf.bfloat16: BFLOAT16, tf.float64: FLOAT64}


def for_dtype(dtype):
    """The tolerance of outputs and gradients computed in `dtype`."""
    return BY_DTYPE[tf.as_dtype(dtype)]
