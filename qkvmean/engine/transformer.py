"""The transformer forward pass, following an :class:`~qkvmean.engine.arch.Arch`, with mean
substitution at chosen layers.

One pass serves every family: the architecture (norms and their placement, activation,
positions, KV heads, q/k norm) is data, and every numeric step goes through the backend
seam (``ops``: :mod:`~qkvmean.engine.backends.cpu` or
:mod:`~qkvmean.engine.backends.cuda`), never a kernel module directly; the buffers are
arrays of the backend's array module (``ops.xp``).

How the work is laid out, for speed on every core and under foreign load:

- **One input per task.** A batch's inputs are independent, so each is one task
  (``ops.run_inputs``: on the CPU, the process's pool of compute threads with BLAS held to
  one thread and the engine's serial kernels): one pool does everything, nothing waits at
  a barrier for a thread that another process holds off its core, and an input is
  computed at its own length (no padding work). A batch with fewer inputs than threads
  runs them one after another, each on every thread (``cpu.spread``: the same products,
  cut into the same blocks, so the same bits).
- **Conditions stacked.** Up to the first substituted layer every condition is the
  baseline, computed once. From there on the baseline and each substitution run as one
  stack of ``C`` copies of the input: every projection is one matrix product of
  ``C * n`` rows.
- **Fused steps, no copies.** The projection bias is added while splitting heads (keys
  and values expanded to one per query head); the output bias, the residual and the norm
  are one pass (pre-norm: the residual sum and the next norm); the MLP bias and its
  activation (vectorised float32) are one pass. The attention writes each map straight
  into the output array, zero-padded to the run's length.

Q, K or V of the selected heads is replaced at the projection output (bias included),
before any q/k norm and the rotary embedding, at every ablated layer, and the change
propagates: maps are recorded at every layer. Weights are held in one family-neutral
layout (:class:`Weights`), every projection stored ``(in, out)`` so that ``y = x @ W + b``
(absent biases are zeros); :mod:`qkvmean.io.models` converts Hugging Face checkpoints
into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .arch import ACTIVATION_CODES, Arch
from .condition import plain
from .effects import InputEffects, effects_of, no_effect
from .kernels.attention import Logits
from .kernels.means import position_sums
from .names import METRICS
from .plan import DatasetMeans, Plan, means_from_sums, position_counts
from .substitution import Substitution, resample_partners

__all__ = ["Layer", "Plan", "Weights", "dataset_means", "model_conditions", "model_projections"]


@dataclass
class Layer:
    """One block's weights; projections ``(in, out)``, absent biases zero."""

    wqkv: np.ndarray  # (D, (H + 2G) dh): query heads, then key heads, then value heads
    bqkv: np.ndarray  # ((H + 2G) dh,)
    wo: np.ndarray  # (H dh, D)
    bo: np.ndarray  # (D,)
    norm1: tuple  # (gamma, beta): the attention's norm (before it; post-norm: after it)
    w1: np.ndarray  # (D, F), or (D, 2F) gated: [gate | up]
    b1: np.ndarray
    w2: np.ndarray  # (F, D)
    b2: np.ndarray
    norm2: tuple  # the MLP's norm (before it; post-norm: after it)
    q_norm: np.ndarray | None = None  # (dh,) RMSNorm weight of each query vector
    k_norm: np.ndarray | None = None
    #: the norms of the attention's and the MLP's outputs before the residual adds them
    #: (Gemma 2/3's post_attention / post_feedforward norms: Arch.output_norms)
    norm3: tuple | None = None
    norm4: tuple | None = None


