"""The CPU attention's products: the score tiles ``q·kᵀ`` and the output tiles ``A·v``.

Scores: four query rows by four key dimensions per pass over the keys, so that every load
and store of an output row feeds sixteen fused multiply-adds (a loop with one dimension
per pass is bound by the loads and stores, at a third of the speed). The innermost loop
runs over contiguous keys (``kt``: the pair's keys, transposed) and is vectorised.
"""

from __future__ import annotations

from numba import njit

from .. import jit

#: Query rows whose scores are computed together, sharing each load of a key vector.
ROWS = 4


@njit(**jit.HOT)
def scores4(q, kt, w, bg, i, jmax, scale):
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


@njit(**jit.HOT)
def scores1(q, kt, w, bg, i, jmax, scale):
    """One row of :func:`scores4` (row tails; the row MODE_SHARED_ROW computes once)."""
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


@njit(**jit.HOT)
def outputs4(w, v, o, bg, i, jmax):
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


@njit(**jit.HOT)
def outputs1(w, v, o, bg, i, jmax):
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


@njit(**jit.HOT)
def transpose_keys(k, bg, n, kt):
    """``kt[d, j] = k[bg, j, d]`` for the ``n`` valid keys, in 16-key tiles (rows of k in,
    columns of kt out)."""
    for j0 in range(0, n, 16):
        for d in range(k.shape[2]):
            for j in range(j0, min(j0 + 16, n)):
                kt[d, j] = k[bg, j, d]
