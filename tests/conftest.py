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