@dataclass
class Weights:
    """A model: its :class:`~qkvmean.engine.arch.Arch` and weights (float32)."""

    arch: Arch
    tok_emb: np.ndarray  # (vocab, D)
    layers: list
    pos_emb: np.ndarray | None = None  # learned positions (max_positions, D)
    type_emb: np.ndarray | None = None  # BERT: token type 0 embedding (D,)
    emb_norm: tuple | None = None  # BERT: the norm of the embeddings
    final_norm: tuple | None = None  # pre-norm decoders: the norm after the last layer
    max_positions: int = 0  # default: the learned positions' count
    name: str = ""
    #: the language-model head ``(vocab, D)``: logits ``= h @ unembed.T (+ unembed_bias)``
    #: (tied: ``tok_emb`` itself); None without one (encoders, base checkpoints)
    unembed: np.ndarray | None = None
    unembed_bias: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.max_positions and self.pos_emb is not None:
            self.max_positions = self.pos_emb.shape[0]
        self._check_shapes()
        windows = self.arch.windows
        if windows and len(windows) != self.n_layers:
            raise ValueError(
                f"the architecture gives {len(windows)} attention windows for "
                f"{self.n_layers} layers: one per layer (0 for a global layer), or none"
            )
        if self.unembed is not None and self.unembed.shape[1] != self.d_model:
            raise ValueError(
                f"the language-model head has shape {self.unembed.shape}, the model needs "
                f"(vocab, {self.d_model})"
            )

    def _check_shapes(self):
        """Every layer's arrays have the shapes the kernels index by (a kernel reading
        past an array is memory corruption, not an error)."""
        a = self.arch
        d, dh = self.d_model, a.head_dim
        cols = (a.n_heads + 2 * a.n_kv_heads) * dh
        for i, layer in enumerate(self.layers):
            f = layer.w2.shape[0]
            want = {
                "wqkv": (d, cols), "bqkv": (cols,), "wo": (a.n_heads * dh, d), "bo": (d,),
                "w1": (d, 2 * f if a.gated else f), "b1": (2 * f if a.gated else f,),
                "w2": (f, d), "b2": (d,),
            }  # fmt: skip
            got = {name: getattr(layer, name).shape for name in want}
            for j in (1, 2):  # a pre-norm block's input norm may be absent: none (identity)
                pair = getattr(layer, f"norm{j}")
                if pair is None and a.placement != "pre":
                    raise ValueError(f"layer {i}: norm{j} is missing; only pre-norm may omit it")
                for k in (0, 1):
                    got[f"norm{j}[{k}]"] = np.shape(pair[k]) if pair is not None else (d,)
                    want[f"norm{j}[{k}]"] = (d,)
            if a.qk_norm:
                got |= {"q_norm": np.shape(layer.q_norm), "k_norm": np.shape(layer.k_norm)}
                token = a.qk_norm_over == "token"
                want |= {"q_norm": (a.n_heads * dh if token else dh,),
                         "k_norm": (a.n_kv_heads * dh if token else dh,)}  # fmt: skip
            if a.output_norms:
                for j in (3, 4):
                    pair = getattr(layer, f"norm{j}")
                    for k in (0, 1):
                        got[f"norm{j}[{k}]"] = np.shape(pair[k]) if pair is not None else ()
                        want[f"norm{j}[{k}]"] = (d,)
            for name, shape in want.items():
                if tuple(got[name]) != shape:
                    raise ValueError(
                        f"layer {i}: {name} has shape {tuple(got[name])}, the architecture "
                        f"needs {shape}"
                    )

    family = property(lambda self: self.arch.family)
    causal = property(lambda self: self.arch.causal)
    n_heads = property(lambda self: self.arch.n_heads)
    n_kv_heads = property(lambda self: self.arch.n_kv_heads)
    head_dim = property(lambda self: self.arch.head_dim)
    eps = property(lambda self: self.arch.norm.eps)

    @property
    def d_model(self) -> int:
        return self.tok_emb.shape[1]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_mlp(self) -> int:
        return self.layers[0].w2.shape[0] if self.layers else 0

    @property
    def vocab_size(self) -> int:
        return self.tok_emb.shape[0]

    def norm(self, weights):
        """``(gamma, beta, rms, eps)`` of a norm's ``(gamma, beta)``, for ``ops.add_norm``."""
        gamma, beta = weights
        spec = self.arch.norm
        if spec.offset:
            gamma = gamma + np.float32(spec.offset)
        return gamma, beta, spec.kind == "rms", float(spec.eps)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Input:
    """The buffers of one input's stacked forward pass (``C`` conditions × ``n`` tokens),
    where the backend computes (``ops.xp``: numpy, or CuPy on a GPU)."""

    def __init__(self, model: Weights, ops, n: int, seq: int, stack: int, maps: bool):
        arch = model.arch
        d, f, heads, dh = model.d_model, model.d_mlp, arch.n_heads, arch.head_dim
        rows = stack * n
        empty = ops.xp.empty
        self.h = empty((rows, d), np.float32)  # the residual stream
        # the attention's input: N1(h), or h itself (post-norm)
        self.x = self.h if arch.placement == "post" else empty((rows, d), np.float32)
        # the MLP's input when it reads the same h as the attention (parallel residual)
        self.y = empty((rows, d), np.float32) if arch.placement == "parallel" else None
        self.qkv = empty((rows, (heads + 2 * arch.n_kv_heads) * dh), np.float32)
        pairs = (stack * heads, n, dh)
        self.q, self.k, self.v, self.o = (empty(pairs, np.float32) for _ in range(4))
        self.ctx = empty((rows, heads * dh), np.float32)
        self.a = empty((rows, d), np.float32)
        self.a2 = empty((rows, d), np.float32) if self.y is not None else None
        self.m = empty((rows, 2 * f if arch.gated else f), np.float32)
        self.g = empty((rows, f), np.float32) if arch.gated else self.m
        self.zero = ops.xp.zeros(d, np.float32)
        self.zero_head = ops.xp.zeros(dh, np.float32)
        self.acc = np.empty(dh, np.float64)
        self.scratch = ops.InputScratch(heads, n, seq, stack, maps)


def _check_logits(ops, q, k, head_dim, scale, max_slope, index):
    """The guard of the public API: every logit must stay finite in float32: the
    products ``q · k``, scaled (a ``query_scale`` may exceed 1), plus ALiBi's ``slope * j``
    over the ``n`` keys (``max_slope``: the largest slope's size)."""
    q_max, k_max = ops.check_finite(q)[1], ops.check_finite(k)[1]
    alibi = max_slope * q.shape[-2]
    if not q_max * k_max * head_dim * max(scale, 1.0) + alibi < _FLOAT32_MAX / 4:
        extra = f", scale {scale:.3g}" if scale > 1.0 else ""
        extra += f", ALiBi up to {alibi:.3g}" if alibi else ""
        raise ValueError(
            f"the attention logits overflow float32 at layer {index} (max|q| = {q_max:.3g}, "
            f"max|k| = {k_max:.3g}{extra}); the model's weights (or its query scale) are "
            "too large or damaged"
        )


