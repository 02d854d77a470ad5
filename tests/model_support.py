"""Model directories written the way Hugging Face writes them, for the model tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model reads every word and looks back at the words before it",
    "mean keys and mean values change what each head attends to",
] * 5


def _random(seed, scale):
    """``r(*shape)``: float32 normal weights times ``scale``, from ``seed``, in call order."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    return r


def byte_level_tokenizer(path: Path, vocab_size=320):
    """A GPT-2 style byte-level BPE tokenizer trained on a tiny corpus."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    tok.save(str(path / "tokenizer.json"))
    return tok.get_vocab_size()


def write_gpt2_dir(
    path: Path, *, n_layer=3, n_head=4, n_embd=32, n_positions=64, seed=0, prefix="", scale=0.3
):
    """A GPT-2 checkpoint: real tensor names, Conv1D (in, out) layout, buffers included."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_tokenizer(path)
    r = _random(seed, scale)

    t = {
        "wte.weight": r(vocab, n_embd),
        "wpe.weight": r(n_positions, n_embd),
        "ln_f.weight": 1 + r(n_embd),
        "ln_f.bias": r(n_embd),
    }
    for i in range(n_layer):
        p = f"h.{i}"
        t |= {
            f"{p}.ln_1.weight": 1 + r(n_embd),
            f"{p}.ln_1.bias": r(n_embd),
            f"{p}.attn.c_attn.weight": r(n_embd, 3 * n_embd),
            f"{p}.attn.c_attn.bias": r(3 * n_embd),
            f"{p}.attn.c_proj.weight": r(n_embd, n_embd),
            f"{p}.attn.c_proj.bias": r(n_embd),
            f"{p}.ln_2.weight": 1 + r(n_embd),
            f"{p}.ln_2.bias": r(n_embd),
            f"{p}.mlp.c_fc.weight": r(n_embd, 4 * n_embd),
            f"{p}.mlp.c_fc.bias": r(4 * n_embd),
            f"{p}.mlp.c_proj.weight": r(4 * n_embd, n_embd),
            f"{p}.mlp.c_proj.bias": r(n_embd),
            # the causal-mask buffer older checkpoints carry; not a weight
            f"{p}.attn.bias": np.tril(np.ones((n_positions, n_positions), np.float32))[None, None],
        }
    save_file(
        {prefix + k: v for k, v in t.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "n_positions": n_positions,
        "vocab_size": vocab,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def padded_ids(tokenizer, texts):
    encs = tokenizer.encode_batch(list(texts))
    lengths = np.array([len(e.ids) for e in encs])
    ids = np.zeros((len(texts), max(lengths)), np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
    return ids, lengths


def special_tokenizer(path: Path, *, bos=None, eos=None, vocab_size=320, specials=()):
    """A byte-level BPE tokenizer whose post-processor adds ``bos`` (and ``eos``) the way
    the family's real tokenizer.json does (Llama: ``<s>`` or ``<|begin_of_text|>``; Qwen
    and Pythia: nothing); ``specials``: the special tokens in the order of their ids (the
    family's own: RoBERTa's ``<s> <pad> </s> <unk>``), else ``bos`` and ``eos``."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    specials = list(specials) or [t for t in (bos, eos) if t]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        CORPUS, vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=specials,
    )  # fmt: skip
    if specials:
        single = " ".join(([bos] if bos else []) + ["$A"] + ([eos] if eos else []))
        tok.post_processor = TemplateProcessing(
            single=single, special_tokens=[(t, tok.token_to_id(t)) for t in specials]
        )
    tok.save(str(path / "tokenizer.json"))
    return tok.get_vocab_size()


def _save(path, tensors, shards):
    """``model.safetensors``, or ``shards`` files and their index, as save_pretrained does."""
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / file), metadata={"format": "pt"})
        weight_map |= {k: file for k in part}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


#: The Llama-style families' tokenizers: BOS as their real post-processors add it.
LLAMA_BOS = {
    "llama": "<|begin_of_text|>",
    "mistral": "<s>",
    "qwen2": None,
    "qwen3": None,
    "phi3": "<s>",
}


def write_llama_dir(
    path: Path,
    model_type="llama",
    *,
    n_layer=3,
    n_head=4,
    n_kv=2,
    d=32,
    head_dim=None,
    d_ff=48,
    max_positions=128,
    rope=None,
    seed=0,
    scale=0.3,
    shards=1,
    extra_config=None,
):
    """A Llama-style checkpoint (llama, mistral, qwen2, qwen3): ``model.`` names,
    ``self_attn.{q,k,v,o}_proj``, SwiGLU ``mlp.{gate,up,down}_proj``, RMSNorm weights,
    grouped KV heads; qwen2 with q/k/v biases, qwen3 with ``q_norm``/``k_norm``; ``rope``
    (config keys, e.g. ``rope_scaling``) as the family writes them."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = special_tokenizer(path, bos=LLAMA_BOS[model_type])
    r = _random(seed, scale)
    dh = head_dim or d // n_head

    t = {"model.embed_tokens.weight": r(vocab, d), "model.norm.weight": 1 + r(d)}
    for i in range(n_layer):
        p = f"model.layers.{i}"
        t |= {
            f"{p}.input_layernorm.weight": 1 + r(d),
            f"{p}.post_attention_layernorm.weight": 1 + r(d),
            f"{p}.self_attn.q_proj.weight": r(n_head * dh, d),
            f"{p}.self_attn.k_proj.weight": r(n_kv * dh, d),
            f"{p}.self_attn.v_proj.weight": r(n_kv * dh, d),
            f"{p}.self_attn.o_proj.weight": r(d, n_head * dh),
            f"{p}.mlp.gate_proj.weight": r(d_ff, d),
            f"{p}.mlp.up_proj.weight": r(d_ff, d),
            f"{p}.mlp.down_proj.weight": r(d, d_ff),
        }
        if model_type == "qwen2":
            t |= {
                f"{p}.self_attn.q_proj.bias": r(n_head * dh),
                f"{p}.self_attn.k_proj.bias": r(n_kv * dh),
                f"{p}.self_attn.v_proj.bias": r(n_kv * dh),
            }
        if model_type == "qwen3":
            t |= {
                f"{p}.self_attn.q_norm.weight": 1 + r(dh),
                f"{p}.self_attn.k_norm.weight": 1 + r(dh),
            }
    t["lm_head.weight"] = r(vocab, d)
    _save(path, t, shards)
    config = {
        "model_type": model_type,
        "hidden_size": d,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "num_hidden_layers": n_layer,
        "intermediate_size": d_ff,
        "max_position_embeddings": max_positions,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
    }
    if head_dim:
        config["head_dim"] = head_dim
    if model_type == "mistral":
        config["sliding_window"] = 4096
    config |= rope or {}
    config |= extra_config or {}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_neox_dir(
    path: Path,
    *,
    n_layer=3,
    n_head=4,
    d=32,
    d_ff=128,
    rotary_pct=0.25,
    parallel=True,
    max_positions=128,
    seed=0,
    scale=0.3,
):
    """A GPT-NeoX (Pythia) checkpoint: ``gpt_neox.`` names, the fused
    ``attention.query_key_value`` interleaved per head ([q | k | v] of each head), biases,
    LayerNorms, partial rotary, and the buffers older checkpoints carry."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = special_tokenizer(path)
    r = _random(seed, scale)

    t = {
        "gpt_neox.embed_in.weight": r(vocab, d),
        "gpt_neox.final_layer_norm.weight": 1 + r(d),
        "gpt_neox.final_layer_norm.bias": r(d),
        "embed_out.weight": r(vocab, d),
    }
    for i in range(n_layer):
        p = f"gpt_neox.layers.{i}"
        t |= {
            f"{p}.input_layernorm.weight": 1 + r(d),
            f"{p}.input_layernorm.bias": r(d),
            f"{p}.post_attention_layernorm.weight": 1 + r(d),
            f"{p}.post_attention_layernorm.bias": r(d),
            f"{p}.attention.query_key_value.weight": r(3 * d, d),
            f"{p}.attention.query_key_value.bias": r(3 * d),
            f"{p}.attention.dense.weight": r(d, d),
            f"{p}.attention.dense.bias": r(d),
            f"{p}.mlp.dense_h_to_4h.weight": r(d_ff, d),
            f"{p}.mlp.dense_h_to_4h.bias": r(d_ff),
            f"{p}.mlp.dense_4h_to_h.weight": r(d, d_ff),
            f"{p}.mlp.dense_4h_to_h.bias": r(d),
            f"{p}.attention.rotary_emb.inv_freq": r(int(d // n_head * rotary_pct) // 2),
        }
    _save(path, t, 1)
    config = {
        "model_type": "gpt_neox",
        "hidden_size": d,
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "intermediate_size": d_ff,
        "max_position_embeddings": max_positions,
        "vocab_size": vocab,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "rotary_pct": rotary_pct,
        "rotary_emb_base": 10000,
        "use_parallel_residual": parallel,
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_phi3_dir(path: Path, **kwargs):
    """A Phi-3 checkpoint: the Llama-style one with Phi-3's fused ``self_attn.qkv_proj``
    (query, key, value rows stacked) and ``mlp.gate_up_proj`` ([gate; up])."""
    from safetensors.numpy import load_file

    write_llama_dir(path, "phi3", **kwargs)
    t = load_file(str(path / "model.safetensors"))
    layers = {k.split(".")[2] for k in t if k.startswith("model.layers.")}
    for i in sorted(layers):
        p = f"model.layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        t[f"{a}.qkv_proj.weight"] = np.concatenate([t.pop(f"{a}.{x}_proj.weight") for x in "qkv"])
        t[f"{m}.gate_up_proj.weight"] = np.concatenate(
            [t.pop(f"{m}.gate_proj.weight"), t.pop(f"{m}.up_proj.weight")]
        )
    _save(path, t, 1)
    return path


#: The families written from tests/data/family_layouts.json (make_family_layouts.py: the
#: config.json and tensor names and shapes that transformers' save_pretrained writes), with
#: their tokenizers' special tokens (in id order) and what the post-processor adds.
LAYOUT_TOKENS = {
    "roberta": (("<s>", "<pad>", "</s>", "<unk>"), "<s>", "</s>"),
    "xlm_roberta": (("<s>", "<pad>", "</s>", "<unk>"), "<s>", "</s>"),
    "distilbert": (("[PAD]", "[UNK]", "[CLS]", "[SEP]"), "[CLS]", "[SEP]"),
    "opt": (("<s>", "<pad>", "</s>"), "</s>", None),  # OPT starts every text with </s>
    "gptj": ((), None, None),
    "stablelm": ((), None, None),
    "gemma": (("<pad>", "<eos>", "<bos>"), "<bos>", None),
    "gemma2": (("<pad>", "<eos>", "<bos>"), "<bos>", None),
    "gemma3": (("<pad>", "<eos>", "<bos>"), "<bos>", None),
    "bloom": (("<unk>", "<s>", "</s>", "<pad>"), None, None),
    "olmo2": (("<|endoftext|>", "<|pad|>"), None, None),
    "falcon": ((), None, None),
    "falcon_new": ((), None, None),
    "modernbert": (("[PAD]", "[UNK]", "[CLS]", "[SEP]"), "[CLS]", "[SEP]"),
}
LAYOUTS = Path(__file__).parent / "data" / "family_layouts.json"
#: Families whose RMSNorm weights are stored as ``gamma - 1`` (applied as ``1 + weight``):
#: their random norm weights are about 0, as in real checkpoints.
NORMS_AS_OFFSET = ("gemma", "gemma2", "gemma3")


def _is_norm_weight(name):
    return name.endswith(".weight") and any(
        part in name for part in ("norm", "LayerNorm", "ln_", "layer_norm")
    )


def write_layout_dir(path: Path, name, *, seed=0, scale=0.3, config=None, drop=(), prefix=None):
    """The checkpoint of family ``name`` as transformers writes it (its layout in
    family_layouts.json): every tensor by its name and shape, small random weights (norm
    weights about 1), the family's tokenizer specials; ``config``: keys to change,
    ``drop``: keys to leave out; ``prefix`` ``(old, new)``: the tensors under ``old``
    renamed to ``new`` and the rest (the task head) left out, as the base model saves
    them."""
    path.mkdir(parents=True, exist_ok=True)
    layout = json.loads(LAYOUTS.read_text())[name]
    specials, bos, eos = LAYOUT_TOKENS[name]
    special_tokenizer(path, bos=bos, eos=eos, specials=specials)
    r = _random(seed, scale)
    tensors = {}
    for key in sorted(layout["tensors"]):
        shape = layout["tensors"][key]
        about_one = _is_norm_weight(key) and name not in NORMS_AS_OFFSET
        tensors[key] = (1 + r(*shape)) if about_one else r(*shape)
    if prefix is not None:
        old, new = prefix
        tensors = {new + k.removeprefix(old): t for k, t in tensors.items() if k.startswith(old)}
    _save(path, tensors, 1)
    cfg = {k: v for k, v in layout["config"].items() if k not in drop} | (config or {})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


#: Every family's test directory, as the golden maps were made from (tests/data/
#: make_golden.py): name → (writer, keyword arguments).
FAMILY_DIRS = {
    "llama": (write_llama_dir, dict(model_type="llama", rope={"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})),
    "mistral": (write_llama_dir, dict(model_type="mistral", n_kv=1, shards=2)),
    "qwen2": (write_llama_dir, dict(model_type="qwen2", rope={"rope_theta": 1000000.0})),
    "qwen3": (write_llama_dir, dict(model_type="qwen3", head_dim=16, rope={
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})),
    "gpt_neox": (write_neox_dir, dict()),
    "phi3": (
        write_phi3_dir,
        dict(rope={"partial_rotary_factor": 0.5}, extra_config={"pad_token_id": None}),
    ),
    "gpt_neox_sequential": (write_neox_dir, dict(parallel=False, rotary_pct=0.5)),
} | {name: (write_layout_dir, dict(name=name)) for name in LAYOUT_TOKENS}  # fmt: skip


#: Checkpoints as older transformers (before 5) wrote them, and as base models save them:
#: the loaders' fallbacks, checked against transformers 5's reading of the same files
#: (golden maps, as FAMILY_DIRS'): name → (family_layouts.json entry, changes).
LEGACY_DIRS = {
    # Gemma 1 as the official releases' config.json has it: hidden_act "gelu", which
    # transformers reads as the tanh GELU (and no hidden_activation)
    "gemma_gelu": ("gemma", dict(drop=("hidden_activation",), config={"hidden_act": "gelu"})),
    # no layer_types: sliding and global alternate from layer 0; the base in rope_theta
    "gemma2_legacy": ("gemma2", dict(drop=("layer_types", "rope_parameters"),
                                     config={"rope_theta": 10000.0})),
    # no layer_types: every sliding_window_pattern-th layer global; the sliding layers'
    # base in rope_local_base_freq, the global one's scaling in rope_scaling
    "gemma3_legacy": ("gemma3", dict(
        drop=("layer_types", "rope_parameters", "_sliding_window_pattern"),
        config={"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                "rope_scaling": {"rope_type": "linear", "factor": 4.0}})),
    # global_attn_every_n_layers alone; global_rope_theta and local_rope_theta
    "modernbert_legacy": ("modernbert", dict(drop=("layer_types", "rope_parameters"),
                          config={"global_rope_theta": 160000.0, "local_rope_theta": 10000.0})),
    # OPTModel's checkpoint (decoder.*, no head); word_embed_proj_dim null: hidden_size
    "opt_base": ("opt", dict(prefix=("model.decoder.", "decoder."),
                             config={"word_embed_proj_dim": None})),
}  # fmt: skip


def write_family_dir(name: str, path: Path) -> Path:
    if name in LEGACY_DIRS:
        layout, changes = LEGACY_DIRS[name]
        return write_layout_dir(path, layout, **changes)
    writer, kwargs = FAMILY_DIRS[name]
    return writer(path, **kwargs)


def convert_to_bfloat16(path: Path):
    """Rewrite ``path/model.safetensors`` in bfloat16 (as Llama 3.2 ships): each float32
    weight truncated to its top 16 bits, the file written by hand (numpy has no
    bfloat16 for safetensors' numpy API to take). Returns the tensors' bits."""
    from safetensors.numpy import load_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    bits = {k: (v.view(np.uint32) >> 16).astype("<u2") for k, v in tensors.items()}
    del tensors
    offset, meta = 0, {"__metadata__": {"format": "pt"}}
    for k in sorted(bits):
        size = bits[k].nbytes
        meta[k] = {
            "dtype": "BF16",
            "shape": list(bits[k].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(meta).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for k in sorted(bits):
            fh.write(bits[k].tobytes())
    return bits
