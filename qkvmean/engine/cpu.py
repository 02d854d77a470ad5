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

from .. import config
from .modes import MODE_SHARED_ROW, MODE_UNIFORM
from .vmath import exp

_JIT = dict(cache=True, fastmath=set(config.FASTMATH), nogil=True)


#: The attention kernels see only validated, finite values (no NaN, no infinity ever
#: enters or arises: masked entries are skipped, not set to -inf), so they may use every
#: fast-math flag; that lets LLVM vectorise the max and sum reductions of the softmax.
_HOT = dict(cache=True, fastmath=True, nogil=True)

#: Query rows whose scores are computed together, sharing each load of a key vector.
ROWS = 4


@njit(**_HOT)
def _scores4(q, kt, w, bg, i, jmax, scale):
    """``w[bg, i + r, :jmax] = (scale * q[bg, i + r]) . kt[bg, :, :jmax]`` for r < 4.

    Four rows at a time: the loop over keys runs innermost over contiguous memory and is
    vectorised, and each key vector is loaded once for the four rows.
    """
    w0 = w[bg, i]
    w1 = w[bg, i + 1]
    w2 = w[bg, i + 2]
    w3 = w[bg, i + 3]
    for j in range(jmax):
        w0[j] = 0.0
        w1[j] = 0.0
        w2[j] = 0.0
        w3[j] = 0.0
    for d in range(q.shape[2]):
        a0 = q[bg, i, d] * scale
        a1 = q[bg, i + 1, d] * scale
        a2 = q[bg, i + 2, d] * scale
        a3 = q[bg, i + 3, d] * scale
        k = kt[bg, d]
        for j in range(jmax):
            kj = k[j]
            w0[j] += a0 * kj
            w1[j] += a1 * kj
            w2[j] += a2 * kj
            w3[j] += a3 * kj


@njit(**_HOT)
def _scores1(q, kt, w, bg, i, jmax, scale):
    """One row of :func:`_scores4`."""
    w0 = w[bg, i]
    for j in range(jmax):
        w0[j] = 0.0
    for d in range(q.shape[2]):
        a0 = q[bg, i, d] * scale
        k = kt[bg, d]
        for j in range(jmax):
            w0[j] += a0 * k[j]


@njit(**_HOT)
def _softmax_row(row, jmax, n_keys, with_metrics, with_kl, p_row, logits):
    """Softmax of the logits ``row[:jmax]`` in place, zeros after; and its statistics.

    Returns ``(entropy, sum_j p_j d_j, sum_j p_j, log Z)`` with ``d_j`` the logits minus
    their max and ``Z = sum_j exp(d_j)``: the entropy of the exact softmax distribution is
    ``log Z - sum_j e_j d_j / Z``, computed from the logits rather than from rounded weights
    (no logarithm per element, and finite even where a weight underflows to 0). ``p_row``
    is the baseline's row (for the KL); ``logits`` (when it has ``jmax`` entries) receives
    ``d``, for rows that will be copied.
    """
    m = row[0]
    for j in range(1, jmax):
        m = max(m, row[j])
    total = 0.0  # float64 sums whatever the dtype
    sed = 0.0
    spd = 0.0
    sp = 0.0
    keep = logits.shape[0] >= jmax
    for j in range(jmax):
        d = row[j] - m
        e = exp(d)
        row[j] = e
        total += e
        if with_metrics:
            sed += e * d
            if with_kl:
                spd += p_row[j] * d
                sp += p_row[j]
        if keep:
            logits[j] = d
    inv = 1.0 / total
    for j in range(jmax):
        row[j] = row[j] * inv
    for j in range(jmax, n_keys):
        row[j] = 0.0
    log_z = np.log(total)
    return log_z - sed * inv, spd, sp, log_z


@njit(**_HOT)
def _output_row(w, v, o, bg, i, jmax):
    """``o[bg, i] = sum_j w[bg, i, j] * v[bg, j]`` over the allowed keys."""
    out = o[bg, i]
    for e in range(v.shape[2]):
        out[e] = 0.0
    for j in range(jmax):
        a = w[bg, i, j]
        vj = v[bg, j]
        for e in range(v.shape[2]):
            out[e] += a * vj[e]


@njit(**_HOT)
def _record_row(mx, bg, blk, i, row, jmax, entropy, spd, sp, log_z):
    """Store the row's entropy and KL from the baseline; add it to the column sums."""
    mx.row_ent[bg, i] = entropy
    if mx.with_kl:
        # KL(p || a) = sum p log p - sum p log a, with log a_j = d_j - log Z
        kl = -mx.base_ent[bg, i] - spd + log_z * sp
        mx.row_kl[bg, i] = max(kl, 0.0)  # >= 0; rounding can dip a hair below
    col = mx.colsum[bg, blk]
    for j in range(jmax):
        col[j] += row[j]


