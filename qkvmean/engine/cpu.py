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
def _attention_block(q, kt, v, n, mode, causal, scale, w, o, with_output, bg, i0, i1):
    """Serial worker: weights (and outputs) of query rows ``i0:i1`` of pair ``bg``."""
    n_keys = w.shape[2]
    first = -1  # first valid row of this block, for MODE_SHARED_ROW
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


@njit(parallel=True, **_JIT)
def attention_kernel(q, kt, v, lengths, group, modes, causal, scale, row_block, w, o, with_output):
    """Parallel driver: one task per ``(pair, block of row_block query rows)``."""
    n_pairs = q.shape[0]
    n_rows = q.shape[1]
    n_blocks = (n_rows + row_block - 1) // row_block
    for task in prange(n_pairs * n_blocks):
        bg = task // n_blocks
        i0 = (task - bg * n_blocks) * row_block
        i1 = min(i0 + row_block, n_rows)
        n = lengths[bg // group]
        mode = modes[bg % group]
        _attention_block(q, kt, v, n, mode, causal, scale, w, o, with_output, bg, i0, i1)


@njit(parallel=True, **_JIT)
def mean_substitute_kernel(x, lengths, group, select, prefix, acc, out):
    """Replace the valid rows of the selected groups by their (prefix) mean.

    ``acc`` is a preallocated ``(BG, D)`` float64 scratch array: one accumulator row per
    pair, so the mean is summed in float64 without allocating inside the loop.
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
                    acc[bg, d] += x[bg, t, d]
                    out[bg, t, d] = acc[bg, d] / (t + 1)
        else:
            for t in range(n):
                for d in range(dim):
                    acc[bg, d] += x[bg, t, d]
            for t in range(n):
                for d in range(dim):
                    out[bg, t, d] = acc[bg, d] / n
        for t in range(n, n_rows):
            for d in range(dim):
                out[bg, t, d] = x[bg, t, d]


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


def attention(q, k, v, lengths, group, modes, causal, scale, row_block, with_output):
    """Weights ``(BG, N, N)`` and outputs ``(BG, N, E)`` (or None) of flattened inputs."""
    n_pairs, n_rows, _ = q.shape
    kt = np.ascontiguousarray(k.transpose(0, 2, 1))
    w = np.empty((n_pairs, n_rows, n_rows), dtype=q.dtype)
    if with_output:
        o = np.empty((n_pairs, n_rows, v.shape[2]), dtype=q.dtype)
    else:
        v = np.empty((n_pairs, n_rows, 0), dtype=q.dtype)
        o = np.empty((0, 0, 0), dtype=q.dtype)
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
        )
    return w, (o if with_output else None)


def mean_substitute(x, lengths, group, select, prefix):
    """Mean-substituted copy of flattened ``x`` for the groups where ``select`` is true."""
    out = np.empty_like(x)
    acc = np.empty((x.shape[0], x.shape[2]), dtype=np.float64)
    with config.kernel_guard():
        mean_substitute_kernel(x, lengths, group, select, prefix, acc, out)
    return out
