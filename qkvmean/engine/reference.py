"""Plain numpy reference of the engine, written to be obviously right, not fast.

Same names and signatures as the public API (:mod:`qkvmean.engine.api`). Everything is
computed in float64 from the given values and cast to the API's result dtype at the end
(float64 for float64 input, float32 otherwise), so for float32 input this is the exact
answer to within float64 rounding. It does not validate its input.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from .substitution import Substitution, resample_partners, resampled


def _result_dtype(*arrays):
    return np.float64 if any(np.asarray(a).dtype == np.float64 for a in arrays) else np.float32


def _batched(x, lengths):
    """View a bare ``(seq, dim)`` input as a batch of one; default lengths to full."""
    x = np.asarray(x, dtype=np.float64)
    bare = x.ndim == 2
    if bare:
        x = x[None]
        if lengths is not None:
            lengths = np.reshape(lengths, 1)
    if lengths is None:
        lengths = np.full(x.shape[0], x.shape[-2])
    return x, np.asarray(lengths), bare


def allowed_mask(n_valid, seq, causal, window=0):
    """``allowed[i, j]``: may query ``i`` attend to key ``j``? (SPEC section 2); with a
    ``window`` W > 0, only the last W keys up to ``i`` (causal), or those within ``W // 2``
    of ``i`` (bidirectional)."""
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    allowed = (i < n_valid) & (j < n_valid)
    if causal:
        allowed &= j <= i
        if window:
            allowed &= j > i - window
    elif window:
        allowed &= np.abs(i - j) <= window // 2
    return allowed


def log_attention_weights(q, k, *, lengths=None, causal=False, scale=None, window=0,
                          softcap=0.0, slopes=None):  # fmt: skip
    """``log A`` in float64: the stable log-softmax of the allowed logits, -inf elsewhere.

    The logits are ``scale q · k``, plus ``slopes[h] * j`` (ALiBi; ``slopes`` per head,
    the axis before the queries), then ``softcap * tanh(s / softcap)`` where ``softcap``
    is set; the allowed keys as :func:`allowed_mask` with ``window``."""
    q, lengths, bare = _batched(q, lengths)
    k, _, _ = _batched(k, None)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    seq = q.shape[-2]
    log_weights = np.full(q.shape[:-1] + (seq,), -np.inf)
    for b in range(q.shape[0]):
        allowed = allowed_mask(lengths[b], seq, causal, window)
        scores = scale * (q[b] @ np.swapaxes(k[b], -1, -2))
        if slopes is not None and len(slopes):
            scores = scores + np.asarray(slopes, np.float64)[:, None, None] * np.arange(seq)
        if softcap:
            scores = softcap * np.tanh(scores / softcap)
        scores = np.where(allowed, scores, -np.inf)
        row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # rows with nothing allowed
        shifted = scores - row_max
        total = np.exp(shifted).sum(axis=-1, keepdims=True)
        log_total = np.log(np.where(total > 0, total, 1.0))  # 0 only for rows with nothing
        log_weights[b] = np.where(allowed, shifted - log_total, -np.inf)
    return log_weights[0] if bare else log_weights


def attention_weights(q, k, *, lengths=None, causal=False, scale=None, **logits):
    """The weights; ``logits``: ``window``, ``softcap``, ``slopes`` as
    :func:`log_attention_weights` takes them."""
    dtype = _result_dtype(q, k)
    log_weights = log_attention_weights(q, k, lengths=lengths, causal=causal, scale=scale, **logits)
    return np.exp(log_weights).astype(dtype)  # exp(-inf) = 0 where not allowed


def attention(q, k, v, *, lengths=None, causal=False, scale=None, **logits):
    dtype = _result_dtype(q, k, v)
    weights = attention_weights(q, k, lengths=lengths, causal=causal, scale=scale, **logits)
    output = weights.astype(np.float64) @ np.asarray(v, dtype=np.float64)
    return weights.astype(dtype), output.astype(dtype)


def dataset_means(x, *, lengths=None):
    """``(*group, seq, dim)``: at each position, the mean over the inputs (axis 0) that
    have a valid token there; 0 where none has."""
    x, lengths, _ = _batched(x, lengths)
    x = x.astype(np.float64)
    means = np.zeros(x.shape[1:])
    for t in range(x.shape[-2]):
        having = [b for b in range(x.shape[0]) if lengths[b] > t]
        if having:
            means[..., t, :] = np.mean([x[b, ..., t, :] for b in having], axis=0)
    return means


def mean_substitute(x, *, over="tokens", lengths=None, means=None):
    """Each valid position replaced as ``over`` says (a
    :class:`~qkvmean.engine.substitution.Substitution` or its spelling): the mean over
    the input's valid tokens, its causal prefix, or its last ``W`` tokens; ``dataset``:
    position ``t`` of every input replaced by ``means[..., t, :]`` (default:
    :func:`dataset_means` of ``x`` itself); ``zero``; ``resample``: the partner's
    position ``t`` (:func:`~qkvmean.engine.substitution.resample_partners`), where the
    partner has one (or, given as ``means`` ``x.shape``, each input's values to take)."""
    sub = Substitution.parse(over)
    dtype = _result_dtype(x)
    if sub.kind == "dataset" and means is None:
        means = dataset_means(x, lengths=lengths)
    x, lengths, bare = _batched(x, lengths)
    partners = resample_partners(lengths, sub.seed) if sub.kind == "resample" else None
    out = x.copy()
    for b in range(x.shape[0]):
        n = lengths[b]
        if n == 0:
            continue
        valid = x[b, ..., :n, :]
        if sub.kind == "dataset":
            out[b, ..., :n, :] = np.asarray(means)[..., :n, :]
        elif sub.kind == "tokens":
            out[b, ..., :n, :] = valid.mean(axis=-2, keepdims=True)
        elif sub.kind in ("causal", "window"):
            width = n if sub.kind == "causal" else sub.window
            for t in range(n):
                out[b, ..., t, :] = valid[..., max(0, t - width + 1) : t + 1, :].mean(axis=-2)
        elif sub.kind == "zero":
            out[b, ..., :n, :] = 0.0
        elif means is not None:  # resample, the partners' values given (a model's baseline)
            out[b, ..., :n, :] = np.asarray(means)[b, ..., :n, :]
        else:  # resample
            r = partners[b]
            m = min(n, lengths[r])
            out[b, ..., :m, :] = x[r, ..., :m, :]
    if bare:
        out = out[0]
    return out.astype(dtype)


def substitute(q, k, v, *, target, over="tokens", heads=None, lengths=None, means=None):
    """``(q, k, v)`` in float64 with ``target`` mean-substituted in the selected heads.

    The substituted tensor is rounded to the compute dtype first, as the API holds it
    (``over="dataset"``: so are its means).
    """
    dtype = _result_dtype(q, k, v)
    tensors = {"q": np.asarray(q), "k": np.asarray(k), "v": np.asarray(v)}
    x = tensors[target].astype(dtype)
    kind = Substitution.parse(over).kind
    if kind == "dataset":
        means = dataset_means(x, lengths=lengths) if means is None else np.asarray(means)
    if means is not None:
        means = np.asarray(means).astype(dtype)
    substituted = mean_substitute(x, over=over, lengths=lengths, means=means)
    substituted = substituted.astype(np.float64)
    if heads is not None:
        heads = np.atleast_1d(np.asarray(heads, dtype=np.intp))
        mixed = x.astype(np.float64)
        mixed[..., heads, :, :] = substituted[..., heads, :, :]
        substituted = mixed
    tensors[target] = substituted
    return tuple(tensors[name].astype(np.float64) for name in "qkv")


def ablate(
    q, k, v, *, target, over="tokens", heads=None, lengths=None, causal=False, scale=None,
    means=None,
):  # fmt: skip
    dtype = _result_dtype(q, k, v)
    q2, k2, v2 = substitute(
        q, k, v, target=target, over=over, heads=heads, lengths=lengths, means=means
    )
    weights, output = attention(q2, k2, v2, lengths=lengths, causal=causal, scale=scale)
    return weights.astype(dtype), output.astype(dtype)


def metrics(log_weights, log_baseline, lengths):
    """Per-(input, group) metrics from the log-weights ``(batch, *group, seq, seq)``.

    ``entropy``: mean over valid rows of ``-sum a log a``; ``kl_from_baseline``: mean over
    valid rows of ``sum p (log p - log a)``, ``p`` the baseline; ``top_key_mass`` and
    ``top_key_index``: the largest column mean of the weights over valid rows, and its
    column. An input with no valid token gets 0, 0, 0, -1. Working from log-weights keeps
    the terms finite where a weight underflows.
    """
    log_a_all = np.asarray(log_weights, dtype=np.float64)
    log_p_all = np.asarray(log_baseline, dtype=np.float64)
    lead = log_a_all.shape[:-2]
    out = {
        "entropy": np.zeros(lead),
        "kl_from_baseline": np.zeros(lead),
        "top_key_mass": np.zeros(lead),
        "top_key_index": np.full(lead, -1, dtype=np.int64),
    }
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        log_a = log_a_all[b, ..., :n, :n]
        log_p = log_p_all[b, ..., :n, :n]
        allowed = np.isfinite(log_a)
        a = np.exp(log_a)
        p = np.exp(log_p)
        safe_a = np.where(allowed, log_a, 0.0)
        safe_p = np.where(allowed, log_p, 0.0)
        out["entropy"][b] = -(a * safe_a).sum(-1).mean(-1)
        out["kl_from_baseline"][b] = (p * (safe_p - safe_a)).sum(-1).mean(-1)
        column_mean = a.mean(axis=-2)
        out["top_key_mass"][b] = column_mean.max(axis=-1)
        out["top_key_index"][b] = column_mean.argmax(axis=-1)
    return out


def metrics_from_maps(weights, baseline, lengths):
    """:func:`metrics` of stored (rounded) maps: ``log`` of the weights themselves."""
    with np.errstate(divide="ignore"):
        return metrics(
            np.log(np.asarray(weights, np.float64)),
            np.log(np.asarray(baseline, np.float64)),
            lengths,
        )


def conditions(
    q,
    k,
    v=None,
    *,
    targets=("q", "k", "v"),
    over="tokens",
    heads=None,
    lengths=None,
    causal=False,
    scale=None,
    means=None,
):
    """Baseline and mean-substituted maps with their metrics, from the functions above."""
    q_arr = np.asarray(q)
    if lengths is None:
        lengths = np.full(q_arr.shape[0], q_arr.shape[-2])
    v = np.zeros(q_arr.shape, q_arr.dtype) if v is None else v
    kw = dict(lengths=lengths, causal=causal, scale=scale)
    logs = {"baseline": log_attention_weights(q, k, **kw)}
    for target in targets:
        given = (means or {}).get(target)
        q2, k2, _ = substitute(
            q, k, v, target=target, over=over, heads=heads, lengths=lengths, means=given
        )
        # named as the API names them: mean_<target>, or zero_<target>, resample_<target>
        logs[f"{Substitution.parse(over).word}_{target}"] = log_attention_weights(q2, k2, **kw)
    names = list(logs)
    dtype = _result_dtype(q, k)
    weights = {name: np.exp(log).astype(dtype) for name, log in logs.items()}
    per_condition = [metrics(logs[name], logs["baseline"], lengths) for name in names]
    stacked = {m: np.stack([c[m] for c in per_condition]) for m in per_condition[0]}
    return SimpleNamespace(names=names, weights=weights, metrics=stacked)


# ------------------------------------------------------------------ transformer forward


def layer_norm(x, gamma, beta, eps):
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def rms_norm(x, gamma, eps):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * gamma


def token_rms_norm(x, gamma, eps):
    """RMSNorm of ``x`` ``(B, H, S, dh)`` over each token's ``H * dh`` values together;
    ``gamma`` ``(H * dh,)`` in head order."""
    b, h, s, dh = x.shape
    flat = np.asarray(x, np.float64).transpose(0, 2, 1, 3).reshape(b, s, h * dh)
    return rms_norm(flat, gamma, eps).reshape(b, s, h, dh).transpose(0, 2, 1, 3)


def norm(spec, weights, x):
    """The norm an :class:`~qkvmean.engine.arch.Norm` describes, with ``(gamma, beta)``."""
    gamma = np.asarray(weights[0], np.float64) + spec.offset
    if spec.kind == "rms":
        return rms_norm(x, gamma, spec.eps)
    return layer_norm(x, gamma, weights[1], spec.eps)


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x, tanh_approx):
    """Exact GELU ``x Φ(x)`` (BERT) or the tanh approximation (GPT-2's ``gelu_new``)."""
    x = np.asarray(x, dtype=np.float64)
    if tanh_approx:
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)).astype(np.float64))


