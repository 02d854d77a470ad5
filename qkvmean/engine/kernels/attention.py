"""Masked softmax attention on the CPU: the serial worker, its task and both drivers.

Layout, after the wrappers in :mod:`qkvmean.engine.api` have validated and flattened
the inputs (kernels see only flat arrays and scalars, never Python objects):

- ``q``: ``(BG, N, D)`` C-contiguous, ``BG = batch * group`` (row ``bg`` belongs to
  input ``bg // group``), ``k``: ``(BG, N, D)`` (each task transposes its pair's keys
  into a per-thread ``kt`` ``(D, N)``, so that the innermost loop of the score
  computation runs over contiguous keys and vectorises without reassociating the dot
  product), ``v``: ``(BG, N, E)``.
- ``lengths``: ``(batch,)`` int64, already checked to lie in ``[0, N]``.
- ``modes``: ``(group,)`` int8, one of the ``MODE_*`` constants, per flattened group.

Each parallel task handles one block of query rows of one ``(input, group)`` pair and
writes only its own rows of the preallocated outputs: no allocation and no shared
writes inside the parallel loop.
"""

from __future__ import annotations

from numba import get_thread_id, njit, prange

from .. import jit
from ..modes import MODE_SHARED_ROW, MODE_UNIFORM
from .metrics import kl_sums, record_row
from .products import ROWS, outputs1, outputs4, scores1, scores4, transpose_keys
from .softmax import softmax_row, uniform_row


@njit(**jit.HOT)
def _attention_block(
    q, kt, v, n, mode, causal, scale, w, o, with_output, bg, i0, i1, mx, scratch, scored
):  # fmt: skip
    """Serial worker: weights (and outputs, metrics) of query rows ``i0:i1`` of pair ``bg``.

    ``scratch`` is this thread's row of logits, kept for the rows that
    ``MODE_SHARED_ROW`` copies. With ``scored``, ``w`` already holds the unscaled scores
    ``q·k`` of the rows that need them (a BLAS product: the model path) and ``q``,
    ``kt`` are not read.
    """
    n_keys = w.shape[2]
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
    i = i0
    while i < top:
        rows = min(ROWS, top - i)
        if mode == MODE_UNIFORM:
            pass  # identical keys: nothing to compute (see uniform_row)
        elif mode == MODE_SHARED_ROW:
            if first < 0 and not scored:
                scores1(q, kt, w, bg, i, n, scale)
            rows = 1
        elif scored:
            pass  # scaled row by row below
        elif rows == ROWS:
            scores4(q, kt, w, bg, i, min(n, i + rows) if causal else n, scale)
        else:
            for r in range(rows):
                scores1(q, kt, w, bg, i + r, min(n, i + r + 1) if causal else n, scale)
        for r in range(rows):
            row = w[bg, i + r]
            jmax = min(n, i + r + 1) if causal else n
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
                if scored:
                    for j in range(jmax):
                        row[j] *= scale
                logits = scratch if mode == MODE_SHARED_ROW else scratch[:0]
                entropy, spd, sp, log_z = softmax_row(
                    row, jmax, n_keys, mx.with_metrics, p_row, logits
                )
                if mode == MODE_SHARED_ROW:
                    first = i + r
                    shared = (entropy, spd, sp, log_z)
                    # the KL sums as the rows that copy this one take them: the same
                    # bits whichever row of the pair a task starts at
                    spd, sp = kl_sums(p_row, scratch, jmax, mx.with_kl)
            if mx.with_metrics:
                record_row(mx, bg, (i + r) // col_block, i + r, row, jmax, entropy, spd, sp, log_z)
        if with_output:  # weights beyond a row's own keys are 0: one jmax for the group
            last = min(n, i + rows) if causal else n
            if rows == ROWS:
                outputs4(w, v, o, bg, i, last)
            else:
                for r in range(rows):
                    outputs1(w, v, o, bg, i + r, min(n, i + r + 1) if causal else n)
        i += rows
    for i in range(max(i0, n), i1):  # padded queries: the whole row is masked
        for j in range(n_keys):
            w[bg, i, j] = 0.0
        if with_output:
            for e in range(v.shape[2]):
                o[bg, i, e] = 0.0


@njit(**jit.HOT)
def _attention_task(
    task, n_blocks, row_block, q, k, v, lengths, group, modes, causal, scale, w, o, with_output,
    mx, scratch, kt, scored,
):  # fmt: skip
    """One task of :func:`attention_kernel`: rows ``blk * row_block`` on of one pair.

    It first transposes the pair's valid keys into ``kt`` (so that the score loop runs
    over contiguous keys), unless its rows never read keys.
    """
    bg = task // n_blocks
    blk = task - bg * n_blocks
    i0 = blk * row_block
    i1 = min(i0 + row_block, q.shape[1])
    n = lengths[bg // group]
    mode = modes[bg % group]
    if mode != MODE_UNIFORM and i0 < n and not scored:
        transpose_keys(k, bg, n, kt)
    _attention_block(
        q, kt, v, n, mode, causal, scale, w, o, with_output, bg, i0, i1, mx, scratch, scored
    )  # fmt: skip


@njit(parallel=True, **jit.HOT)
def attention_kernel(
    q, k, v, lengths, group, modes, causal, scale, row_block, w, o, with_output, mx, scratch,
    kt_scratch,
):  # fmt: skip
    """Parallel driver: one task per ``(pair, block of row_block query rows)``, each with
    this thread's rows of ``scratch`` and ``kt_scratch``."""
    n_blocks = (q.shape[1] + row_block - 1) // row_block
    for task in prange(q.shape[0] * n_blocks):
        tid = get_thread_id()
        _attention_task(
            task, n_blocks, row_block, q, k, v, lengths, group, modes, causal, scale, w, o,
            with_output, mx, scratch[tid], kt_scratch[tid], False,
        )  # fmt: skip


@njit(**jit.HOT)
def attention_serial(
    q, k, v, lengths, group, modes, causal, scale, w, o, with_output, mx, scratch, kt, scored
):  # fmt: skip
    """Serial driver: whole pairs in order, on the calling thread (the model path, which
    runs one input per task of its own pool, with ``scored``: see
    :func:`_attention_block`). Without ``scored``, the same tasks as
    :func:`attention_kernel` with ``row_block`` the whole pair, so the same bits."""
    n_rows = q.shape[1]
    for task in range(q.shape[0]):
        _attention_task(
            task, 1, n_rows, q, k, v, lengths, group, modes, causal, scale, w, o, with_output,
            mx, scratch, kt, scored,
        )  # fmt: skip
