"""Model-path throughput: all-MiniLM-L6-v2 at 128 tokens, all four conditions.

    python bench/bench_model.py [--inputs 64] [--batch 8] [--repeat 3]

Measures, in one run and interleaved:
- ``model``: baseline + mean-Q + mean-K + mean-V forward passes with every layer's maps
  and metrics (``qkvmean.engine.transformer.model_conditions``), inputs/s;
- ``raw qkv``: the same maps from raw Q/K/V of the same shape (6 layers, 12 heads,
  128 tokens, head dim 32) through ``qkvmean.conditions`` — what the model path costs on
  top of attention itself;
- ``end to end``: ``qkvmean run --model minilm`` on the inputs, store included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

import qkvmean
from qkvmean.engine.transformer import model_conditions
from qkvmean.io.models import load_model

SENTENCE = (
    "Researchers replace the queries, keys or values of a head by their mean over "
    "the tokens and then look at how the attention of every later layer changes. "
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    model = load_model("minilm")
    tok = model.tokenizer
    tok.enable_truncation(max_length=args.tokens)
    texts = [f"Input {i}. " + SENTENCE * 6 for i in range(args.inputs)]
    ids = np.array([e.ids for e in tok.encode_batch(texts)])
    tok.no_truncation()
    assert ids.shape == (args.inputs, args.tokens), ids.shape
    lengths = np.full(args.inputs, args.tokens)
    w = model.weights
    rng = np.random.default_rng(0)
    shape = (args.inputs, w.n_layers, w.n_heads, args.tokens, w.head_dim)
    q, k = (rng.normal(size=(2, *shape)) * 1.5).astype(np.float32)

    def run_model():
        for s in range(0, args.inputs, args.batch):
            model_conditions(w, ids[s : s + args.batch], lengths[s : s + args.batch])

    def run_qkv():
        for s in range(0, args.inputs, args.batch):
            qkvmean.conditions(
                q[s : s + args.batch], k[s : s + args.batch], lengths=lengths[s : s + args.batch]
            )

    cases = {"model": run_model, "raw qkv": run_qkv}
    for fn in cases.values():  # compile, warm up
        fn()
    times = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "texts.txt"
        text_file.write_text("\n".join(texts))
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "qkvmean",
                "run",
                "--model",
                "minilm",
                "--text",
                str(text_file),
                "--max-tokens",
                str(args.tokens),
                "--out",
                str(Path(tmp) / "s.h5"),
                "--quiet",
            ],
            check=True,
        )
        end_to_end = time.perf_counter() - t0

    rows = {name: args.inputs / statistics.median(t) for name, t in times.items()}
    rows["end to end (qkvmean run, incl. start-up)"] = args.inputs / end_to_end
    print(
        f"all-MiniLM-L6-v2, {args.tokens} tokens, 4 conditions, batch {args.batch}, "
        f"{numba.get_num_threads()} threads; median of {args.repeat}"
    )
    for name, rate in rows.items():
        print(f"{name:<42} {rate:8.1f} inputs/s")
    print(f"model / raw-qkv time ratio: {rows['raw qkv'] / rows['model']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
