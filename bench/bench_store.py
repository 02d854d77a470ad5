"""The store benchmark: encoding chunks, and ``run --qkv`` end to end per compression.

    python bench/bench_store.py                  # 2000 inputs, 3 runs each; bench/store.json
    python bench/bench_store.py --inputs 400 --runs 1

Reported:
- encoding the chunks of dense attention maps (8 inputs x 12 heads x 128 tokens of
  baseline weights from random q and k; 256 KiB chunks): qkvmean's encoder (shuffle, byte
  planes that would not compress stored, the rest deflated with ISA-L) against the plain
  way (shuffle, then ISA-L deflate of the whole chunk), interleaved, median µs per chunk
  and the compressed size;
- ``qkvmean run --qkv`` (12 heads x 128 tokens, all four conditions) with the default
  deflate and with ``--compression none``: inputs/s, MB/s of maps, bytes written and the
  share of wall time outside the kernels, each run on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_speed import make_qkv_input, run_qkv  # noqa: E402

import qkvmean  # noqa: E402
from qkvmean.store import codec  # noqa: E402


def encoding(repeat: int):
    from isal import isal_zlib

    rng = np.random.default_rng(0)
    q, k = (rng.normal(size=(8, 12, 128, 64)).astype(np.float32) for _ in range(2))
    chunks = qkvmean.attention_weights(q, k).reshape(24, 4 * 128 * 128)
    filters = codec.parse_compression("deflate")

    def plain(row):
        return isal_zlib.compress(row.view(np.uint8).reshape(-1, 4).T.copy(), 1)

    def ours(row):
        return codec._encode_chunk(row, filters, 128)

    times = {"plain deflate": [], "qkvmean": []}
    sizes = {}
    for _ in range(repeat):
        for name, encode in (("plain deflate", plain), ("qkvmean", ours)):
            t0 = time.perf_counter()
            out = [encode(row) for row in chunks]
            times[name].append((time.perf_counter() - t0) / len(chunks) * 1e6)
            sizes[name] = sum(map(len, out)) / chunks.nbytes
    return {
        name: {"us_per_chunk": statistics.median(t), "ratio": sizes[name]}
        for name, t in times.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20, help="rounds of chunk encoding")
    parser.add_argument("--json", default=str(HERE / "store.json"))
    args = parser.parse_args(argv)
    report = {"encoding": encoding(args.repeat), "runs": {}}
    for name, e in report["encoding"].items():
        print(
            f"encode a 256 KiB chunk, {name:13s} {e['us_per_chunk']:6.0f} µs, "
            f"size {e['ratio']:.4f} of the raw bytes"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_qkv_input(tmp / "qkv.h5", args.inputs)
        for compression in ("deflate", "none"):
            runs = report["runs"][compression] = []
            for i in range(args.runs):
                out = tmp / f"{compression}-{i}.h5"
                r = run_qkv(src, out, compression)
                r["file_gb"] = out.stat().st_size / 1e9
                out.unlink()
                runs.append(r)
                print(
                    f"run --qkv --compression {compression}: {r['inputs']} inputs, "
                    f"{r['inputs_per_s']:.1f} inputs/s, {r['mb_maps_per_s']:.0f} MB/s of maps, "
                    f"{r['file_gb']:.2f} GB written, "
                    f"{r['share_outside_kernels']:.0%} of wall time outside kernels"
                )
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
