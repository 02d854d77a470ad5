"""Architecture as data: what a transformer block is, in one description.

A family (BERT, GPT-2, Llama, Qwen, GPT-NeoX, ...) is an :class:`Arch` value that a loader
entry in :mod:`qkvmean.io.models` fills in from a Hugging Face ``config.json``; the forward
pass (:mod:`qkvmean.engine.transformer`) and the numpy reference
(:func:`qkvmean.engine.reference.transformer_forward`) follow it and never ask which family
they run. Adding a family is a loader entry, not a branch in a forward pass.

The pieces:

- **norm**: LayerNorm (``x - mean``, scaled, plus a bias) or RMSNorm (no centring, no
  bias), with its ``eps``; the weight is applied as ``offset + gamma`` (0 for every family
  here; Gemma-style checkpoints store ``gamma - 1`` and use offset 1).
- **placement**: ``post`` (BERT: ``h = N1(h + attn(h))``, ``h = N2(h + mlp(h))``), ``pre``
  (GPT-2, Llama: ``h += attn(N1(h))``, ``h += mlp(N2(h))``, a final norm) or ``parallel``
  (GPT-NeoX: ``h += attn(N1(h)) + mlp(N2(h))``, both from the same ``h``); pre with
  ``output_norms`` (Gemma 2/3): ``h += N3(attn(N1(h)))``, ``h += N4(mlp(N2(h)))``.
- **activation**: ``gelu`` (exact, erf), ``gelu_tanh`` (GPT-2's ``gelu_new``), ``silu``
  or ``relu`` (OPT), each also gated: ``silu_gated`` (SwiGLU: ``silu(gate(x)) * up(x)``),
  ``gelu_tanh_gated`` (Gemma's GeGLU), ``gelu_gated`` (ModernBERT's).
- **positions**: ``learned`` absolute embeddings added to the tokens, or ``rotary``
  (:class:`Rotary`: ``theta``, the rotated dimensions of a head, and the frequency scaling
  ``default``, ``linear`` or ``llama3``), applied to Q and K after the projection (and
  after any q/k norm), in the rotate-half layout of Hugging Face's Llama and GPT-NeoX.
- **heads**: ``n_heads`` query heads, ``n_kv_heads`` key/value heads (grouped-query
  attention when fewer: query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``),
  ``head_dim`` (not always ``d_model / n_heads``: Qwen3).
- **qk_norm**: an RMSNorm over ``head_dim`` of every query and key vector (Qwen3), or
  (``qk_norm_over="token"``, OLMo 2) over all heads' vectors of a token together.
- **embedding_scale**: the token embeddings are multiplied by it (in float32) before the
  positions are added (Gemma: ``sqrt(d_model)``).
- **attention logits**: the scores ``scale q · k`` (``query_scale``, else ``1 /
  sqrt(head_dim)``), plus ALiBi's ``slope_h * j`` (positions ``alibi``, BLOOM), then
  soft-capped as ``c tanh(s / c)`` (``softcap``, Gemma 2), over the keys of the layer's
  window (``windows``: Gemma 2/3's sliding layers, causal; ModernBERT's local layers, on
  both sides), which use ``local_rotary`` where the family has one; ``final_softcap``
  caps the output logits (the effects' next-token distributions).

Mean substitution happens at the projection output (bias included), before the q/k norm
and the rotary embedding: what a forward hook on ``q_proj``/``k_proj``/``v_proj`` changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NORMS = ("layer", "rms")
PLACEMENTS = ("post", "pre", "parallel")
#: The MLP's nonlinearities: a base function, plain or gated (``act(gate) * up``: SwiGLU,
#: GeGLU). Append only: a code is an index here.
ACTIVATIONS = ("gelu", "gelu_tanh", "silu_gated", "relu", "gelu_gated", "gelu_tanh_gated", "silu")
#: The base functions the kernels know, by code: exact GELU, tanh GELU, SiLU, ReLU.
BASE_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
POSITIONS = ("learned", "rotary", "alibi")
ROPE_SCALINGS = ("default", "linear", "llama3")

#: Kernel codes of the activations (the Numba kernels take an int, not a string).
ACTIVATION_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}


def activation_parts(code: int) -> tuple[int, bool]:
    """An activation code as the kernels take it: the base function's code (an index of
    :data:`BASE_ACTIVATIONS`) and whether it is gated."""
    name = ACTIVATIONS[code]
    gated = name.endswith("_gated")
    return BASE_ACTIVATIONS.index(name.removesuffix("_gated")), gated


@dataclass(frozen=True)
class Norm:
    kind: str = "layer"  # "layer" or "rms"
    eps: float = 1e-5
    offset: float = 0.0  # the weight is applied as offset + gamma

    def __post_init__(self):
        _choice(self.kind, NORMS, "norm kind")


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding of the first ``dim`` dimensions of every head."""

    theta: float = 10000.0
    dim: int = 0  # rotated dimensions per head (even; head_dim unless partial)
    scaling: str = "default"
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int = 8192  # llama3
    interleaved: bool = False  # pairs (2i, 2i + 1) as GPT-J, not (i, i + dim / 2)

    def __post_init__(self):
        _choice(self.scaling, ROPE_SCALINGS, "rope scaling")
        if self.dim <= 0 or self.dim % 2:
            raise ValueError(f"rotary dimensions must be even and positive, got {self.dim}")

    def inv_freq(self) -> np.ndarray:
        """The ``dim / 2`` angular frequencies (float64), after the scaling."""
        inv = 1.0 / self.theta ** (np.arange(0, self.dim, 2, dtype=np.float64) / self.dim)
        if self.scaling == "linear":
            return inv / self.factor
        if self.scaling == "llama3":  # Llama 3.1: long wavelengths slowed, a smooth band
            old = float(self.original_max_positions)
            low_wavelen = old / self.low_freq_factor
            high_wavelen = old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled)
        return inv

    def tables(self, n: int):
        """``(cos, sin)`` float32 ``(n, dim / 2)`` for positions ``0 .. n - 1``."""
        angles = np.arange(n, dtype=np.float64)[:, None] * self.inv_freq()[None, :]
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass(frozen=True)
class Arch:
    """One block structure, shared by every layer of a model."""

    family: str
    causal: bool
    placement: str
    norm: Norm
    activation: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    positions: str = "learned"
    rotary: Rotary | None = None
    qk_norm: bool = False
    embedding_norm: bool = False  # a norm of the embeddings (BERT)
    final_norm: bool = False  # a norm after the last layer (pre-norm decoders)
    embedding_scale: float = 1.0  # the token embeddings times this (Gemma: sqrt(d_model))
    #: per layer, the keys a query sees (0: all; W: the last W, i - W < j <= i, when
    #: causal; |i - j| <= W // 2 otherwise); empty: every layer global
    windows: tuple = ()
    local_rotary: Rotary | None = None  # the rotary of the layers with a window, if its own
    softcap: float = 0.0  # attention logits c * tanh(s / c) (Gemma 2); 0: none
    final_softcap: float = 0.0  # the output logits likewise (Gemma 2); 0: none
    query_scale: float = 0.0  # the scores' scale; 0: 1 / sqrt(head_dim)
    output_norms: bool = False  # pre-norm, and each sublayer's output normed (Gemma 2/3)
    qk_norm_over: str = "head"  # q/k norm of each head's vector, or "token": all heads' (OLMo 2)

    def __post_init__(self):
        _choice(self.placement, PLACEMENTS, "norm placement")
        _choice(self.activation, ACTIVATIONS, "activation")
        _choice(self.positions, POSITIONS, "position scheme")
        for name in ("n_heads", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"{self.n_heads} query heads cannot share {self.n_kv_heads} key/value heads equally"
            )
        _choice(self.qk_norm_over, ("head", "token"), "q/k norm")
        if self.output_norms and self.placement != "pre":
            raise ValueError("output norms are supported in the pre-norm placement only")
        if (self.positions == "rotary") != (self.rotary is not None):
            raise ValueError("rotary positions need a Rotary description, and only they")
        for rotary in (self.rotary, self.local_rotary):
            if rotary is not None and rotary.dim > self.head_dim:
                raise ValueError(
                    f"rotary dimensions {rotary.dim} exceed the head dimension {self.head_dim}"
                )
        if self.local_rotary is not None and self.rotary is None:
            raise ValueError("a local rotary embedding needs a global one")
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in self.windows):
            raise ValueError(f"attention windows must be integers >= 0, got {self.windows}")
        for name in ("softcap", "final_softcap", "query_scale", "embedding_scale"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def gated(self) -> bool:
        return self.activation.endswith("_gated")

    @property
    def exact_fast_paths(self) -> bool:
        """Are the mean-K (uniform rows) and mean-Q (one shared row) fast paths exact?

        Only when identical projections give identical keys or queries at the attention:
        a rotary embedding makes them differ by position.
        """
        return self.positions == "learned" and not any(self.windows)

    @property
    def scale(self) -> float:
        """The factor of the scores ``q · k``."""
        return self.query_scale or 1.0 / math.sqrt(self.head_dim)

    def window(self, layer: int) -> int:
        """The window of ``layer`` (0: every key)."""
        return self.windows[layer] if self.windows else 0

    def rotary_of(self, layer: int):
        """The rotary embedding of ``layer``: the local one where it has a window."""
        local = self.local_rotary is not None and self.window(layer) > 0
        return self.local_rotary if local else self.rotary

    def alibi_slopes(self) -> np.ndarray:
        """ALiBi's slope of each query head (float32 ``(H,)``): the geometric sequence of
        Press et al. for the largest power of two of heads, the odd terms of the next one's
        for the rest (BLOOM's ``build_alibi_tensor``); empty without ALiBi."""
        if self.positions != "alibi":
            return np.zeros(0, np.float32)
        heads = self.n_heads
        closest = 2 ** math.floor(math.log2(heads))
        base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
        slopes = [base ** (i + 1) for i in range(closest)]
        if closest != heads:
            extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
            slopes += [extra ** (i + 1) for i in range(0, 2 * (heads - closest), 2)]
        return np.array(slopes, np.float32)

    def describe(self) -> dict:
        """The architecture as plain JSON values (for the store's configuration)."""
        out = {
            "family": self.family,
            "causal": self.causal,
            "placement": self.placement,
            "norm": self.norm.kind,
            "norm_eps": self.norm.eps,
            "activation": self.activation,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "positions": self.positions,
            "qk_norm": self.qk_norm,
        }
        if self.embedding_scale != 1.0:
            out["embedding_scale"] = self.embedding_scale
        for name in ("softcap", "final_softcap", "query_scale"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if any(self.windows):
            out["windows"] = list(self.windows)
        if self.output_norms:
            out["output_norms"] = True
        if self.qk_norm and self.qk_norm_over != "head":
            out["qk_norm_over"] = self.qk_norm_over
        if self.local_rotary is not None:
            r = self.local_rotary
            out["local_rotary"] = {"theta": r.theta, "dim": r.dim, "scaling": r.scaling}
        if self.rotary is not None:
            r = self.rotary
            out["rotary"] = {"theta": r.theta, "dim": r.dim, "scaling": r.scaling}
            if r.interleaved:
                out["rotary"]["interleaved"] = True
            if r.scaling != "default":
                out["rotary"]["factor"] = r.factor
        return out


def _choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
