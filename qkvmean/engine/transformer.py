"""Transformer forward passes (BERT and GPT-2) with mean substitution at chosen layers.

How the work is laid out, for speed on every core and under foreign load:

- **One input per task.** A batch's inputs are independent, so each is one task on the
  process's pool of compute threads (:func:`qkvmean.config.task_pool`), with BLAS held to
  one thread and the engine's serial kernels: one pool does everything, nothing waits at
  a barrier for a thread that another process holds off its core, and an input is
  computed at its own length (no padding work).
- **Conditions stacked.** Up to the first substituted layer every condition is the
  baseline, computed once. From there on the baseline and each substitution run as one
  stack of ``C`` copies of the input: every projection is one matrix product of
  ``C * n`` rows.
- **Fused steps, no copies.** The projection bias is added while splitting heads; the
  output bias, the residual and the LayerNorm are one pass (GPT-2: the residual sum and
  the next LayerNorm); the MLP bias and GELU (vectorised float32) are one pass. The
  attention kernel writes each map straight into the output array, zero-padded to the
  run's length.

Q, K or V of the selected heads is replaced after its projection (and bias) and before
attention, at every ablated layer, and the change propagates: maps are recorded at every
layer. Weights are held in one family-neutral layout (:class:`Weights`), with every
projection stored ``(in, out)`` so that ``y = x @ W + b``; :mod:`qkvmean.io.models`
converts Hugging Face checkpoints into it.
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
    def d_mlp(self) -> int:
        return self.layers[0].w1.shape[1] if self.layers else 0

    @property
    def max_positions(self) -> int:
        return self.pos_emb.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.tok_emb.shape[0]


@dataclass(frozen=True)
class Plan:
    """What a model run substitutes, and where: the conditions are the baseline and one
    per target."""

    targets: tuple = ("q", "k", "v")
    over: str = "tokens"
    layers: frozenset = frozenset({0})
    heads: np.ndarray | None = None  # boolean (n_heads,) mask; None: all heads

    @property
    def names(self) -> list:
        return ["baseline"] + [f"mean_{t}" for t in self.targets]

    def first(self, n_layers) -> int:
        """The first layer where a condition differs from the baseline."""
        return min(self.layers) if self.targets and self.layers else n_layers


_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Input:
    """The buffers of one input's stacked forward pass (``C`` conditions × ``n`` tokens)."""

    def __init__(self, model: Weights, n: int, stack: int):
        d, f, heads, dh = model.d_model, model.d_mlp, model.n_heads, model.head_dim
        rows = stack * n
        self.h = np.empty((rows, d), np.float32)  # the residual stream
        self.x = np.empty((rows, d), np.float32) if model.causal else self.h  # GPT-2: LN(h)
        self.qkv = np.empty((rows, 3 * d), np.float32)
        self.q, self.k, self.v, self.o = (
            np.empty((stack * heads, n, dh), np.float32) for _ in range(4)
        )
        self.ctx = np.empty((rows, d), np.float32)
        self.a = np.empty((rows, d), np.float32)
        self.m = np.empty((rows, f), np.float32)
        self.length = np.array([n], dtype=np.int64)
        self.scratch = np.empty(n, np.float32)
        self.kt = np.empty((0, 0), np.float32)  # the kernel reads no keys: scores are given


def _add_norm(x, bias, residual, norm, eps, out, store_sum=False):
    """``out = LN(x + bias (+ residual))``; with ``store_sum`` also ``residual = x + bias +
    residual`` (see :func:`qkvmean.engine.cpu.add_norm_serial`)."""
    cpu.add_norm_serial(
        x,
        bias,
        x if residual is None else residual,
        residual is not None,
        store_sum,
        norm[0],
        norm[1],
        float(eps),
        out,
    )


def _check_logits(q, k, head_dim, index):
    """The guard of the public API: every logit must stay finite in float32."""
    q_max, k_max = cpu.scan_finite(q.reshape(-1))[1], cpu.scan_finite(k.reshape(-1))[1]
    if not q_max * k_max * head_dim < _FLOAT32_MAX / 4:
        raise ValueError(
            f"the attention logits overflow float32 at layer {index} (max|q| = {q_max:.3g}, "
            f"max|k| = {k_max:.3g}); the model's weights are too large or damaged"
        )


def _substitute(plan: Plan, target, x, length, n_heads, modes, causal):
    """Mean-substitute ``target`` in place in ``x`` (one condition's ``(H, n, dh)``), or
    set the fast-path ``modes`` that make it unnecessary."""
    select = np.ones(n_heads, np.bool_) if plan.heads is None else plan.heads
    prefix = plan.over == "causal"
    fast = config.FAST_PATHS and not prefix
    if target == "k" and fast:
        modes[select] = MODE_UNIFORM  # identical keys: uniform rows, nothing to substitute
        return
    acc = np.empty(x.shape[2], np.float64)
    cpu.mean_substitute_serial(x, length, n_heads, select, prefix, 1.0, acc, x)
    if target == "q" and fast and not causal:
        modes[select] = MODE_SHARED_ROW