class _Outputs:
    """A batch's results, on the host: maps ``(B, len(map_layers), H, S, S)`` per
    condition (None: no maps wanted) at the layers ``map_layers``, metrics ``(C, B, L,
    H)``, and (when wanted) each condition's final hidden states ``(C, B, S, D)`` and its
    effects on the output ``{effect: (C, B)}``."""

    def __init__(self, model: Weights, plan: Plan, batch, seq, hidden, map_layers, effects):
        self.seq = seq
        self.map_layers = {layer: i for i, layer in enumerate(map_layers)}
        names = plan.names
        shape = (batch, len(map_layers), model.n_heads, seq, seq)
        # zero pages, lazily
        self.maps = [np.zeros(shape, np.float32) for _ in names] if map_layers else None
        mshape = (len(names), batch, model.n_layers, model.n_heads)
        self.metrics = {name: np.zeros(mshape) for name in METRICS[:3]}
        self.metrics[METRICS[3]] = np.full(mshape, -1, dtype=np.int64)  # no top key
        self.hidden = (
            np.zeros((len(names), batch, seq, model.d_model), np.float32) if hidden else None
        )
        self.effect_names = effects_of(model) if effects else ()
        self.effects = {name: np.zeros((len(names), batch), np.float32) for name in
                        self.effect_names} if effects else None  # fmt: skip

    def reduced(self, c, b, layer):
        return tuple(self.metrics[name][c, b, layer] for name in METRICS)

    def map(self, c, b, layer):
        """Where condition ``c``'s map of input ``b`` at ``layer`` goes (None: not kept)."""
        if self.maps is None or layer not in self.map_layers:
            return None
        return self.maps[c][b, self.map_layers[layer]]


def _same_as_baseline(out: _Outputs, b, c, layers):
    """Condition ``c`` equals the baseline at ``layers`` of input ``b``: its maps and
    metrics are the baseline's, with a KL of exactly 0."""
    for layer in layers:
        if out.map(c, b, layer) is not None:
            out.map(c, b, layer)[...] = out.map(0, b, layer)
        for name in METRICS:
            out.metrics[name][c, b, layer] = out.metrics[name][0, b, layer]
        out.metrics[METRICS[1]][c, b, layer] = 0.0  # the KL from the baseline


def _mlp(ops, model, layer, buf, rows, inp, out):
    """``out = act(inp @ w1 + b1) @ w2`` (bias b2 not added)."""
    m = buf.m[:rows]
    ops.matmul(inp, layer.w1, m)
    g = buf.g[:rows]
    ops.bias_activation(m, layer.b1, ACTIVATION_CODES[model.arch.activation], g)
    ops.matmul(g, layer.w2, out)


class _Taps:
    """Q, K and V of the baseline pass at chosen layers, copied to the host: ``at``
    ``"projection"`` (the projection output, where the substitution happens) or
    ``"attention"`` (after any q/k norm and the rotary embedding: what the dot products
    see). Keys and values are kept per KV head."""

    def __init__(self, model: Weights, layers, at, batch, seq):
        arch = model.arch
        self.layers = {layer: i for i, layer in enumerate(layers)}
        self.last = max(layers)
        self.at = at
        self.group = arch.group_size
        heads = {"q": arch.n_heads, "k": arch.n_kv_heads, "v": arch.n_kv_heads}
        self.values = {
            t: np.zeros((batch, len(layers), heads[t], seq, arch.head_dim), np.float32)
            for t in "qkv"
        }

    def __call__(self, ops, index, b, n, at, q, k, v):
        if at != self.at or index not in self.layers:
            return
        i = self.layers[index]
        self.values["q"][b, i, :, :n] = ops.to_host(q)
        self.values["k"][b, i, :, :n] = ops.to_host(k[:: self.group])
        self.values["v"][b, i, :, :n] = ops.to_host(v[:: self.group])


def _one_input(ops, model: Weights, plan: Plan, ids, b, out: _Outputs, layers, given, taps):
    """Every condition's forward pass of input ``b`` (token ids ``ids``), into ``out``."""
    n = ids.shape[0]
    if n == 0:  # no tokens: empty maps, metrics 0 and no top key (as initialised)
        return
    chunks = plan.chunks(n, model.n_layers)
    stack = 1 + max(len(members) for _, members in chunks)
    buf = _Input(model, ops, n, out.seq, stack, out.maps is not None)
    try:
        _Pass(ops, model, plan, b, n, out, layers, buf, given, taps).run(ids, chunks)
    except BaseException:
        buf.scratch.abort()  # no copy may still write into buffers about to be freed
        raise


