"""Transformer forward passes (BERT and GPT-2) with mean substitution at chosen layers.

Projections are BLAS matrix products through numpy (float32); attention, masking,
softmax, substitution, LayerNorm and GELU are the engine's Numba kernels
(:mod:`qkvmean.engine.cpu`). The substitution replaces the selected heads' Q, K or V after
projection and before attention, at every ablated layer, and propagates: attention
weights are recorded at every layer.

Weights are held in one family-neutral layout (:class:`Weights`), with every projection
stored ``(in, out)`` so that ``y = x @ W + b``; :mod:`qkvmean.io.models` converts
Hugging Face checkpoints into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import config
from . import cpu
from .api import METRICS, Conditions
from .modes import MODE_SHARED_ROW, MODE_UNIFORM

FAMILIES = ("bert", "gpt2")


@dataclass
class Layer:
    wqkv: np.ndarray  # (D, 3D): query, key, value columns
    bqkv: np.ndarray  # (3D,)
    wo: np.ndarray  # (D, D)
    bo: np.ndarray
    ln1: tuple  # BERT: after attention; GPT-2: before attention
    w1: np.ndarray  # (D, F)
    b1: np.ndarray
    w2: np.ndarray  # (F, D)
    b2: np.ndarray
    ln2: tuple  # BERT: after the MLP; GPT-2: before the MLP


@dataclass
class Weights:
    """A BERT (post-LayerNorm encoder) or GPT-2 (pre-LayerNorm causal decoder) model."""

    family: str
    n_heads: int
    eps: float
    tok_emb: np.ndarray  # (vocab, D)
    pos_emb: np.ndarray  # (max_positions, D)
    layers: list
    type_emb: np.ndarray | None = None  # BERT: token type 0 embedding (D,)
    emb_ln: tuple | None = None  # BERT: LayerNorm of the embeddings
    final_ln: tuple | None = None  # GPT-2: ln_f
    name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def causal(self) -> bool:
        return self.family == "gpt2"

    @property
    def d_model(self) -> int:
        return self.tok_emb.shape[1]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def max_positions(self) -> int:
        return self.pos_emb.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.tok_emb.shape[0]


@dataclass
class Ablation:
    """Which tensor to substitute, where, and how."""

    target: str | None = None  # None: the baseline
    over: str = "tokens"
    layers: frozenset = frozenset({0})
    heads: np.ndarray | None = None  # boolean (n_heads,) mask; None: all heads


def _split_heads(x, batch, seq, n_heads, head_dim):
    """(B*N, H*dh) → (B*H, N, dh), C-contiguous."""
    x = x.reshape(batch, seq, n_heads, head_dim).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(x).reshape(batch * n_heads, seq, head_dim)


def _merge_heads(x, batch, seq, n_heads, head_dim):
    """(B*H, N, dh) → (B*N, H*dh)."""
    x = x.reshape(batch, n_heads, seq, head_dim).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(x).reshape(batch * seq, n_heads * head_dim)


def _embed(model: Weights, ids):
    batch, seq = ids.shape
    h = model.tok_emb[ids] + model.pos_emb[:seq][None]
    if model.type_emb is not None:
        h = h + model.type_emb
    h = np.ascontiguousarray(h, dtype=np.float32).reshape(batch * seq, model.d_model)
    if model.emb_ln is not None:
        h = cpu.layer_norm(h, *model.emb_ln, model.eps)
    return h


def _same_as_baseline(rows):
    """The row metrics of a layer whose weights are the baseline's: KL exactly 0."""
    return (rows[0], np.zeros_like(rows[1]), rows[2])


def _attention_layer(model, layer, index, x, batch, seq, lengths, ablation, base, want, reuse=None):
    """Self-attention of one layer: ``(context (B*N, D), weights, row metrics)``.

    ``reuse``: the baseline's ``(weights, rows)`` of this layer when only ``v`` differs
    from the baseline here (its weights are then the baseline's, bit for bit).
    """
    n_heads, head_dim = model.n_heads, model.head_dim
    qkv = x @ layer.wqkv
    qkv += layer.bqkv
    d = model.d_model
    q, k, v = (
        _split_heads(qkv[:, i * d : (i + 1) * d], batch, seq, n_heads, head_dim) for i in range(3)
    )
    # the guard of the public API: every logit must stay finite in float32
    q_max, k_max = cpu.scan_finite(q.reshape(-1))[1], cpu.scan_finite(k.reshape(-1))[1]
    if not q_max * k_max * head_dim < float(np.finfo(np.float32).max) / 4:
        raise ValueError(
            f"the attention logits overflow float32 at layer {index} (max|q| = {q_max:.3g}, "
            f"max|k| = {k_max:.3g}); the model's weights are too large or damaged"
        )
    modes = np.zeros(n_heads, dtype=np.int8)
    if ablation.target is not None and index in ablation.layers:
        select = np.ones(n_heads, np.bool_) if ablation.heads is None else ablation.heads
        prefix = ablation.over == "causal"
        fast = config.FAST_PATHS and not prefix
        if ablation.target == "q":
            q = cpu.mean_substitute(q, lengths, n_heads, select, prefix)
            if fast and not model.causal:
                modes[select] = MODE_SHARED_ROW
        elif ablation.target == "k":
            if fast:
                modes[select] = MODE_UNIFORM
            else:
                k = cpu.mean_substitute(k, lengths, n_heads, select, prefix)
        else:
            v = cpu.mean_substitute(v, lengths, n_heads, select, prefix)
    w, o, rows = cpu.attention(
        q,
        k,
        v,
        lengths,
        n_heads,
        modes,
        model.causal,
        1.0 / np.sqrt(head_dim),
        config.ROW_BLOCK,
        True,
        metrics=want and reuse is None,
        base=base,
    )
    if reuse is not None:
        w, rows = reuse[0], _same_as_baseline(reuse[1]) if want else None
    return _merge_heads(o, batch, seq, n_heads, head_dim), w, rows