class _Outputs:
    """A batch's maps ``(B, L, H, S, S)`` per condition and metrics ``(C, B, L, H)``."""

    def __init__(self, model: Weights, plan: Plan, batch, seq, hidden):
        shape = (batch, model.n_layers, model.n_heads, seq, seq)
        self.maps = [np.zeros(shape, np.float32) for _ in plan.names]  # zero pages, lazily
        mshape = (len(plan.names), batch, model.n_layers, model.n_heads)
        self.metrics = {name: np.zeros(mshape) for name in METRICS[:3]}
        self.metrics["top_key_index"] = np.full(mshape, -1, dtype=np.int64)
        self.hidden = (
            np.zeros((len(plan.names), batch, seq, model.d_model), np.float32) if hidden else None
        )

    def reduced(self, c, b, layer):
        return tuple(self.metrics[name][c, b, layer] for name in METRICS)


def _attention(model, buf: _Input, out: _Outputs, b, layer, c, modes, metrics, base):
    """Condition ``c``'s attention at ``layer`` of input ``b``: its map written into the
    outputs, its context into ``buf.o``; returns its row entropies (the baseline of the
    next conditions).

    The products ``q·kᵀ`` and ``A·v`` are BLAS calls; the scaling, mask, softmax, fast
    paths and metrics are :func:`qkvmean.engine.cpu.attention_serial` on the scores.
    """
    heads = model.n_heads
    n = buf.length[0]
    pairs = slice(c * heads, (c + 1) * heads)
    q, k, v = buf.q[pairs], buf.k[pairs], buf.v[pairs]
    w = out.maps[c][b, layer]  # (H, S, S), C-contiguous: rows and columns < n are the map
    valid = w[:, :n, :n]
    if np.all(modes == MODE_SHARED_ROW):  # one row of scores per head is read
        np.matmul(q[:, :1], k.transpose(0, 2, 1), out=w[:, :1, :n])
    elif not np.all(modes == MODE_UNIFORM):  # (uniform rows read no scores)
        np.matmul(q, k.transpose(0, 2, 1), out=valid)
    n_keys = w.shape[2]
    col_block = min(n, cpu.COL_BLOCK)
    n_blocks = (n + col_block - 1) // col_block
    with_kl = base is not None
    mx = cpu.Metrics(
        metrics,
        with_kl,
        base[0] if with_kl else np.zeros((1, 1, n_keys), np.float32),
        base[1] if with_kl else np.empty((0, 0)),
        np.zeros((heads, n)),
        np.zeros((heads, n)),
        np.empty((heads, n_blocks, n_keys)),
        col_block,
    )
    cpu.attention_serial(
        q,
        k,
        v,
        buf.length,
        heads,
        modes,
        model.causal,
        np.float32(1.0 / np.sqrt(model.head_dim)),
        w,
        buf.o[pairs],
        False,
        mx,
        buf.scratch,
        buf.kt,
        True,
    )
    np.matmul(valid, v, out=buf.o[pairs])
    if metrics:
        cpu.reduce_metrics_serial(
            mx.row_ent, mx.row_kl, mx.colsum, buf.length, heads, *out.reduced(c, b, layer)
        )
    return mx.row_ent


def _same_as_baseline(out: _Outputs, b, c, layers):
    """Condition ``c`` equals the baseline at ``layers`` of input ``b``: its maps and
    metrics are the baseline's, with a KL of exactly 0."""
    for layer in layers:
        out.maps[c][b, layer] = out.maps[0][b, layer]
        for name in METRICS:
            out.metrics[name][c, b, layer] = out.metrics[name][0, b, layer]
        out.metrics["kl_from_baseline"][c, b, layer] = 0.0