class _Pass:
    """One input's forward passes: embeddings, then per layer the Q/K/V projection with
    the substitution, the attention, and the residual/norm steps of the placement, for
    each chunk of :meth:`Plan.chunks` (a stack of the baseline and the conditions that
    branch at the same layer; a later chunk starts from the baseline's rows there).

    ``given(b, target, layer)``: the vectors that replace ``target`` of input ``b`` at
    ``layer`` (``(M, >= n, dh)``, where the backend computes) for the given kinds
    (dataset, zero, resample), else None; ``taps``: a :class:`_Taps` or None.
    """

    def __init__(self, ops, model: Weights, plan: Plan, b, n, out: _Outputs, layers,
                 buf: _Input, given, taps):  # fmt: skip
        self.ops, self.model, self.plan, self.b, self.n = ops, model, plan, b, n
        self.out, self.layers, self.buf, self.given, self.taps = out, layers, buf, given, taps
        arch = model.arch
        self.arch, self.heads = arch, arch.n_heads
        self.post, self.parallel = arch.placement == "post", arch.placement == "parallel"
        self.scale = arch.scale
        self.reused = []  # (condition, layer) whose weights are the baseline's
        self.members = (0,)  # per stacked copy: its condition (None: an unrecorded baseline)
        self.snapshots = {}  # layer: the baseline's rows there, for the later chunks
        self.effects = None  # the baseline's part of the effects (effects.InputEffects)
        # the metrics of a baseline copy that is not recorded go here
        self.spare = tuple(np.zeros(self.heads) for _ in METRICS[:3])
        self.spare += (np.zeros(self.heads, np.int64),)

    def run(self, ids, chunks):
        self.ids = ids
        layer, members = chunks[0]
        self._embed(ids)
        self._layers(0, layer, (0, *members), {start for start, _ in chunks[1:]})
        for start, members in chunks[1:]:
            self._restore(start)
            self._layers(start, start, (None, *members), ())
        self.buf.scratch.finish()  # the maps and metrics are in `out` from here on
        self._finish()

    def _layers(self, begin, branch, members, keep):
        """The layers from ``begin`` on of the stack ``members``, which branches at
        layer ``branch`` (a stack of one before it); keeps the baseline's rows at the
        layers ``keep``; then each member's final results."""
        model, n, taps = self.model, self.n, self.taps
        self.members = members
        live = 1
        for index in range(begin, model.n_layers):
            if index in keep:
                self._keep(index)
            if index == branch and len(members) > 1:  # from here on each has its own rows
                live = len(members)
                self._fork(live)
            rows, pairs = live * n, live * self.heads
            q, k, v, modes = self._qkv(index, live, rows, pairs)
            if taps is not None:
                taps(self.ops, index, self.b, n, "attention", *(x[: self.heads] for x in (q, k, v)))
                if index == taps.last:
                    return  # nothing later is wanted
            a = self._attention(index, live, rows, pairs, q, k, v, modes)
            self._residual(index, rows, a)
        self._final(live)

    def _state(self):
        """The buffers that carry one layer's input: ``h``, and ``x`` and ``y`` where
        they are not ``h`` itself."""
        buf = self.buf
        return [x for x in (buf.h, None if self.post else buf.x, buf.y) if x is not None]

    def _keep(self, index):
        """Keep the baseline's rows at the start of layer ``index`` (a later chunk's)."""
        self.snapshots[index] = [x[: self.n].copy() for x in self._state()]

    def _restore(self, index):
        """The baseline's rows at the start of layer ``index``, as kept."""
        for x, kept in zip(self._state(), self.snapshots[index], strict=True):
            x[: self.n] = kept

    def _embed(self, ids):
        """``h`` = the embeddings (and their norm); ``x`` (and ``y``) = the first layer's
        norms of ``h``, unless post-norm."""
        ops, model, buf, n = self.ops, self.model, self.buf, self.n
        emb = model.tok_emb[ops.xp.asarray(ids)]
        if model.arch.embedding_scale != 1.0:
            emb *= np.float32(model.arch.embedding_scale)
        if model.pos_emb is not None:
            emb += model.pos_emb[:n]
        if model.type_emb is not None:
            emb += model.type_emb
        if model.emb_norm is not None:
            self._add_norm(emb, buf.zero, None, model.emb_norm, buf.h[:n])
        else:
            buf.h[:n] = emb
        if model.layers and not self.post:
            self._add_norm(buf.h[:n], buf.zero, None, model.layers[0].norm1, buf.x[:n])
            if self.parallel:
                self._add_norm(buf.h[:n], buf.zero, None, model.layers[0].norm2, buf.y[:n])

    def _fork(self, live):
        """Copy the baseline's rows to every condition's (at the first substituted layer)."""
        n = self.n
        for c in range(1, live):
            for rows_of in self._state():
                rows_of[c * n : (c + 1) * n] = rows_of[:n]

    def _qkv(self, index, live, rows, pairs):
        """Q, K, V of every live condition at layer ``index``, substituted at the projection
        output (before the q/k norm and the rotary embedding); and the modes per head."""
        ops, plan, arch, buf, heads = self.ops, self.plan, self.arch, self.buf, self.heads
        layer = self.model.layers[index]
        q, k, v = buf.q[:pairs], buf.k[:pairs], buf.v[:pairs]
        ops.matmul(buf.x[:rows], layer.wqkv, buf.qkv[:rows])
        ops.split_heads(buf.qkv[:rows], layer.bqkv, heads, arch.n_kv_heads, q, k, v)
        if self.taps is not None:
            self.taps(ops, index, self.b, self.n, "projection", q[:heads], k[:heads], v[:heads])
        modes = np.zeros((live, heads), np.int8)
        for c in range(1, live):
            cond = plan.conditions[self.members[c] - 1]
            if index not in cond.layers:
                continue
            step = plan.step(cond.target, causal=arch.causal, exact_fast=arch.exact_fast_paths)
            select = cond.select(heads)
            modes[c, select] = step.mode
            if step.substitute:
                tensor = {"q": q, "k": k, "v": v}[cond.target]
                part = tensor[c * heads : (c + 1) * heads]
                given = None if self.given is None else self.given(self.b, cond.target, index)
                ops.substitute(
                    part, buf.scratch.length, heads, select, plan.window(self.n), buf.acc, given
                )
        if layer.q_norm is not None:
            eps = float(arch.norm.eps)
            if arch.qk_norm_over == "token":  # all heads of a token together (OLMo 2)
                ops.token_norm(q, heads, 1, layer.q_norm, eps)
                ops.token_norm(k, heads, arch.group_size, layer.k_norm, eps)
            else:
                ops.head_norm(q, layer.q_norm, eps, buf.zero_head)
                ops.head_norm(k, layer.k_norm, eps, buf.zero_head)
        rope = self.layers[index].rope
        if rope is not None:
            ops.rotary(q, *rope)
            ops.rotary(k, *rope)
        return q, k, v, modes

    def _attention(self, index, live, rows, pairs, q, k, v, modes):
        """Each condition's attention at layer ``index`` (maps and metrics into ``out``),
        then the output projection; returns it (without its bias)."""
        ops, plan, arch, buf, heads = self.ops, self.plan, self.arch, self.buf, self.heads
        _check_logits(ops, q, k, arch.head_dim, self.scale, self.layers[index].max_slope, index)
        for c in range(live):
            member = self.members[c]
            cond = plan.conditions[member - 1] if c else None
            # where only V differs from the baseline, the weights are the baseline's
            reuse = cond is not None and plan.weights_unchanged(cond.target) and index == cond.first
            part = slice(c * heads, (c + 1) * heads)
            recorded = member is not None
            ops.attention_one(
                q[part], k[part], v[part], modes[c], arch.causal, self.scale,
                self.layers[index].logits, c,
                self.out.map(member, self.b, index) if recorded else None, buf.o[part],
                buf.scratch, not reuse,
                self.out.reduced(member, self.b, index) if recorded else self.spare,
            )  # fmt: skip
            if reuse:
                self.reused.append((member, index))
        ops.merge_heads(buf.o[:pairs], heads, buf.ctx[:rows])
        a = buf.a[:rows]
        ops.matmul(buf.ctx[:rows], self.model.layers[index].wo, a)
        return a

    def _add_norm(self, x, bias, residual, weights, out, store_sum=False):
        """``ops.add_norm`` with a norm's ``(gamma, beta)``, or None: no norm (ModernBERT's
        first layer, OLMo 2's inputs), ``out = x + bias (+ residual)`` as it is."""
        ops = self.ops
        if weights is not None:
            ops.add_norm(x, bias, residual, self.model.norm(weights), out, store_sum=store_sum)
        elif residual is None:
            ops.add(x, bias, out)
        elif store_sum:  # residual += x + bias; out = residual
            ops.add(residual, x, residual)
            ops.add(residual, bias, residual)
            if out is not residual:
                ops.add(residual, self.buf.zero, out)
        else:
            ops.add(residual, x, out)
            ops.add(out, bias, out)

    def _residual(self, index, rows, a):
        """The residual and norm steps of the placement after the attention output ``a``
        of layer ``index``, the MLP among them; ``x`` (and ``y``) become the next layer's
        inputs."""
        ops, model, buf, add_norm = self.ops, self.model, self.buf, self._add_norm
        layer = model.layers[index]
        h, x = buf.h[:rows], buf.x[:rows]
        following = model.layers[index + 1] if index + 1 < model.n_layers else None
        last = following is None and model.final_norm is None  # no norm after this layer
        after = following.norm1 if following is not None else model.final_norm
        if self.post:  # h = N1(a + bo + h); h = N2(mlp(h) + b2 + h)
            add_norm(a, layer.bo, h, layer.norm1, h)
            _mlp(ops, model, layer, buf, rows, h, a)
            add_norm(a, layer.b2, h, layer.norm2, h)
            return
        if self.parallel:  # h += attn + bo + mlp(N2(h_before)) + b2
            _mlp(ops, model, layer, buf, rows, buf.y[:rows], buf.a2[:rows])
            ops.add(a, buf.a2[:rows], a)
            bias = layer.bo + layer.b2
        elif layer.norm3 is not None:  # h += N3(a + bo); x = N2(h); h += N4(mlp(x) + b2)
            add_norm(a, layer.bo, None, layer.norm3, a)
            add_norm(a, buf.zero, h, layer.norm2, x, store_sum=True)
            _mlp(ops, model, layer, buf, rows, x, a)
            add_norm(a, layer.b2, None, layer.norm4, a)
            bias = buf.zero
        else:  # h += a + bo; x = N2(h); h += mlp(x) + b2
            add_norm(a, layer.bo, h, layer.norm2, x, store_sum=True)
            _mlp(ops, model, layer, buf, rows, x, a)
            bias = layer.b2
        if last:  # the last layer, no final norm: h += a + bias
            ops.add(h, a, h)
            ops.add(h, bias, h)
        else:  # and x = the next norm of h
            add_norm(a, bias, h, after, x, store_sum=True)
        if self.parallel and following is not None:
            add_norm(h, buf.zero, None, following.norm2, buf.y[:rows])
        if ops.check_finite(h)[0] >= 0:
            raise ValueError(
                f"the model's activations overflow float32 at layer {index}; its weights "
                "are too large or damaged"
            )

    def _final(self, live):
        """Each recorded member's final hidden states (after the final norm, where the
        family has one) and effects on the output (the baseline's first)."""
        out, n, b, model = self.out, self.n, self.b, self.model
        if out.hidden is None and out.effects is None:
            return
        final = self.buf.x if not self.post and model.final_norm is not None else self.buf.h
        rows = self.ops.to_host(final[: live * n])
        if self.members[0] == 0:  # the recorded baseline: the effects are against it
            if out.hidden is not None:
                out.hidden[0, b, :n] = rows[:n]
            if out.effects is not None:
                self.effects = InputEffects(
                    model, out.effect_names, self.ids, rows[:n], self.ops.host_matmul
                )
                for name, value in no_effect(out.effect_names).items():
                    out.effects[name][0, b] = value
        if live == 1:
            return
        members = self.members[1:live]
        if out.hidden is not None:
            for c, member in enumerate(members, start=1):
                out.hidden[member, b, :n] = rows[c * n : (c + 1) * n]
        if out.effects is not None:
            found = self.effects.of_stack(rows[n : live * n], live - 1)
            for member, values in zip(members, found, strict=True):
                for name, value in values.items():
                    out.effects[name][member, b] = value

    def _finish(self):
        """The conditions' results that are the baseline's: before each one's first
        substituted layer, and mean-V's weights at that layer."""
        out, b = self.out, self.b
        for c, index in self.reused:
            _same_as_baseline(out, b, c, [index])
        for c, cond in enumerate(self.plan.conditions, start=1):
            _same_as_baseline(out, b, c, range(cond.first))


