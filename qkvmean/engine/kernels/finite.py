"""The finite scan of the input checks and the overflow guards (numpy or CuPy arrays)."""

from __future__ import annotations

import math

import numpy as np


def scan_finite(flat, xp=np):
    """``(index of the first non-finite value or -1, max |value|)`` of a 1-D array (of
    the array module ``xp``: numpy, or CuPy for the CUDA backend).

    ``max`` and ``min`` propagate NaN and are SIMD loops: two passes tell whether
    everything is finite and give the largest magnitude; the index is looked for only when
    something is wrong.
    """
    if flat.size == 0:
        return -1, 0.0
    top, bottom = float(flat.max()), float(flat.min())
    if math.isfinite(top) and math.isfinite(bottom):
        return -1, max(abs(top), abs(bottom))
    return int((~xp.isfinite(flat)).argmax()), float("inf")
