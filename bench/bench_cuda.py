"""The CUDA backend on a GPU: correctness against the CPU, then throughput, side by side.

    python bench/bench_cuda.py [--json bench/cuda.json] [--sizes 512,2048,8192]
    python bench/bench_cuda.py --quick      # a smoke run (also under NUMBA_ENABLE_CUDASIM=1)

Needs ``pip install -e ".[cuda]"`` and a GPU (NUMBA_ENABLE_CUDASIM unset or 0). In order:

1. **Correctness**: random inputs through ``attention_weights``, ``attention``, ``ablate``
   (every target, both means, padded and causal) and ``conditions`` (maps and metrics) on
   ``device="cuda"`` and ``device="cpu"``: the largest differences (must be < 2e-5).
2. **The device**: its name, the float32 peak from its SM count and clock (FP32 lanes per
   SM by compute capability), cuBLAS's measured SGEMM rate, and the measured
   device-to-host bandwidth into pinned memory (the host link).
3. **Maps/s** for ``(8, 12, N, 64)`` float32 with N in 512, 2048, 8192 (a map is one
   ``N x N`` matrix of one input and head): ``attention_weights`` from host inputs to host
   maps, as a user calls it; ``conditions(maps=False)`` (baseline + mean Q/K/V, metrics
   only: the maps never leave the GPU); and the CPU backend's ``attention_weights`` on all
   of this machine's cores. For each: the fraction of the float32 peak (2 N² d FLOP per
   map for ``q·kᵀ``) and of the host link (4 N² bytes per map brought back).
4. ``qkvmean run --model`` on a Llama-3.2-1B-shaped directory (bench/bench_model.py's
   writer: bf16, 16 layers, 2048 wide, 32 heads, 8 KV heads; 4 inputs of 128 tokens) with
   ``--device cuda`` and ``--device cpu``, with and without ``--no-maps``: wall and
   in-process inputs/s, and the two stores compared (maps and metrics within 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

#: FP32 lanes per SM by compute capability (CUDA C Programming Guide, "Arithmetic
#: Instructions"); the peak is lanes x SMs x 2 (FMA) x clock.
FP32_LANES = {(6, 0): 64, (7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 9): 128}


def fp32_lanes(cc):
    return FP32_LANES.get(tuple(cc), 128 if cc[0] >= 9 else 64)


def median_time(fn, reps):
    fn()  # warm: compilation, the memory pools
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def correctness(quick):
    import qkvmean

    rng = np.random.default_rng(0)
    shape = (2, 3, 9, 8) if quick else (3, 4, 257, 64)
    q, k, v = rng.normal(size=(3, *shape)).astype(np.float32)
    lengths = rng.integers(1, shape[2] + 1, size=shape[0])
    worst = {}

    def diff(name, a, b):
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        d = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True) if x is not None)
        worst[name] = max(worst.get(name, 0.0), d)

    for causal in (False, True):
        for lens in (None, lengths):
            kw = dict(lengths=lens, causal=causal)
            f = qkvmean.attention_weights
            diff("attention_weights", f(q, k, **kw, device="cuda"), f(q, k, **kw))
            f = qkvmean.attention
            diff("attention", f(q, k, v, **kw, device="cuda"), f(q, k, v, **kw))
            for target in "qkv":
                for over in ("tokens", "causal"):
                    f = qkvmean.ablate
                    extra = dict(kw, target=target, over=over, heads=[0, 2])
                    diff("ablate", f(q, k, v, **extra, device="cuda"), f(q, k, v, **extra))
            a = qkvmean.conditions(q, k, **kw, device="cuda")
            b = qkvmean.conditions(q, k, **kw)
            for name in a.names:
                diff("conditions maps", a.weights[name], b.weights[name])
            for m in ("entropy", "kl_from_baseline", "top_key_mass"):
                diff("conditions metrics", a.metrics[m], b.metrics[m])
    return worst


def device_facts(quick):
    from numba import cuda

    from qkvmean.engine.backends import cuda as backend

    if backend.SIMULATOR:
        return {"device": backend.describe(), "peak_gflops": None, "sgemm_gflops": None,
                "d2h_gbps": None}  # fmt: skip
    import cupy as cp
    import cupyx

    dev = cuda.get_current_device()
    cc = dev.compute_capability
    sms = dev.MULTIPROCESSOR_COUNT
    clock_khz = dev.CLOCK_RATE
    peak = fp32_lanes(cc) * sms * 2 * clock_khz * 1e3 / 1e9
    n = 4096 if quick else 8192
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.empty_like(a)

    def gemm():
        cp.matmul(a, a, out=c)
        cp.cuda.Device().synchronize()

    sgemm = 2 * n**3 / median_time(gemm, 5) / 1e9
    nbytes = (256 if quick else 2048) * 2**20
    src = cp.empty(nbytes // 4, cp.float32)
    dst = cupyx.empty_pinned(src.shape, src.dtype)

    def d2h():
        src.get(out=dst)

    d2h_gbps = nbytes / median_time(d2h, 5) / 1e9
    return {
        "device": backend.describe(), "sms": sms, "clock_mhz": clock_khz / 1e3,
        "fp32_lanes_per_sm": fp32_lanes(cc), "peak_gflops": peak, "sgemm_gflops": sgemm,
        "d2h_gbps": d2h_gbps,
    }  # fmt: skip


def maps_table(sizes, facts, quick, cpu_limit):
    import qkvmean

    rows = []
    batch, heads, dim = (2, 2, 16) if quick else (8, 12, 64)
    for n in sizes:
        rng = np.random.default_rng(n)
        q, k = rng.normal(size=(2, batch, heads, n, dim)).astype(np.float32)
        n_maps = batch * heads
        reps = 2 if n >= 8192 else 3
        flop = 2 * n * n * dim  # per map, q·kᵀ
        link = 4 * n * n  # bytes per map brought back
        row = {"N": n, "maps": n_maps}
        row["cuda_s"] = median_time(
            lambda q=q, k=k: qkvmean.attention_weights(q, k, device="cuda"), reps
        )
        row["cuda_metrics_only_s"] = median_time(
            lambda q=q, k=k: qkvmean.conditions(q, k, device="cuda", maps=False), reps
        )
        if n <= cpu_limit:
            row["cpu_s"] = median_time(lambda q=q, k=k: qkvmean.attention_weights(q, k), reps)
        for key in ("cuda_s", "cuda_metrics_only_s", "cpu_s"):
            if key not in row:
                continue
            maps = n_maps * (4 if key == "cuda_metrics_only_s" else 1)
            rate = maps / row[key]
            name = key[:-2]
            row[f"{name}_maps_per_s"] = rate
            if facts["peak_gflops"]:
                row[f"{name}_peak_fraction"] = rate * flop / 1e9 / facts["peak_gflops"]
            if facts["d2h_gbps"] and key == "cuda_s":
                row["cuda_link_fraction"] = rate * link / 1e9 / facts["d2h_gbps"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def model_run(tmp: Path, quick):
    """``qkvmean run --model`` on both devices; the stores compared."""
    import h5py

    if quick:
        model, tokens, n_inputs = "synthetic", 8, 2
    else:
        from bench_model import write_llama_1b

        model, tokens, n_inputs = str(write_llama_1b(tmp / "llama-1b")), 128, 4
    from bench_model import run_timed, texts_file

    text = texts_file(tmp / "texts.txt", n_inputs, tokens)
    out = {}
    for device in ("cuda", "cpu"):
        for maps in ("--maps", "--no-maps"):
            store = tmp / f"{device}{maps}.h5"
            cmd = [sys.executable, "-m", "qkvmean", "run", "--model", model, "--text", str(text),
                   "--max-tokens", str(tokens), "--device", device, maps, "-o", str(store),
                   "--overwrite"]  # fmt: skip
            wall, inside = run_timed(cmd, env=dict(os.environ))
            out[f"{device} {maps}"] = {
                "wall_inputs_per_s": n_inputs / wall,
                "in_process_inputs_per_s": n_inputs / inside if inside else None,
            }
            print(json.dumps({f"{device} {maps}": out[f"{device} {maps}"]}), flush=True)
    worst = 0.0
    with h5py.File(tmp / "cuda--maps.h5") as a, h5py.File(tmp / "cpu--maps.h5") as b:
        for group in ("attention", "metrics"):
            for name in a[group]:
                if name in ("top_key_index", "condition"):
                    continue
                x, y = a[group][name][()], b[group][name][()]
                worst = max(worst, float(np.abs(x.astype(np.float64) - y).max()))
    out["max_abs_difference_cuda_vs_cpu"] = worst
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--sizes", default="512,2048,8192", help="sequence lengths N")
    parser.add_argument("--cpu-limit", type=int, default=2048, help="largest N run on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--no-model", action="store_true", help="skip the run --model part")
    args = parser.parse_args(argv)
    sizes = [16, 32] if args.quick else [int(s) for s in args.sizes.split(",")]

    import qkvmean
    from qkvmean import config

    results = {"qkvmean": qkvmean.__version__, "cpu_threads": config.compute_threads()}
    t0 = time.perf_counter()
    results["correctness_max_abs"] = worst = correctness(args.quick)
    print(json.dumps({"correctness_max_abs": worst}), flush=True)
    if max(worst.values()) >= 2e-5:
        raise SystemExit(f"CUDA and CPU disagree: {worst}")
    results["device"] = facts = device_facts(args.quick)
    print(json.dumps(facts), flush=True)
    results["maps"] = maps_table(sizes, facts, args.quick, args.cpu_limit)
    if not args.no_model:
        with tempfile.TemporaryDirectory() as tmp:
            results["run_model"] = model_run(Path(tmp), args.quick)
    results["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    report(results)


def report(results):
    facts = results["device"]
    print(f"\ndevice: {facts['device']}")
    if facts.get("peak_gflops"):
        print(
            f"float32 peak {facts['peak_gflops'] / 1e3:.1f} TFLOP/s; cuBLAS SGEMM "
            f"{facts['sgemm_gflops'] / 1e3:.1f} TFLOP/s; device-to-host "
            f"{facts['d2h_gbps']:.1f} GB/s (pinned)"
        )
    print("\n| N | maps | CUDA maps/s (to host) | of peak | of link | CUDA metrics only maps/s "
          "| of peak | CPU maps/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")

    def pct(row, key):
        return f"{100 * row[key]:.1f} %" if key in row else "–"

    for row in results["maps"]:
        cpu = f"{row['cpu_maps_per_s']:.0f}" if "cpu_maps_per_s" in row else "–"
        print(
            f"| {row['N']} | {row['maps']} | {row['cuda_maps_per_s']:.0f} | "
            f"{pct(row, 'cuda_peak_fraction')} | {pct(row, 'cuda_link_fraction')} | "
            f"{row['cuda_metrics_only_maps_per_s']:.0f} | "
            f"{pct(row, 'cuda_metrics_only_peak_fraction')} | {cpu} |"
        )
    if "run_model" in results:
        print("\nrun --model (inputs/s, wall / in process):")
        for key, value in results["run_model"].items():
            if isinstance(value, dict):
                inside = value["in_process_inputs_per_s"]
                print(f"  {key:16s} {value['wall_inputs_per_s']:.3f} / {inside or 0:.3f}")
        print(f"  max |cuda - cpu| {results['run_model']['max_abs_difference_cuda_vs_cpu']:.2e}")


if __name__ == "__main__":
    main()
