"""The MLP's activations on rows, fused with the bias: GELU (exact, tanh) and SwiGLU."""

from __future__ import annotations

from numba import njit, prange

from ... import config
from .. import jit
from .vmath import gelu_erf, gelu_tanh, silu


@njit(**jit.VEC)
def _gelu_row(r, x, bias, tanh_approx):
    """``x[r] = gelu(x[r] + bias)`` with the vectorised float32 functions of
    :mod:`~qkvmean.engine.kernels.vmath` (relative error a few units of float32 roundoff)."""
    row = x[r]
    if tanh_approx:
        for d in range(row.shape[0]):
            row[d] = gelu_tanh(row[d] + bias[d])
    else:
        for d in range(row.shape[0]):
            row[d] = gelu_erf(row[d] + bias[d])


@njit(parallel=True, **jit.VEC)
def bias_gelu_kernel(x, bias, tanh_approx):
    """In place: ``x = gelu(x + bias)``, exact (erf) or the tanh approximation (GPT-2)."""
    for r in prange(x.shape[0]):
        _gelu_row(r, x, bias, tanh_approx)


@njit(**jit.VEC)
def bias_gelu_serial(x, bias, tanh_approx):
    for r in range(x.shape[0]):
        _gelu_row(r, x, bias, tanh_approx)


@njit(**jit.VEC)
def _swiglu_row(r, g, bias, out):
    row = g[r]
    dst = out[r]
    f = out.shape[1]
    for d in range(f):
        dst[d] = silu(row[d] + bias[d]) * (row[f + d] + bias[f + d])


@njit(**jit.VEC)
def bias_swiglu_serial(g, bias, out):
    """``out = silu(g[:, :F] + bias[:F]) * (g[:, F:] + bias[F:])`` (SwiGLU: the gate and
    up projections side by side in ``g`` ``(rows, 2F)``)."""
    for r in range(g.shape[0]):
        _swiglu_row(r, g, bias, out)


@njit(parallel=True, **jit.VEC)
def bias_swiglu_kernel(g, bias, out):
    """:func:`bias_swiglu_serial`, rows on the compute threads."""
    for r in prange(g.shape[0]):
        _swiglu_row(r, g, bias, out)


def bias_gelu(x, bias, tanh_approx):
    """In place ``x = gelu(x + bias)`` on a 2-D C-contiguous array; returns ``x``."""
    with config.kernel_guard():
        bias_gelu_kernel(x, bias, bool(tanh_approx))
    return x