def _one_input(model: Weights, plan: Plan, ids, b, out: _Outputs):
    """Every condition's forward pass of input ``b`` (token ids ``ids``), into ``out``."""
    n = ids.shape[0]
    if n == 0:  # no tokens: empty maps, metrics 0 and no top key (as initialised)
        return
    names = plan.names
    stack = len(names)
    n_layers, heads, dh = model.n_layers, model.n_heads, model.head_dim
    first = plan.first(n_layers)
    buf = _Input(model, n, stack if first < n_layers else 1)
    gpt2 = model.causal
    zero = np.zeros(model.d_model, np.float32)
    emb = model.tok_emb[ids] + model.pos_emb[:n]
    if model.type_emb is not None:
        emb += model.type_emb
    if model.emb_ln is not None:
        _add_norm(emb, zero, None, model.emb_ln, model.eps, buf.h[:n])
    else:
        buf.h[:n] = emb
    if gpt2:
        _add_norm(buf.h[:n], zero, None, model.layers[0].ln1, model.eps, buf.x[:n])
    base_rows = [None] * n_layers
    for index in range(n_layers):
        layer = model.layers[index]
        live = 1 if index < first else stack  # conditions computed at this layer
        if index == first and live > 1:  # from here on every condition has its own rows
            for c in range(1, live):
                buf.h[c * n : (c + 1) * n] = buf.h[:n]
                if gpt2:
                    buf.x[c * n : (c + 1) * n] = buf.x[:n]
        rows, pairs = live * n, live * heads
        h, x = buf.h[:rows], buf.x[:rows]
        np.matmul(x, layer.wqkv, out=buf.qkv[:rows])
        cpu.split_heads_serial(buf.qkv[:rows], layer.bqkv, heads, buf.q[:pairs], buf.k[:pairs],
                               buf.v[:pairs])  # fmt: skip
        _check_logits(buf.q[:pairs], buf.k[:pairs], dh, index)
        for c in range(live):
            target = plan.targets[c - 1] if c else None
            modes = np.zeros(heads, np.int8)
            if target is not None and index in plan.layers:
                qkv = {"q": buf.q, "k": buf.k, "v": buf.v}[target]
                _substitute(plan, target, qkv[c * heads : (c + 1) * heads], buf.length, heads,
                            modes, gpt2)  # fmt: skip
            # where only V differs from the baseline, the weights are the baseline's
            reuse = target == "v" and index == first
            base = None if c == 0 else (out.maps[0][b, index], base_rows[index])
            ent = _attention(model, buf, out, b, index, c, modes, not reuse, base)
            if c == 0:
                base_rows[index] = ent
            if reuse:
                _same_as_baseline(out, b, c, [index])
        cpu.merge_heads_serial(buf.o[:pairs], heads, buf.ctx[:rows])
        a = buf.a[:rows]
        np.matmul(buf.ctx[:rows], layer.wo, out=a)
        if gpt2:  # h += a + bo; x = LN2(h)
            _add_norm(a, layer.bo, h, layer.ln2, model.eps, x, store_sum=True)
        else:  # h = LN1(a + bo + h)
            _add_norm(a, layer.bo, h, layer.ln1, model.eps, h)
        m = buf.m[:rows]
        np.matmul(x, layer.w1, out=m)
        cpu.bias_gelu_serial(m, layer.b1, gpt2)
        np.matmul(m, layer.w2, out=a)
        if gpt2:  # h += m + b2; x = the next LayerNorm of h
            following = model.layers[index + 1].ln1 if index + 1 < n_layers else model.final_ln
            if following is None:
                h += a
                h += layer.b2
            else:
                _add_norm(a, layer.b2, h, following, model.eps, x, store_sum=True)
        else:  # h = LN2(m + b2 + h)
            _add_norm(a, layer.b2, h, layer.ln2, model.eps, h)
        if cpu.scan_finite(h.reshape(-1))[0] >= 0:
            raise ValueError(
                f"the model's activations overflow float32 at layer {index}; its weights "
                "are too large or damaged"
            )
    for c in range(1, stack):
        _same_as_baseline(out, b, c, range(min(first, n_layers)))
    if out.hidden is not None:
        final = buf.x if gpt2 and model.final_ln is not None else buf.h
        for c in range(stack):
            src = c * n if first < n_layers else 0
            out.hidden[c, b, :n] = final[src : src + n]


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
    hidden=False,
):
    """Baseline and mean-substituted forward passes: every layer's maps and metrics.

    ``ids`` ``(B, N)`` are padded token ids, ``lengths`` the valid tokens of each. Returns
    :class:`~qkvmean.engine.api.Conditions` with weights ``(B, L, H, S, S)`` (``S = seq``,
    default ``N``; maps are zero-padded to it) and metrics ``(C, B, L, H)``; with
    ``hidden``, also each condition's final hidden states ``(B, S, D)`` (after GPT-2's
    final LayerNorm; zeros at padding).
    """
    ids = np.asarray(ids)
    lengths = np.asarray(lengths, dtype=np.int64)
    batch, n = ids.shape
    seq = n if seq is None else seq
    head_mask = None
    if heads is not None:
        head_mask = np.zeros(model.n_heads, np.bool_)
        head_mask[list(heads)] = True
    plan = Plan(tuple(targets), over, frozenset(ablate_layers), head_mask)
    out = _Outputs(model, plan, batch, seq, hidden)
    inputs = [np.ascontiguousarray(ids[b, : lengths[b]]) for b in range(batch)]
    config.run_tasks([lambda b=b: _one_input(model, plan, inputs[b], b, out) for b in range(batch)])
    names = plan.names
    return Conditions(
        names=names,
        weights=dict(zip(names, out.maps, strict=True)),
        metrics=out.metrics,
        hidden=None if out.hidden is None else dict(zip(names, out.hidden, strict=True)),
    )
