"""The softmax of one row of logits, in place, with the sums its metrics need.

Float32 ``exp`` from :mod:`~qkvmean.engine.kernels.vmath`; sums in the row's dtype within
chunks of :data:`CHUNK` keys and in float64 across chunks.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import jit
from .vmath import exp, fmax

#: Keys per partial sum in the softmax (see :func:`_softmax_row`).
CHUNK = 64


@njit(**jit.HOT)
def exp_row(row, jmax, m):
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


@njit(**jit.HOT)
def exp_row_stats(row, jmax, m, p_row):
    """:func:`exp_row`, also summing ``e_j d_j``, ``p_j d_j`` and ``p_j``.

    The same shape as :func:`exp_row`: whole chunks, then the tail in a loop of its own
    (a tail branch inside the chunk loop kept LLVM from vectorising it: 7 ns an entry
    instead of 1).
    """
    total = sed = spd = sp = 0.0
    zero = row[0] - row[0]
    j0 = 0
    while j0 + CHUNK <= jmax:
        part_total = part_sed = part_spd = part_sp = zero
        for jj in range(CHUNK):
            d = row[j0 + jj] - m
            e = exp(d)
            row[j0 + jj] = e
            part_total += e
            part_sed += e * d
            part_spd += p_row[j0 + jj] * d
            part_sp += p_row[j0 + jj]
        total += part_total
        sed += part_sed
        spd += part_spd
        sp += part_sp
        j0 += CHUNK
    part_total = part_sed = part_spd = part_sp = zero
    for j in range(j0, jmax):
        d = row[j] - m
        e = exp(d)
        row[j] = e
        part_total += e
        part_sed += e * d
        part_spd += p_row[j] * d
        part_sp += p_row[j]
    return total + part_total, sed + part_sed, spd + part_spd, sp + part_sp


@njit(**jit.HOT)
def softmax_row(row, jmax, n_keys, with_metrics, p_row, logits):
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
        m = fmax(m, row[j])
    if logits.shape[0] >= jmax:  # keep d = logits - max for the rows that copy this one
        for j in range(jmax):
            logits[j] = row[j] - m
    if with_metrics:  # two loops rather than a test inside one: each stays vectorised
        total, sed, spd, sp = exp_row_stats(row, jmax, m, p_row)
    else:
        total = exp_row(row, jmax, m)
        sed = spd = sp = 0.0
    inv = 1.0 / total
    for j in range(jmax):
        row[j] = row[j] * inv
    for j in range(jmax, n_keys):
        row[j] = 0.0
    log_z = np.log(total)
    return log_z - sed * inv, spd, sp, log_z


@njit(**jit.HOT)
def uniform_row(row, jmax, n_keys, with_kl, p_row):
    """What :func:`softmax_row` gives for ``jmax`` equal logits, without computing it.

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
