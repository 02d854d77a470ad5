"""The speed benchmark: kernels against numpy and PyTorch, and the machine's own limits.

    python bench/bench_speed.py                      # everything; writes bench/speed.json
    python bench/bench_speed.py --seq 512 --quick    # one shape, fewer repeats
    python bench/bench_speed.py --install-torch      # pip-install PyTorch (CPU) first

All timings of one shape are interleaved (each repeat runs every contender once, in the
same order) and the median is reported, so drift on a shared machine hits all of them
alike; ratios are what to read. Inputs: float32 q, k, v of shape (batch, 12, seq, 64) with
batch 8 up to seq 512 and 2 beyond (issue 25's (8, 12, 512, 64) and (2, 12, 2048, 64)),
every token valid, no causal mask (the plain attention maps).

Reported:
- per seq: ``attention_weights`` and ``ablate`` for q, k and v (maps only), the numpy
  reference (``qkvmean.engine.reference``, float64 inside), PyTorch's
  ``softmax(q @ k^T * scale)`` on the CPU, a plain float32 numpy version of the same, and
  the time to fill a fresh output array once; speed-ups and the max error against the
  float64 reference;
- the machine: float32 matrix-multiply rate (a large numpy matmul) and write bandwidth
  (filling a fresh large array), with the fraction of each the baseline kernel reaches;
  per shape, the bound (the ``q kᵀ`` products at that matmul rate plus filling the fresh
  output once, as measured) and the fraction of it ``attention_weights`` reaches;
- the model path's attention (``cpu.attention_one``, one thread, 12 heads of 64, the
  baseline and a condition with its KL, metrics on) per map entry at 512 and 2048 tokens,
  and the part of it that is not the two products (the softmax and metrics);
- 1 thread against all threads: the raw kernel, and ``qkvmean run --model minilm`` on one
  input of 512 tokens (``--threads 1`` against ``--threads N``, whole processes, with and
  without ``--no-maps``: one input has to be split across the cores to use them);
- ``qkvmean run --qkv`` and ``qkvmean run --model minilm`` end to end (inputs/s, MB/s of
  maps, share of wall time outside the kernels);
- CLI start-up: cold (empty Numba cache: compilation included) and warm, on a tiny input.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numba
import numpy as np

import qkvmean
from qkvmean.engine import reference as ref

HERE = Path(__file__).resolve().parent


def _median_ms(samples):
    return 1e3 * statistics.median(samples)


#: Pause between two timed calls, so that the spinning worker threads of the previous one
#: (OpenMP in PyTorch, OpenBLAS in numpy, TBB in Numba) are idle before the next starts.
PAUSE = 0.25


def interleaved(cases, repeat):
    """``{name: median ms}``: every case once per repeat, in turn, after one warm-up.

    The order rotates from one repeat to the next: on this machine a fresh large array
    right after another library freed its own (PyTorch's outputs at seq 2048) took up to
    four times as long to fill, so whichever case came next would always pay for it.
    """
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(PAUSE)
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: _median_ms(t) for name, t in times.items()}


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(numba.get_num_threads())
    return torch


def numpy_softmax(q, k, scale):
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= np.float32(scale)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def batch_of(seq):
    return 8 if seq <= 512 else 2


def bench_shape(seq, repeat, torch, with_reference, matmul_gflops):
    batch = batch_of(seq)
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, batch, 12, seq, 64)).astype(np.float32)
    scale = 1 / 8
    out_shape = (batch, 12, seq, seq)
    cases = {
        "attention_weights": lambda: qkvmean.attention_weights(q, k),
        "mean-Q maps": lambda: qkvmean.ablate(q, k, None, target="q"),
        "mean-K maps": lambda: qkvmean.ablate(q, k, None, target="k"),
        "mean-V (maps + output)": lambda: qkvmean.ablate(q, k, v, target="v"),
        "fill output once": lambda: np.empty(out_shape, np.float32).fill(0.5),
        "numpy float32": lambda: numpy_softmax(q, k, scale),
    }
    if with_reference:
        cases["numpy reference"] = lambda: ref.attention_weights(q, k)
    if torch is not None:
        tq, tk = torch.from_numpy(q), torch.from_numpy(k)

        def torch_softmax():
            with torch.no_grad():
                return torch.softmax(tq @ tk.transpose(-1, -2) * scale, dim=-1)

        cases["pytorch"] = torch_softmax
    ms = interleaved(cases, repeat)
    # accuracy against the float64 reference, on one input (the reference is slow)
    w = qkvmean.attention_weights(q[:1], k[:1])
    err = float(np.abs(w - ref.attention_weights(q[:1], k[:1])).max())
    wk = qkvmean.ablate(q[:1], k[:1], v[:1], target="k")[0]
    err_k = float(np.abs(wk - ref.ablate(q[:1], k[:1], v[:1], target="k")[0]).max())
    flops = 2.0 * batch * 12 * seq * seq * 64
    bound = flops / matmul_gflops / 1e6 + ms["fill output once"]
    return {
        "seq": seq,
        "shape": [batch, 12, seq, 64],
        "ms": ms,
        "bound_ms": bound,
        "of_bound": bound / ms["attention_weights"],
        "max_error": err,
        "max_error_mean_k": err_k,
        "gflops_baseline": flops / ms["attention_weights"] / 1e6,
        "output_gb_per_s": 4.0 * np.prod(out_shape) / ms["attention_weights"] / 1e6,
    }


def machine_limits():
    a = np.random.default_rng(1).normal(size=(2048, 2048)).astype(np.float32)
    t = interleaved({"matmul": lambda: a @ a}, 5)["matmul"]
    big = (8, 12, 1024, 1024)
    fill = interleaved({"fill": lambda: np.empty(big, np.float32).fill(0.5)}, 5)["fill"]
    warm = np.empty(big, np.float32)
    fill_warm = interleaved({"fill": lambda: warm.fill(0.5)}, 5)["fill"]
    nbytes = 4.0 * np.prod(big)
    return {
        "matmul_gflops": 2 * 2048**3 / t / 1e6,
        "write_gb_per_s_fresh": nbytes / fill / 1e6,
        "write_gb_per_s_warm": nbytes / fill_warm / 1e6,
    }


def model_attention(seq, repeat):
    """ns per map entry of the model path's attention, one thread: ``(total, products)``
    for the baseline and one condition with its KL (metrics on, maps kept)."""
    from qkvmean import config
    from qkvmean.engine.backends import cpu
    from qkvmean.engine.kernels.attention import plain

    heads, dim = 12, 64
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(3, heads, seq, dim)).astype(np.float32)
    q1 = q * np.float32(1.001)
    modes = np.zeros(heads, np.int8)
    scratch = cpu.InputScratch(heads, seq, seq, 2, True)
    w0, w1 = np.zeros((2, heads, seq, seq), np.float32)
    o = np.empty((heads, seq, dim), np.float32)
    reduced = [np.empty(heads) for _ in range(4)]

    lg = plain()  # every key, no soft-cap or ALiBi: what issue 25 measured

    def both():
        cpu.attention_one(q, k, v, modes, False, 0.125, lg, 0, w0, o, scratch, True, reduced)
        cpu.attention_one(q1, k, v, modes, False, 0.125, lg, 1, w1, o, scratch, True, reduced)

    def products():  # the same two products per condition, whole heads at once
        for _ in range(2):
            np.matmul(q, k.transpose(0, 2, 1), out=w0)
            np.matmul(w0, v, out=o)

    with config.blas_single_thread():
        ms = interleaved({"attention": both, "products": products}, repeat)
    entries = 2 * heads * seq * seq
    total, prod = (1e6 * ms[name] / entries for name in ("attention", "products"))
    return {"seq": seq, "ns_per_entry": total, "products_ns_per_entry": prod,
            "softmax_metrics_ns_per_entry": total - prod}  # fmt: skip


def threads_scaling(seq, repeat):
    q, k = np.random.default_rng(2).normal(size=(2, batch_of(seq), 12, seq, 64)).astype(np.float32)
    total = numba.get_num_threads()
    out = {}
    for n in (1, total):
        numba.set_num_threads(n)
        out[n] = interleaved({"w": lambda: qkvmean.attention_weights(q, k)}, repeat)["w"]
    numba.set_num_threads(total)
    return {
        "seq": seq,
        "ms_1_thread": out[1],
        "threads": total,
        "ms_all_threads": out[total],
        "speedup": out[1] / out[total],
    }


def one_long_input(tmp: Path, rounds: int):
    """``qkvmean run --model minilm`` on one text of 512 tokens at one thread and at all of
    them, interleaved, medians: whole processes (start-up and loading included, as a user
    runs it) and in process (``local.run``'s own seconds, the model loaded once)."""
    from qkvmean import config
    from qkvmean.run import local, sources
    from qkvmean.run.options import Options

    text = tmp / "long.txt"
    text.write_text("Mean keys make every query look at all the words in the same way. " * 60)
    total = numba.get_num_threads()
    wall, inside = {}, {}
    for r in range(rounds):
        for extra in ([], ["--no-maps"]):
            for threads in (1, total):
                key = f"{threads} threads {' '.join(extra) or 'defaults'}"
                out = tmp / f"long-{r}-{threads}-{len(extra)}.h5"
                args = ["run", "--model", "minilm", "--text", text, "--max-tokens", 512,
                        "--threads", threads, "-q", "--out", out, *extra]  # fmt: skip
                wall.setdefault(key, []).append(_run(args, stderr=subprocess.DEVNULL))
                opts = Options(maps=not extra)
                opts.check()
                source = sources.ModelSource(
                    "minilm", [text.read_text()], opts, max_tokens=512, texts_label=str(text)
                )
                config.THREADS = threads
                numba.set_num_threads(threads)
                try:
                    summary = local.run(source, tmp / f"in-{out.name}", opts, show_progress=False)
                finally:
                    config.THREADS = None
                    numba.set_num_threads(total)
                inside.setdefault(key, []).append(summary.seconds)
    wall = {k: statistics.median(v) for k, v in wall.items()}
    inside = {k: statistics.median(v) for k, v in inside.items()}

    def speedups(t):
        return {
            mode: t[f"1 threads {mode}"] / t[f"{total} threads {mode}"]
            for mode in ("defaults", "--no-maps")
        }

    return {
        "threads": total,
        "rounds": rounds,
        "wall_seconds": wall,
        "in_process_seconds": inside,
        "speedup_wall": speedups(wall),
        "speedup_in_process": speedups(inside),
    }


def _run(args, env=None, stderr=None):
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "qkvmean", *map(str, args)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    return time.perf_counter() - t0


def make_qkv_input(path: Path, n_inputs: int):
    """Raw Q/K/V for ``run --qkv``: n inputs of 12 heads x 128 tokens x 64, chunks of 8."""
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        for name in "qkv":
            f.create_dataset(
                name,
                data=rng.normal(size=(n_inputs, 12, 128, 64)).astype("f4"),
                chunks=(8, 12, 128, 64),
            )
    return path


def run_qkv(src: Path, out: Path, compression="deflate"):
    """``qkvmean run --qkv`` as the CLI runs it; the summary as a dict."""
    from qkvmean.run import local, sources
    from qkvmean.run.options import Options

    opts = Options(compression=compression)
    opts.check()
    summary = local.run(sources.QKVSource(str(src), opts), out, opts, show_progress=False)
    return _summary(summary, f"12 heads x 128 tokens, 4 conditions, {opts.compression}")


def end_to_end(tmp: Path, n_inputs: int):
    from qkvmean.io.texts import read_texts
    from qkvmean.run import local, sources
    from qkvmean.run.options import Options

    out = {"qkv": run_qkv(make_qkv_input(tmp / "qkv.h5", n_inputs), tmp / "qkv-store.h5")}
    texts = tmp / "texts.txt"
    sentence = "Mean keys make every query look at all the words in the same way. "
    texts.write_text("\n".join(f"{i}. " + sentence * 8 for i in range(64)))
    opts = Options()
    source = sources.ModelSource(
        "minilm", read_texts(texts), opts, max_tokens=128, texts_label=str(texts)
    )
    summary = local.run(source, tmp / "model-store.h5", opts, show_progress=False)
    out["model minilm"] = _summary(
        summary, "64 texts x 128 tokens, 6 layers x 12 heads, 4 conditions"
    )
    return out


def _summary(s, what):
    return {
        "what": what,
        "inputs": s.n_inputs,
        "seconds": s.seconds,
        "inputs_per_s": s.computed / s.seconds,
        "mb_maps_per_s": s.map_bytes / 1e6 / s.seconds,
        "kernel_seconds": s.kernel_seconds,
        "share_outside_kernels": 1 - s.kernel_seconds / s.seconds,
    }


def startup(tmp: Path):
    src = tmp / "tiny.h5"
    q = np.random.default_rng(4).normal(size=(2, 2, 4, 8)).astype(np.float32)
    with h5py.File(src, "w") as f:
        for name in "qkv":
            f[name] = q
    cache = tmp / "numba-cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    cold = _run(["run", "--qkv", src, "--out", tmp / "c1.h5", "-q"], env)
    warm = [_run(["run", "--qkv", src, "--out", tmp / f"w{i}.h5", "-q"], env) for i in range(3)]
    return {"cold_s": cold, "warm_s": statistics.median(warm)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repeats, no end-to-end runs")
    parser.add_argument(
        "--install-torch",
        action="store_true",
        help="pip install torch (CPU build) for the comparison, if missing",
    )
    parser.add_argument("--json", default=str(HERE / "speed.json"))
    args = parser.parse_args(argv)
    repeat = 3 if args.quick else args.repeat
    if args.install_torch and _torch() is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "torch==2.13.0"], check=False)
    torch = _torch()
    info = {
        "qkvmean": qkvmean.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "cpus": os.cpu_count(),
        "threads": numba.get_num_threads(),
        "machine": platform.machine(),
    }
    print(" ".join(f"{k} {v}" for k, v in info.items()))
    report = {"info": info, "limits": machine_limits(), "shapes": []}
    lim = report["limits"]
    print(
        f"machine: float32 matmul {lim['matmul_gflops']:.0f} GFLOP/s; write "
        f"{lim['write_gb_per_s_fresh']:.1f} GB/s into fresh memory, "
        f"{lim['write_gb_per_s_warm']:.1f} GB/s warm"
    )
    for seq in args.seq:
        r = bench_shape(
            seq,
            repeat,
            torch,
            with_reference=seq <= 512,
            matmul_gflops=lim["matmul_gflops"],
        )
        report["shapes"].append(r)
        ms = r["ms"]
        base = ms["attention_weights"]
        print(f"\nseq {seq}: {tuple(r['shape'])} float32, median of interleaved runs")
        print(f"  {'':<20}{'ms':>10}{'speed-up of attention_weights':>32}")
        for name, t in ms.items():
            print(f"  {name:<20}{t:>10.1f}{t / base:>31.2f}x")
        print(
            f"  baseline maps: {r['gflops_baseline']:.0f} GFLOP/s "
            f"({r['gflops_baseline'] / lim['matmul_gflops']:.0%} of the matmul rate), "
            f"{r['output_gb_per_s']:.1f} GB/s written "
            f"({r['output_gb_per_s'] / lim['write_gb_per_s_fresh']:.0%} of fresh-memory "
            f"bandwidth); max error {r['max_error']:.2g} (mean-K {r['max_error_mean_k']:.2g})"
        )
        print(
            f"  bound (q kT at {lim['matmul_gflops']:.0f} GFLOP/s + one fresh output write): "
            f"{r['bound_ms']:.1f} ms; attention_weights at {r['of_bound']:.0%} of it; "
            f"{ms['numpy float32'] / base:.2f}x numpy float32"
            + (f", {ms['pytorch'] / base:.2f}x PyTorch" if "pytorch" in ms else "")
        )
        for name in ("mean-K maps", "mean-Q maps"):
            print(
                f"  {name}: {ms[name] / ms['fill output once']:.2f}x the time to fill the "
                "output once"
            )
    report["model_attention"] = [model_attention(seq, repeat) for seq in (512, 2048)]
    for m in report["model_attention"]:
        print(
            f"\nmodel path attention, {m['seq']} tokens, one thread: {m['ns_per_entry']:.2f} ns "
            f"per map entry, of which the products {m['products_ns_per_entry']:.2f} and the "
            f"softmax and metrics {m['softmax_metrics_ns_per_entry']:.2f}"
        )
    report["threads"] = threads_scaling(512, repeat)
    t = report["threads"]
    print(
        f"\nthreads (seq 512): 1 thread {t['ms_1_thread']:.1f} ms, "
        f"{t['threads']} threads {t['ms_all_threads']:.1f} ms: "
        f"{t['speedup']:.2f}x"
    )
    with tempfile.TemporaryDirectory() as tmp:
        report["one_input"] = one_long_input(Path(tmp), 3)
    o = report["one_input"]
    for how in ("in_process", "wall"):
        print(
            f"one input of 512 tokens (run --model minilm, {how.replace('_', ' ')}): "
            f"{o['threads']} threads against 1: "
            + ", ".join(f"{m} {x:.2f}x" for m, x in o[f"speedup_{how}"].items())
            + " ("
            + ", ".join(f"{k} {v:.2f} s" for k, v in o[f"{how}_seconds"].items())
            + ")"
        )
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            report["end_to_end"] = end_to_end(Path(tmp), 2000)
            report["startup"] = startup(Path(tmp))
        for name, e in report["end_to_end"].items():
            print(
                f"run --{name}: {e['inputs_per_s']:.1f} inputs/s, {e['mb_maps_per_s']:.0f} MB/s "
                f"of maps, {e['share_outside_kernels']:.0%} of wall time outside kernels "
                f"({e['what']})"
            )
        s = report["startup"]
        print(
            f"CLI on a tiny input: cold (compiling) {s['cold_s']:.1f} s, warm {s['warm_s']:.1f} s"
        )
    Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
