"""A head sweep end to end: qkvmean against transformers + hooks and TransformerLens.

    python bench/bench_model.py --install-torch /tmp/torchvenv      # once: a separate venv
    python bench/bench_sweep.py --torch-python /tmp/torchvenv/bin/python \\
        [--texts 32] [--tokens 64] [--sample 12] [--busy] [--json bench/sweep.json]

The model: a GPT-2-small-shaped directory the bench writes (12 layers, 768 wide, 12 heads,
its real vocabulary of 50257 rows in the embedding and the tied head; random weights,
the tests' byte-level tokenizer). The job: every target x layer x head alone, 432
conditions, each substituted by its mean over the tokens, and each condition's effect on
the output (next-token KL from the baseline over every position, cross-entropy change,
hidden-state change), over ``--texts`` texts of ``--tokens`` tokens.

- qkvmean: ``qkvmean run --model DIR --text F --sweep heads`` as a user runs it (a new
  process: start-up, model loading and the store included), timed whole;
- transformers + forward hooks (bench/torch_sweep.py): what a user writes: one forward
  pass per condition with a hook on ``c_attn`` that replaces the head's slice, the KL from
  the logits. A full sweep takes about an hour on 2 cores, so ``--sample`` conditions
  (spread over the layers, heads and targets) are timed and the sweep's time is the
  baseline pass plus 432 times their mean (a condition costs the same whatever its layer:
  a whole forward pass); ``--sample 432`` runs them all;
- TransformerLens 4.3 (if it imports in the PyTorch venv): HookedTransformer is gone in
  4.x; its TransformerBridge around the same model, with ``run_with_hooks`` on
  ``blocks.L.attn.hook_q/k/v``, the same sampling.

Reported: seconds per condition and for the whole sweep, the ratio, and the largest
difference between qkvmean's /effects and each tool's numbers on the sampled conditions
(averaged over the inputs). ``--busy`` keeps one core busy with another process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
VOCAB = 50257
SENTENCE = (
    "Researchers replace the queries, keys or values of a head by their mean over "
    "the tokens and then look at how the attention of every later layer changes. "
)


def write_gpt2_small(path: Path) -> Path:
    """GPT-2 small's shapes, with its full vocabulary in the embedding (tied head), so
    that the head's product costs what it costs in the real model."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from model_support import write_gpt2_dir
    from safetensors.numpy import load_file, save_file

    write_gpt2_dir(path, n_layer=12, n_head=12, n_embd=768, n_positions=1024, scale=0.02)
    tensors = load_file(str(path / "model.safetensors"))
    rng = np.random.default_rng(1)
    tensors["wte.weight"] = (rng.standard_normal((VOCAB, 768)) * 0.02).astype(np.float32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = VOCAB
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def texts_file(path: Path, n, tokens) -> Path:
    words = max(2, tokens // 10)
    path.write_text("\n".join(f"Input {i}. " + SENTENCE * words for i in range(n)) + "\n")
    return path


def sample(n, layers=12, heads=12) -> list:
    """``n`` conditions spread over targets, layers and heads."""
    every = [(t, layer, h) for t in "qkv" for layer in range(layers) for h in range(heads)]
    if n >= len(every):
        return every
    picks = np.linspace(0, len(every) - 1, n).round().astype(int)
    # move along the heads too, not only the layers
    return [every[(i + 7 * j) % len(every)] for j, i in enumerate(picks)]


def run_qkvmean(model_dir, text, tokens, out) -> float:
    cmd = [sys.executable, "-m", "qkvmean", "run", "--model", str(model_dir), "--text", str(text),
           "--max-tokens", str(tokens), "--sweep", "heads", "--out", str(out), "--overwrite",
           "-q"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def run_torch(python, tool, model_dir, text, tokens, conditions) -> dict | None:
    spec = ",".join(f"{t}:{layer}:{h}" for t, layer, h in conditions)
    cmd = [python, str(HERE / "torch_sweep.py"), "--model", str(model_dir), "--text", str(text),
           "--max-tokens", str(tokens), "--conditions", spec, "--tool", tool]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"{tool}: failed, skipped:\n{proc.stderr[-1500:]}", file=sys.stderr)
        return None
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    found["wall"] = wall
    return found


def differences(store, found) -> dict:
    """The largest |qkvmean - tool| of each effect over the sampled conditions."""
    with h5py.File(store) as f:
        names = [x.decode() for x in f["metrics/condition"][...]]
        worst = {}
        for row in found["conditions"]:
            c = names.index(row["condition"])
            for effect in ("kl_next_token", "ce_change", "hidden_change"):
                ours = float(f["effects"][effect][c].mean())
                worst[effect] = max(worst.get(effect, 0.0), abs(ours - row[effect]))
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", required=True, help="the PyTorch venv's python")
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sample", type=int, default=12, help="conditions the PyTorch tools run")
    p.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    p.add_argument("--tools", default="transformers,lens")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model_dir = write_gpt2_small(tmp / "gpt2-small")
            text = texts_file(tmp / "texts.txt", args.texts, args.tokens)
            conditions = sample(args.sample)
            results = {"texts": args.texts, "tokens": args.tokens, "conditions": 432,
                       "busy": args.busy, "cores": os.cpu_count()}  # fmt: skip
            store = tmp / "sweep.h5"
            ours = run_qkvmean(model_dir, text, args.tokens, store)
            results["qkvmean"] = {"sweep_s": ours, "per_condition_s": ours / 432}
            for tool in args.tools.split(","):
                found = run_torch(args.torch_python, tool, model_dir, text, args.tokens, conditions)
                if found is None:
                    results[tool] = "did not run"
                    continue
                per = float(np.mean([r["seconds"] for r in found["conditions"]]))
                sweep = found["baseline"] + 432 * per + found["load"]
                results[tool] = {
                    "sampled": len(conditions), "per_condition_s": per, "sweep_s": sweep,
                    "ratio": sweep / ours, "max_difference": differences(store, found),
                }  # fmt: skip
    finally:
        if busy is not None:
            busy.kill()
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
