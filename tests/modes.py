"""The three ways a layer runs in the tests: eagerly, in a tf.function, and compiled by XLA."""

import tensorflow as tf

MODES = ("eager", "function", "xla")


def compiled(function, mode):
    """`function` as it runs in `mode`."""
    if mode == "eager":
        return function
    if mode == "function":
        return tf.function(function, autograph=False)
    if mode == "xla":
        return tf.function(function, jit_compile=True, autograph=False)
    raise ValueError(f"unknown mode {mode!r}")


def grid(ranks, axes, valid):
    """Every (rank, axis) pair with `valid(rank, axis)`."""
    return [(rank, axis) for rank in ranks for axis in axes if valid(rank, axis)]


def axis_fits(rank, axis):
    """Whether every entry of `axis` names an axis of a rank-`rank` input other than the batch axis 0."""
    entries = [axis] if isinstance(axis, int) else axis
    return all(-rank < a < rank and a % rank != 0 for a in entries)
