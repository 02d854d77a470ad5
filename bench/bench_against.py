"""This tree against another checkout of qkvmean, the same jobs side by side.

    git worktree add /tmp/old <commit>
    python bench/bench_against.py /tmp/old [--rounds 5] [--busy] [--json FILE]

For a reshaping that must not slow anything down: each job runs as a whole process
(``python -m qkvmean run ...``, start-up, model loading and writing the store included,
as a user runs it), with this tree's package and with the other checkout's
(``PYTHONPATH=OTHER``), interleaved round by round; reported are the medians of the wall
times and their ratio (other / this: above 1, this tree is faster). The jobs: MiniLM at
128 tokens (every layer's maps stored; and ``--no-maps``), a GPT-2-small-shaped model at
128 tokens (the directory ``bench_model.py`` writes), and raw Q/K/V (the raw API's
kernels and the store). ``--busy`` keeps one core busy with another process throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_model import texts_file, write_gpt2_small  # noqa: E402


@contextlib.contextmanager
def busy_core(on: bool):
    """Another process keeping one core busy while the block runs (when ``on``)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if busy is not None:
            busy.kill()


def jobs(tmp: Path) -> dict:
    texts = texts_file(tmp / "texts.txt", 32, 128)
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(tmp / "qkv.h5", "w") as f:
        for name in "qkv":
            f[name] = rng.normal(size=(64, 2, 12, 128, 64)).astype(np.float32)
    gpt2 = write_gpt2_small(tmp / "gpt2")
    model = ["run", "--text", str(texts), "--max-tokens", "128"]
    return {
        "minilm:128": [*model, "--model", "minilm"],
        "minilm:128 --no-maps": [*model, "--model", "minilm", "--no-maps"],
        "gpt2-small:128": [*model, "--model", str(gpt2)],
        "qkv 64x2x12x128x64": ["run", "--qkv", str(tmp / "qkv.h5")],
    }


def timed(args, out: Path, pythonpath=None) -> float:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, "-m", "qkvmean", *args, "--out", str(out), "--overwrite", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="another checkout of qkvmean (its root)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.other / "qkvmean" / "__init__.py").is_file():
        parser.error(f"{args.other}: not a checkout of qkvmean (no qkvmean/__init__.py)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp, busy_core(args.busy):
        tmp = Path(tmp)
        todo = jobs(tmp)
        for job in todo.values():  # compile both trees' kernels first (caches)
            timed(job, tmp / "warm.h5")
            timed(job, tmp / "warm.h5", args.other)
        times = {name: {"this": [], "other": []} for name in todo}
        for _ in range(args.rounds):
            for name, job in todo.items():
                times[name]["this"].append(timed(job, tmp / "this.h5"))
                times[name]["other"].append(timed(job, tmp / "other.h5", args.other))
        print(f"{'job':28s} {'this (s)':>9s} {'other (s)':>9s} {'other/this':>10s}")
        for name, t in times.items():
            this, other = statistics.median(t["this"]), statistics.median(t["other"])
            results[name] = {"this_s": this, "other_s": other, "ratio": other / this, **t}
            print(f"{name:28s} {this:9.2f} {other:9.2f} {other / this:10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"busy": args.busy, "rounds": args.rounds,
                                         "jobs": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
