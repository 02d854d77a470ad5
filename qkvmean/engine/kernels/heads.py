"""Head layout of the model path: projections split into heads (with the bias), heads
merged back, and the rotary embedding of each head's vectors."""

from __future__ import annotations

from numba import njit, prange

from .. import jit
from .rows import merge_heads_row, rotary_vector, split_heads_row, token_norm_vector


@njit(**jit.SERIAL)
def split_heads_serial(qkv, bias, n_heads, n_kv_heads, q, k, v):
    """Projections ``(C*n, (H + 2G) dh)`` of ``C`` stacked copies of one input (columns:
    the ``H`` query heads, then ``G`` key heads, then ``G`` value heads), plus ``bias``,
    into head-major ``q``, ``k``, ``v`` ``(C*H, n, dh)``: row ``c*n + t`` to pairs
    ``c*H + h``, token ``t``. Keys and values are expanded to one per query head
    (query head ``h`` reads KV head ``h // (H / G)``), so that each can be substituted
    for its own query head."""
    for r in range(qkv.shape[0]):
        split_heads_row(r, qkv, bias, n_heads, n_kv_heads, q, k, v)


@njit(parallel=True, **jit.SERIAL)
def split_heads_kernel(qkv, bias, n_heads, n_kv_heads, q, k, v):
    """:func:`split_heads_serial`, rows on the compute threads."""
    for r in prange(qkv.shape[0]):
        split_heads_row(r, qkv, bias, n_heads, n_kv_heads, q, k, v)


@njit(**jit.SERIAL)
def merge_heads_serial(o, n_heads, ctx):
    """Inverse of :func:`split_heads_serial` for the attention outputs ``(C*H, n, dh)``."""
    for r in range(ctx.shape[0]):
        merge_heads_row(r, o, n_heads, ctx)


@njit(parallel=True, **jit.SERIAL)
def merge_heads_kernel(o, n_heads, ctx):
    """:func:`merge_heads_serial`, rows on the compute threads."""
    for r in prange(ctx.shape[0]):
        merge_heads_row(r, o, n_heads, ctx)


@njit(**jit.SERIAL)
def rotary_serial(x, cos, sin, interleaved):
    """In place, the rotary embedding of the first ``2 * cos.shape[1]`` dimensions of
    every vector of ``x`` ``(P, n, dh)`` (rotate-half layout: dimension ``i`` pairs with
    ``i + half``; ``interleaved``: ``2i`` with ``2i + 1``); ``cos``, ``sin`` ``(>= n,
    half)`` by position."""
    for p in range(x.shape[0]):
        for t in range(x.shape[1]):
            rotary_vector(x, p, t, cos, sin, interleaved)


@njit(parallel=True, **jit.SERIAL)
def rotary_kernel(x, cos, sin, interleaved):
    """:func:`rotary_serial`, heads on the compute threads."""
    for p in prange(x.shape[0]):
        for t in range(x.shape[1]):
            rotary_vector(x, p, t, cos, sin, interleaved)


@njit(**jit.SERIAL)
def token_norm_serial(x, heads, group, gamma, eps):
    """In place, :func:`~qkvmean.engine.kernels.rows.token_norm_vector` of every token of
    every copy of ``x`` ``(C * heads, n, dh)``."""
    for c in range(x.shape[0] // heads):
        for t in range(x.shape[1]):
            token_norm_vector(x, c, t, heads, group, gamma, eps)


@njit(parallel=True, **jit.SERIAL)
def token_norm_kernel(x, heads, group, gamma, eps):
    """:func:`token_norm_serial`, tokens on the compute threads."""
    n = x.shape[1]
    for task in prange((x.shape[0] // heads) * n):
        token_norm_vector(x, task // n, task % n, heads, group, gamma, eps)
