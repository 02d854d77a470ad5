"""The effect of each condition on the model's output, from the final hidden states.

Per condition and input, float32 (the baseline's own row: 0, 0, 0 and 1):

- ``hidden_change``: ``||H_c - H_0|| / ||H_0||``, the Frobenius norms over the input's
  valid positions of the final hidden states (after the final norm where the family has
  one), every model;
- ``kl_next_token``: language models with a head (GPT-2 tied, Llama-like ``lm_head`` or
  tied, GPT-NeoX ``embed_out``): the mean over valid positions ``t`` of
  ``KL(p_0(. | t) || p_c(. | t))``, the next-token distributions ``softmax(H W_U^T)``;
- ``ce_change``: the same models: the mean over ``t < n - 1`` of the cross-entropy of the
  text's own next token ``ids[t + 1]`` under the condition, minus the baseline's (nats;
  0 for inputs of fewer than two tokens);
- ``embedding_cosine``: encoders (BERT, the sentence-transformers MiniLM): the cosine of
  the mean-pooled final hidden states of the condition and the baseline (what
  sentence-transformers' mean pooling gives, before its normalisation, which does not
  change a cosine).

An input with no valid token gets 0 everywhere (no distribution, no embedding).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .. import config
from . import jit
from .kernels import blas
from .kernels.products import matmul_serial
from .kernels.vmath import exp
from .names import EFFECTS


def effects_of(model) -> tuple:
    """The effects that apply to ``model``: with a language-model head, the next-token
    ones; an encoder, the embedding cosine."""
    names = [EFFECTS[0]]
    if model.unembed is not None and model.causal:
        names += [EFFECTS[1], EFFECTS[2]]
    if not model.causal:
        names.append(EFFECTS[3])
    return tuple(names)


@njit(**jit.SERIAL)
def base_distribution(z, ids, n, p, stats):
    """Per row ``t < n`` of the baseline's logits ``z`` ``(>= n, V)``, once per input:
    ``p[t]`` = ``softmax(z[t])`` (float32) and ``stats[t]`` = (the cross-entropy of
    token ``ids[t + 1]`` (0 in the last row), ``Σ p[t]``, ``Σ p[t] log p[t]``) in float64
    (the sums over the float32 ``p`` as stored, so that :func:`next_token_kernel`'s
    algebra is exact for them)."""
    for t in range(n):
        m = -np.inf
        for v in range(z.shape[1]):
            m = max(m, np.float64(z[t, v]))
        total = 0.0
        for v in range(z.shape[1]):
            total += math.exp(z[t, v] - m)
        lse = m + math.log(total)
        mass = 0.0
        plogp = 0.0
        for v in range(z.shape[1]):
            log_p = z[t, v] - lse
            pv = np.float32(math.exp(log_p))
            p[t, v] = pv
            mass += pv
            plogp += pv * log_p
        stats[t, 0] = lse - z[t, ids[t + 1]] if t < n - 1 else 0.0
        stats[t, 1] = mass
        stats[t, 2] = plogp


@njit(**jit.HOT)
def next_token_kernel(p, stats, cond, ids, n, out):
    """Per valid row ``t < n`` of a condition's logits ``cond`` ``(>= n, V)``, against the
    baseline's :func:`base_distribution` ``p``, ``stats``: ``out[t, 0]`` =
    ``KL(p_t || softmax(cond_t))``, ``out[t, 1]`` and ``out[t, 2]`` the cross-entropies
    of token ``ids[t + 1]`` under the baseline and the condition (rows ``t < n - 1``).

    ``KL = Σ p log p - Σ p cond + lse(cond) Σ p``: two passes over the row, one of them
    a dot product and the other one ``exp`` per entry (the vectorised float32
    :func:`~qkvmean.engine.kernels.vmath.exp`, relative error below 5e-7, summed in
    float64), instead of three ``exp`` per entry."""
    vocab = cond.shape[1]
    for t in range(n):
        m = cond[t, 0]
        dot = 0.0
        for v in range(vocab):
            m = max(m, cond[t, v])
            dot += np.float64(p[t, v]) * np.float64(cond[t, v])
        total = 0.0
        for v in range(vocab):
            total += np.float64(exp(cond[t, v] - m))
        lse = np.float64(m) + math.log(total)
        out[t, 0] = max(stats[t, 2] - dot + lse * stats[t, 1], 0.0)
        if t < n - 1:
            out[t, 1] = stats[t, 0]
            out[t, 2] = lse - cond[t, ids[t + 1]]


#: About how many rows of logits one product computes (``n`` tokens a condition: the
#: conditions of a stack go through the head ``LOGIT_ROWS // n`` at a time).
LOGIT_ROWS = 512


class InputEffects:
    """The effects of one input's conditions: the baseline's part computed once (its
    norm, pooled embedding and logits, the costly part), then :meth:`of` each
    condition's final hidden states."""

    def __init__(self, model, names, ids, base, matmul=None):
        """``base``: the baseline's final hidden states ``(n, D)`` (``n >= 1``) of the
        input with token ids ``ids`` (at least ``n`` of them); ``matmul(a, b, out)``: the
        host product for the head's logits (the model path's, in its blocks: on every
        thread for an input that has them to itself)."""
        self.model, self.names, self.n = model, names, base.shape[0]
        self.matmul = matmul or host_matmul
        self.ids = np.asarray(ids, dtype=np.int64)
        self.h0 = np.asarray(base, dtype=np.float64)
        self.norm0 = np.linalg.norm(self.h0)
        self.pooled0 = self.h0.mean(axis=0)
        self.p = None  # the baseline's next-token distributions, where the model has a head
        if EFFECTS[1] in names:
            z = _logits(model, np.asarray(base, np.float32), self.matmul)
            self.p, self.stats = np.empty_like(z), np.empty((self.n, 3))
            with config.kernel_guard():
                base_distribution(z, self.ids, self.n, self.p, self.stats)
        self.rows = np.zeros((self.n, 3))

    def of(self, hidden) -> dict:
        """``{effect: value}`` of a condition's final hidden states ``(n, D)``."""
        return self.of_stack(hidden, 1)[0]

    def of_stack(self, hidden, count) -> list:
        """:meth:`of` each of ``count`` conditions whose final hidden states are stacked
        ``(count * n, D)``; their logits in products of :data:`LOGIT_ROWS` rows or so
        (a product of a few rows by the head is bound by reading the head, not by its
        arithmetic)."""
        n = self.n
        hidden = np.asarray(hidden, np.float32)
        found = []
        per = max(1, LOGIT_ROWS // n)
        for first in range(0, count, per):
            last = min(count, first + per)
            rows = hidden[first * n : last * n]
            z = _logits(self.model, rows, self.matmul) if self.p is not None else None
            for c in range(first, last):
                rows = hidden[c * n : (c + 1) * n]
                found.append(self._effects(rows, None if z is None else z[(c - first) * n :]))
        return found

    def _effects(self, hidden, cond) -> dict:
        n = self.n
        hc = np.asarray(hidden, dtype=np.float64)
        found = {EFFECTS[0]: np.linalg.norm(hc - self.h0) / self.norm0 if self.norm0 else 0.0}
        if cond is not None:
            rows = self.rows
            rows[:] = 0.0
            with config.kernel_guard():
                next_token_kernel(self.p, self.stats, cond, self.ids, n, rows)
            found[EFFECTS[1]] = rows[:, 0].mean()
            found[EFFECTS[2]] = (rows[: n - 1, 2] - rows[: n - 1, 1]).mean() if n > 1 else 0.0
        if EFFECTS[3] in self.names:
            pooled = hc.mean(axis=0)
            denom = np.linalg.norm(pooled) * np.linalg.norm(self.pooled0)
            found[EFFECTS[3]] = pooled @ self.pooled0 / denom if denom else 0.0
        return found


def no_effect(names) -> dict:
    """The baseline's own values (and an empty input's: 0 everywhere)."""
    return {name: 1.0 if name == EFFECTS[3] else 0.0 for name in names}


def output_effects(model, hidden, ids, lengths) -> dict:
    """``{effect: (C, B) float32}`` of :func:`effects_of` ``model``, from each condition's
    final hidden states ``hidden`` ``(C, B, S, D)`` (condition 0 the baseline, as
    :func:`~qkvmean.engine.transformer.model_conditions` gives them with ``hidden=True``),
    the token ids ``(B, >= n)`` and the valid ``lengths``. (``model_conditions(...,
    effects=True)`` computes the same in each input's pass, without keeping the hidden
    states.)"""
    hidden = np.asarray(hidden, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    n_cond, batch = hidden.shape[:2]
    if ids.shape[0] != batch or lengths.shape != (batch,) or (lengths > hidden.shape[2]).any():
        raise ValueError(
            f"hidden {hidden.shape}, ids {ids.shape} and lengths {lengths.shape} do not match"
        )
    names = effects_of(model)
    out = {name: np.zeros((n_cond, batch), np.float32) for name in names}
    for b in range(batch):
        n = int(lengths[b])
        if n == 0:  # no distribution, no embedding: 0 everywhere
            continue
        for name, value in no_effect(names).items():
            out[name][0, b] = value
        effects = InputEffects(model, names, ids[b], hidden[0, b, :n])
        for c in range(1, n_cond):
            for name, value in effects.of(hidden[c, b, :n]).items():
                out[name][c, b] = value
    return out


def host_matmul(a, b, out):
    """The model path's serial product: the same blocks at one BLAS thread, so the same
    bits as the effects of a model run."""
    with config.blas_single_thread():
        matmul_serial(blas.gemm(np.float32), a, b, out)


def _logits(model, h, matmul):
    """``h @ W_U^T`` (+ the head's bias), float32 ``(n, V)``; soft-capped as ``c tanh(z /
    c)`` where the family caps its output logits (Gemma 2)."""
    z = np.empty((h.shape[0], model.unembed.shape[0]), np.float32)
    matmul(np.ascontiguousarray(h), model.unembed.T, z)
    if model.unembed_bias is not None:
        z += model.unembed_bias
    cap = model.arch.final_softcap
    if cap:
        z /= np.float32(cap)
        np.tanh(z, out=z)
        z *= np.float32(cap)
    return z
