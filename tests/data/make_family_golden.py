"""Regenerate golden_families.npz: every family's attention maps from Hugging Face
transformers (PyTorch), with the substitution done by forward hooks on the projections.

Not part of the test suite (PyTorch and transformers are not dependencies); run it by hand
where both are installed (``python bench/bench_model.py --install-torch DIR`` makes such a
venv; qkvmean itself need not be installed there, only on the path):

    DIR/bin/python tests/data/make_family_golden.py

For each directory of tests/model_support.py's ``FAMILY_DIRS`` (real tensor names and
layouts, small random weights, GQA, llama3 and linear rope scaling, Qwen3's q/k norm,
GPT-NeoX's fused interleaved QKV with partial rotary, parallel and sequential residual; and
the families written from family_layouts.json: RoBERTa, XLM-R, DistilBERT, OPT, GPT-J,
StableLM, Gemma 1/2/3 (soft-capping, sliding windows, local rotary, q/k norm), BLOOM (ALiBi),
OLMo 2 (norms on the sublayers' outputs, q/k norm over all heads), ModernBERT (local windows
on both sides, no first attention norm)), and of ``LEGACY_DIRS`` (older configs'
keys, OPT's base-model checkpoint), and each of ``TEXTS``, it records transformers' eager
attention weights of every layer ``(L, H, n, n)`` for the baseline and mean-Q/K/V at layer 1:

- ``causal``: the causal prefix mean, every head;
- ``tokens_heads``: the mean over tokens, in the heads of the last KV group only (hooks on
  the K/V projections can only replace a whole KV head; qkvmean's partial-group semantics
  are tested against the numpy reference).

Keys: ``<family>/ids/<text>`` (the token ids, so that a tokenizer that changed is caught)
and ``<family>/<setting>/<condition>/<text>``.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from model_support import FAMILY_DIRS, LEGACY_DIRS, write_family_dir  # noqa: E402

TEXTS = ("the quick brown fox jumps", "mean keys and values")
LAYER = 1
SETTINGS = {"causal": "causal", "tokens_heads": "tokens"}


#: Where each family's separate q/k/v projections are (in its base model), and their names.
DEFAULT_PROJECTIONS = (lambda m: m.layers[LAYER].self_attn, ("q_proj", "k_proj", "v_proj"))
PROJECTIONS = {
    "roberta": (lambda m: m.encoder.layer[LAYER].attention.self, ("query", "key", "value")),
    "xlm-roberta": (lambda m: m.encoder.layer[LAYER].attention.self, ("query", "key", "value")),
    "distilbert": (lambda m: m.transformer.layer[LAYER].attention, ("q_lin", "k_lin", "v_lin")),
    "opt": (lambda m: m.decoder.layers[LAYER].self_attn, ("q_proj", "k_proj", "v_proj")),
    "gptj": (lambda m: m.h[LAYER].attn, ("q_proj", "k_proj", "v_proj")),
}


def _mean(x, over):
    """x: (n, width) float64 → the mean over tokens, or the causal prefix mean."""
    if over == "tokens":
        return x.mean(0, keepdim=True).expand_as(x)
    return x.cumsum(0) / torch.arange(1, x.shape[0] + 1, dtype=torch.float64)[:, None]


def hooks(model, family, target, over, heads):
    """Forward hooks that substitute ``target`` of ``heads`` at layer LAYER's projection
    output; returns the handles."""
    cfg = model.config
    n_heads = cfg.num_attention_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    group = n_heads // getattr(cfg, "num_key_value_heads", n_heads)
    if family in ("gpt_neox", "bloom"):
        fused = (
            model.layers[LAYER].attention if family == "gpt_neox" else model.h[LAYER].self_attention
        )
        module = fused.query_key_value
        # fused output: per head [q | k | v], dh each
        cols = [h * 3 * dh + "qkv".index(target) * dh for h in heads]
    elif family == "falcon":
        module = model.h[LAYER].self_attention.query_key_value
        kv_heads = 1 if not cfg.new_decoder_architecture else cfg.num_kv_heads
        g = n_heads // kv_heads
        if cfg.new_decoder_architecture:  # per KV group: [its query heads | k | v]
            kv = sorted({h // g for h in heads})
            cols = {
                "q": [((h // g) * (g + 2) + h % g) * dh for h in heads],
                "k": [(x * (g + 2) + g) * dh for x in kv],
                "v": [(x * (g + 2) + g + 1) * dh for x in kv],
            }[target]
        else:  # the query heads, then the one key head, then the value head
            cols = {"q": [h * dh for h in heads], "k": [n_heads * dh], "v": [(n_heads + 1) * dh]}[
                target
            ]
    elif family == "modernbert":
        module = model.layers[LAYER].attn.Wqkv  # [q | k | v], the heads in order in each
        cols = [("qkv".index(target) * cfg.hidden_size + h * dh) for h in heads]
    elif family == "phi3":
        module = model.layers[LAYER].self_attn.qkv_proj
        # fused output: the query heads, then the key heads, then the value heads
        kv = sorted({h // group for h in heads})
        cols = {
            "q": [h * dh for h in heads],
            "k": [(n_heads + g) * dh for g in kv],
            "v": [(n_heads + cfg.num_key_value_heads + g) * dh for g in kv],
        }[target]
    else:
        where, names = PROJECTIONS.get(family, DEFAULT_PROJECTIONS)
        module = getattr(where(model), names["qkv".index(target)])
        if target == "q":
            cols = [h * dh for h in heads]
        else:  # a whole KV head per group of query heads
            cols = sorted({(h // group) * dh for h in heads})

    def hook(mod, inp, res):
        res = res.clone()
        for c in cols:
            x = res[0, :, c : c + dh].double()
            res[0, :, c : c + dh] = _mean(x, over).float()
        return res

    return [module.register_forward_hook(hook)]


def main():
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (*FAMILY_DIRS, *LEGACY_DIRS):
            path = write_family_dir(name, Path(tmp) / name)
            family = json.loads((path / "config.json").read_text())["model_type"]
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            model = AutoModel.from_pretrained(
                str(path), attn_implementation="eager", dtype=torch.float32
            ).eval()
            cfg = model.config
            n_heads = cfg.num_attention_heads
            group = n_heads // getattr(cfg, "num_key_value_heads", n_heads)
            print(name, type(model).__name__, getattr(cfg, "rope_parameters", None))
            for i, text in enumerate(TEXTS):
                ids = tok.encode(text).ids
                out[f"{name}/ids/{i}"] = np.array(ids, np.int64)
                for setting, over in SETTINGS.items():
                    last_group = range(n_heads - group, n_heads)
                    heads = range(n_heads) if setting == "causal" else last_group
                    for cond in ("baseline", "mean_q", "mean_k", "mean_v"):
                        handles = []
                        if cond != "baseline":
                            handles = hooks(model, family, cond[-1], over, list(heads))
                        with torch.no_grad():
                            att = model(
                                input_ids=torch.tensor([ids]), output_attentions=True
                            ).attentions
                        for h in handles:
                            h.remove()
                        maps = np.stack([a[0].numpy() for a in att])
                        out[f"{name}/{setting}/{cond}/{i}"] = maps.astype(np.float32)
    np.savez_compressed(HERE / "golden_families.npz", **out)


if __name__ == "__main__":
    main()
