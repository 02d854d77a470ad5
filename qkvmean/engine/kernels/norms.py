"""LayerNorm and RMSNorm of rows, fused with the bias and the residual sum."""

from __future__ import annotations

from numba import njit, prange

from .. import jit
from .rows import norm_row


@njit(**jit.SERIAL)
def add_norm_serial(x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out):
    """The model path's fused residual step, on the calling thread: see
    :func:`~qkvmean.engine.kernels.rows.norm_row` (post-norm: ``h = N(a + b + h)``;
    pre-norm: ``h += a + b`` and ``x = N'(h)``)."""
    for r in range(x.shape[0]):
        norm_row(r, x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out)


@njit(parallel=True, **jit.SERIAL)
def add_norm_kernel(x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out):
    """:func:`add_norm_serial`, rows on the compute threads."""
    for r in prange(x.shape[0]):
        norm_row(r, x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out)
