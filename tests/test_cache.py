"""Numba's on-disk cache, written by several processes at once, then reused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import qkvmean
    from qkvmean.engine import reference as ref
    q, k = np.random.default_rng(0).normal(size=(2, 2, 3, 40, 8)).astype(np.float32)
    w = qkvmean.attention_weights(q, k, lengths=[40, 17], causal=True)
    expected = ref.attention_weights(q, k, lengths=[40, 17], causal=True)
    assert np.abs(w - expected).max() < 1e-6
    print("ok")
    """
)


def test_two_processes_compile_into_one_cache_then_a_third_reuses_it(tmp_path):
    """Two writers at once (one per core of the 2-core CI machine: a third only queued
    behind them and cost the suite 20 s), then a reader that finds everything."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.strip() == "ok", err[-2000:]
    index = list(tmp_path.rglob("*.nbi"))
    assert any("attention_kernel" in p.name for p in index), index
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    # the third process found everything it needed: it wrote nothing new
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes
