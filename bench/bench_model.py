"""The main job against PyTorch, side by side: whole processes, interleaved, medians.

    python bench/bench_model.py --install-torch /tmp/torchvenv      # once: a separate venv
    python bench/bench_model.py --torch-python /tmp/torchvenv/bin/python [--busy] \\
        [--rounds 3] [--json bench/model.json]

For each model (all-MiniLM-L6-v2; a GPT-2-small-shaped directory the bench writes: 12
layers, 768 wide, 12 heads, random weights; a Llama-3.2-1B-shaped one in bfloat16: 16
layers, 2048 wide, 32 heads, 8 KV heads, MLP 8192) at 128 and 512 tokens (Llama: 128),
the same texts go through, as separate processes, one after another in each round:

- ``qkvmean run --model M --text F --max-tokens N`` with default options (every layer's
  maps and metrics stored, deflate), and with ``--no-maps`` (metrics only);
- ``bench/torch_job.py`` (transformers, eager attention, forward hooks, the maps of every
  layer materialised and the same metrics computed) with 1 and 2 threads, storing the maps
  with h5py gzip:1 and not storing them.

Reported: inputs/s from wall time (start-up and model loading included, as a user sees
it) and from in-process time (after loading), the ratio of qkvmean to the best PyTorch
setting, the float32 matmul rate of this machine on the model's own projection shapes
(numpy, 1 and 2 threads) and the FLOP-bound inputs/s it implies. ``--busy`` keeps one
core busy with another process throughout. PyTorch is never installed into qkvmean's
environment: ``--install-torch DIR`` makes a separate venv (torch 2.13.0, the CPU build on
this machine's disk, and transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SENTENCE = (
    "Researchers replace the queries, keys or values of a head by their mean over "
    "the tokens and then look at how the attention of every later layer changes. "
)
#: (model, tokens) → inputs per run, so that each run takes seconds, not minutes
SIZES = {
    ("minilm", 128): 64,
    ("minilm", 512): 16,
    ("gpt2", 128): 16,
    ("gpt2", 512): 4,
    ("llama", 128): 4,
}


def install_torch(venv: Path):
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0", "transformers", "h5py", "tokenizers"], check=True)
    print(f"PyTorch venv ready: --torch-python {venv / 'bin' / 'python'}")


def write_gpt2_small(path: Path) -> Path:
    """A GPT-2-small-shaped checkpoint (the tests' writer: real names and layout)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from model_support import write_gpt2_dir

    return write_gpt2_dir(path, n_layer=12, n_head=12, n_embd=768, n_positions=1024, scale=0.02)


def write_llama_1b(path: Path) -> Path:
    """A Llama-3.2-1B-shaped checkpoint in bfloat16: 16 layers, hidden 2048, 32 heads, 8 KV
    heads, MLP 8192, llama3 rope scaling (random weights; the tests' small vocabulary, which
    changes nothing but the embedding lookup)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from model_support import convert_to_bfloat16, write_llama_dir

    rope = {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    }  # fmt: skip
    write_llama_dir(
        path, n_layer=16, n_head=32, n_kv=8, d=2048, d_ff=8192, max_positions=131072,
        rope=rope, scale=0.02,
    )  # fmt: skip
    convert_to_bfloat16(path)
    return path


def _shapes(weights):
    """The (in, out) shapes of one layer's projections (QKV fused, the MLP's)."""
    layer = weights.layers[0]
    return [w.shape for w in (layer.wqkv, layer.wo, layer.w1, layer.w2)]


def flops_per_input(model_dir, tokens) -> float:
    """Multiply-adds ×2 of the four forward passes (baseline, mean-Q, -K, -V) of one input
    of ``tokens`` tokens: projections, MLP and the two attention products."""
    from qkvmean.io.models import load_model

    w = load_model(str(model_dir)).weights
    qk = w.n_heads * w.head_dim
    per_layer = 2 * tokens * sum(a * b for a, b in _shapes(w)) + 2 * 2 * tokens * tokens * qk
    return 4.0 * w.n_layers * per_layer


def matmul_rate(model_dir, tokens, threads) -> float:
    """GFLOP/s of numpy float32 matmul on the model's projection shapes, 4 conditions of
    one input stacked (what one task multiplies), at ``threads`` BLAS threads."""
    from threadpoolctl import threadpool_limits

    from qkvmean.io.models import load_model

    w = load_model(str(model_dir)).weights
    rows = 4 * tokens
    rng = np.random.default_rng(0)
    shapes = _shapes(w)
    xs = {k: rng.normal(size=(rows, k)).astype(np.float32) for k in {s[0] for s in shapes}}
    ws = [rng.normal(size=s).astype(np.float32) for s in shapes]
    outs = [np.empty((rows, s[1]), np.float32) for s in shapes]
    flop = sum(2 * rows * a * b for a, b in shapes)
    times = []
    with threadpool_limits(threads, user_api="blas"):
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(5):
                for wt, o in zip(ws, outs, strict=True):
                    np.matmul(xs[wt.shape[0]], wt, out=o)
            times.append((time.perf_counter() - t0) / 5)
    return flop / statistics.median(times) / 1e9


def texts_file(path: Path, n, tokens) -> Path:
    words = max(1, tokens // 20)
    path.write_text("\n".join(f"Input {i}. " + SENTENCE * words for i in range(n)) + "\n")
    return path


def run_timed(cmd, env=None) -> tuple:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    inside = None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):  # torch_job.py
            inside = json.loads(line)["seconds"]
        elif line.startswith("wrote "):  # qkvmean run: "... in 12.3 s: ..."
            inside = float(re.search(r" in ([0-9.]+) s: ", line).group(1))
    return wall, inside


def contenders(model_spec, model_dir, text, tokens, out_dir, torch_python):
    q = [sys.executable, "-m", "qkvmean", "run", "--model", model_spec, "--text", str(text)]
    q += ["--max-tokens", str(tokens), "--overwrite"]  # its summary line gives its time
    cases = {
        "qkvmean run (defaults)": q + ["--out", str(out_dir / "q.h5")],
        "qkvmean run --no-maps": q + ["--no-maps", "--out", str(out_dir / "qn.h5")],
    }
    if torch_python:
        t = [torch_python, str(HERE / "torch_job.py"), "--model", str(model_dir)]
        t += ["--text", str(text), "--max-tokens", str(tokens)]
        for threads in (1, 2):
            cases[f"PyTorch + hooks + h5py gzip:1, {threads} thr"] = t + [
                "--threads",
                str(threads),
                "--out",
                str(out_dir / f"t{threads}.h5"),
            ]
            cases[f"PyTorch + hooks, maps not stored, {threads} thr"] = t + [
                "--threads",
                str(threads),
                "--no-store",
            ]
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install-torch", type=Path, metavar="DIR")
    parser.add_argument("--torch-python", help="the python of a venv with torch + transformers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="one configuration, e.g. minilm:128")
    parser.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.install_torch:
        install_torch(args.install_torch)
        return
    from qkvmean.io.models import minilm_path

    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    results = {"busy": args.busy, "cpus": os.cpu_count(), "configs": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            dirs = {"minilm": ("minilm", minilm_path())}
            gpt2 = write_gpt2_small(tmp / "gpt2-small")
            dirs["gpt2"] = (str(gpt2), gpt2)
            if not args.only or args.only.startswith("llama"):
                llama = write_llama_1b(tmp / "llama-1b")
                dirs["llama"] = (str(llama), llama)
            for (name, tokens), n in SIZES.items():
                if args.only and args.only != f"{name}:{tokens}":
                    continue
                spec, model_dir = dirs[name]
                text = texts_file(tmp / f"{name}-{tokens}.txt", n, tokens)
                flop = flops_per_input(model_dir, tokens)
                rates = {t: matmul_rate(model_dir, tokens, t) for t in (1, 2)}
                cases = contenders(spec, model_dir, text, tokens, tmp, args.torch_python)
                times = {c: [] for c in cases}
                for _ in range(args.rounds):
                    for case, cmd in cases.items():
                        times[case].append(run_timed(cmd))
                config = {
                    "model": name,
                    "tokens": tokens,
                    "inputs": n,
                    "gflop_per_input": flop / 1e9,
                    "matmul_gflops": rates,
                    "flop_bound_inputs_per_s": max(rates.values()) * 1e9 / flop,
                    "rows": {},
                }
                for case, ts in times.items():
                    wall = statistics.median(t[0] for t in ts)
                    inside = [t[1] for t in ts if t[1] is not None]
                    config["rows"][case] = {
                        "wall_s": wall,
                        "inputs_per_s": n / wall,
                        "in_process_inputs_per_s": n / statistics.median(inside)
                        if inside
                        else None,
                    }
                results["configs"].append(config)
                report(config)
    finally:
        if busy is not None:
            busy.kill()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(config):
    print(
        f"\n{config['model']}, {config['tokens']} tokens, {config['inputs']} inputs, 4 "
        f"conditions: {config['gflop_per_input']:.1f} GFLOP per input; matmul "
        f"{config['matmul_gflops'][1]:.0f} / {config['matmul_gflops'][2]:.0f} GFLOP/s "
        f"(1 / 2 threads): FLOP-bound {config['flop_bound_inputs_per_s']:.2f} inputs/s"
    )
    rows = config["rows"]
    for case, r in rows.items():
        inside = r["in_process_inputs_per_s"]
        inside = f"{inside:7.2f}" if inside else "      -"
        print(f"  {case:<46} {r['wall_s']:7.1f} s  {r['inputs_per_s']:7.2f} inputs/s  {inside}")
    best = {
        kind: max(
            (r["inputs_per_s"] for c, r in rows.items() if c.startswith("PyTorch") and kind in c),
            default=None,
        )
        for kind in ("gzip", "not stored")
    }
    if best["gzip"]:
        ratio = rows["qkvmean run (defaults)"]["inputs_per_s"] / best["gzip"]
        print(f"  qkvmean (defaults) / best PyTorch with storage: {ratio:.2f}x")
    if best["not stored"]:
        ratio = rows["qkvmean run --no-maps"]["inputs_per_s"] / best["not stored"]
        print(f"  qkvmean --no-maps / best PyTorch without storage: {ratio:.2f}x")


if __name__ == "__main__":
    main()
