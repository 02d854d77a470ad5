"""``qkvmean export --metrics`` of a large store, as a user runs it: rows/s for CSV and
Parquet, whole commands (start-up included), medians.

    python bench/bench_export.py [--inputs 2000] [--rounds 3] [--json bench/export.json]

The store: ``qkvmean run --qkv --no-maps`` on random Q/K/V of ``--inputs`` inputs x 16
layers x 32 heads x 8 tokens (4 conditions: 4 x inputs x 512 rows, 4.1 M for 2000).
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

import numpy as np

from qkvmean.io.qkv import write_qkv


def make_store(tmp: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(n, 16, 32, 8, 4)).astype(np.float32) for _ in range(3))
    write_qkv(tmp / "in.h5", q, k, v, lengths=rng.integers(1, 9, size=n))  # named axes
    store = tmp / "s.h5"
    subprocess.run(
        [sys.executable, "-m", "qkvmean", "run", "--qkv", str(tmp / "in.h5"), "--out",
         str(store), "--no-maps", "-q"],
        check=True,
    )  # fmt: skip
    return store


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = make_store(tmp, args.inputs)
        rows = 4 * args.inputs * 16 * 32
        times = {".csv": [], ".parquet": []}
        for _ in range(args.rounds):
            for ext in times:
                t0 = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "qkvmean", "export", str(store), "--metrics",
                     str(tmp / f"m{ext}"), "--overwrite", "-q"],
                    check=True,
                )  # fmt: skip
                times[ext].append(time.perf_counter() - t0)
        result = {"rows": rows}
        for ext, ts in times.items():
            wall = statistics.median(ts)
            size = (tmp / f"m{ext}").stat().st_size
            result[ext] = {"wall_s": wall, "rows_per_s": rows / wall, "bytes": size}
            print(f"{ext:9s} {rows} rows  {wall:6.2f} s  {rows / wall / 1e6:5.2f} M rows/s  "
                  f"{size / 1e6:7.1f} MB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
