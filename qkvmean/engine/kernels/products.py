"""The model path's matrix products ``out = a @ b`` in fixed blocks of rows.

Every product of the model path is cut into blocks of :data:`ROWS` rows of ``a`` (from
row 0, whatever the thread count), each one single-threaded BLAS ``gemm``
(:mod:`qkvmean.engine.kernels.blas`). :func:`matmul_serial` runs them in order on the
calling thread (one input per task); :func:`matmul_kernel` shares them out among the
compute threads (an input with the cores to itself). The blocks, and so the bits, are the
same either way: a multi-threaded BLAS would split the work by the thread count and round
differently (OpenBLAS 0.3.31 does).
"""

from __future__ import annotations

from numba import njit, prange

from .. import jit
from .blas import NO_TRANS, ROW_MAJOR, TRANS

#: Rows of ``a`` per product: enough that repacking ``b`` for each block costs little
#: (a few per cent against one product of every row), few enough to share out.
ROWS = 256


@njit(**jit.HOT)
def _layout(x):
    """``(transpose flag, leading dimension)`` of a 2-d operand whose rows or columns are
    contiguous, in CBLAS's row-major terms (a transposed view, as the loader keeps some
    weights, is read as such; never copied)."""
    item = x.itemsize
    if x.strides[1] == item or x.shape[1] <= 1:
        return NO_TRANS, max(x.strides[0] // item, x.shape[1], 1)
    return TRANS, max(x.strides[1] // item, x.shape[0], 1)


@njit(**jit.HOT)
def _block(gemm, a, b, out, i):
    rows = min(ROWS, a.shape[0] - i)
    trans_a, lda = _layout(a)
    trans_b, ldb = _layout(b)
    gemm(
        ROW_MAJOR, trans_a, trans_b, rows, b.shape[1], a.shape[1], 1.0, a[i:].ctypes.data, lda,
        b.ctypes.data, ldb, 0.0, out[i:].ctypes.data,
        max(out.strides[0] // out.itemsize, out.shape[1], 1),
    )  # fmt: skip


@njit(**jit.HOT)
def matmul_serial(gemm, a, b, out):
    """``out = a @ b`` (2-d; rows or columns of ``a`` and ``b`` contiguous, rows of
    ``out``), block after block on the calling thread."""
    for i in range(0, a.shape[0], ROWS):
        _block(gemm, a, b, out, i)


@njit(parallel=True, **jit.HOT)
def matmul_kernel(gemm, a, b, out):
    """:func:`matmul_serial`'s blocks on the compute threads."""
    for blk in prange((a.shape[0] + ROWS - 1) // ROWS):
        _block(gemm, a, b, out, blk * ROWS)
