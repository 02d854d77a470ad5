"""The MLP's activations on rows, fused with the bias: GELU (exact, tanh), SiLU and ReLU,
each plain or gated (``act(gate) * up``: SwiGLU, GeGLU). The codes of the base functions are
the indices of :data:`qkvmean.engine.arch.BASE_ACTIVATIONS`."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ... import config
from .. import jit
from .vmath import gelu_erf, gelu_tanh, silu

GELU, GELU_TANH, SILU, RELU = 0, 1, 2, 3


@njit(**jit.VEC)
def _act_row(src, bias, code, dst):
    """``dst[d] = act(src[d] + bias[d])`` for ``d < len(dst)``, with the vectorised float32
    functions of :mod:`~qkvmean.engine.kernels.vmath` (relative error a few units of float32
    roundoff); ``dst`` may be ``src``. One loop per function: no branch inside a loop."""
    f = dst.shape[0]
    if code == GELU:
        for d in range(f):
            dst[d] = gelu_erf(src[d] + bias[d])
    elif code == GELU_TANH:
        for d in range(f):
            dst[d] = gelu_tanh(src[d] + bias[d])
    elif code == SILU:
        for d in range(f):
            dst[d] = silu(src[d] + bias[d])
    else:
        zero = np.float32(0.0)
        for d in range(f):
            x = src[d] + bias[d]
            dst[d] = x if x > zero else zero


@njit(**jit.VEC)
def _row(r, m, bias, code, gated, out):
    """Row ``r``: ``out = act(m + bias)``; gated, ``out = act(gate) * up`` from the gate
    and up halves of ``m`` ``(rows, 2F)`` side by side."""
    row, dst = m[r], out[r]
    _act_row(row, bias, code, dst)
    if gated:
        f = dst.shape[0]
        for d in range(f):
            dst[d] *= row[f + d] + bias[f + d]


@njit(**jit.VEC)
def bias_activation_serial(m, bias, code, gated, out):
    """``out = act(m + bias)`` (``out`` may be ``m``), or gated from ``m``'s two halves."""
    for r in range(m.shape[0]):
        _row(r, m, bias, code, gated, out)


@njit(parallel=True, **jit.VEC)
def bias_activation_kernel(m, bias, code, gated, out):
    """:func:`bias_activation_serial`, rows on the compute threads."""
    for r in prange(m.shape[0]):
        _row(r, m, bias, code, gated, out)


def bias_gelu(x, bias, tanh_approx):
    """In place ``x = gelu(x + bias)`` on a 2-D C-contiguous array; returns ``x``."""
    with config.kernel_guard():
        bias_activation_kernel(x, bias, GELU_TANH if tanh_approx else GELU, False, x)
    return x
