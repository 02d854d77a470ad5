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

import numpy as np
from numba import njit, prange

from .. import config
from .modes import MODE_SHARED_ROW, MODE_UNIFORM

_JIT = dict(cache=True, fastmath=set(config.FASTMATH), nogil=True)


@njit(**_JIT)
def _normalise_row(w, bg, i, jmax, n_keys):
    """Turn ``w[bg, i, :jmax]`` (logits) into softmax weights; zero the rest."""
    m = w[bg, i, 0]
    for j in range(1, jmax):
        if w[bg, i, j] > m:
            m = w[bg, i, j]
    total = 0.0  # float64 accumulator whatever the dtype
    for j in range(jmax):
        e = np.exp(w[bg, i, j] - m)
        w[bg, i, j] = e
        total += e
    inv = 1.0 / total
    for j in range(jmax):
        w[bg, i, j] = w[bg, i, j] * inv
    for j in range(jmax, n_keys):
        w[bg, i, j] = 0.0


@njit(**_JIT)
def _score_row(q, kt, scale, w, bg, i, jmax):
    """``w[bg, i, j] = scale * (q[bg, i] . k[bg, j])`` for ``j < jmax``."""
    for j in range(jmax):
        w[bg, i, j] = 0.0
    for d in range(q.shape[2]):
        qd = q[bg, i, d]
        for j in range(jmax):
            w[bg, i, j] += qd * kt[bg, d, j]
    for j in range(jmax):
        w[bg, i, j] *= scale


@njit(**_JIT)
def _output_row(w, v, o, bg, i, jmax):
    """``o[bg, i] = sum_j w[bg, i, j] * v[bg, j]`` over the allowed keys."""
    for e in range(v.shape[2]):
        o[bg, i, e] = 0.0
    for j in range(jmax):
        a = w[bg, i, j]
        for e in range(v.shape[2]):
            o[bg, i, e] += a * v[bg, j, e]


@njit(**_JIT)
def _row_metrics(w, base, base_ent, row_ent, row_kl, colsum, with_kl, bg, blk, i, jmax):
    """Entropy, KL(baseline || this row) and column sums of the finished row ``w[bg, i]``.

    ``row_ent[bg, i] = -sum_j a_j log a_j``; ``row_kl[bg, i] = sum_j p_j log p_j -
    sum_j p_j log a_j`` with ``p = base[bg, i]`` and ``base_ent[bg, i] = -sum_j p_j log p_j``
    from the baseline pass. Both use the same ``log a_j``, so a row equal to its baseline
    has a KL of exactly 0. A weight that underflowed to 0 where the baseline has mass gives
    an infinite KL, as the stored maps do.
    """
    ent = 0.0
    cross = 0.0
    for j in range(jmax):
        a = w[bg, i, j]
        colsum[bg, blk, j] += a
        if a > 0.0:
            la = np.log(np.float64(a))
            ent -= a * la
            if with_kl:
                cross += base[bg, i, j] * la
        elif with_kl and base[bg, i, j] > 0.0:
            cross = -np.inf
    row_ent[bg, i] = ent
    if with_kl:
        row_kl[bg, i] = -base_ent[bg, i] - cross


@njit(**_JIT)
def _attention_block(q, kt, v, n, mode, causal, scale, w, o, with_output, bg, i0, i1, mx, blk):
    """Serial worker: weights (and outputs, metrics) of query rows ``i0:i1`` of pair ``bg``."""
    n_keys = w.shape[2]
    first = -1  # first valid row of this block, for MODE_SHARED_ROW
    if mx.with_metrics:
        for j in range(n_keys):
            mx.colsum[bg, blk, j] = 0.0
    for i in range(i0, i1):
        if i >= n:  # padded query: the whole row is masked
            for j in range(n_keys):
                w[bg, i, j] = 0.0
            if with_output:
                for e in range(v.shape[2]):
                    o[bg, i, e] = 0.0
            continue
        jmax = min(n, i + 1) if causal else n
        if mode == MODE_UNIFORM:
            for j in range(jmax):
                w[bg, i, j] = 1.0
            _normalise_row(w, bg, i, jmax, n_keys)
        elif mode == MODE_SHARED_ROW and first >= 0:
            for j in range(n_keys):
                w[bg, i, j] = w[bg, first, j]
        else:
            _score_row(q, kt, scale, w, bg, i, jmax)
            _normalise_row(w, bg, i, jmax, n_keys)
            first = i
        if with_output:
            _output_row(w, v, o, bg, i, jmax)
        if mx.with_metrics:
            _row_metrics(
                w,
                mx.base,
                mx.base_ent,
                mx.row_ent,
                mx.row_kl,
                mx.colsum,
                mx.with_kl,
                bg,
                blk,
                i,
                jmax,
            )


@njit(parallel=True, **_JIT)
def attention_kernel(
    q, kt, v, lengths, group, modes, causal, scale, row_block, w, o, with_output, mx
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
        _attention_block(q, kt, v, n, mode, causal, scale, w, o, with_output, bg, i0, i1, mx, blk)


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
        False, False, np.empty((0, 0, 0), dtype), *(np.empty((0, 0)),) * 3, np.empty((0, 0, 0))
    )


def attention(
    q, k, v, lengths, group, modes, causal, scale, row_block, with_output, metrics=False, base=None
):
    """Weights ``(BG, N, N)``, outputs ``(BG, N, E)`` or None, and row metrics or None.

    With ``metrics``, also returns ``(row_ent, row_kl, colsum)`` for
    :func:`reduce_metrics`; ``base`` (the baseline weights and row entropies, from a
    metrics call without ``base``) adds the KL from the baseline.
    """
    n_pairs, n_rows, _ = q.shape
    kt = np.ascontiguousarray(k.transpose(0, 2, 1))
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
            base[0] if with_kl else np.empty((0, 0, 0), q.dtype),
            base[1] if with_kl else np.empty((0, 0)),
            np.zeros((n_pairs, n_rows)),
            np.zeros((n_pairs, n_rows)),
            np.empty((n_pairs, n_blocks, n_rows)),
        )
    else:
        mx = _no_metrics(q.dtype)
    with config.kernel_guard():
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
