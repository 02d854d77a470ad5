import os

# The CUDA kernels are tested under Numba's CUDA simulator unless the environment says
# otherwise (NUMBA_ENABLE_CUDASIM=0 on a machine with a GPU); Numba reads this when it is
# first imported, so it is set before anything imports it.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import cudasim  # noqa: F401  (the simulator's shared arrays under a lock: tests/cudasim.py)
from hypothesis import HealthCheck, settings

# Kernels compile on first use (seconds), so no per-example deadline; the "ci" profile
# keeps the suite within a few minutes on 2 cores and draws the same examples on every
# run (a result on one machine is the result on the next); "thorough" draws new ones.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Under NUMBA_DISABLE_JIT=1 (the coverage run of the README's development section: the
# kernels run as plain Python, so that their lines count) these tests would take far too
# long; they are skipped in that mode only. Test id (without parameters) -> why.
NO_JIT = {
    "tests/test_cache.py::test_two_processes_compile_into_one_cache_then_a_third_reuses_it": (
        "it tests Numba's cache of compiled kernels, and nothing is compiled"
    ),
    "tests/test_engine_reference.py::test_acceptance_accuracy_on_typical_inputs": (
        "maps of 2 x 4 x 6 heads x 300 tokens x 64 dims in both dtypes, sixteen times: hours "
        "uncompiled (the property tests run the same kernels on small shapes)"
    ),
    "tests/test_distributed.py::test_a_killed_worker_loses_nothing": (
        "120 inputs of 4 layers x 8 heads x 48 tokens, twice: tens of minutes uncompiled "
        "(the smaller cluster tests run the same code)"
    ),
    "tests/test_distributed.py::test_a_worker_killed_in_the_first_pass_loses_nothing": (
        "240 inputs of 4 layers x 8 heads x 48 tokens, twice: tens of minutes uncompiled "
        "(the smaller cluster tests run the same code)"
    ),
}


def pytest_collection_modifyitems(config, items):
    if os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0"):
        return
    import pytest

    for item in items:
        why = NO_JIT.get(item.nodeid.split("[")[0])
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=f"NUMBA_DISABLE_JIT=1: {why}"))
