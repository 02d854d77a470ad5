"""CUDA kernels (numba-cuda) for masked softmax attention and mean substitution.

Work in progress for the CUDA backend (issue 13): these kernels (attention weights and
outputs, the uniform mean-K mode, the per-row metrics and their per-pair reduction, mean
substitution) are tested under Numba's CUDA simulator against the numpy reference, but the
module is not yet registered in :data:`qkvmean.engine.api.BACKENDS` — it does not provide
the model-path operations of :mod:`qkvmean.engine.backend` yet, nor device-resident
buffers and streams, so ``device="cuda"`` is still refused.

Same layout as the CPU kernels (:mod:`qkvmean.engine.cpu`): flattened, validated,
C-contiguous ``(batch * group, seq, dim)`` arrays, ``lengths`` ``(batch,)`` int64 within
``[0, seq]``, ``modes`` ``(group,)`` int8. One GPU thread per (pair, query row) for
attention and per (pair, feature) for the mean; every thread writes only its own row or
column of the preallocated outputs. numba-cuda is imported when this module is: the core
package never imports it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .cpu import reduce_pair
from .modes import MODE_UNIFORM

#: Threads per block along the two grid axes (pairs × rows or features).
BLOCK = (4, 32)


def _grid(n_pairs, n_inner):
    return (
        (max(n_pairs, 1) + BLOCK[0] - 1) // BLOCK[0],
        (max(n_inner, 1) + BLOCK[1] - 1) // BLOCK[1],
    )


@cuda.jit
def _mean_kernel(x, lengths, group, select, prefix, out):
    bg, d = cuda.grid(2)
    if bg >= x.shape[0] or d >= x.shape[2]:
        return
    n = lengths[bg // group]
    if not select[bg % group]:
        n = 0  # copied through untouched
    acc = 0.0  # float64 accumulator, as on the CPU
    if prefix:
        for t in range(n):
            acc += x[bg, t, d]
            out[bg, t, d] = acc / (t + 1)
    else:
        for t in range(n):
            acc += x[bg, t, d]
        for t in range(n):
            out[bg, t, d] = acc / n
    for t in range(n, x.shape[1]):
        out[bg, t, d] = x[bg, t, d]


@cuda.jit(device=True)
def _dot(q, k, bg, i, j):
    s = 0.0
    for e in range(q.shape[2]):
        s += q[bg, i, e] * k[bg, j, e]
    return s


@cuda.jit
def _attention_kernel(
    q, k, v, lengths, group, modes, causal, scale, w, o, with_output, metrics, base, base_ent,
    with_kl, row_ent, row_kl,
):  # fmt: skip
    bg, i = cuda.grid(2)
    n_rows = q.shape[1]
    if bg >= q.shape[0] or i >= n_rows:
        return
    n = lengths[bg // group]
    if i >= n:  # a padded query: its row and output are 0
        for j in range(n_rows):
            w[bg, i, j] = 0.0
        if with_output:
            for e in range(o.shape[2]):
                o[bg, i, e] = 0.0
        return
    jmax = i + 1 if causal else n  # allowed keys: j < jmax
    uniform = modes[bg % group] == MODE_UNIFORM
    top = 0.0
    log_z = math.log(jmax)
    if uniform:  # identical keys: 1 / n_allowed, in closed form
        for j in range(jmax):
            w[bg, i, j] = 1.0 / jmax
    else:
        top = -math.inf
        for j in range(jmax):
            s = _dot(q, k, bg, i, j) * scale
            w[bg, i, j] = s
            top = max(top, s)
        total = 0.0
        for j in range(jmax):
            p = math.exp(w[bg, i, j] - top)
            w[bg, i, j] = p
            total += p
        for j in range(jmax):
            w[bg, i, j] /= total
        log_z = math.log(total)
    if metrics:
        # log a_j = d_j - log Z with d_j = s_j - max (0 for uniform rows): entropy
        # = log Z - sum a d, KL(p || a) = sum p log p - sum p d + log Z sum p, finite
        # where a weight underflows (the scores are recomputed, not read back from a)
        sad = 0.0
        spd = 0.0
        sp = 0.0
        for j in range(jmax):
            d = 0.0 if uniform else _dot(q, k, bg, i, j) * scale - top
            sad += w[bg, i, j] * d
            if with_kl:
                spd += base[bg, i, j] * d
                sp += base[bg, i, j]
        row_ent[bg, i] = log_z - sad
        if with_kl:
            row_kl[bg, i] = max(-base_ent[bg, i] - spd + log_z * sp, 0.0)
    for j in range(jmax, n_rows):
        w[bg, i, j] = 0.0
    if with_output:
        for e in range(o.shape[2]):
            acc = 0.0
            for j in range(jmax):
                acc += w[bg, i, j] * v[bg, j, e]
            o[bg, i, e] = acc


@cuda.jit
def _colsum_kernel(w, lengths, group, colsum):
    """``colsum[bg, 0, j]``: the sum of column ``j`` over the valid rows, in row order (one
    block of rows, in the CPU backend's ``(BG, blocks, N)`` layout)."""
    bg, j = cuda.grid(2)
    if bg >= w.shape[0] or j >= w.shape[2]:
        return
    acc = 0.0
    for i in range(lengths[bg // group]):
        acc += w[bg, i, j]
    colsum[bg, 0, j] = acc


@cuda.jit
def _reduce_kernel(row_ent, row_kl, colsum, lengths, group, ent, kl, mass, index):
    """Per pair: :func:`qkvmean.engine.cpu.reduce_pair`, the CPU backend's own code."""
    bg = cuda.grid(1)
    if bg < row_ent.shape[0]:
        reduce_pair(bg, row_ent, row_kl, colsum, lengths, group, ent, kl, mass, index)


def reduce_metrics(rows, lengths, group):
    """``(entropy, kl, top_key_mass, top_key_index)`` per pair from :func:`attention`'s
    row metrics."""
    row_ent, row_kl, colsum = rows
    n_pairs = row_ent.shape[0]
    out = (np.empty(n_pairs), np.empty(n_pairs), np.empty(n_pairs), np.empty(n_pairs, np.int64))
    threads = 64
    _reduce_kernel[(max(n_pairs, 1) + threads - 1) // threads, threads](
        row_ent, row_kl, colsum, lengths, np.int64(group), *out
    )
    return out


def mean_substitute(x, lengths, group, select, prefix):
    """Mean-substituted copy of flattened ``x`` for the groups where ``select`` is true."""
    out = np.empty_like(x)
    _mean_kernel[_grid(x.shape[0], x.shape[2]), BLOCK](
        x, lengths, np.int64(group), select, bool(prefix), out
    )
    return out


def attention(q, k, v, lengths, group, modes, causal, scale, with_output, metrics=False, base=None):
    """Weights ``(BG, N, N)``, outputs ``(BG, N, E)`` or None, and row metrics or None.

    With ``metrics``, also ``(row_ent, row_kl, colsum)`` for :func:`reduce_metrics`;
    ``base`` (the baseline weights and row entropies, from a metrics call without it)
    adds the KL from the baseline — the CPU backend's conventions.
    """
    n_pairs, n_rows, _ = q.shape
    row_ent = np.zeros((n_pairs, n_rows))
    row_kl = np.zeros((n_pairs, n_rows))
    with_kl = base is not None
    base_w = base[0] if with_kl else np.zeros((1, 1, 1), q.dtype)
    base_ent = base[1] if with_kl else np.zeros((1, 1))
    w = np.empty((n_pairs, n_rows, n_rows), q.dtype)
    if with_output:
        o = np.empty((n_pairs, n_rows, v.shape[2]), q.dtype)
    else:
        v = np.empty((n_pairs, n_rows, 0), q.dtype)
        o = np.empty((n_pairs, n_rows, 0), q.dtype)
    _attention_kernel[_grid(n_pairs, n_rows), BLOCK](
        q, k, v, lengths, np.int64(group), modes, bool(causal), q.dtype.type(scale), w, o,
        bool(with_output), bool(metrics), base_w, base_ent, with_kl, row_ent, row_kl,
    )  # fmt: skip
    rows = None
    if metrics:
        colsum = np.zeros((n_pairs, 1, n_rows))
        _colsum_kernel[_grid(n_pairs, n_rows), BLOCK](w, lengths, np.int64(group), colsum)
        rows = (row_ent, row_kl, colsum)
    return w, (o if with_output else None), rows
