"""Tunables and process-wide Numba settings, in one place so tests can patch them.

Importing this module asks Numba for a thread-safe threading layer (``tbb``, a declared
dependency on x86-64, else ``omp``) unless ``NUMBA_THREADING_LAYER`` is set: qkvmean's
kernels run inside threaded schedulers (the store writer, Dask workers, user thread
pools), and Numba's ``workqueue`` layer aborts the process when two threads launch
parallel kernels at once. If no thread-safe layer loads, kernel launches are serialised
with a process-wide lock instead.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numba

#: Query rows per parallel task in the attention kernel; 0 (the default) chooses: a whole
#: (input, head) pair per task when there are enough pairs to share out (each task then
#: transposes its keys once), else 32 rows. Tests set small values to exercise blocks.
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

_lock = threading.Lock()
_state = {"serialise": None}


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