@njit(**_HOT)
def _attention_block(
    q, kt, v, n, mode, causal, scale, w, o, with_output, bg, i0, i1, mx, blk, scratch
):
    """Serial worker: weights (and outputs, metrics) of query rows ``i0:i1`` of pair ``bg``.

    ``scratch`` is this thread's row of logits, kept for the rows that
    ``MODE_SHARED_ROW`` copies.
    """
    n_keys = w.shape[2]
    no_logits = scratch[:0]
    p_row = mx.base[bg, 0] if mx.with_kl else mx.base[0, 0]
    if mx.with_metrics:
        col = mx.colsum[bg, blk]
        for j in range(n_keys):
            col[j] = 0.0
    first = -1  # the row MODE_SHARED_ROW copies
    shared = (0.0, 0.0, 0.0, 0.0)
    top = min(i1, n)  # rows at or after n are padding
    i = i0
    while i < top:
        rows = min(ROWS, top - i)
        if mode == MODE_UNIFORM:  # identical keys: every logit equal (0 after the max)
            for r in range(rows):
                jmax = min(n, i + r + 1) if causal else n
                for j in range(jmax):
                    w[bg, i + r, j] = 0.0
        elif mode == MODE_SHARED_ROW:
            if first < 0:
                _scores1(q, kt, w, bg, i, n, scale)
            rows = 1
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
                spd = 0.0
                sp = 0.0
                for j in range(n_keys):
                    row[j] = src[j]
                if mx.with_kl:
                    for j in range(jmax):
                        spd += p_row[j] * scratch[j]
                        sp += p_row[j]
                entropy, log_z = shared[0], shared[3]
            else:
                logits = scratch if mode == MODE_SHARED_ROW else no_logits
                entropy, spd, sp, log_z = _softmax_row(
                    row, jmax, n_keys, mx.with_metrics, mx.with_kl, p_row, logits
                )
                if mode == MODE_SHARED_ROW:
                    first = i + r
                    shared = (entropy, spd, sp, log_z)
            if with_output:
                _output_row(w, v, o, bg, i + r, jmax)
            if mx.with_metrics:
                _record_row(mx, bg, blk, i + r, row, jmax, entropy, spd, sp, log_z)
        i += rows
    for i in range(max(i0, n), i1):  # padded queries: the whole row is masked
        for j in range(n_keys):
            w[bg, i, j] = 0.0
        if with_output:
            for e in range(v.shape[2]):
                o[bg, i, e] = 0.0


