"""Masked softmax attention on the CPU: the serial worker, its task and both drivers.

Layout, after the wrappers in :mod:`qkvmean.engine.api` have validated and flattened
the inputs (kernels see only flat arrays and scalars, never Python objects):

- ``q``: ``(BG, N, D)``, ``k``: ``(BG, N, D)``, ``v``: ``(BG, N, E)``, each pair's rows
  contiguous (row ``bg`` belongs to input ``bg // group``).
- ``lengths``: ``(batch,)`` int64, already checked to lie in ``[0, N]``.
- ``modes``: ``(group,)`` int8, one of the ``MODE_*`` constants, per flattened group.
- ``gemm``: the BLAS product of :mod:`qkvmean.engine.kernels.blas` for the dtype.

Each pair's query rows go in blocks of :data:`BLOCK`: one ``gemm`` writes the block's
scores ``scale q kᵀ`` into its rows of the output, the softmax and the metrics run on
them while they are in cache, and (for outputs) a second ``gemm`` multiplies them by
``v``. Each parallel task handles whole blocks of one ``(input, group)`` pair and writes
only its own rows of the preallocated outputs: no allocation and no shared writes inside
the parallel loop. The blocks start at multiples of :data:`BLOCK` whatever the task
layout, so every product, and so every bit, is the same however the rows are shared out.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import get_thread_id, njit, prange

from .. import jit
from ..modes import MODE_GENERAL, MODE_SHARED_ROW, MODE_UNIFORM
from .blas import NO_TRANS, ROW_MAJOR, TRANS
from .metrics import kl_sums, record_row
from .rows import key_range
from .softmax import softmax_row, uniform_row

#: Query rows per block: per product, and per task where a pair is split among threads.
#: 128 rows of 2048 keys are 1 MB of scores, which stay in a core's L2 from the product
#: through the softmax to the output product (64 and 256 rows measured no better, and
#: fewer rows per product repack the keys more often).
BLOCK = 128


class Logits(NamedTuple):
    """How a layer's scores become logits, and which keys each query sees (the kernels
    take it as one argument; :func:`plain` is the default: none of it)."""

    window: int  # 0: every key; W: the last W when causal (i - W < j <= i), else |i - j| <= W // 2
    softcap: float  # 0: none; c: logits c * tanh(s / c)
    slopes: np.ndarray  # (group,) ALiBi: slope_h * j added to head h's scores; empty: none


def plain(dtype=np.float32) -> Logits:
    """Scores as they are, every key (up to the query, when causal)."""
    return Logits(0, 0.0, np.zeros(0, dtype))


def check_modes(modes, lg: Logits) -> None:
    """Refuse the fast modes where rows differ by position (a window or ALiBi slopes).

    Mean-K's uniform rows stand for keys that were never substituted: a kernel that quietly
    took the general path instead would give the baseline's map under the condition's
    name. Mean-Q's shared row would copy one query's window or slopes to every row. The
    plan never picks either for such a layer (``Arch.exact_fast_paths``); every backend
    checks here before its kernel runs.
    """
    alibi = bool(np.any(np.asarray(lg.slopes) != 0.0))
    if (lg.window > 0 or alibi) and bool(np.any(np.asarray(modes) != MODE_GENERAL)):
        cause = f"a sliding window of {lg.window}" if lg.window > 0 else "ALiBi slopes"
        raise ValueError(
            f"the mean-K/mean-Q fast modes assume every query sees its keys alike, which "
            f"{cause} breaks: plan the general mode (Arch.exact_fast_paths is false for "
            "such models)"
        )


@njit(**jit.HOT)
def _shape_row(row, jmin, jmax, slope, softcap):
    """In place, the scores ``row[jmin:jmax]`` as logits: ALiBi's ``slope * j`` added,
    then ``softcap * tanh(s / softcap)``."""
    if slope != 0.0:
        for j in range(jmin, jmax):
            row[j] += slope * j
    if softcap > 0.0:
        for j in range(jmin, jmax):
            row[j] = softcap * np.tanh(row[j] / softcap)


@njit(**jit.HOT)
def _ld(x):
    """Elements between two rows of ``x``'s last two axes (its rows are contiguous); at
    least a row's length, as BLAS requires (a one-row axis may have any stride, 0 in a
    broadcast view)."""
    return max(x.strides[x.ndim - 2] // x.itemsize, x.shape[x.ndim - 1], 1)


@njit(**jit.HOT)
def _scores(gemm, q, k, w, bg, i, rows, keys, scale):
    """``w[bg, i:i + rows, :keys] = scale q[bg, i:i + rows] k[bg, :keys]ᵀ``."""
    dim = q.shape[2]
    gemm(
        ROW_MAJOR, NO_TRANS, TRANS, rows, keys, dim, scale, q[bg, i:].ctypes.data, _ld(q),
        k[bg].ctypes.data, _ld(k), 0.0, w[bg, i:].ctypes.data, _ld(w),
    )  # fmt: skip


@njit(**jit.HOT)
def _outputs(gemm, w, v, o, bg, i, rows, keys):
    """``o[bg, i:i + rows] = w[bg, i:i + rows, :keys] v[bg, :keys]``."""
    gemm(
        ROW_MAJOR, NO_TRANS, NO_TRANS, rows, v.shape[2], keys, 1.0, w[bg, i:].ctypes.data,
        _ld(w), v[bg].ctypes.data, _ld(v), 0.0, o[bg, i:].ctypes.data, _ld(o),
    )  # fmt: skip


@njit(**jit.HOT)
def _attention_block(
    gemm, q, k, v, n, mode, causal, scale, lg, slope, w, o, with_output, bg, i0, i1, mx,
    scratch,
):  # fmt: skip
    """Serial worker: weights (and outputs, metrics) of query rows ``i0:i1`` of pair ``bg``.

    ``scratch`` is this thread's row of logits, kept for the rows that
    ``MODE_SHARED_ROW`` copies. ``lg`` (:class:`Logits`) and ``slope`` (this pair's ALiBi
    slope): the logits and windows. Rows then differ by position, which the fast modes
    assume they do not: :func:`check_modes` refuses that pairing before any kernel runs.
    """
    n_keys = w.shape[2]
    window = lg.window
    shaped = slope != 0.0 or lg.softcap > 0.0
    p_row = mx.base[0, 0]  # zeros, unless there is a baseline (below)
    col_block = mx.col_block
    if mx.with_metrics:  # this task's column-sum blocks (whole ones: see attention())
        for sub in range(i0 // col_block, (i1 + col_block - 1) // col_block):
            col = mx.colsum[bg, sub]
            for j in range(n_keys):
                col[j] = 0.0
    first = -1  # the row MODE_SHARED_ROW copies
    shared = (0.0, 0.0, 0.0, 0.0)
    top = min(i1, n)  # rows at or after n are padding
    for i in range(i0, top, BLOCK):
        rows = min(BLOCK, top - i)
        keys = min(n, i + rows) if causal else n  # the keys any row of the block sees
        if mode == MODE_SHARED_ROW:
            if first < 0:
                _scores(gemm, q, k, w, bg, i, 1, n, scale)
        elif mode != MODE_UNIFORM:  # (uniform rows need no scores: see uniform_row)
            _scores(gemm, q, k, w, bg, i, rows, keys, scale)
        for r in range(rows):
            row = w[bg, i + r]
            jmin, jmax = key_range(i + r, n, causal, window)
            if mx.with_kl:
                p_row = mx.base[bg, i + r]
            if mode == MODE_SHARED_ROW and first >= 0:
                src = w[bg, first]
                for j in range(n_keys):
                    row[j] = src[j]
                spd, sp = kl_sums(p_row, scratch, jmax, mx.with_kl)
                entropy, log_z = shared[0], shared[3]
            elif mode == MODE_UNIFORM:
                entropy, spd, sp, log_z = uniform_row(row, jmax, n_keys, mx.with_kl, p_row)
            else:
                if shaped:
                    _shape_row(row, jmin, jmax, slope, lg.softcap)
                for j in range(jmin):  # (only with a window: jmin is 0 otherwise)
                    row[j] = 0.0
                logits = scratch if mode == MODE_SHARED_ROW else scratch[:0]
                entropy, spd, sp, log_z = softmax_row(
                    row[jmin:], jmax - jmin, n_keys - jmin, mx.with_metrics, p_row[jmin:], logits
                )
                if mode == MODE_SHARED_ROW:
                    first = i + r
                    shared = (entropy, spd, sp, log_z)
                    # the KL sums as the rows that copy this one take them: the same
                    # bits whichever row of the pair a task starts at
                    spd, sp = kl_sums(p_row, scratch, jmax, mx.with_kl)
            if mx.with_metrics:
                record_row(mx, bg, (i + r) // col_block, i + r, row, jmax, entropy, spd, sp, log_z)
        if with_output:  # weights beyond a row's own keys are 0: one product per block
            _outputs(gemm, w, v, o, bg, i, rows, keys)
    for i in range(max(i0, n), i1):  # padded queries: the whole row is masked
        for j in range(n_keys):
            w[bg, i, j] = 0.0
        if with_output:
            for e in range(v.shape[2]):
                o[bg, i, e] = 0.0


@njit(**jit.HOT)
def _attention_task(
    gemm, task, n_blocks, row_block, q, k, v, lengths, group, modes, causal, scale, lg, w, o,
    with_output, mx, scratch,
):  # fmt: skip
    """One task of :func:`attention_kernel`: rows ``blk * row_block`` on of one pair."""
    bg = task // n_blocks
    blk = task - bg * n_blocks
    i0 = blk * row_block
    i1 = min(i0 + row_block, q.shape[1])
    slope = lg.slopes[bg % group] if lg.slopes.shape[0] else 0.0
    _attention_block(
        gemm, q, k, v, lengths[bg // group], modes[bg % group], causal, scale, lg, slope, w,
        o, with_output, bg, i0, i1, mx, scratch,
    )  # fmt: skip


@njit(parallel=True, **jit.HOT)
def attention_kernel(
    gemm, q, k, v, lengths, group, modes, causal, scale, lg, row_block, w, o, with_output, mx,
    scratch,
):  # fmt: skip
    """Parallel driver: one task per ``(pair, block of row_block query rows)``, each with
    this thread's row of ``scratch``. ``gemm`` runs on the calling thread of each task:
    the caller holds BLAS at one thread."""
    n_blocks = (q.shape[1] + row_block - 1) // row_block
    for task in prange(q.shape[0] * n_blocks):
        _attention_task(
            gemm, task, n_blocks, row_block, q, k, v, lengths, group, modes, causal, scale,
            lg, w, o, with_output, mx, scratch[get_thread_id()],
        )  # fmt: skip


@njit(**jit.HOT)
def attention_serial(
    gemm, q, k, v, lengths, group, modes, causal, scale, lg, w, o, with_output, mx, scratch
):  # fmt: skip
    """Serial driver: whole pairs in order, on the calling thread (the model path, which
    runs one input per task of its own pool): the same blocks, so the same bits, as
    :func:`attention_kernel`."""
    for task in range(q.shape[0]):
        _attention_task(
            gemm, task, 1, q.shape[1], q, k, v, lengths, group, modes, causal, scale, lg, w,
            o, with_output, mx, scratch,
        )  # fmt: skip
