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

sys.path.insert(0, str(HERE))
from hf_projections import projection  # noqa: E402

TEXTS = ("the quick brown fox jumps", "mean keys and values")
LAYER = 1
SETTINGS = {"causal": "causal", "tokens_heads": "tokens"}


def _mean(x, over):
    """x: (n, width) float64 → the mean over tokens, or the causal prefix mean."""
    if over == "tokens":
        return x.mean(0, keepdim=True).expand_as(x)
    return x.cumsum(0) / torch.arange(1, x.shape[0] + 1, dtype=torch.float64)[:, None]


def hooks(model, family, target, over, heads):
    """Forward hooks that substitute ``target`` of ``heads`` at layer LAYER's projection
    output; returns the handles."""
    module, cols, dh = projection(model, family, target, LAYER, heads)

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
