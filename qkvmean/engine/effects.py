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
from numba import njit, prange

from .. import config
from . import jit

#: Every effect, in the store's order.
EFFECTS = ("hidden_change", "kl_next_token", "ce_change", "embedding_cosine")


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
def _log_sum_exp(z):
    m = -np.inf
    for v in range(z.shape[0]):
        m = max(m, np.float64(z[v]))
    s = 0.0
    for v in range(z.shape[0]):
        s += math.exp(z[v] - m)
    return m + math.log(s)


@njit(parallel=True, **jit.SERIAL)
def next_token_kernel(base, cond, ids, n, out):
    """Per valid row ``t < n`` of the logits ``base`` and ``cond`` ``(>= n, V)``:
    ``out[t, 0]`` = ``KL(softmax(base_t) || softmax(cond_t))``, ``out[t, 1]`` and
    ``out[t, 2]`` the cross-entropies of token ``ids[t + 1]`` (rows ``t < n - 1``), all
    in float64."""
    for t in prange(n):
        lse_b = _log_sum_exp(base[t])
        lse_c = _log_sum_exp(cond[t])
        kl = 0.0
        for v in range(base.shape[1]):
            log_p = base[t, v] - lse_b
            kl += math.exp(log_p) * (log_p - (cond[t, v] - lse_c))
        out[t, 0] = max(kl, 0.0)
        if t < n - 1:
            out[t, 1] = lse_b - base[t, ids[t + 1]]
            out[t, 2] = lse_c - cond[t, ids[t + 1]]


def output_effects(model, hidden, ids, lengths) -> dict:
    """``{effect: (C, B) float32}`` of :func:`effects_of` ``model``, from each condition's
    final hidden states ``hidden`` ``(C, B, S, D)`` (condition 0 the baseline, as
    :func:`~qkvmean.engine.transformer.model_conditions` gives them with ``hidden=True``),
    the token ids ``(B, >= n)`` and the valid ``lengths``."""
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
    if EFFECTS[3] in out:
        out[EFFECTS[3]][0] = 1.0
    for b in range(batch):
        n = int(lengths[b])
        if n == 0:
            for name in names:
                out[name][:, b] = 0.0
            continue
        h0 = hidden[0, b, :n].astype(np.float64)
        norm0 = np.linalg.norm(h0)
        pooled0 = h0.mean(axis=0)
        base = _logits(model, hidden[0, b, :n]) if EFFECTS[1] in out else None
        rows = np.zeros((n, 3))
        for c in range(1, n_cond):
            hc = hidden[c, b, :n].astype(np.float64)
            out[EFFECTS[0]][c, b] = np.linalg.norm(hc - h0) / norm0 if norm0 else 0.0
            if base is not None:
                rows[:] = 0.0
                with config.kernel_guard():
                    next_token_kernel(base, _logits(model, hidden[c, b, :n]), ids[b], n, rows)
                out[EFFECTS[1]][c, b] = rows[:, 0].mean()
                if n > 1:
                    out[EFFECTS[2]][c, b] = (rows[: n - 1, 2] - rows[: n - 1, 1]).mean()
            if EFFECTS[3] in out:
                pooled = hc.mean(axis=0)
                denom = np.linalg.norm(pooled) * np.linalg.norm(pooled0)
                out[EFFECTS[3]][c, b] = pooled @ pooled0 / denom if denom else 0.0
    return out


def _logits(model, h):
    """``h @ W_U^T`` (+ the head's bias), float32 ``(n, V)``."""
    z = np.matmul(h, model.unembed.T)
    if model.unembed_bias is not None:
        z += model.unembed_bias
    return z