@njit(parallel=True, **_HOT)
def attention_kernel(
    q, kt, v, lengths, group, modes, causal, scale, row_block, w, o, with_output, mx, scratch
):
    """Parallel driver: one task per ``(pair, block of row_block query rows)``."""
    n_pairs = q.shape[0]
    n_rows = q.shape[1]
    n_blocks = (n_rows + row_block - 1) // row_block
    for task in prange(n_pairs * n_blocks):
        bg = task // n_blocks
        blk = task - bg * n_blocks
        i0 = blk * row_block
        i1 = min(i0 + row_block, n_rows)
        n = lengths[bg // group]
        mode = modes[bg % group]
        _attention_block(
            q,
            kt,
            v,
            n,
            mode,
            causal,
            scale,
            w,
            o,
            with_output,
            bg,
            i0,
            i1,
            mx,
            blk,
            scratch[get_thread_id()],
        )


@njit(parallel=True, **_HOT)
def transpose_kernel(k, kt):
    """``kt[p] = k[p].T`` for every pair, in parallel."""
    for p in prange(k.shape[0]):
        for j in range(k.shape[1]):
            for d in range(k.shape[2]):
                kt[p, d, j] = k[p, j, d]


@njit(parallel=True, **_JIT)
def reduce_metrics_kernel(
    row_ent, row_kl, colsum, lengths, group, out_ent, out_kl, out_mass, out_index
):
    """Per pair: means over valid rows, and the key column with the largest mean weight."""
    for bg in prange(row_ent.shape[0]):
        n = lengths[bg // group]
        if n == 0:  # no valid rows: nothing attends anywhere
            out_ent[bg] = 0.0
            out_kl[bg] = 0.0
            out_mass[bg] = 0.0
            out_index[bg] = -1
            continue
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
def mean_substitute_kernel(x, lengths, group, select, prefix, shrink, acc, out):
    """Replace the valid rows of the selected groups by their (prefix) mean.

    ``acc`` is a preallocated ``(BG, D)`` float64 scratch array: one accumulator row per
    pair, so the mean is summed in float64 without allocating inside the loop. Values are
    summed times ``shrink``, an exact power of two (1 unless the sum could overflow).
    """
    n_pairs, n_rows, dim = x.shape
    for bg in prange(n_pairs):
        n = lengths[bg // group]
        if not select[bg % group]:
            n = 0  # copy through untouched
        for d in range(dim):
            acc[bg, d] = 0.0
        if prefix:
            for t in range(n):
                for d in range(dim):
                    acc[bg, d] += x[bg, t, d] * shrink
                    out[bg, t, d] = acc[bg, d] / (t + 1) / shrink
        else:
            for t in range(n):
                for d in range(dim):
                    acc[bg, d] += x[bg, t, d] * shrink
            for t in range(n):
                for d in range(dim):
                    out[bg, t, d] = acc[bg, d] / n / shrink
        for t in range(n, n_rows):
            for d in range(dim):
                out[bg, t, d] = x[bg, t, d]


@njit(parallel=True, **_JIT)
def layer_norm_kernel(x, residual, with_residual, gamma, beta, eps, out):
    """``out[r] = LayerNorm(x[r] (+ residual[r]))`` per row; statistics in float64.

    ``x``, ``residual``, ``out``: ``(rows, D)``; ``out`` may be ``x``.
    """
    n_rows, dim = x.shape
    for r in prange(n_rows):
        total = 0.0
        for d in range(dim):
            a = x[r, d] + residual[r, d] if with_residual else x[r, d]
            out[r, d] = a
            total += a
        mean = total / dim
        sq = 0.0
        for d in range(dim):
            c = out[r, d] - mean
            sq += c * c
        inv = 1.0 / np.sqrt(sq / dim + eps)
        for d in range(dim):
            out[r, d] = (out[r, d] - mean) * inv * gamma[d] + beta[d]


_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


@njit(parallel=True, **_JIT)
def bias_gelu_kernel(x, bias, tanh_approx):
    """In place: ``x = gelu(x + bias)``, exact (erf) or the tanh approximation (GPT-2)."""
    n_rows, dim = x.shape
    for r in prange(n_rows):
        for d in range(dim):
            a = np.float64(x[r, d] + bias[d])
            if tanh_approx:
                g = 0.5 * a * (1.0 + math.tanh(_SQRT_2_OVER_PI * (a + 0.044715 * a * a * a)))
            else:
                g = 0.5 * a * (1.0 + math.erf(a * _SQRT_HALF))
            x[r, d] = g


@njit(nogil=True, cache=True)
def scan_finite(flat):
    """Return ``(index of the first non-finite value or -1, max |finite value|)``."""
    biggest = 0.0
    for idx in range(flat.size):
        a = flat[idx]
        if not np.isfinite(a):
            return idx, biggest
        a = abs(a)
        if a > biggest:
            biggest = a
    return -1, biggest


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
    colsum: np.ndarray  # (BG, n_blocks, N) out: per-task column sums


def _no_metrics(dtype):
    return Metrics(
        False, False, np.empty((1, 1, 0), dtype), *(np.empty((0, 0)),) * 3, np.empty((0, 0, 0))
    )


def attention(
    q, k, v, lengths, group, modes, causal, scale, row_block, with_output, metrics=False, base=None
):
    """Weights ``(BG, N, N)``, outputs ``(BG, N, E)`` or None, and row metrics or None.

    With ``metrics``, also returns ``(row_ent, row_kl, colsum)`` for
    :func:`reduce_metrics`; ``base`` (the baseline weights and row entropies, from a
    metrics call without ``base``) adds the KL from the baseline.
    """
    n_pairs, n_rows, dim = q.shape
    kt = np.empty((n_pairs, dim, n_rows), dtype=q.dtype)
    w = np.empty((n_pairs, n_rows, n_rows), dtype=q.dtype)
    if with_output:
        o = np.empty((n_pairs, n_rows, v.shape[2]), dtype=q.dtype)
    else:
        v = np.empty((n_pairs, n_rows, 0), dtype=q.dtype)
        o = np.empty((0, 0, 0), dtype=q.dtype)
    if metrics:
        n_blocks = (n_rows + row_block - 1) // row_block
        with_kl = base is not None
        mx = Metrics(
            True,
            with_kl,
            base[0] if with_kl else np.empty((1, 1, 0), q.dtype),
            base[1] if with_kl else np.empty((0, 0)),
            np.zeros((n_pairs, n_rows)),
            np.zeros((n_pairs, n_rows)),
            np.empty((n_pairs, n_blocks, n_rows)),
        )
    else:
        mx = _no_metrics(q.dtype)
    # one row of logits per thread, for MODE_SHARED_ROW
    scratch = np.empty((numba.config.NUMBA_NUM_THREADS, n_rows), dtype=q.dtype)
    with config.kernel_guard():
        transpose_kernel(k, kt)
        attention_kernel(
            q,
            kt,
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


def layer_norm(x, gamma, beta, eps, residual=None, out=None):
    """Row-wise LayerNorm of ``x (+ residual)`` (2-D, C-contiguous)."""
    out = np.empty_like(x) if out is None else out
    with config.kernel_guard():
        layer_norm_kernel(
            x,
            x if residual is None else residual,
            residual is not None,
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


def mean_substitute(x, lengths, group, select, prefix, shrink=1.0):
    """Mean-substituted copy of flattened ``x`` for the groups where ``select`` is true."""
    out = np.empty_like(x)
    acc = np.empty((x.shape[0], x.shape[2]), dtype=np.float64)
    with config.kernel_guard():
        mean_substitute_kernel(x, lengths, group, select, prefix, float(shrink), acc, out)
    return out
