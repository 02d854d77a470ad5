"""CUDA kernels (numba-cuda) for masked softmax attention and mean substitution.

Work in progress for the CUDA backend (issue 13): these kernels are tested under Numba's
CUDA simulator against the numpy reference, but the module is not yet registered in
:data:`qkvmean.engine.api.BACKENDS` — it does not provide the metrics or the model-path
operations of :mod:`qkvmean.engine.backend` yet, so ``device="cuda"`` is still refused.

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


@cuda.jit
def _attention_kernel(q, k, v, lengths, group, modes, causal, scale, w, o, with_output):
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
    if modes[bg % group] == MODE_UNIFORM:  # identical keys: 1 / n_allowed, in closed form
        for j in range(jmax):
            w[bg, i, j] = 1.0 / jmax
    else:
        top = -math.inf
        for j in range(jmax):
            s = 0.0
            for e in range(q.shape[2]):
                s += q[bg, i, e] * k[bg, j, e]
            s *= scale
            w[bg, i, j] = s
            top = max(top, s)
        total = 0.0
        for j in range(jmax):
            p = math.exp(w[bg, i, j] - top)
            w[bg, i, j] = p
            total += p
        for j in range(jmax):
            w[bg, i, j] /= total
    for j in range(jmax, n_rows):
        w[bg, i, j] = 0.0
    if with_output:
        for e in range(o.shape[2]):
            acc = 0.0
            for j in range(jmax):
                acc += w[bg, i, j] * v[bg, j, e]
            o[bg, i, e] = acc


def mean_substitute(x, lengths, group, select, prefix):
    """Mean-substituted copy of flattened ``x`` for the groups where ``select`` is true."""
    out = np.empty_like(x)
    _mean_kernel[_grid(x.shape[0], x.shape[2]), BLOCK](
        x, lengths, np.int64(group), select, bool(prefix), out
    )
    return out


def attention(q, k, v, lengths, group, modes, causal, scale, with_output):
    """Weights ``(BG, N, N)`` and outputs ``(BG, N, E)`` (or None)."""
    n_pairs, n_rows, _ = q.shape
    w = np.empty((n_pairs, n_rows, n_rows), q.dtype)
    if with_output:
        o = np.empty((n_pairs, n_rows, v.shape[2]), q.dtype)
    else:
        v = np.empty((n_pairs, n_rows, 0), q.dtype)
        o = np.empty((n_pairs, n_rows, 0), q.dtype)
    _attention_kernel[_grid(n_pairs, n_rows), BLOCK](
        q, k, v, lengths, np.int64(group), modes, bool(causal), q.dtype.type(scale), w, o,
        bool(with_output),
    )  # fmt: skip
    return w, (o if with_output else None)
