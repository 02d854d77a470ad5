"""Tunables and process-wide Numba settings, in one place so tests can patch them.

Importing this module asks Numba for a thread-safe threading layer (``tbb``, a declared
dependency on x86-64, else ``omp``) unless ``NUMBA_THREADING_LAYER`` is set: qkvmean's
kernels run inside threaded schedulers (the store writer, Dask workers, user thread
pools), and Numba's ``workqueue`` layer aborts the process when two threads launch
parallel kernels at once. If no thread-safe layer loads, kernel launches are serialised
with a process-wide lock instead.

The ``tbb`` wheel puts ``libtbb.so.12`` in the environment's ``lib/``, which is on the
loader's path in a conda environment but not in a venv, where Numba then silently falls
back to ``omp`` — whose spinning threads fight OpenBLAS's for the cores. Before Numba's
threads start, :func:`_preload_tbb` loads the wheel's library by its absolute path (found
from the wheel's own file list), so that Numba's ``tbbpool`` finds it already loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading

import numba

#: Query rows per parallel task in the attention kernel; 0 (the default) chooses: a whole
#: (input, head) pair per task when there are enough pairs to share out, else blocks of
#: :data:`qkvmean.engine.kernels.attention.BLOCK` rows. Tests set small values to exercise
#: blocks (below 32 rows they also split the column sums).
ROW_BLOCK = 0

#: Use the algebraic shortcuts for mean-K (uniform rows) and mean-Q (one shared row).
#: Tests switch this off to compare them with the general path.
FAST_PATHS = True

#: Fast-math flags for the kernels: everything except ``nnan``/``ninf``, so that NaN
#: and infinity semantics survive.
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

_SAFE_LAYERS = ("tbb", "omp")

if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "threadsafe"

_lock = threading.RLock()  # re-entrant: a spread input holds it around kernels that take it
_state = {"serialise": None, "tbb": None}


_TBB_NAMES = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}


def _tbb_library():
    """The path of the ``tbb`` wheel's runtime library, or None."""
    import importlib.metadata

    name = _TBB_NAMES.get(sys.platform)
    try:
        files = importlib.metadata.files("tbb") or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name:
            path = f.locate()
            if os.path.exists(path):
                return os.path.realpath(path)
    return None


def _preload_tbb() -> str | None:
    """Load the ``tbb`` wheel's library globally, so that Numba's ``tbbpool`` links to it
    wherever the wheel put it; returns its path, or None when there is none to load."""
    path = _tbb_library()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return path


# At import, before anything can start Numba's threads (``numba.get_num_threads()`` does).
if numba.config.THREADING_LAYER in ("threadsafe", "tbb", "default"):
    _state["tbb"] = _preload_tbb()


def _start_threads() -> bool:
    """Start Numba's pool once; return True when launches must be serialised."""
    from numba.np.ufunc.parallel import _launch_threads

    try:
        _launch_threads()
    except ValueError:  # "No threading layer could be loaded": fall back to workqueue
        numba.config.THREADING_LAYER = "workqueue"
        _launch_threads()
    return numba.threading_layer() not in _SAFE_LAYERS


def kernel_guard():
    """Context manager held around every parallel kernel launch.

    A no-op with a thread-safe layer; a process-wide lock with ``workqueue``.
    """
    if _state["serialise"] is None:
        with _lock:
            if _state["serialise"] is None:
                _state["serialise"] = _start_threads()
    return _lock if _state["serialise"] else contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Compute threads: one pool for the model path's tasks and the store's compression, BLAS
# at one thread inside it, so the process never runs more busy threads than it has cores.
# --------------------------------------------------------------------------------------

#: Compute threads (``--threads``); None: :func:`available_cores`.
THREADS = None


def _cgroup_cpus() -> float:
    """The CPU quota of this process's cgroup (``cpu.max``), in cores; inf if none."""
    for path, parse in (
        ("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", lambda t: [t, None]),
    ):
        try:
            with open(path) as f:
                quota, period = parse(f.read().strip())
            if period is None:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    period = f.read().strip()
        except (OSError, ValueError):
            continue
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            return int(quota) / int(period)
    return float("inf")


@functools.lru_cache(maxsize=1)
def _machine_cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota < cores:
        cores = max(1, int(quota + 0.5))
    return cores


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, less where a cgroup quota says
    so (a container's ``--cpus``), at most ``NUMBA_NUM_THREADS``."""
    return max(1, min(_machine_cores(), numba.config.NUMBA_NUM_THREADS))


def compute_threads() -> int:
    return THREADS or available_cores()


_pool_lock = threading.Lock()
_pool = {"executor": None, "size": 0, "controller": None}


def task_pool():
    """The process's pool of :func:`compute_threads` worker threads."""
    from concurrent.futures import ThreadPoolExecutor

    size = compute_threads()
    with _pool_lock:
        if _pool["size"] != size:
            if _pool["executor"] is not None:
                _pool["executor"].shutdown(wait=False)
            _pool["executor"] = ThreadPoolExecutor(size, thread_name_prefix="qkvmean")
            _pool["size"] = size
        return _pool["executor"]


def _blas_controller():
    with _pool_lock:
        if _pool["controller"] is None:
            from threadpoolctl import ThreadpoolController

            _pool["controller"] = ThreadpoolController()
        return _pool["controller"]


_hold_lock = threading.Lock()
_hold = {"depth": 0, "saved": []}


def _setter(library):
    """``library``'s own call that sets its thread count for the whole process.

    OpenBLAS's is called directly: threadpoolctl (3.8) lets only the first thread that
    limits OpenBLAS change it and silently ignores the others, so a hold taken on a user's
    thread or a Dask worker's would not hold. The other libraries go through threadpoolctl.
    """
    if library.internal_api == "openblas" and getattr(library, "threading_layer", "") != "openmp":
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_", "_64"):
                name = f"{prefix}openblas_set_num_threads{suffix}"
                function = getattr(library.dynlib, name, None)
                if function is not None:
                    function.argtypes, function.restype = [ctypes.c_int], None
                    return function
    return library.set_num_threads


@contextlib.contextmanager
def blas_single_thread():
    """BLAS libraries at one thread while any caller is inside; back as they were once the
    last one leaves.

    Reference-counted under a lock, so callers on several threads (user threads calling the
    raw API at once, a spread input inside a batch, Dask's worker threads) may enter and
    leave in any order: the first one in sets every BLAS to one thread and the last one out
    restores what the first one saw. A threadpoolctl limit per caller restores what *it*
    saw, so two overlapping callers leaving in the order they came put BLAS back to many
    threads while the second still runs kernels, each Numba thread then starting BLAS
    threads of its own (the cores oversubscribed, a product's bits depending on the thread
    count).
    """
    with _hold_lock:
        if _hold["depth"] == 0:
            controllers = _blas_controller().lib_controllers
            libraries = [lib for lib in controllers if lib.user_api == "blas"]
            _hold["saved"] = [(_setter(lib), lib.get_num_threads()) for lib in libraries]
            for set_threads, _ in _hold["saved"]:
                set_threads(1)
        _hold["depth"] += 1
    try:
        yield
    finally:
        with _hold_lock:
            _hold["depth"] -= 1
            if _hold["depth"] == 0:
                for set_threads, threads in _hold.pop("saved"):
                    if threads is not None:
                        set_threads(threads)
                _hold["saved"] = []


def run_tasks(tasks):
    """Run the callables ``tasks`` on :func:`task_pool`, BLAS at one thread; raise the
    first exception once all have finished.

    One BLAS thread per task always, even when there are fewer tasks than threads: a
    task's bits then never depend on how many tasks ran beside it (a batch's size, the
    thread count), only on its own input.
    """
    if not tasks:
        return
    with blas_single_thread():
        if len(tasks) == 1 or compute_threads() == 1:
            for task in tasks:
                task()
            return
        futures = [task_pool().submit(task) for task in tasks]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def _numpy_blas(pools, strict=False):
    """The BLAS among ``pools`` (threadpoolctl's) that numpy's products call.

    Other libraries load their own (SciPy's OpenBLAS, when something imports SciPy); which
    of those a process happens to have loaded says nothing about how a store was computed,
    and would make two runs of the same job record different environments. numpy's is the
    one in numpy's wheel (``numpy.libs``/``numpy/.libs``), else the one of the version numpy
    was built against; when neither can be told, all of them (``strict``: none).
    """
    import numpy as np

    here = os.path.dirname(os.path.abspath(np.__file__))
    wheel = (here + os.sep, here + ".libs" + os.sep)
    own = [p for p in pools if os.path.abspath(p.get("filepath") or "").startswith(wheel)]
    if own:
        return own
    try:
        built = np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("version")
    except Exception:  # an old or unusual numpy build: no config to read
        built = None
    same = [p for p in pools if built and p.get("version") == built]
    return same or ([] if strict else pools)


def describe_threads() -> dict:
    """Which threads compute: Numba's layer and threads, the task pool, BLAS."""
    kernel_guard()
    from threadpoolctl import threadpool_info

    blas = [
        {key: pool.get(key) for key in ("internal_api", "version", "architecture", "num_threads")}
        for pool in _numpy_blas([p for p in threadpool_info() if p.get("user_api") == "blas"])
    ]
    return {
        "threading_layer": numba.threading_layer(),
        "tbb_library": _state["tbb"],
        "numba_threads": numba.get_num_threads(),
        "compute_threads": compute_threads(),
        "available_cores": available_cores(),
        "blas": blas,
    }
