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
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.normal(size=shape) * scale).astype(np.float32)

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
