"""Kernels launched from several threads at once (as a threaded scheduler would)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


# "default" lets qkvmean pick a thread-safe layer; "workqueue" forces the unsafe one, which
# qkvmean must then serialise with its lock.
@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_four_threads_at_once_match_one_call_each(layer):
    # In a subprocess: an unsafe threading layer aborts the interpreter, which must show
    # up as a failed test rather than take pytest down with it.
    script = textwrap.dedent(
        """
        import threading
        import numpy as np
        import numba
        import qkvmean

        rng = np.random.default_rng(0)
        jobs = []
        for t in range(4):
            q, k, v = rng.normal(size=(3, 4, 6, 48, 16)).astype(np.float32)
            lengths = rng.integers(0, 49, size=4)
            jobs.append((q, k, v, lengths, "qkv"[t % 3], bool(t % 2)))

        def run(job):
            q, k, v, lengths, target, causal = job
            w, o = qkvmean.attention(q, k, v, lengths=lengths, causal=causal)
            wa, oa = qkvmean.ablate(q, k, v, target=target, lengths=lengths, causal=causal)
            m = qkvmean.mean_substitute(q, lengths=lengths, over="causal")
            return w, o, wa, oa, m

        expected = [run(job) for job in jobs]
        barrier = threading.Barrier(4)
        results = [None] * 4
        def worker(i):
            barrier.wait()
            for _ in range(5):
                results[i] = run(jobs[i])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, want in zip(results, expected):
            for a, b in zip(got, want):
                assert np.array_equal(a, b)
        print("layer", numba.threading_layer())
        """
    )
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    used = proc.stdout.split()[-1]
    if layer == "default":
        assert used in ("tbb", "omp")
    else:
        assert used == layer


def _fresh(script, **env_changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(env_changes)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _tbb_installed():
    import importlib.metadata

    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_a_fresh_process_runs_on_the_thread_safe_layer_it_was_given():
    """In a venv the tbb wheel's library is not on the loader's path; qkvmean loads it, so
    that Numba runs on TBB (not OpenMP, whose spinning threads fight BLAS's)."""
    proc = _fresh(
        """
        import numpy as np, numba, qkvmean
        from qkvmean import config
        q = np.random.default_rng(0).normal(size=(4, 3, 16, 8)).astype(np.float32)
        qkvmean.attention_weights(q, q)
        print(numba.threading_layer(), config._state["tbb"])
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    layer, library = proc.stdout.split()
    if _tbb_installed():  # a declared dependency on x86-64
        assert layer == "tbb"
        # (a venv with --system-site-packages may use the base Python's tbb wheel)
        prefixes = tuple(os.path.realpath(p) for p in (sys.prefix, sys.base_prefix))
        assert library.startswith(prefixes) or "site-packages" in library
    else:
        assert layer == "omp"


def test_version_verbose_says_which_layer_and_threads():
    proc = subprocess.run(
        [sys.executable, "-m", "qkvmean", "--version", "--verbose"],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")},
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    layer = "tbb" if _tbb_installed() else "omp"
    assert f"Numba: {layer} layer" in lines["threads"]
    assert "compute threads" in lines["threads"] and "BLAS" in lines
    assert "the kernels call " in lines["BLAS"] and "compiled loops" not in lines["BLAS"]
    # no simulator here (NUMBA_ variables removed): a GPU, or why CUDA is not usable
    cuda = lines["cuda"].split(None, 1)[1]
    assert cuda.endswith("(--device cuda)") or cuda.startswith("not usable: ")


def test_threads_follow_the_cores_this_process_may_use():
    """Started on one core (as ``taskset -c 0`` does): one compute thread, one Numba
    thread."""
    one = {sorted(os.sched_getaffinity(0))[0]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import numba; from qkvmean import config; config.kernel_guard(); "
            "print(config.compute_threads(), numba.get_num_threads())",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, one),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1"]
