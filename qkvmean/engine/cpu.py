"""CPU backend: Numba kernels for masked softmax attention and mean substitution.

Layout, after the wrappers in :mod:`qkvmean.engine.api` have validated and flattened
the inputs (kernels see only flat arrays and scalars, never Python objects):

- ``q``: ``(BG, N, D)`` C-contiguous, ``BG = batch * group`` (row ``bg`` belongs to
  input ``bg // group``), ``kt``: ``(BG, D, N)`` (keys transposed so the innermost
  loop of the score computation runs over contiguous keys and vectorises without
  reassociating the dot product), ``v``: ``(BG, N, E)``.
- ``lengths``: ``(batch,)`` int64, already checked to lie in ``[0, N]``.
- ``modes``: ``(group,)`` int8, one of the ``MODE_*`` constants, per flattened group.

Each parallel task handles one block of query rows of one ``(input, group)`` pair and
writes only its own rows of the preallocated outputs: no allocation and no shared
writes inside the parallel loop.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from numba import get_thread_id, njit, prange
from numba.extending import register_jitable

from .. import config
from .modes import MODE_SHARED_ROW, MODE_UNIFORM
from .vmath import exp, gelu_erf, gelu_tanh, silu

_JIT = dict(cache=True, fastmath=set(config.FASTMATH), nogil=True)


#: The attention kernels see only validated, finite values (no NaN, no infinity ever
#: enters or arises: masked entries are skipped, not set to -inf), so they may use every
#: fast-math flag; that lets LLVM vectorise the max and sum reductions of the softmax.
_HOT = dict(cache=True, fastmath=True, nogil=True)

#: The vectorised elementwise kernels (GELU): numpy's error model, so that a division
#: is a plain division (Python's raises on zero, and that branch keeps LLVM from
#: vectorising the loop; the divisors here are never zero).
_VEC = dict(_HOT, error_model="numpy")

#: Query rows whose scores are computed together, sharing each load of a key vector.
ROWS = 4
#: Keys per partial sum in the softmax (see :func:`_softmax_row`).
CHUNK = 64
#: Query rows per block of column sums (for top_key_mass); see :func:`attention`.
COL_BLOCK = 32


# Scores: four query rows by four key dimensions per pass over the keys, so that every
# load and store of an output row feeds sixteen fused multiply-adds (a loop with one
# dimension per pass is bound by the loads and stores, at a third of the speed). The
# innermost loop runs over contiguous keys and is vectorised.


@njit(**_HOT)
def _scores4(q, kt, w, bg, i, jmax, scale):
    """``w[bg, i + r, :jmax] = (scale * q[bg, i + r]) . kt[:, :jmax]``, r < 4 (``kt``: the
    pair's keys, transposed)."""
    w0 = w[bg, i + 0]
    w1 = w[bg, i + 1]
    w2 = w[bg, i + 2]
    w3 = w[bg, i + 3]
    d = 0
    while d + 4 <= q.shape[2]:
        a00 = q[bg, i + 0, d + 0] * scale
        a01 = q[bg, i + 0, d + 1] * scale
        a02 = q[bg, i + 0, d + 2] * scale
        a03 = q[bg, i + 0, d + 3] * scale
        a10 = q[bg, i + 1, d + 0] * scale
        a11 = q[bg, i + 1, d + 1] * scale
        a12 = q[bg, i + 1, d + 2] * scale
        a13 = q[bg, i + 1, d + 3] * scale
        a20 = q[bg, i + 2, d + 0] * scale
        a21 = q[bg, i + 2, d + 1] * scale
        a22 = q[bg, i + 2, d + 2] * scale
        a23 = q[bg, i + 2, d + 3] * scale
        a30 = q[bg, i + 3, d + 0] * scale
        a31 = q[bg, i + 3, d + 1] * scale
        a32 = q[bg, i + 3, d + 2] * scale
        a33 = q[bg, i + 3, d + 3] * scale
        k0 = kt[d + 0]
        k1 = kt[d + 1]
        k2 = kt[d + 2]
        k3 = kt[d + 3]
        if d == 0:  # the first pass sets the sums, later ones add to them
            for j in range(jmax):
                x0 = k0[j]
                x1 = k1[j]
                x2 = k2[j]
                x3 = k3[j]
                w0[j] = a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
                w1[j] = a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
                w2[j] = a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
                w3[j] = a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3
        else:
            for j in range(jmax):
                x0 = k0[j]
                x1 = k1[j]
                x2 = k2[j]
                x3 = k3[j]
                w0[j] = w0[j] + a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
                w1[j] = w1[j] + a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
                w2[j] = w2[j] + a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
                w3[j] = w3[j] + a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3
        d += 4
    if d == 0:  # fewer than 4 dimensions
        for j in range(jmax):
            w0[j] = 0.0
            w1[j] = 0.0
            w2[j] = 0.0
            w3[j] = 0.0
    while d < q.shape[2]:
        b0 = q[bg, i + 0, d] * scale
        b1 = q[bg, i + 1, d] * scale
        b2 = q[bg, i + 2, d] * scale
        b3 = q[bg, i + 3, d] * scale
        k = kt[d]
        for j in range(jmax):
            w0[j] += b0 * k[j]
            w1[j] += b1 * k[j]
            w2[j] += b2 * k[j]
            w3[j] += b3 * k[j]
        d += 1


@njit(**_HOT)
def _scores1(q, kt, w, bg, i, jmax, scale):
    """One row of :func:`_scores4` (row tails; the row MODE_SHARED_ROW computes once)."""
    w0 = w[bg, i + 0]
    d = 0
    while d + 8 <= q.shape[2]:
        a00 = q[bg, i + 0, d + 0] * scale
        a01 = q[bg, i + 0, d + 1] * scale
        a02 = q[bg, i + 0, d + 2] * scale
        a03 = q[bg, i + 0, d + 3] * scale
        a04 = q[bg, i + 0, d + 4] * scale
        a05 = q[bg, i + 0, d + 5] * scale
        a06 = q[bg, i + 0, d + 6] * scale
        a07 = q[bg, i + 0, d + 7] * scale
        k0 = kt[d + 0]
        k1 = kt[d + 1]
        k2 = kt[d + 2]
        k3 = kt[d + 3]
        k4 = kt[d + 4]
        k5 = kt[d + 5]
        k6 = kt[d + 6]
        k7 = kt[d + 7]
        if d == 0:  # the first pass sets the sums, later ones add to them
            for j in range(jmax):
                x0 = k0[j]
                x1 = k1[j]
                x2 = k2[j]
                x3 = k3[j]
                x4 = k4[j]
                x5 = k5[j]
                x6 = k6[j]
                x7 = k7[j]
                w0[j] = (
                    a00 * x0
                    + a01 * x1
                    + a02 * x2
                    + a03 * x3
                    + a04 * x4
                    + a05 * x5
                    + a06 * x6
                    + a07 * x7
                )
        else:
            for j in range(jmax):
                x0 = k0[j]
                x1 = k1[j]
                x2 = k2[j]
                x3 = k3[j]
                x4 = k4[j]
                x5 = k5[j]
                x6 = k6[j]
                x7 = k7[j]
                w0[j] = (
                    w0[j]
                    + a00 * x0
                    + a01 * x1
                    + a02 * x2
                    + a03 * x3
                    + a04 * x4
                    + a05 * x5
                    + a06 * x6
                    + a07 * x7
                )
        d += 8
    if d == 0:  # fewer than 8 dimensions
        for j in range(jmax):
            w0[j] = 0.0
    while d < q.shape[2]:
        b0 = q[bg, i + 0, d] * scale
        k = kt[d]
        for j in range(jmax):
            w0[j] += b0 * k[j]
        d += 1


@njit(**_HOT)
def _exp_row(row, jmax, m):
    """``row[j] = exp(row[j] - m)`` for j < jmax; their sum.

    Sums run in the row's dtype within chunks of CHUNK keys (vectorised, a partial sum in
    every lane) and in float64 across chunks: the error stays at a few units of roundoff
    whatever the row length, at the speed of the row's own arithmetic. The chunk loop has
    the constant trip count CHUNK: LLVM vectorises that, and leaves a loop bounded by
    ``min(j0 + CHUNK, jmax)`` scalar (four times slower).
    """
    total = 0.0
    zero = row[0] - row[0]
    j0 = 0
    while j0 + CHUNK <= jmax:
        part = zero
        for jj in range(CHUNK):
            e = exp(row[j0 + jj] - m)
            row[j0 + jj] = e
            part += e
        total += part
        j0 += CHUNK
    part = zero
    for j in range(j0, jmax):
        e = exp(row[j] - m)
        row[j] = e
        part += e
    return total + part


@njit(**_HOT)
def _exp_row_stats(row, jmax, m, p_row):
    """:func:`_exp_row`, also summing ``e_j d_j``, ``p_j d_j`` and ``p_j``."""
    total = sed = spd = sp = 0.0
    zero = row[0] - row[0]
    j0 = 0
    while j0 < jmax:
        part_total = part_sed = part_spd = part_sp = zero
        if j0 + CHUNK <= jmax:
            for jj in range(CHUNK):
                j = j0 + jj
                d = row[j] - m
                e = exp(d)
                row[j] = e
                part_total += e
                part_sed += e * d
                part_spd += p_row[j] * d
                part_sp += p_row[j]
            j0 += CHUNK
        else:
            for j in range(j0, jmax):
                d = row[j] - m
                e = exp(d)
                row[j] = e
                part_total += e
                part_sed += e * d
                part_spd += p_row[j] * d
                part_sp += p_row[j]
            j0 = jmax
        total += part_total
        sed += part_sed
        spd += part_spd
        sp += part_sp
    return total, sed, spd, sp


@njit(**_HOT)
def _softmax_row(row, jmax, n_keys, with_metrics, p_row, logits):
    """Softmax of the logits ``row[:jmax]`` in place, zeros after; and its statistics.

    Returns ``(entropy, sum_j p_j d_j, sum_j p_j, log Z)`` with ``d_j`` the logits minus
    their max (also left in ``logits``) and ``Z = sum_j exp(d_j)``: the entropy of the exact
    softmax distribution is ``log Z - sum_j e_j d_j / Z``, computed from the logits rather
    than from rounded weights (no logarithm per element, and finite even where a weight
    underflows to 0). ``p_row`` is the baseline's row, for the KL (zeros without one);
    ``logits``, when long enough, receives ``d``.
    """
    m = row[0]
    for j in range(1, jmax):
        m = max(m, row[j])
    if logits.shape[0] >= jmax:  # keep d = logits - max for the rows that copy this one
        for j in range(jmax):
            logits[j] = row[j] - m
    if with_metrics:  # two loops rather than a test inside one: each stays vectorised
        total, sed, spd, sp = _exp_row_stats(row, jmax, m, p_row)
    else:
        total = _exp_row(row, jmax, m)
        sed = spd = sp = 0.0
    inv = 1.0 / total
    for j in range(jmax):
        row[j] = row[j] * inv
    for j in range(jmax, n_keys):
        row[j] = 0.0
    log_z = np.log(total)
    return log_z - sed * inv, spd, sp, log_z


@njit(**_HOT)
def _uniform_row(row, jmax, n_keys, with_kl, p_row):
    """What :func:`_softmax_row` gives for ``jmax`` equal logits, without computing it.

    Every ``d_j`` is 0 and every ``exp(d_j)`` exactly 1, so ``Z = jmax`` exactly and each
    weight is ``1 * (1 / jmax)``: the same operations, so the same bits.
    """
    inv = 1.0 / jmax
    for j in range(jmax):
        row[j] = inv  # rounded on store, like the general path's 1 * inv
    for j in range(jmax, n_keys):
        row[j] = 0.0
    sp = 0.0
    if with_kl:
        for j in range(jmax):
            sp += p_row[j]
    log_z = np.log(float(jmax))
    return log_z, 0.0, sp, log_z


@njit(**_HOT)
def _outputs4(w, v, o, bg, i, jmax):
    """``o[bg, i + r] = sum_j w[bg, i + r, j] * v[bg, j]`` for r < 4, j < jmax.

    Four keys per pass over the output rows (each load and store feeds sixteen fused
    multiply-adds); the innermost loop runs over the value dimension.
    """
    o0 = o[bg, i + 0]
    o1 = o[bg, i + 1]
    o2 = o[bg, i + 2]
    o3 = o[bg, i + 3]
    j = 0
    while j + 4 <= jmax:
        a00 = w[bg, i + 0, j + 0]
        a01 = w[bg, i + 0, j + 1]
        a02 = w[bg, i + 0, j + 2]
        a03 = w[bg, i + 0, j + 3]
        a10 = w[bg, i + 1, j + 0]
        a11 = w[bg, i + 1, j + 1]
        a12 = w[bg, i + 1, j + 2]
        a13 = w[bg, i + 1, j + 3]
        a20 = w[bg, i + 2, j + 0]
        a21 = w[bg, i + 2, j + 1]
        a22 = w[bg, i + 2, j + 2]
        a23 = w[bg, i + 2, j + 3]
        a30 = w[bg, i + 3, j + 0]
        a31 = w[bg, i + 3, j + 1]
        a32 = w[bg, i + 3, j + 2]
        a33 = w[bg, i + 3, j + 3]
        v0 = v[bg, j + 0]
        v1 = v[bg, j + 1]
        v2 = v[bg, j + 2]
        v3 = v[bg, j + 3]
        if j == 0:
            for e in range(v.shape[2]):
                o0[e] = a00 * v0[e] + a01 * v1[e] + a02 * v2[e] + a03 * v3[e]
                o1[e] = a10 * v0[e] + a11 * v1[e] + a12 * v2[e] + a13 * v3[e]
                o2[e] = a20 * v0[e] + a21 * v1[e] + a22 * v2[e] + a23 * v3[e]
                o3[e] = a30 * v0[e] + a31 * v1[e] + a32 * v2[e] + a33 * v3[e]
        else:
            for e in range(v.shape[2]):
                o0[e] = o0[e] + a00 * v0[e] + a01 * v1[e] + a02 * v2[e] + a03 * v3[e]
                o1[e] = o1[e] + a10 * v0[e] + a11 * v1[e] + a12 * v2[e] + a13 * v3[e]
                o2[e] = o2[e] + a20 * v0[e] + a21 * v1[e] + a22 * v2[e] + a23 * v3[e]
                o3[e] = o3[e] + a30 * v0[e] + a31 * v1[e] + a32 * v2[e] + a33 * v3[e]
        j += 4
    if j == 0:
        for e in range(v.shape[2]):
            o0[e] = 0.0
            o1[e] = 0.0
            o2[e] = 0.0
            o3[e] = 0.0
    while j < jmax:
        b0 = w[bg, i + 0, j]
        b1 = w[bg, i + 1, j]
        b2 = w[bg, i + 2, j]
        b3 = w[bg, i + 3, j]
        x = v[bg, j]
        for e in range(v.shape[2]):
            o0[e] += b0 * x[e]
            o1[e] += b1 * x[e]
            o2[e] += b2 * x[e]
            o3[e] += b3 * x[e]
        j += 1


@njit(**_HOT)
def _outputs1(w, v, o, bg, i, jmax):
    """``o[bg, i + r] = sum_j w[bg, i + r, j] * v[bg, j]`` for r < 1, j < jmax.

    Four keys per pass over the output rows (each load and store feeds four fused
    multiply-adds); the innermost loop runs over the value dimension.
    """
    o0 = o[bg, i + 0]
    j = 0
    while j + 4 <= jmax:
        a00 = w[bg, i + 0, j + 0]
        a01 = w[bg, i + 0, j + 1]
        a02 = w[bg, i + 0, j + 2]
        a03 = w[bg, i + 0, j + 3]
        v0 = v[bg, j + 0]
        v1 = v[bg, j + 1]
        v2 = v[bg, j + 2]
        v3 = v[bg, j + 3]
        if j == 0:
            for e in range(v.shape[2]):
                o0[e] = a00 * v0[e] + a01 * v1[e] + a02 * v2[e] + a03 * v3[e]
        else:
            for e in range(v.shape[2]):
                o0[e] = o0[e] + a00 * v0[e] + a01 * v1[e] + a02 * v2[e] + a03 * v3[e]
        j += 4
    if j == 0:
        for e in range(v.shape[2]):
            o0[e] = 0.0
    while j < jmax:
        b0 = w[bg, i + 0, j]
        x = v[bg, j]
        for e in range(v.shape[2]):
            o0[e] += b0 * x[e]
        j += 1


@njit(**_HOT)
def _record_row(mx, bg, blk, i, row, jmax, entropy, spd, sp, log_z):
    """Store the row's entropy and KL from the baseline; add it to the column sums."""
    mx.row_ent[bg, i] = entropy
    if mx.with_kl:
        # KL(p || a) = sum p log p - sum p log a, with log a_j = d_j - log Z
        kl = -mx.base_ent[bg, i] - spd + log_z * sp
        mx.row_kl[bg, i] = max(kl, 0.0)  # >= 0; rounding can dip a hair below
    else:  # the baseline (the model path reuses its row buffers across conditions)
        mx.row_kl[bg, i] = 0.0
    col = mx.colsum[bg, blk]
    for j in range(jmax):
        col[j] += row[j]


@njit(**_HOT)
def _kl_sums(p_row, d, jmax, with_kl):
    """``(sum_j p_j d_j, sum_j p_j)`` over the first ``jmax`` keys, in float64, in key
    order (0, 0 without a baseline)."""
    spd = 0.0
    sp = 0.0
    if with_kl:
        for j in range(jmax):
            spd += p_row[j] * d[j]
            sp += p_row[j]
    return spd, sp


@njit(**_HOT)
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
            pass  # identical keys: nothing to compute (see _uniform_row)
        elif mode == MODE_SHARED_ROW:
            if first < 0 and not scored:
                _scores1(q, kt, w, bg, i, n, scale)
            rows = 1
        elif scored:
            pass  # scaled row by row below
        elif rows == ROWS:
            _scores4(q, kt, w, bg, i, min(n, i + rows) if causal else n, scale)
        else:
            for r in range(rows):
                _scores1(q, kt, w, bg, i + r, min(n, i + r + 1) if causal else n, scale)
        for r in range(rows):
            row = w[bg, i + r]
            jmax = min(n, i + r + 1) if causal else n
            if mx.with_kl:
                p_row = mx.base[bg, i + r]
            if mode == MODE_SHARED_ROW and first >= 0:
                src = w[bg, first]
                for j in range(n_keys):
                    row[j] = src[j]
                spd, sp = _kl_sums(p_row, scratch, jmax, mx.with_kl)
                entropy, log_z = shared[0], shared[3]
            elif mode == MODE_UNIFORM:
                entropy, spd, sp, log_z = _uniform_row(row, jmax, n_keys, mx.with_kl, p_row)
            else:
                if scored:
                    for j in range(jmax):
                        row[j] *= scale
                logits = scratch if mode == MODE_SHARED_ROW else scratch[:0]
                entropy, spd, sp, log_z = _softmax_row(
                    row, jmax, n_keys, mx.with_metrics, p_row, logits
                )
                if mode == MODE_SHARED_ROW:
                    first = i + r
                    shared = (entropy, spd, sp, log_z)
                    # the KL sums as the rows that copy this one take them: the same
                    # bits whichever row of the pair a task starts at
                    spd, sp = _kl_sums(p_row, scratch, jmax, mx.with_kl)
            if mx.with_metrics:
                _record_row(mx, bg, (i + r) // col_block, i + r, row, jmax, entropy, spd, sp, log_z)
        if with_output:  # weights beyond a row's own keys are 0: one jmax for the group
            last = min(n, i + rows) if causal else n
            if rows == ROWS:
                _outputs4(w, v, o, bg, i, last)
            else:
                for r in range(rows):
                    _outputs1(w, v, o, bg, i + r, min(n, i + r + 1) if causal else n)
        i += rows
    for i in range(max(i0, n), i1):  # padded queries: the whole row is masked
        for j in range(n_keys):
            w[bg, i, j] = 0.0
        if with_output:
            for e in range(v.shape[2]):
                o[bg, i, e] = 0.0


@njit(**_HOT)
def _transpose_keys(k, bg, n, kt):
    """``kt[d, j] = k[bg, j, d]`` for the ``n`` valid keys, in 16-key tiles (rows of k in,
    columns of kt out)."""
    for j0 in range(0, n, 16):
        for d in range(k.shape[2]):
            for j in range(j0, min(j0 + 16, n)):
                kt[d, j] = k[bg, j, d]


@njit(**_HOT)
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
        _transpose_keys(k, bg, n, kt)
    _attention_block(
        q, kt, v, n, mode, causal, scale, w, o, with_output, bg, i0, i1, mx, scratch, scored
    )  # fmt: skip


@njit(parallel=True, **_HOT)
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


@njit(**_HOT)
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


@register_jitable
def reduce_pair(bg, row_ent, row_kl, colsum, lengths, group, out_ent, out_kl, out_mass, out_index):
    """Pair ``bg``: means over valid rows, and the key column with the largest mean weight
    (``colsum`` ``(BG, blocks, N)``: column sums per block of rows). Compiled into the
    CPU kernels and into the CUDA backend's, so both reduce alike."""
    n = lengths[bg // group]
    if n == 0:  # no valid rows: nothing attends anywhere
        out_ent[bg] = 0.0
        out_kl[bg] = 0.0
        out_mass[bg] = 0.0
        out_index[bg] = -1
        return
    ent = 0.0
    kl = 0.0
    for i in range(n):
        ent += row_ent[bg, i]
        kl += row_kl[bg, i]
    out_ent[bg] = ent / n
    out_kl[bg] = kl / n
    best = -1.0
    best_j = 0
    for j in range(n):
        total = 0.0
        for blk in range(colsum.shape[1]):
            total += colsum[bg, blk, j]
        if total > best:
            best = total
            best_j = j
    out_mass[bg] = best / n
    out_index[bg] = best_j


@njit(parallel=True, **_JIT)
def reduce_metrics_kernel(row_ent, row_kl, colsum, lengths, group, *out):
    for bg in prange(row_ent.shape[0]):
        reduce_pair(bg, row_ent, row_kl, colsum, lengths, group, *out)


@njit(**_JIT)
def reduce_metrics_serial(row_ent, row_kl, colsum, lengths, group, *out):
    for bg in range(row_ent.shape[0]):
        reduce_pair(bg, row_ent, row_kl, colsum, lengths, group, *out)


@njit(**_JIT)
def _mean_pair(bg, x, lengths, group, select, prefix, shrink, acc, out):
    """Replace the valid rows of pair ``bg`` by their (prefix) mean, if it is selected;
    ``out`` may be ``x``. Summed in float64 in ``acc``, times ``shrink``, an exact power
    of two (1 unless the sum could overflow)."""
    n_rows, dim = x.shape[1], x.shape[2]
    n = lengths[bg // group]
    if not select[bg % group]:
        n = 0  # copy through untouched
    for d in range(dim):
        acc[d] = 0.0
    if prefix:
        for t in range(n):
            for d in range(dim):
                acc[d] += x[bg, t, d] * shrink
                out[bg, t, d] = acc[d] / (t + 1) / shrink
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


@njit(parallel=True, **_JIT)
def mean_substitute_kernel(x, lengths, group, select, prefix, shrink, acc, out):
    """:func:`_mean_pair` for every pair; ``acc`` is a preallocated ``(BG, D)`` float64
    scratch array (one accumulator row per pair: no allocation inside the loop)."""
    for bg in prange(x.shape[0]):
        _mean_pair(bg, x, lengths, group, select, prefix, shrink, acc[bg], out)


@njit(**_JIT)
def mean_substitute_serial(x, lengths, group, select, prefix, shrink, acc, out):
    for bg in range(x.shape[0]):
        _mean_pair(bg, x, lengths, group, select, prefix, shrink, acc, out)


@njit(**_JIT)
def _given_pair(bg, x, lengths, group, select, means, out):
    """Replace the valid rows of pair ``bg`` by the given per-position ``means[g]``
    (``over="dataset"``), if it is selected; ``out`` may be ``x``."""
    n_rows, dim = x.shape[1], x.shape[2]
    g = bg % group
    n = lengths[bg // group] if select[g] else 0
    for t in range(n):
        for d in range(dim):
            out[bg, t, d] = means[g, t, d]
    for t in range(n, n_rows):
        for d in range(dim):
            out[bg, t, d] = x[bg, t, d]


@njit(parallel=True, **_JIT)
def given_substitute_kernel(x, lengths, group, select, means, out):
    """:func:`_given_pair` for every pair; ``means`` ``(group, >= N, D)``."""
    for bg in prange(x.shape[0]):
        _given_pair(bg, x, lengths, group, select, means, out)


@njit(**_JIT)
def given_substitute_serial(x, lengths, group, select, means, out):
    for bg in range(x.shape[0]):
        _given_pair(bg, x, lengths, group, select, means, out)


@njit(parallel=True, **_JIT)
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


@register_jitable
def norm_row(r, x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out):
    """``s = x[r] + bias (+ residual[r])``; ``residual[r] = s`` with ``store_sum``;
    ``out[r] = LayerNorm(s)`` (``rms``: RMSNorm, no centring; ``beta`` is zero),
    statistics in float64. ``out`` may be ``x`` or ``residual``. Compiled into the CPU
    kernels and the CUDA backend's (one thread per row there)."""
    dim = x.shape[1]
    total = 0.0
    for d in range(dim):
        a = x[r, d] + bias[d]
        if with_residual:
            a += residual[r, d]
        if store_sum:
            residual[r, d] = a
        out[r, d] = a
        total += a
    mean = 0.0 if rms else total / dim
    sq = 0.0
    for d in range(dim):
        c = out[r, d] - mean
        sq += c * c
    inv = 1.0 / math.sqrt(sq / dim + eps)
    for d in range(dim):
        out[r, d] = (out[r, d] - mean) * inv * gamma[d] + beta[d]


@njit(parallel=True, **_JIT)
def layer_norm_kernel(x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out):
    for r in prange(x.shape[0]):
        norm_row(r, x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out)


@njit(**_JIT)
def add_norm_serial(x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out):
    """The model path's fused residual step, on the calling thread: see :func:`_norm_row`
    (post-norm: ``h = N(a + b + h)``; pre-norm: ``h += a + b`` and ``x = N'(h)``)."""
    for r in range(x.shape[0]):
        norm_row(r, x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out)


@njit(**_VEC)
def _gelu_row(r, x, bias, tanh_approx):
    """``x[r] = gelu(x[r] + bias)`` with the vectorised float32 functions of
    :mod:`~qkvmean.engine.vmath` (relative error a few units of float32 roundoff)."""
    row = x[r]
    if tanh_approx:
        for d in range(row.shape[0]):
            row[d] = gelu_tanh(row[d] + bias[d])
    else:
        for d in range(row.shape[0]):
            row[d] = gelu_erf(row[d] + bias[d])


@njit(parallel=True, **_VEC)
def bias_gelu_kernel(x, bias, tanh_approx):
    """In place: ``x = gelu(x + bias)``, exact (erf) or the tanh approximation (GPT-2)."""
    for r in prange(x.shape[0]):
        _gelu_row(r, x, bias, tanh_approx)


@njit(**_VEC)
def bias_gelu_serial(x, bias, tanh_approx):
    for r in range(x.shape[0]):
        _gelu_row(r, x, bias, tanh_approx)


@register_jitable
def split_heads_row(r, qkv, bias, n_heads, n_kv_heads, q, k, v):
    """Row ``r`` of :func:`split_heads_serial` (shared with the CUDA backend)."""
    n = q.shape[1]
    dh = q.shape[2]
    per_kv = n_heads // n_kv_heads
    k0 = n_heads * dh
    v0 = k0 + n_kv_heads * dh
    c = r // n
    t = r - c * n
    for h in range(n_heads):
        pair = c * n_heads + h
        col = h * dh
        kv = (h // per_kv) * dh
        for e in range(dh):
            q[pair, t, e] = qkv[r, col + e] + bias[col + e]
            k[pair, t, e] = qkv[r, k0 + kv + e] + bias[k0 + kv + e]
            v[pair, t, e] = qkv[r, v0 + kv + e] + bias[v0 + kv + e]


@njit(**_JIT)
def split_heads_serial(qkv, bias, n_heads, n_kv_heads, q, k, v):
    """Projections ``(C*n, (H + 2G) dh)`` of ``C`` stacked copies of one input (columns:
    the ``H`` query heads, then ``G`` key heads, then ``G`` value heads), plus ``bias``,
    into head-major ``q``, ``k``, ``v`` ``(C*H, n, dh)``: row ``c*n + t`` to pairs
    ``c*H + h``, token ``t``. Keys and values are expanded to one per query head
    (query head ``h`` reads KV head ``h // (H / G)``), so that each can be substituted
    for its own query head."""
    for r in range(qkv.shape[0]):
        split_heads_row(r, qkv, bias, n_heads, n_kv_heads, q, k, v)


@register_jitable
def rotary_vector(x, p, t, cos, sin):
    """In place, the rotary embedding of vector ``x[p, t]`` (see :func:`rotary_serial`;
    shared with the CUDA backend)."""
    half = cos.shape[1]
    for i in range(half):
        a = x[p, t, i]
        b = x[p, t, i + half]
        x[p, t, i] = a * cos[t, i] - b * sin[t, i]
        x[p, t, i + half] = b * cos[t, i] + a * sin[t, i]


@njit(**_JIT)
def rotary_serial(x, cos, sin):
    """In place, the rotary embedding of the first ``2 * cos.shape[1]`` dimensions of
    every vector of ``x`` ``(P, n, dh)`` (rotate-half layout: dimension ``i`` pairs with
    ``i + half``); ``cos``, ``sin`` ``(>= n, half)`` by position."""
    for p in range(x.shape[0]):
        for t in range(x.shape[1]):
            rotary_vector(x, p, t, cos, sin)


@njit(**_VEC)
def bias_swiglu_serial(g, bias, out):
    """``out = silu(g[:, :F] + bias[:F]) * (g[:, F:] + bias[F:])`` (SwiGLU: the gate and
    up projections side by side in ``g`` ``(rows, 2F)``)."""
    f = out.shape[1]
    for r in range(g.shape[0]):
        row = g[r]
        dst = out[r]
        for d in range(f):
            dst[d] = silu(row[d] + bias[d]) * (row[f + d] + bias[f + d])


@register_jitable
def merge_heads_row(r, o, n_heads, ctx):
    """Row ``r`` of :func:`merge_heads_serial` (shared with the CUDA backend)."""
    n = o.shape[1]
    dh = o.shape[2]
    c = r // n
    t = r - c * n
    for h in range(n_heads):
        for e in range(dh):
            ctx[r, h * dh + e] = o[c * n_heads + h, t, e]


@njit(**_JIT)
def merge_heads_serial(o, n_heads, ctx):
    """Inverse of :func:`split_heads_serial` for the attention outputs ``(C*H, n, dh)``."""
    for r in range(ctx.shape[0]):
        merge_heads_row(r, o, n_heads, ctx)


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


# --------------------------------------------------------------------------------------
# Backend interface (what qkvmean.engine.api calls; a CUDA backend provides the same).
# --------------------------------------------------------------------------------------

name = "cpu"


class Metrics(NamedTuple):
    """Per-row metric buffers for :func:`attention_kernel` (empty arrays when unused)."""

    with_metrics: bool
    with_kl: bool
    base: np.ndarray  # (BG, N, N) baseline weights, for the KL
    base_ent: np.ndarray  # (BG, N) baseline row entropies
    row_ent: np.ndarray  # (BG, N) out
    row_kl: np.ndarray  # (BG, N) out
    colsum: np.ndarray  # (BG, N / col_block, N) out: column sums per block of rows
    col_block: int  # rows per column-sum block: fixed, so the sums do not depend on tasks


def _no_metrics(dtype):
    return Metrics(
        False, False, np.empty((1, 1, 0), dtype), *(np.empty((0, 0)),) * 3, np.empty((0, 0, 0)), 1
    )


def attention(
    q, k, v, lengths, group, modes, causal, scale, row_block, with_output, metrics=False,
    base=None, maps=True,
):  # fmt: skip
    """Weights ``(BG, N, N)``, outputs ``(BG, N, E)`` or None, and row metrics or None.

    With ``metrics``, also returns ``(row_ent, row_kl, colsum)`` for
    :func:`reduce_metrics`; ``base`` (the baseline's weights and row metrics, from a
    metrics call without ``base``) adds the KL from the baseline. ``maps`` False: the
    caller will not read the weights (here they are computed all the same).
    """
    n_pairs, n_rows, dim = q.shape
    threads = numba.config.NUMBA_NUM_THREADS
    if not row_block:  # whole pairs per task when there are enough pairs to share out
        row_block = n_rows if n_pairs >= 4 * numba.get_num_threads() else COL_BLOCK
    if row_block > COL_BLOCK:  # a task covers a whole pair, or whole column-sum blocks
        row_block = n_rows
    row_block = max(row_block, 1)
    w = np.empty((n_pairs, n_rows, n_rows), dtype=q.dtype)
    if with_output:
        o = np.empty((n_pairs, n_rows, v.shape[2]), dtype=q.dtype)
    else:
        v = np.empty((n_pairs, n_rows, 0), dtype=q.dtype)
        o = np.empty((0, 0, 0), dtype=q.dtype)
    if metrics:
        # Column sums add up rows in blocks of COL_BLOCK whatever the task layout (a task
        # covers whole blocks: all of its pair, or exactly one block), so top_key_mass
        # does not depend on the number of threads or how the rows were split.
        col_block = min(row_block, COL_BLOCK)
        n_blocks = (n_rows + col_block - 1) // col_block
        with_kl = base is not None
        mx = Metrics(
            True,
            with_kl,
            base[0] if with_kl else np.zeros((1, 1, n_rows), q.dtype),  # p = 0: no KL
            base[1][0] if with_kl else np.empty((0, 0)),  # the baseline's row entropies
            np.zeros((n_pairs, n_rows)),
            np.zeros((n_pairs, n_rows)),
            np.empty((n_pairs, n_blocks, n_rows)),
            col_block,
        )
    else:
        mx = _no_metrics(q.dtype)
    # per thread: one row of logits (for MODE_SHARED_ROW) and one pair's keys, transposed
    scratch = np.empty((threads, n_rows), dtype=q.dtype)
    kt_scratch = np.empty((threads, dim, n_rows), dtype=q.dtype)
    with config.kernel_guard():
        attention_kernel(
            q,
            k,
            v,
            lengths,
            group,
            modes,
            causal,
            q.dtype.type(scale),
            row_block,
            w,
            o,
            with_output,
            mx,
            scratch,
            kt_scratch,
        )
    rows = (mx.row_ent, mx.row_kl, mx.colsum) if metrics else None
    return w, (o if with_output else None), rows


def reduce_metrics(rows, lengths, group):
    """``(entropy, kl, top_key_mass, top_key_index)`` per pair from the row metrics."""
    row_ent, row_kl, colsum = rows
    n_pairs = row_ent.shape[0]
    out = (
        np.empty(n_pairs),
        np.empty(n_pairs),
        np.empty(n_pairs),
        np.empty(n_pairs, dtype=np.int64),
    )
    with config.kernel_guard():
        reduce_metrics_kernel(row_ent, row_kl, colsum, lengths, group, *out)
    return out


def layer_norm(x, gamma, beta, eps, residual=None, out=None, rms=False):
    """Row-wise LayerNorm (``rms``: RMSNorm) of ``x (+ residual)`` (2-D, C-contiguous)."""
    out = np.empty_like(x) if out is None else out
    zero = np.zeros(x.shape[1], x.dtype)
    with config.kernel_guard():
        layer_norm_kernel(
            x,
            zero,
            x if residual is None else residual,
            residual is not None,
            False,
            bool(rms),
            gamma,
            beta,
            float(eps),
            out,
        )
    return out


def bias_gelu(x, bias, tanh_approx):
    """In place ``x = gelu(x + bias)`` on a 2-D C-contiguous array; returns ``x``."""
    with config.kernel_guard():
        bias_gelu_kernel(x, bias, bool(tanh_approx))
    return x


def mean_substitute(x, lengths, group, select, prefix, shrink=1.0, means=None):
    """Mean-substituted copy of flattened ``x`` for the groups where ``select`` is true;
    with ``means`` ``(group, >= N, D)`` (``over="dataset"``), each valid position is
    replaced by its given mean instead."""
    out = np.empty_like(x)
    if means is not None:
        with config.kernel_guard():
            given_substitute_kernel(x, lengths, group, select, means, out)
        return out
    acc = np.empty((x.shape[0], x.shape[2]), dtype=np.float64)
    with config.kernel_guard():
        mean_substitute_kernel(x, lengths, group, select, prefix, float(shrink), acc, out)
    return out


def position_sums(x, lengths, group, sums):
    """Add the valid positions of flattened ``x`` ``(B * group, N, D)`` into float64
    ``sums`` ``(group, >= N, D)``, input by input (the ``over="dataset"`` means; on the
    host whichever device computes the maps: a pass over memory)."""
    with config.kernel_guard():
        position_sums_kernel(x, lengths, group, sums)


# --------------------------------------------------------------------------------------
# Model-path interface: one input on the calling thread (qkvmean.engine.transformer runs
# one input per task of run_tasks). A backend provides the same names.
# --------------------------------------------------------------------------------------


def run_tasks(tasks):
    """Run independent per-input tasks (here: on the pool of compute threads, BLAS at one
    thread each)."""
    return config.run_tasks(tasks)


def matmul(a, b, out):
    """``out = a @ b`` (BLAS)."""
    np.matmul(a, b, out=out)


def add(a, b, out):
    """``out = a + b``, elementwise."""
    np.add(a, b, out=out)


def add_norm(x, bias, residual, norm, out, store_sum=False):
    """``out = N(x + bias (+ residual))``; with ``store_sum`` also ``residual = x + bias +
    residual``. ``norm`` is ``(gamma, beta, rms, eps)``; ``residual`` None: no residual."""
    gamma, beta, rms, eps = norm
    add_norm_serial(
        x, bias, x if residual is None else residual, residual is not None, store_sum, rms,
        gamma, beta, eps, out,
    )  # fmt: skip


def head_norm(x, gamma, eps, zero):
    """In place, RMSNorm of every ``head_dim`` vector of ``x`` ``(P, n, dh)`` (Qwen3's q/k
    norm); ``zero`` is a ``(dh,)`` array of zeros."""
    flat = x.reshape(-1, x.shape[2])
    add_norm_serial(flat, zero, flat, False, False, True, gamma, zero, eps, flat)


def bias_activation(m, bias, code, out):
    """``out = act(m + bias)``: GELU in place (``out`` is ``m``), or SwiGLU from the gate
    and up halves of ``m`` into ``out``; ``code`` from
    :data:`qkvmean.engine.arch.ACTIVATION_CODES`."""
    if code == 2:
        bias_swiglu_serial(m, bias, out)
    else:
        bias_gelu_serial(m, bias, code == 1)


split_heads = split_heads_serial
merge_heads = merge_heads_serial
rotary = rotary_serial


def substitute(x, length, n_heads, select, prefix, acc, means=None):
    """In place, mean-substitute the selected heads of one condition's ``(H, n, dh)``;
    with ``means`` ``(H, >= n, dh)`` (``over="dataset"``), by those."""
    if means is not None:
        given_substitute_serial(x, length, n_heads, select, means, x)
    else:
        mean_substitute_serial(x, length, n_heads, select, prefix, 1.0, acc, x)


class InputScratch:
    """Per-input buffers of :func:`attention_one` (row metrics, per-thread scratch, the
    baseline's map of the current layer for the KL of the other conditions)."""

    def __init__(self, n_heads, n, seq, stack, maps):
        n_blocks = -(-n // COL_BLOCK)  # blocks of min(n, COL_BLOCK) rows (n >= 1)
        self.length = np.array([n], dtype=np.int64)
        self.base_ent = np.zeros((n_heads, n))
        self.row_ent = np.zeros((n_heads, n))
        self.row_kl = np.zeros((n_heads, n))
        self.colsum = np.empty((n_heads, n_blocks, seq))
        self.no_base = np.zeros((1, 1, seq), np.float32)
        self.no_ent = np.empty((0, 0))
        self.logits = np.empty(n, np.float32)
        self.kt = np.empty((0, 0), np.float32)  # the kernel reads no keys: scores are given
        # without maps to return: the baseline's and the current condition's, here
        self.own = None if maps else np.zeros((min(stack, 2), n_heads, n, n), np.float32)
        self.base_map = None

    def finish(self):
        """Every result of this input is in place (they are written as computed here)."""

    def abort(self):
        """After an error: nothing is in flight here."""


def attention_one(q, k, v, modes, causal, scale, c, w, o, scratch, metrics, reduced):
    """Condition ``c``'s attention for every head of one input (``c = 0``: the baseline,
    which the KL of the later conditions of the same layer reads).

    ``q``, ``k``, ``v`` ``(H, n, dh)``; the map is written into ``w`` ``(H, S, S)`` (its
    ``n x n`` corner; the rest stays zero), or kept in ``scratch`` when ``w`` is None (no
    maps wanted); the output into ``o``. With ``metrics``, the four metrics of each head
    are written into ``reduced`` (four ``(H,)`` arrays). The products ``q·kᵀ`` and ``A·v``
    are BLAS calls; scaling, mask, softmax, fast paths and metrics are
    :func:`attention_serial` on the scores.
    """
    heads = q.shape[0]
    n = scratch.length[0]
    if w is None:
        w = scratch.own[min(c, 1)]
    if c == 0:
        scratch.base_map = w
    valid = w[:, :n, :n]
    if np.all(modes == MODE_SHARED_ROW):  # one row of scores per head is read
        np.matmul(q[:, :1], k.transpose(0, 2, 1), out=w[:, :1, :n])
    elif not np.all(modes == MODE_UNIFORM):  # (uniform rows read no scores)
        np.matmul(q, k.transpose(0, 2, 1), out=valid)
    with_kl = c > 0
    mx = Metrics(
        metrics,
        with_kl,
        scratch.base_map if with_kl else scratch.no_base,
        scratch.base_ent if with_kl else scratch.no_ent,
        scratch.row_ent if with_kl else scratch.base_ent,
        scratch.row_kl,
        scratch.colsum,
        min(n, COL_BLOCK),
    )
    attention_serial(
        q, k, v, scratch.length, heads, modes, causal, np.float32(scale), w, o, False, mx,
        scratch.logits, scratch.kt, True,
    )  # fmt: skip
    np.matmul(valid, v, out=o)
    if metrics:
        reduce_metrics_serial(mx.row_ent, mx.row_kl, mx.colsum, scratch.length, heads, *reduced)


def check_finite(x):
    """:func:`scan_finite` of any array."""
    return scan_finite(x.reshape(-1))


#: The model path's array module (allocation, slicing, indexing of the buffers).
xp = np


def upload(model):
    """The model's weights where this backend computes: here, as they are."""
    return model


def to_host(x):
    """``x`` as a numpy array: here, itself."""
    return x
