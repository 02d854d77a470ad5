"""Row helpers compiled into the kernels of every backend (CPU and CUDA alike).

Each is ``register_jitable``: plain Python on scalars and array elements, inlined into
its caller's kernel, whether that is a Numba CPU kernel or a numba-cuda one, so that both
backends compute these steps with the same code (one thread per row on a GPU).
"""

from __future__ import annotations

import math

from numba.extending import register_jitable


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


@register_jitable
def token_norm_vector(x, c, t, heads, group, gamma, eps):
    """In place, the RMSNorm of token ``t``'s vectors of every head of copy ``c`` of ``x``
    ``(C * heads, n, dh)`` taken together (OLMo 2's q/k norm over the whole projection),
    statistics in float64; head ``h`` is scaled by ``gamma[(h // group) * dh:]`` (keys
    expanded to one per query head share their KV head's weights, and the mean of squares
    of the expanded heads is the KV heads' own). Shared with the CUDA backend."""
    dh = x.shape[2]
    sq = 0.0
    for h in range(heads):
        for d in range(dh):
            a = x[c * heads + h, t, d]
            sq += a * a
    inv = 1.0 / math.sqrt(sq / (heads * dh) + eps)
    for h in range(heads):
        g = (h // group) * dh
        for d in range(dh):
            x[c * heads + h, t, d] = x[c * heads + h, t, d] * inv * gamma[g + d]


@register_jitable
def key_range(i, n, causal, window):
    """``(jmin, jmax)``: the keys ``jmin <= j < jmax`` that query ``i`` (of ``n``) sees:
    with ``window`` W > 0, the last W up to ``i`` when ``causal``, else those within
    ``W // 2`` of ``i`` on either side (shared with the CUDA backend)."""
    if causal:
        hi = min(n, i + 1)
        return (max(0, hi - window) if window > 0 else 0), hi
    if window > 0:
        half = window // 2
        return max(0, i - half), min(n, i + half + 1)
    return 0, n


@register_jitable
def rotary_vector(x, p, t, cos, sin, interleaved):
    """In place, the rotary embedding of vector ``x[p, t]`` (see :func:`rotary_serial`;
    shared with the CUDA backend): dimension ``i`` of the rotated ones pairs with ``i +
    half`` (rotate-half: Llama, GPT-NeoX) or, ``interleaved``, ``2i`` with ``2i + 1``
    (GPT-J)."""
    half = cos.shape[1]
    for i in range(half):
        j, m = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        a = x[p, t, j]
        b = x[p, t, m]
        x[p, t, j] = a * cos[t, i] - b * sin[t, i]
        x[p, t, m] = b * cos[t, i] + a * sin[t, i]


@register_jitable
def window_mean_feature(x, bg, d, n, window, shrink, out):
    """Feature ``d`` of pair ``bg``'s first ``n`` rows replaced by its causal mean over the
    last ``window`` tokens (``1 <= window < n``), summed in float64 times ``shrink``;
    backwards, so that ``out`` may be ``x``: row t's window reads rows t - W + 1 .. t,
    none of which is written before row t itself. (Shared with the CUDA backend.)"""
    s = 0.0
    for t in range(n - window, n):
        s += x[bg, t, d] * shrink
    for t in range(n - 1, -1, -1):
        own = x[bg, t, d]
        out[bg, t, d] = s / min(t + 1, window) / shrink
        s -= own * shrink
        if t - window >= 0:
            s += x[bg, t - window, d] * shrink
