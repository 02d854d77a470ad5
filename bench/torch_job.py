"""The same job as ``qkvmean run --model``, the way a PyTorch user would write it.

    python bench/torch_job.py --model DIR --text FILE --max-tokens N --threads T
                              [--out S.h5 | --no-store] [--batch 8]

Run by ``bench/bench_model.py`` in an environment with torch and transformers (never
qkvmean's own): Hugging Face transformers with eager attention and forward hooks that
replace Q, K or V of every head at layer 0 by its mean over the valid tokens, the baseline
and the three substitutions per batch, every layer's attention maps, the per-head metrics
(entropy, KL from the baseline, top-key mass and index) and, unless ``--no-store``, every
map and metric written with h5py (shuffle + gzip level 1, one map per chunk). Prints one
JSON line: ``{"seconds": in-process time after loading, "inputs": n}``.
"""

from __future__ import annotations

import argparse
import json
import time

import h5py
import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModel


def _projections(model):
    """``(kind, modules)`` for the hooks of layer 0: BERT's query/key/value Linear
    modules, Llama's q/k/v_proj (grouped K/V heads: all heads are substituted, so the
    whole K/V projection), or GPT-2's fused ``c_attn``."""
    if hasattr(model, "encoder"):
        att = model.encoder.layer[0].attention.self
        return "split", {"q": att.query, "k": att.key, "v": att.value}
    if hasattr(model, "layers"):
        att = model.layers[0].self_attn
        return "split", {"q": att.q_proj, "k": att.k_proj, "v": att.v_proj}
    return "fused", {"qkv": model.h[0].attn.c_attn}


def _mean_hook(mask, which, d_model):
    """A forward hook replacing the output (or its ``which`` third, for a fused
    projection) by its mean over the valid tokens of each input."""

    def hook(module, args, out):
        m = mask[..., None].to(out.dtype)  # (B, N, 1)
        lo, hi = (0, out.shape[-1]) if which is None else (which * d_model, (which + 1) * d_model)
        part = out[..., lo:hi]
        mean = (part * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        out = out.clone()
        out[..., lo:hi] = torch.where(m > 0, mean.expand_as(part), part)
        return out

    return hook


def _metrics(maps, base, mask):
    """Per (input, layer, head): mean row entropy, mean KL of the condition from the
    baseline, top-key mass and index, over valid rows."""
    a = torch.stack(maps, 1).double()  # (B, L, H, N, N)
    m = mask[:, None, None, :, None].double()
    n = mask.sum(1).double()[:, None, None]
    logp = torch.log(a.clamp(min=1e-30))
    ent = -(a * logp).sum(-1)
    out = {"entropy": (ent * m[..., 0]).sum(-1) / n}
    if base is not None:
        b = torch.stack(base, 1).double()  # KL(baseline || condition), as qkvmean's
        kl = (b * (torch.log(b.clamp(min=1e-30)) - logp)).sum(-1)
        out["kl_from_baseline"] = (kl * m[..., 0]).sum(-1) / n
    else:
        out["kl_from_baseline"] = torch.zeros_like(out["entropy"])
    col = (a * m).sum(-2) / n[..., None]
    out["top_key_mass"], out["top_key_index"] = col.max(-1)
    return {k: v.numpy() for k, v in out.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out")
    parser.add_argument("--no-store", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t_load = time.perf_counter()
    model = AutoModel.from_pretrained(
        args.model, attn_implementation="eager", dtype=torch.float32
    ).eval()  # (bfloat16 checkpoints converted to float32, as qkvmean reads them)
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    tok.no_padding()  # (a sentence-transformers tokenizer.json pads to a fixed length)
    tok.enable_truncation(max_length=args.max_tokens)
    texts = [line for line in open(args.text, encoding="utf-8").read().split("\n") if line]
    enc = [e.ids for e in tok.encode_batch(texts)]
    kind, modules = _projections(model)
    d_model = model.config.hidden_size
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    seq = max(len(e) for e in enc)
    t0 = time.perf_counter()
    store = None
    if not args.no_store:
        store = h5py.File(args.out, "w")
        for name in ("baseline", "mean_q", "mean_k", "mean_v"):
            store.create_dataset(
                f"attention/{name}",
                (len(enc), layers, heads, seq, seq),
                np.float32,
                chunks=(1, 1, 1, seq, seq),
                shuffle=True,
                compression="gzip",
                compression_opts=1,
            )
    for s in range(0, len(enc), args.batch):
        chunk = enc[s : s + args.batch]
        n = max(len(e) for e in chunk)
        ids = torch.zeros((len(chunk), n), dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        base = None
        for name in ("baseline", "mean_q", "mean_k", "mean_v"):
            handle = None
            if name != "baseline":
                target = name[-1]
                if kind == "split":
                    handle = modules[target].register_forward_hook(_mean_hook(mask, None, d_model))
                else:
                    which = "qkv".index(target)
                    handle = modules["qkv"].register_forward_hook(_mean_hook(mask, which, d_model))
            try:
                out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            finally:
                if handle is not None:
                    handle.remove()
            maps = list(out.attentions)  # L × (B, H, n, n)
            metrics = _metrics(maps, base, mask)
            if name == "baseline":
                base = maps
            if store is not None:
                block = torch.stack(maps, 1).numpy()
                full = np.zeros((len(chunk), layers, heads, seq, seq), np.float32)
                full[..., :n, :n] = block
                store[f"attention/{name}"][s : s + len(chunk)] = full
                for metric, values in metrics.items():
                    key = f"metrics/{name}/{metric}"
                    if key not in store:
                        store.create_dataset(key, (len(enc), layers, heads), values.dtype)
                    store[key][s : s + len(chunk)] = values
    if store is not None:
        store.close()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "load_seconds": t0 - t_load, "inputs": len(enc)}))


if __name__ == "__main__":
    main()