def _checked_ids(model: Weights, ids, lengths, seq):
    """``(ids, lengths, seq)`` checked against each other and the model."""
    ids = np.asarray(ids)
    lengths = np.asarray(lengths, dtype=np.int64)
    batch, n = ids.shape
    seq = n if seq is None else seq
    if seq < n or lengths.shape != (batch,) or np.any((lengths < 0) | (lengths > n)):
        raise ValueError(
            f"ids {ids.shape} need lengths of shape ({batch},) within [0, {n}] and seq >= {n}"
        )
    if n > max(model.max_positions, 1) and model.pos_emb is not None:
        raise ValueError(f"{n} tokens exceed the model's {model.max_positions} positions")
    if ids.size and (ids.min() < 0 or ids.max() >= model.vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {model.vocab_size}) for this model's embeddings, "
            f"got {int(ids.min())}..{int(ids.max())}"
        )
    return ids, lengths, seq


def check_key_groups(arch: Arch, conditions) -> None:
    """A key norm over the whole projection (OLMo 2) reads every KV head of a token, so
    the query heads of a KV group cannot see different keys there: K is substituted per
    KV head, all the heads of a group or none (a hook on ``k_proj`` can do no other).
    Checked by :func:`model_conditions`, and by the CLI before any work starts."""
    group = arch.group_size
    if group == 1 or not (arch.qk_norm and arch.qk_norm_over == "token"):
        return
    for c in conditions:
        if c.target != "k" or c.heads is None:
            continue
        chosen = set(c.heads)
        for g in range(arch.n_kv_heads):
            members = set(range(g * group, (g + 1) * group))
            if chosen & members and not members <= chosen:
                raise ValueError(
                    f"condition {c.label}: {arch.family}'s key norm reads all key/value heads "
                    f"of a token together, so K is substituted per KV head: select all of "
                    f"query heads {g * group}..{(g + 1) * group - 1} (KV head {g}) or none"
                )


