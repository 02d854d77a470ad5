"""``qkvmean run`` on a Dask cluster against a local run: inputs/s against the number of
workers, whole commands as a user runs them, interleaved, medians.

    python bench/bench_dask.py [--workers 1,2] [--rounds 3] [--json bench/dask.json]

For raw Q/K/V (``bench_speed.make_qkv_input``: 12 heads x 128 tokens x 64, 4 conditions)
and for all-MiniLM-L6-v2 (texts of 128 tokens), each round runs, as separate processes:
``qkvmean run`` locally, and with ``--workers N`` (a LocalCluster of N processes, the
cluster's start-up included, as a user pays it) for each N. Reported: wall time, inputs/s
and the ratio to the local run. ``--busy`` keeps one core busy with another process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_speed import make_qkv_input  # noqa: E402


def timed(cmd) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="cluster sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--qkv-inputs", type=int, default=512)
    parser.add_argument("--texts", type=int, default=96)
    parser.add_argument("--busy", action="store_true", help="one core busy throughout")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.workers.split(",")]
    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    results = {"cores": len(os.sched_getaffinity(0)), "busy": args.busy, "jobs": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            qkv = make_qkv_input(tmp / "qkv.h5", args.qkv_inputs)
            texts = tmp / "texts.txt"
            sentence = "Mean keys make every query look at all the words in the same way. "
            texts.write_text("\n".join(f"{i}. " + sentence * 8 for i in range(args.texts)))
            jobs = {
                "qkv": (["--qkv", str(qkv)], args.qkv_inputs),
                "model minilm": (
                    ["--model", "minilm", "--text", str(texts), "--max-tokens", "128"],
                    args.texts,
                ),
            }
            for job, (source, n) in jobs.items():
                times = {"local": []} | {f"--workers {w}": [] for w in sizes}
                for _ in range(args.rounds):
                    for name in times:
                        extra = [] if name == "local" else name.split()
                        out = ["-o", str(tmp / "out.h5"), "--overwrite", "--quiet"]
                        cmd = [sys.executable, "-m", "qkvmean", "run", *source, *out, *extra]
                        times[name].append(timed(cmd))
                base = statistics.median(times["local"])
                rows = {}
                for name, ts in times.items():
                    wall = statistics.median(ts)
                    rows[name] = {"wall_s": wall, "inputs_per_s": n / wall, "vs_local": base / wall}
                    print(json.dumps({job: {name: rows[name]}}), flush=True)
                results["jobs"][job] = rows
    finally:
        if busy is not None:
            busy.kill()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| job | run | wall s | inputs/s | vs local |\n|---|---|---|---|---|")
    for job, rows in results["jobs"].items():
        for name, r in rows.items():
            print(
                f"| {job} | {name} | {r['wall_s']:.2f} | {r['inputs_per_s']:.1f} | "
                f"{r['vs_local']:.2f}x |"
            )


if __name__ == "__main__":
    main()