def forward(
    model: Weights,
    ids,
    lengths,
    ablation=None,
    *,
    base=None,
    metrics=True,
    start=0,
    hidden=None,
    reuse_first=None,
    keep_inputs=False,
):
    """Run the model on ``ids`` ``(B, N)`` (padded; ``lengths`` valid tokens each).

    Returns ``(weights, rows, hidden, inputs)``: per layer from ``start`` on, the attention
    weights ``(B*H, N, N)`` and (with ``metrics``) the row metrics for
    :func:`cpu.reduce_metrics`; the final hidden states ``(B, N, D)``; and (with
    ``keep_inputs``) every layer's input hidden states. ``base``: the baseline's per-layer
    ``(weights, row entropies)``, for the KL from the baseline. ``start``/``hidden``:
    begin at layer ``start`` from its input hidden states (those of an earlier pass).
    ``reuse_first``: the baseline's ``(weights, rows)`` of layer ``start``, when only ``v``
    changes there.
    """
    ablation = ablation or Ablation()
    ids = np.asarray(ids)
    lengths = np.asarray(lengths, dtype=np.int64)
    batch, seq = ids.shape
    h = _embed(model, ids) if hidden is None else hidden
    weights, rows, inputs = [], [], []
    gpt2 = model.family == "gpt2"
    for index in range(start, model.n_layers):
        layer = model.layers[index]
        if keep_inputs:
            inputs.append(h)
        x = cpu.layer_norm(h, *layer.ln1, model.eps) if gpt2 else h
        layer_base = None if base is None else base[index]
        ctx, w, r = _attention_layer(
            model,
            layer,
            index,
            x,
            batch,
            seq,
            lengths,
            ablation,
            layer_base,
            metrics,
            reuse=reuse_first if index == start else None,
        )
        weights.append(w)
        rows.append(r)
        a = ctx @ layer.wo
        a += layer.bo
        if gpt2:
            h = h + a
            x = cpu.layer_norm(h, *layer.ln2, model.eps)
        else:
            h = cpu.layer_norm(a, *layer.ln1, model.eps, residual=h)
            x = h
        m = x @ layer.w1
        cpu.bias_gelu(m, layer.b1, tanh_approx=gpt2)
        m = m @ layer.w2
        m += layer.b2
        h = h + m if gpt2 else cpu.layer_norm(m, *layer.ln2, model.eps, residual=h)
        if cpu.scan_finite(h.reshape(-1))[0] >= 0:
            raise ValueError(
                f"the model's activations overflow float32 at layer {index}; its weights "
                "are too large or damaged"
            )
    if model.final_ln is not None:
        h = cpu.layer_norm(h, *model.final_ln, model.eps)
    return weights, rows, h.reshape(batch, seq, model.d_model), inputs


def model_conditions(
    model: Weights,
    ids,
    lengths,
    *,
    targets=("q", "k", "v"),
    over="tokens",
    heads=None,
    ablate_layers=(0,),
    seq=None,
):
    """Baseline and mean-substituted forward passes: every layer's maps and metrics.

    Returns :class:`~qkvmean.engine.api.Conditions` with weights ``(B, L, H, S, S)``
    (``S = seq``, default the padded length of ``ids``; maps are zero-padded to it) and
    metrics ``(C, B, L, H)``.
    """
    ids = np.asarray(ids)
    lengths = np.asarray(lengths, dtype=np.int64)
    batch, n = ids.shape
    seq = n if seq is None else seq
    head_mask = None
    if heads is not None:
        head_mask = np.zeros(model.n_heads, np.bool_)
        head_mask[list(heads)] = True
    names, maps, per_condition = [], {}, []

    def record(name, layer_weights, layer_rows):
        out = np.zeros((batch, model.n_layers, model.n_heads, seq, seq), np.float32)
        stats = []
        for index, (w, r) in enumerate(zip(layer_weights, layer_rows, strict=True)):
            out[:, index, :, :n, :n] = w.reshape(batch, model.n_heads, n, n)
            stats.append(cpu.reduce_metrics(r, lengths, model.n_heads))
        names.append(name)
        maps[name] = out
        # (metric) → (B, L, H)
        per_condition.append(
            [
                np.stack([s[i].reshape(batch, model.n_heads) for s in stats], axis=1)
                for i in range(len(METRICS))
            ]
        )

    w0, r0, _, inputs = forward(model, ids, lengths, keep_inputs=True)
    record("baseline", w0, r0)
    base = [(w, r[0]) for w, r in zip(w0, r0, strict=True)]
    layers = frozenset(ablate_layers)
    first = min(layers)
    # Layers before the first ablated one are the baseline's: start there, from the
    # baseline's hidden states (same bits, KL exactly 0, work saved).
    unchanged_w = w0[:first]
    unchanged_r = [_same_as_baseline(r) for r in r0[:first]]
    for target in targets:
        ablation = Ablation(target=target, over=over, layers=layers, heads=head_mask)
        reuse = (w0[first], r0[first]) if target == "v" else None
        w, r, _, _ = forward(
            model,
            ids,
            lengths,
            ablation,
            base=base,
            start=first,
            hidden=inputs[first],
            reuse_first=reuse,
        )
        record(f"mean_{target}", unchanged_w + w, unchanged_r + r)
    metrics = {name: np.stack([c[i] for c in per_condition]) for i, name in enumerate(METRICS)}
    return Conditions(names=names, weights=maps, metrics=metrics)