def _check_layer_numbers(model: Weights, layers):
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range for {model.n_layers} layers")


class _LayerAttention(NamedTuple):
    """What one layer's attention needs besides Q, K, V: its rotary tables ``(cos, sin,
    interleaved)`` where the backend computes (None without rotary) and its logits
    (:class:`~qkvmean.engine.kernels.attention.Logits`: window, soft-cap, ALiBi)."""

    rope: tuple | None
    logits: Logits
    max_slope: float  # the largest |ALiBi slope| (0 without), for the overflow guard


def _layer_attention(ops, arch: Arch, n_layers, n):
    """Every layer's :class:`_LayerAttention` for inputs of up to ``n`` tokens (one set of
    rotary tables per distinct embedding: global and local)."""
    tables = {}
    slopes = arch.alibi_slopes()
    max_slope = float(np.abs(slopes).max(initial=0.0))
    found = []
    for index in range(n_layers):
        rotary = arch.rotary_of(index)
        if rotary is not None and rotary not in tables:
            cos, sin = rotary.tables(max(n, 1))
            tables[rotary] = (ops.xp.asarray(cos), ops.xp.asarray(sin), rotary.interleaved)
        logits = Logits(int(arch.window(index)), float(arch.softcap), slopes)
        found.append(_LayerAttention(tables.get(rotary), logits, max_slope))
    return found


