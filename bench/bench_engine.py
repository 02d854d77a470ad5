"""Time the engine against the numpy reference, side by side in one run.

    python bench/bench_engine.py                 # default shapes
    python bench/bench_engine.py --seq 128 512 --repeat 7 --json out.json

For each shape, every timed function runs once to compile and warm up, then the runs of
all functions are interleaved (so drift on a shared machine hits them alike) and the
median is reported. Speed-up = reference time / qkvmean time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numba
import numpy as np

import qkvmean
from qkvmean.engine import reference as ref


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_shape(batch, heads, seq, dim, repeat, dtype):
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, batch, heads, seq, dim)).astype(dtype)
    lengths = np.full(batch, seq)
    lengths[::2] = max(seq * 3 // 4, 1)  # some padding, as real batches have
    cases = {
        "attention_weights": (
            lambda: qkvmean.attention_weights(q, k, lengths=lengths),
            lambda: ref.attention_weights(q, k, lengths=lengths),
        ),
    }
    for target in "qkv":
        cases[f"ablate {target}"] = (
            lambda t=target: qkvmean.ablate(q, k, v, target=t, lengths=lengths),
            lambda t=target: ref.ablate(q, k, v, target=t, lengths=lengths),
        )
    times = {name: ([], []) for name in cases}
    for fast, slow in cases.values():  # compile + warm caches
        fast()
        slow()
    for _ in range(repeat):
        for name, (fast, slow) in cases.items():
            times[name][0].append(_timed(fast))
            times[name][1].append(_timed(slow))
    rows = []
    for name, (t_fast, t_slow) in times.items():
        fast_ms = 1e3 * statistics.median(t_fast)
        slow_ms = 1e3 * statistics.median(t_slow)
        rows.append(
            dict(
                function=name,
                batch=batch,
                heads=heads,
                seq=seq,
                dim=dim,
                dtype=np.dtype(dtype).name,
                qkvmean_ms=fast_ms,
                numpy_ref_ms=slow_ms,
                speedup=slow_ms / fast_ms,
            )
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    print(
        f"qkvmean {qkvmean.__version__}, numba {numba.__version__}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, threads {numba.get_num_threads()}, {platform.machine()}"
    )
    rows = []
    for seq in args.seq:
        rows += bench_shape(args.batch, args.heads, seq, args.dim, args.repeat, args.dtype)
    print(f"layer {numba.threading_layer()}; median of {args.repeat} interleaved runs")
    header = (
        f"{'function':<18} {'shape (b,h,n,d)':<20} {'qkvmean ms':>11} {'numpy ms':>10} "
        f"{'speed-up':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = f"({r['batch']},{r['heads']},{r['seq']},{r['dim']})"
        print(
            f"{r['function']:<18} {shape:<20} {r['qkvmean_ms']:>11.2f} "
            f"{r['numpy_ref_ms']:>10.2f} {r['speedup']:>8.2f}x"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
