"""How non-trivial the shared hypothesis strategies are, drawn as the ci profile draws.

    python tests/strategy_stats.py [N]

For each shared strategy (``support.cases`` with the arguments the tests give it), draws
``N`` (default 60) examples with ``derandomize=True, max_examples=N`` (the ci profile of
``conftest.py``) and counts how many are *non-trivial*: every axis of ``q`` and ``v``
non-empty and at least one input with two or more valid tokens (so that a softmax is
taken over two keys or more). Not a test: a measurement to run when changing a strategy.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from hypothesis import HealthCheck, given, settings
from support import cases

# the arguments each test module gives cases()
STRATEGIES = {
    "cases()": dict(),
    "cases(head_axis=True)": dict(head_axis=True),
    "cases(head_axis=True, min_heads=2)": dict(head_axis=True, min_heads=2),
    "cases(head_axis=True, min_heads=3)": dict(head_axis=True, min_heads=3),
    "cases(dtypes=(float64,))": dict(dtypes=(np.float64,)),
    "cases(dtypes=(f32, f64), head_axis=True, max_seq=70)": dict(
        dtypes=(np.float32, np.float64), head_axis=True, max_seq=70
    ),
}


def non_trivial(case, with_v=True) -> bool:
    shapes_ok = case.q.size > 0 and (case.v.size > 0 or not with_v)
    return bool(shapes_ok and len(case.lengths) and int(np.max(case.lengths)) >= 2)


def draws(kwargs, n, key):
    """(non-trivial, non-trivial ignoring v, drawn) of ``n`` derandomized draws of a test
    whose digest is extended by ``key``."""
    seen = []

    @settings(
        max_examples=n,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(**kwargs))
    def record(case):
        seen.append((non_trivial(case), non_trivial(case, with_v=False)))

    record.hypothesis.inner_test._hypothesis_internal_add_digest = key
    record()
    return sum(a for a, _ in seen), sum(b for _, b in seen), len(seen)


def measure(kwargs, n=60, runs=10):
    """Derandomized draws depend on the test function's digest, so each run is a
    differently-keyed test, as each test module's function is: the spread over runs is
    what the tests see."""
    return [draws(kwargs, n, str(run).encode()) for run in range(runs)]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    print(f"non-trivial examples of {n} per run, {runs} runs: min..max (mean %); ignoring v")
    for name, kwargs in STRATEGIES.items():
        got = measure(kwargs, n, runs)
        good = [g for g, _, _ in got]
        good_q = [g for _, g, _ in got]
        total = sum(t for _, _, t in got)
        print(
            f"{name:55s} {min(good):2d}..{max(good):2d} ({100 * sum(good) / total:3.0f} %);"
            f" {min(good_q):2d}..{max(good_q):2d} ({100 * sum(good_q) / total:3.0f} %)"
        )
