"""The finite scan of the input checks and the overflow guards (numpy or CuPy arrays)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ... import config
from .. import jit
from .vmath import fmax

#: Values per task of the parallel scan.
SCAN_BLOCK = 1 << 16


@njit(**jit.SERIAL)
def _scan_block(flat, start, stop):
    """``(max |x|, sum of x * 0)`` over ``flat[start:stop]``: the sum is NaN where any
    value is not finite (``inf * 0`` and ``nan * 0`` are NaN; these flags keep them so),
    and one pass of vectorised code gives both."""
    top = flat[start] - flat[start]  # 0 in the array's type (NaN if flat[start] is not finite)
    flag = top
    for i in range(start, stop):
        x = flat[i]
        top = fmax(top, abs(x))
        flag += x * 0
    return top, flag


@njit(parallel=True, **jit.SERIAL)
def _scan_kernel(flat, tops, flags):
    for task in prange(tops.shape[0]):
        start = task * SCAN_BLOCK
        tops[task], flags[task] = _scan_block(flat, start, min(start + SCAN_BLOCK, flat.size))


def scan_finite(flat, xp=np, parallel=False):
    """``(index of the first non-finite value or -1, max |value|)`` of a 1-D array (of
    the array module ``xp``: numpy, or CuPy for the CUDA backend).

    float32 and float64 numpy arrays: one compiled pass (on all cores with ``parallel``);
    other arrays: ``max`` and ``min``, which propagate NaN. The index is looked for only
    when something is wrong.
    """
    if flat.size == 0:
        return -1, 0.0
    if xp is np and flat.dtype in (np.float32, np.float64):
        if parallel:
            n_tasks = -(-flat.size // SCAN_BLOCK)
            tops, flags = np.empty(n_tasks, flat.dtype), np.empty(n_tasks, flat.dtype)
            with config.kernel_guard():
                _scan_kernel(flat, tops, flags)
            top, flag = float(tops.max()), float(flags.sum())
        else:
            top, flag = (float(x) for x in _scan_block(flat, 0, flat.size))
        if math.isfinite(top) and math.isfinite(flag):
            return -1, top
    else:
        top, bottom = float(flat.max()), float(flat.min())
        if math.isfinite(top) and math.isfinite(bottom):
            return -1, max(abs(top), abs(bottom))
    return int((~xp.isfinite(flat)).argmax()), float("inf")