def _run_inputs(ops, model: Weights, plan: Plan, ids, lengths, out: _Outputs, given, taps):
    """Each input's forward pass, one task per input."""
    layers = _layer_attention(ops, model.arch, model.n_layers, ids.shape[1])
    inputs = [np.ascontiguousarray(ids[b, : lengths[b]]) for b in range(ids.shape[0])]
    here = ops.upload(model)  # the weights where the backend computes
    ops.run_inputs(
        [
            lambda ops_b, b=b: _one_input(ops_b, here, plan, inputs[b], b, out, layers, given, taps)
            for b in range(ids.shape[0])
        ]
    )


def model_projections(model: Weights, ids, lengths, *, layers, at="projection", seq=None,
                      device="cpu"):  # fmt: skip
    """Q, K and V of the baseline pass at ``layers``: ``{"q": (B, len(layers), H, S, dh),
    "k", "v": (B, len(layers), KV heads, S, dh)}`` float32 on the host, zero-padded.

    ``at="projection"``: the projection output (bias included), where qkvmean
    substitutes, before any q/k norm and the rotary embedding; ``"attention"``: after
    them, what the attention's dot products see. The pass stops after the last layer
    asked for.
    """
    from .api import backend

    if at not in ("projection", "attention"):
        raise ValueError(f"at must be 'projection' or 'attention', got {at!r}")
    ops = backend(device)
    ids, lengths, seq = _checked_ids(model, ids, lengths, seq)
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        raise ValueError("layers is empty: name at least one layer")
    _check_layer_numbers(model, layers)
    plan = Plan()
    out = _Outputs(model, plan, ids.shape[0], seq, False, (), False)
    taps = _Taps(model, layers, at, ids.shape[0], seq)
    _run_inputs(ops, model, plan, ids, lengths, out, None, taps)
    return taps.values


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
    device="cpu",
    maps=True,
    means=None,
    partners=None,
    conditions=None,
    map_layers=None,
    effects=False,
):
    """Baseline and mean-substituted forward passes: every layer's maps and metrics.

    ``ids`` ``(B, N)`` are padded token ids, ``lengths`` the valid tokens of each; ``heads``
    names query heads. Returns :class:`~qkvmean.engine.api.Conditions` with weights
    ``(B, L, H, S, S)`` (``S = seq``, default ``N``; maps are zero-padded to it) and
    metrics ``(C, B, L, H)``; with ``hidden``, also each condition's final hidden states
    ``(B, S, D)`` (after the final norm, where the family has one; zeros at padding);
    with ``effects``, each condition's effects on the output ``{effect: (C, B)}``
    (:mod:`qkvmean.engine.effects`, computed in each input's pass).
    ``device`` as in :func:`qkvmean.attention`; ``maps`` False: metrics only (empty
    ``weights``), and on a GPU the maps never leave it; ``map_layers``: the layers whose
    maps are kept (default every layer; the maps are then ``(B, len(map_layers), H, S,
    S)``). ``over="dataset"`` substitutes
    ``means`` (a :class:`~qkvmean.engine.plan.DatasetMeans` of every target at every
    ablated layer, e.g. :func:`dataset_means` of a data set's inputs). ``over`` is any
    :class:`~qkvmean.engine.substitution.Substitution` spelling; ``"resample"`` draws each
    input's partner among ``ids``, unless ``partners`` gives their ``(ids, lengths)``, one
    per input (a run draws them over all of its inputs).

    ``conditions``: :class:`~qkvmean.engine.condition.Condition` values (each with its
    own layers and heads, e.g. :func:`~qkvmean.engine.condition.sweep`'s) in place of
    ``targets``, ``heads`` and ``ablate_layers``; their substitution must be ``over``.
    The layers before a condition's first substituted layer are computed once for all
    conditions that branch there.
    """
    from .api import Conditions, backend

    ops = backend(device)
    ids, lengths, seq = _checked_ids(model, ids, lengths, seq)
    sub = Substitution.parse(over)
    if conditions is None:
        if not len(ablate_layers):
            raise ValueError("ablate_layers is empty: name at least one layer")
        conditions = plain(targets, sub, ablate_layers, heads)
    plan = Plan(tuple(conditions), sub, means)
    for c in plan.conditions:
        if not c.layers:
            raise ValueError(f"condition {c.label} substitutes at no layer: name at least one")
        _check_layer_numbers(model, c.layers)
        if c.heads is not None and not all(0 <= h < model.n_heads for h in c.heads):
            raise ValueError(
                f"condition {c.label}: heads {list(c.heads)} out of range for {model.n_heads}"
            )
    check_key_groups(model.arch, plan.conditions)
    if (sub.kind == "dataset") != (means is not None):
        raise ValueError(
            "over='dataset' substitutes the means of a data set: pass means= (see "
            "qkvmean.engine.transformer.dataset_means)"
            if means is None
            else f"means apply to over='dataset' only, not over={sub.spec!r}"
        )
    if partners is not None and sub.kind != "resample":
        raise ValueError(f"partners apply to over='resample' only, not over={sub.spec!r}")
    if map_layers is None:
        map_layers = range(model.n_layers)
    map_layers = sorted({int(x) for x in map_layers}) if maps else []
    _check_layer_numbers(model, map_layers)
    given = _given(ops, model, sub, means, plan.targets, plan.layers, ids, lengths, seq, partners)
    out = _Outputs(model, plan, ids.shape[0], seq, hidden, map_layers, bool(effects))
    _run_inputs(ops, model, plan, ids, lengths, out, given, taps=None)
    names = plan.names
    return Conditions(
        names=names,
        weights={} if out.maps is None else dict(zip(names, out.maps, strict=True)),
        metrics=out.metrics,
        hidden=None if out.hidden is None else dict(zip(names, out.hidden, strict=True)),
        effects=out.effects,
    )


