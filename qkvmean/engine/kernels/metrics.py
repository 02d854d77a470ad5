"""Attention metrics: per-row entropy, KL and column sums, reduced per pair.

Entropy and KL come from the logits (see
:func:`~qkvmean.engine.kernels.softmax.softmax_row`); the column sums (for the top key)
add rows in fixed blocks of :data:`COL_BLOCK`, so no sum depends on how rows were shared
out among threads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import jit
from .rows import reduce_pair

#: Query rows per block of column sums (for top_key_mass); see :func:`attention`.
COL_BLOCK = 32


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


def no_metrics(dtype):
    return Metrics(
        False, False, np.empty((1, 1, 0), dtype), *(np.empty((0, 0)),) * 3, np.empty((0, 0, 0)), 1
    )


@njit(**jit.HOT)
def record_row(mx, bg, blk, i, row, jmax, entropy, spd, sp, log_z):
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


@njit(**jit.HOT)
def kl_sums(p_row, d, jmax, with_kl):
    """``(sum_j p_j d_j, sum_j p_j)`` over the first ``jmax`` keys, in float64, in key
    order (0, 0 without a baseline)."""
    spd = 0.0
    sp = 0.0
    if with_kl:
        for j in range(jmax):
            spd += p_row[j] * d[j]
            sp += p_row[j]
    return spd, sp


@njit(parallel=True, **jit.SERIAL)
def reduce_metrics_kernel(row_ent, row_kl, colsum, lengths, group, *out):
    for bg in prange(row_ent.shape[0]):
        reduce_pair(bg, row_ent, row_kl, colsum, lengths, group, *out)


@njit(**jit.SERIAL)
def reduce_metrics_serial(row_ent, row_kl, colsum, lengths, group, *out):
    for bg in range(row_ent.shape[0]):
        reduce_pair(bg, row_ent, row_kl, colsum, lengths, group, *out)
