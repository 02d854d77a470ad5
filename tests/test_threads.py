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
