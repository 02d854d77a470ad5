"""A head sweep as a user of transformers or TransformerLens writes it: one forward pass
per condition, the substitution done by a hook, the effect on the output computed from
the logits. Run by bench/bench_sweep.py with the PyTorch venv's python (never imported by
qkvmean).

    python bench/torch_sweep.py --model DIR --text FILE --max-tokens 64 \\
        --conditions q:0:3,k:11:5 [--tool transformers|lens] [--threads 2]

Prints one JSON line: the seconds of the baseline pass and of each condition, and each
condition's effects averaged over the inputs (the same definitions as qkvmean's
/effects: KL(base || condition) of the next-token distributions averaged over the
positions, the change of the mean cross-entropy of the text's own next token, the
relative L2 change of the final hidden state).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel


def _ids(model_dir, text, tokens):
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    lines = [line for line in open(text).read().splitlines() if line.strip()]
    encoded = [tok.encode(line).ids[:tokens] for line in lines]
    if len({len(e) for e in encoded}) != 1:
        raise SystemExit("every text must have at least --max-tokens tokens (no padding here)")
    return torch.tensor(encoded)


def _effects(logp0, base_hidden, logits, hidden, ids):
    """Per input: KL(base || cond) mean over positions, CE change, hidden change, in
    float32 as a user computes them (``logp0``: the baseline's log-probabilities)."""
    logp = F.log_softmax(logits, -1)
    kl = F.kl_div(logp, logp0, log_target=True, reduction="none").sum(-1).mean(-1)
    nxt = ids[:, 1:, None]
    ce0 = -logp0[:, :-1].gather(-1, nxt).squeeze(-1).mean(-1)
    ce = -logp[:, :-1].gather(-1, nxt).squeeze(-1).mean(-1)
    dh = (hidden - base_hidden).flatten(1).norm(dim=1)
    return {
        "kl_next_token": kl.mean().item(),
        "ce_change": (ce - ce0).mean().item(),
        "hidden_change": (dh / base_hidden.flatten(1).norm(dim=1)).mean().item(),
    }


def transformers_sweep(model_dir, ids, conditions):
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()  # its default attention
    d = model.config.n_embd
    dh = d // model.config.n_head
    offset = {"q": 0, "k": d, "v": 2 * d}

    def run():
        out = model(ids, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]  # after ln_f

    def hook_for(target, head):
        cols = slice(offset[target] + head * dh, offset[target] + (head + 1) * dh)

        def hook(module, inputs, out):  # c_attn's output: (B, T, 3D), bias included
            out = out.clone()
            out[..., cols] = out[..., cols].mean(dim=1, keepdim=True)
            return out

        return hook

    def condition(target, layer, head):
        attn = model.transformer.h[layer].attn.c_attn
        handle = attn.register_forward_hook(hook_for(target, head))
        try:
            return run()
        finally:
            handle.remove()

    return run, condition


def lens_sweep(model_dir, ids, conditions):
    """TransformerLens 4.x: HookedTransformer is gone; its TransformerBridge around the same
    transformers model, with hooks on ``blocks.L.attn.hook_q/k/v`` (B, T, H, dh)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    bridge = build_bridge_from_module(
        hf, "GPT2LMHeadModel", hf_config=hf.config, dtype=torch.float32
    ).eval()
    final = {}

    def keep(x, hook):
        final["h"] = x
        return x

    def run(hooks=()):
        logits = bridge.run_with_hooks(ids, fwd_hooks=[*hooks, ("ln_final.hook_out", keep)])
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        return logits, final["h"]

    def condition(target, layer, head):
        def hook(x, hook):
            x = x.clone()
            x[:, :, head] = x[:, :, head].mean(dim=1, keepdim=True)
            return x

        return run([(f"blocks.{layer}.attn.hook_{target}", hook)])

    return run, condition


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--conditions", required=True, help="target:layer:head,...")
    p.add_argument("--tool", choices=["transformers", "lens"], default="transformers")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    ids = _ids(args.model, args.text, args.max_tokens)
    conditions = [(t, int(layer), int(h)) for t, layer, h in
                  (c.split(":") for c in args.conditions.split(","))]  # fmt: skip
    make = transformers_sweep if args.tool == "transformers" else lens_sweep
    run, condition = make(args.model, ids, conditions)
    load = time.perf_counter() - t_load
    with torch.no_grad():
        t0 = time.perf_counter()
        base_logits, base_hidden = run()
        logp0 = F.log_softmax(base_logits, -1)
        base = time.perf_counter() - t0
        results = []
        for target, layer, head in conditions:
            t0 = time.perf_counter()
            logits, hidden = condition(target, layer, head)
            found = _effects(logp0, base_hidden, logits, hidden, ids)
            seconds = time.perf_counter() - t0
            results.append({"condition": f"mean_{target}@L{layer}H{head}", "seconds": seconds,
                            **found})  # fmt: skip
    print(json.dumps({"tool": args.tool, "load": load, "baseline": base, "torch": torch.__version__,
                      "conditions": results}))  # fmt: skip


if __name__ == "__main__":
    main()
