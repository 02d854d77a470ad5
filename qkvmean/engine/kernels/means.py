"""Substitution of flattened Q/K/V: running means (over tokens, causal windows and
prefixes) and given vectors per position (dataset means, zeros, another input's values),
and the float64 per-position sums of the dataset means."""

from __future__ import annotations

from numba import njit, prange

from ... import config
from .. import jit
from .rows import window_mean_feature


@njit(**jit.SERIAL)
def _mean_pair(bg, x, lengths, group, select, window, shrink, acc, out):
    """Replace the valid rows of pair ``bg`` by their running mean, if it is selected;
    ``out`` may be ``x``. ``window`` 0: the mean over every valid token; ``W >= 1``: the
    causal mean over the last ``W`` tokens ``max(0, t - W + 1) .. t`` (``W >= n``: the
    prefix mean). Summed in float64 in ``acc``, times ``shrink``, an exact power of two
    (1 unless the sum could overflow)."""
    n_rows, dim = x.shape[1], x.shape[2]
    n = lengths[bg // group]
    if not select[bg % group]:
        n = 0  # copy through untouched
    for d in range(dim):
        acc[d] = 0.0
    if window >= n and window > 0:  # the prefix mean
        for t in range(n):
            for d in range(dim):
                acc[d] += x[bg, t, d] * shrink
                out[bg, t, d] = acc[d] / (t + 1) / shrink
    elif window > 0:  # feature by feature, in place (rows.window_mean_feature)
        for d in range(dim):
            window_mean_feature(x, bg, d, n, window, shrink, out)
    else:
        for t in range(n):
            for d in range(dim):
                acc[d] += x[bg, t, d] * shrink
        for t in range(n):
            for d in range(dim):
                out[bg, t, d] = acc[d] / n / shrink
    for t in range(n, n_rows):
        for d in range(dim):
            out[bg, t, d] = x[bg, t, d]


@njit(parallel=True, **jit.SERIAL)
def mean_substitute_kernel(x, lengths, group, select, window, shrink, acc, out):
    """:func:`_mean_pair` for every pair; ``acc`` is a preallocated ``(BG, D)`` float64
    scratch array (one accumulator row per pair: no allocation inside the loop)."""
    for bg in prange(x.shape[0]):
        _mean_pair(bg, x, lengths, group, select, window, shrink, acc[bg], out)


@njit(**jit.SERIAL)
def mean_substitute_serial(x, lengths, group, select, window, shrink, acc, out):
    for bg in range(x.shape[0]):
        _mean_pair(bg, x, lengths, group, select, window, shrink, acc, out)


@njit(**jit.SERIAL)
def _given_pair(bg, x, lengths, group, select, given, out):
    """Replace the valid rows of pair ``bg`` by given per-position vectors, if it is
    selected; ``out`` may be ``x``. ``given`` ``(M, >= N, D)`` holds one set per pair
    ``bg % M``: ``M = group`` shares them over the inputs (the dataset means, zeros),
    ``M = B * group`` gives each input its own (resampled from another input)."""
    n_rows, dim = x.shape[1], x.shape[2]
    g = bg % given.shape[0]
    n = lengths[bg // group] if select[bg % group] else 0
    for t in range(n):
        for d in range(dim):
            out[bg, t, d] = given[g, t, d]
    for t in range(n, n_rows):
        for d in range(dim):
            out[bg, t, d] = x[bg, t, d]


@njit(parallel=True, **jit.SERIAL)
def given_substitute_kernel(x, lengths, group, select, means, out):
    """:func:`_given_pair` for every pair; ``means`` ``(group or B * group, >= N, D)``."""
    for bg in prange(x.shape[0]):
        _given_pair(bg, x, lengths, group, select, means, out)


@njit(**jit.SERIAL)
def given_substitute_serial(x, lengths, group, select, means, out):
    for bg in range(x.shape[0]):
        _given_pair(bg, x, lengths, group, select, means, out)


@njit(parallel=True, **jit.SERIAL)
def position_sums_kernel(x, lengths, group, sums):
    """``sums[g, t] += x[b * group + g, t]`` for every valid position ``t < lengths[b]``,
    inputs ``b`` in order (so the float64 sums do not depend on the thread count); one
    task per group, each writing only its own ``sums[g]``."""
    dim = x.shape[2]
    for g in prange(group):
        for b in range(lengths.shape[0]):
            for t in range(lengths[b]):
                for d in range(dim):
                    sums[g, t, d] += x[b * group + g, t, d]


def position_sums(x, lengths, group, sums):
    """Add the valid positions of flattened ``x`` ``(B * group, N, D)`` into float64
    ``sums`` ``(group, >= N, D)``, input by input (the ``over="dataset"`` means; on the
    host whichever device computes the maps: a pass over memory)."""
    with config.kernel_guard():
        position_sums_kernel(x, lengths, group, sums)