def silu(x):
    return x / (1.0 + np.exp(-x))


def activation(kind, x):
    """The MLP's nonlinearity; a gated one (``*_gated``) reads the gate and up halves of
    ``x`` and returns ``act(gate) * up``."""
    base = kind.removesuffix("_gated")
    if base != kind:
        gate, up = np.split(x, 2, axis=-1)
        return activation(base, gate) * up
    if base == "silu":
        return silu(x)
    if base == "relu":
        return np.maximum(x, 0.0)
    return gelu(x, base == "gelu_tanh")


def rotate(x, rotary, n):
    """The rotary embedding of ``x`` ``(..., n, dh)`` at positions ``0 .. n - 1``: the
    first ``rotary.dim`` dimensions turn in pairs (rotate-half: ``i`` with ``i + dim/2``;
    interleaved, GPT-J: ``2i`` with ``2i + 1``), the rest pass through."""
    angles = np.arange(n)[:, None] * rotary.inv_freq()[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    turned, rest = x[..., : rotary.dim], x[..., rotary.dim :]
    if rotary.interleaved:
        x1, x2 = turned[..., 0::2], turned[..., 1::2]
        pairs = np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return np.concatenate([pairs.reshape(turned.shape), rest], axis=-1)
    half = rotary.dim // 2
    x1, x2 = turned[..., :half], turned[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def projections(model, ids, lengths):
    """Each layer's ``{"q", "k", "v"}`` of the baseline pass, at the projection output
    (keys and values expanded to one per query head), ``(batch, head, seq, dim)``."""
    taken = []
    transformer_forward(model, ids, lengths, capture=taken)
    return taken


def transformer_forward(
    model, ids, lengths, *, target=None, over="tokens", heads=None, ablate_layers=(0,),
    means=None, capture=None,
):  # fmt: skip
    """Reference forward pass of a :class:`qkvmean.engine.transformer.Weights` model,
    following its :class:`~qkvmean.engine.arch.Arch`.

    Returns ``(weights, hidden)``: a list with each layer's attention weights
    ``(batch, head, seq, seq)`` and the final hidden states ``(batch, seq, d_model)``, all
    float64. ``heads`` names query heads; keys and values are expanded to one per query
    head before the substitution, so substituting K of one head of a group leaves the
    others' keys as they are. ``over="dataset"``: ``means[layer]`` is the ``(head, seq,
    dim)`` mean of ``target`` at each ablated layer (default: the per-position means of
    this batch's own baseline pass, float32 as the engine holds them); ``"resample"``:
    each input takes its partner's values of the baseline pass (as float32), at every
    ablated layer. ``capture``: a
    list that receives each layer's projections (as :func:`projections`).
    """
    kind = Substitution.parse(over).kind
    if target is not None and kind in ("dataset", "resample") and means is None:
        taken = projections(model, ids, lengths)
        if kind == "dataset":
            means = {
                layer: dataset_means(taken[layer][target], lengths=lengths).astype(np.float32)
                for layer in ablate_layers
            }
        else:  # each input takes its partner's values of the baseline pass
            partners = resample_partners(lengths, Substitution.parse(over).seed)
            means = {
                layer: resampled(taken[layer][target], lengths, partners).astype(np.float32)
                for layer in ablate_layers
            }
    arch = model.arch
    ids = np.asarray(ids)
    batch, seq = ids.shape
    n_heads, n_kv, dh = arch.n_heads, arch.n_kv_heads, arch.head_dim

    def heads_first(x, count):  # (B, N, count*dh) → (B, count, N, dh)
        return x.reshape(batch, seq, count, dh).transpose(0, 2, 1, 3)

    def n(weights, x):  # None: no norm there (ModernBERT's first layer, OLMo 2's inputs)
        return x if weights is None else norm(arch.norm, weights, x)

    h = model.tok_emb[ids].astype(np.float64) * np.float32(arch.embedding_scale)
    if model.pos_emb is not None:
        h = h + model.pos_emb[:seq]
    if model.type_emb is not None:
        h = h + model.type_emb
    if model.emb_norm is not None:
        h = n(model.emb_norm, h)
    all_weights = []
    for index, layer in enumerate(model.layers):
        x = h if arch.placement == "post" else n(layer.norm1, h)
        qkv = x @ layer.wqkv + layer.bqkv
        q_cols, kv_cols = n_heads * dh, n_kv * dh
        q = heads_first(qkv[..., :q_cols], n_heads)
        k = heads_first(qkv[..., q_cols : q_cols + kv_cols], n_kv)
        v = heads_first(qkv[..., q_cols + kv_cols :], n_kv)
        k = np.repeat(k, arch.group_size, axis=1)  # query head h reads KV head h // group
        v = np.repeat(v, arch.group_size, axis=1)
        if capture is not None:
            capture.append({"q": q, "k": k, "v": v})
        if target is not None and index in ablate_layers:
            given = means[index] if kind in ("dataset", "resample") else None
            q, k, v = substitute(
                q, k, v, target=target, over=over, heads=heads, lengths=lengths, means=given
            )
        if layer.q_norm is not None and arch.qk_norm_over == "token":  # all heads at once
            kv_gamma = np.repeat(layer.k_norm.reshape(n_kv, dh), arch.group_size, axis=0)
            q = token_rms_norm(q, layer.q_norm, arch.norm.eps)
            k = token_rms_norm(k, kv_gamma.reshape(-1), arch.norm.eps)
        elif layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, arch.norm.eps)
            k = rms_norm(k, layer.k_norm, arch.norm.eps)
        rotary = arch.rotary_of(index)
        if rotary is not None:
            q, k = rotate(q, rotary, seq), rotate(k, rotary, seq)
        weights, out = attention(
            q, k, v, lengths=lengths, causal=arch.causal, scale=arch.scale,
            window=arch.window(index), softcap=arch.softcap, slopes=arch.alibi_slopes(),
        )  # fmt: skip
        all_weights.append(weights.astype(np.float64))
        a = out.astype(np.float64).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        a = a @ layer.wo + layer.bo

        def mlp(y, layer=layer):
            return activation(arch.activation, y @ layer.w1 + layer.b1) @ layer.w2 + layer.b2

        if arch.placement == "post":
            h = n(layer.norm1, h + a)
            h = n(layer.norm2, h + mlp(h))
        elif arch.placement == "parallel":
            h = h + a + mlp(n(layer.norm2, h))
        elif layer.norm3 is not None:  # norms of the sublayers' outputs too (Gemma 2/3)
            h = h + n(layer.norm3, a)
            h = h + n(layer.norm4, mlp(n(layer.norm2, h)))
        else:
            h = h + a
            h = h + mlp(n(layer.norm2, h))
    if model.final_norm is not None:
        h = n(model.final_norm, h)
    return all_weights, h


# ------------------------------------------------------------------ effects on the output


def output_effects(model, hidden, ids, lengths):
    """:func:`qkvmean.engine.effects.output_effects` written out in float64: the change
    of the final hidden state, the next-token KL and cross-entropy change (a model with
    a head), the cosine of the mean-pooled embeddings (an encoder); ``(C, B)`` each."""
    from .effects import effects_of

    names = effects_of(model)
    hidden = np.asarray(hidden, dtype=np.float64)
    n_cond, batch = hidden.shape[:2]
    out = {name: np.zeros((n_cond, batch)) for name in names}

    def log_probs(h):
        z = h @ model.unembed.astype(np.float64).T
        if model.unembed_bias is not None:
            z = z + model.unembed_bias
        if model.arch.final_softcap:
            z = model.arch.final_softcap * np.tanh(z / model.arch.final_softcap)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    for b, n in enumerate(lengths):
        if n == 0:
            continue
        h0 = hidden[0, b, :n]
        for c in range(n_cond):
            hc = hidden[c, b, :n]
            out["hidden_change"][c, b] = np.linalg.norm(hc - h0) / np.linalg.norm(h0)
            if "kl_next_token" in out:
                lp0, lpc = log_probs(h0), log_probs(hc)
                out["kl_next_token"][c, b] = (np.exp(lp0) * (lp0 - lpc)).sum(-1).mean()
                if n > 1:
                    nxt = np.asarray(ids[b][1:n])
                    rows = np.arange(n - 1)
                    ce0 = -lp0[rows, nxt].mean()
                    out["ce_change"][c, b] = -lpc[rows, nxt].mean() - ce0
            if "embedding_cosine" in out:
                p0, pc = h0.mean(0), hc.mean(0)
                out["embedding_cosine"][c, b] = p0 @ pc / np.linalg.norm(p0) / np.linalg.norm(pc)
    return out