def _given(ops, model: Weights, sub, means, targets, layers, ids, lengths, seq, partners):
    """The producer of the given vectors of ``sub``'s kind, ``given(b, target, layer)``
    (None for the running means): the dataset ``means``; zeros; or, for ``resample``,
    each input's partner's projections of the baseline pass (positions past the
    partner's length keep the input's own; ``partners``: their ``(ids, lengths)``, one per
    input, or None to draw them among these inputs)."""
    if sub.running or not layers:  # (no condition substitutes anything)
        return None
    if sub.kind == "dataset":
        longest = int(lengths.max(initial=0))
        shared = _device_means(ops, model, means, targets, layers, longest)
        return lambda b, target, layer: shared[target, layer]
    if sub.kind == "zero":
        zeros = ops.xp.zeros((1, max(seq, 1), model.head_dim), np.float32)
        return lambda b, target, layer: zeros
    layers = sorted(set(layers))
    group = model.arch.group_size

    def project(ids, lengths):
        found = model_projections(model, ids, lengths, layers=layers, seq=seq, device=ops.name)
        return {t: x if t == "q" else np.repeat(x, group, axis=2) for t, x in found.items()}

    own = project(ids, lengths)
    if partners is None:  # partners drawn among the inputs of this call
        chosen = resample_partners(lengths, sub.seed)
        theirs, their_lengths = own, lengths
    else:  # each input's partner given, (ids, lengths) in the inputs' order
        chosen = np.arange(len(lengths))
        their_ids, their_lengths = _checked_ids(model, *partners, None)[:2]
        if len(their_lengths) != len(lengths):
            raise ValueError(
                f"partners name {len(their_lengths)} inputs for {len(lengths)}: one per input"
            )
        theirs = project(their_ids, their_lengths)
    per_input = {}
    for target in targets:
        for i, layer in enumerate(layers):
            taken = np.array(own[target][:, i])
            for b, r in enumerate(chosen):
                m = int(min(lengths[b], their_lengths[r]))
                taken[b, :, :m] = theirs[target][r, i, :, :m]
            per_input[target, layer] = [ops.xp.asarray(taken[b]) for b in range(len(lengths))]
    return lambda b, target, layer: per_input[target, layer][b]


def _device_means(ops, model: Weights, means: DatasetMeans, targets, layers, longest):
    """``{(target, layer): (H, positions, dh)}`` where the backend computes, checked."""
    arch = model.arch
    want = (arch.n_heads, arch.head_dim)
    given = {}
    for target in targets:
        for layer in layers:
            if target not in means.values or layer not in means.layers:
                raise ValueError(f"the dataset means have no {target} at layer {layer}")
            m = np.ascontiguousarray(means.at(target, layer), dtype=np.float32)
            if m.ndim != 3 or (m.shape[0], m.shape[2]) != want or m.shape[1] < longest:
                raise ValueError(
                    f"the dataset means of {target} at layer {layer} have shape {m.shape}; "
                    f"the model needs ({want[0]}, >= {longest}, {want[1]})"
                )
            if not np.isfinite(m).all():
                raise ValueError(f"the dataset means of {target} at layer {layer} are not finite")
            given[target, layer] = ops.xp.asarray(m)
    return given


def projection_sums(projected, lengths):
    """Float64 sums over inputs of :func:`model_projections`' arrays, per position:
    ``{target: (layers, heads, S, dh)}``, inputs added in order (the CPU kernel)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sums = {}
    for target, x in projected.items():
        batch, n_layers, heads, seq, dim = x.shape
        total = np.zeros((n_layers * heads, seq, dim))
        position_sums(x.reshape(batch * n_layers * heads, seq, dim), lengths,
                      n_layers * heads, total)  # fmt: skip
        sums[target] = total.reshape(n_layers, heads, seq, dim)
    return sums


def means_of(model: Weights, sums, counts, layers) -> DatasetMeans:
    """The :class:`DatasetMeans` of :func:`projection_sums` added over a data set: float32,
    keys and values repeated to one per query head."""
    group = model.arch.group_size
    values = {}
    for target, total in sums.items():
        m = means_from_sums(total, counts, np.float32)
        values[target] = m if target == "q" else np.repeat(m, group, axis=1)
    return DatasetMeans(tuple(layers), values, np.asarray(counts, dtype=np.int64))


def dataset_means(model: Weights, ids, lengths, *, layers=(0,), targets=("q", "k", "v"),
                  device="cpu") -> DatasetMeans:  # fmt: skip
    """The per-position means of ``targets`` at ``layers`` over the inputs ``ids``, taken
    from their baseline pass: what ``model_conditions(..., over="dataset")`` substitutes.
    (``qkvmean run --over dataset`` streams the same sums batch by batch.)"""
    ids, lengths, seq = _checked_ids(model, ids, lengths, None)
    layers = sorted(set(int(layer) for layer in layers))
    projected = model_projections(model, ids, lengths, layers=layers, seq=seq, device=device)
    sums = projection_sums({t: projected[t] for t in targets}, lengths)
    return means_of(model, sums, position_counts(lengths, seq), layers)
