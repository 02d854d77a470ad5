"""A fix for Numba's CUDA simulator, installed by ``conftest.py`` for the tests.

The simulator's ``cuda.shared.array`` looks the block's array up and creates it when it
is missing, without a lock, so two threads of a block that get there together could each
create their own "shared" array (seen: a wrong row about once in a thousand launches of
the softmax kernel). :func:`install` puts the first allocation under a lock. Nothing
happens unless the simulator is on (``NUMBA_ENABLE_CUDASIM=1``) and numba-cuda is
installed.
"""

from __future__ import annotations

import sys
import threading
import traceback

import numba
import numpy as np


def install() -> bool:
    """Patch the simulator's shared arrays; False when there is no simulator to patch."""
    if not numba.config.ENABLE_CUDASIM:
        return False
    try:
        import numba_cuda  # noqa: F401  (the CUDA target the backend uses)
        from numba.cuda.simulator.kernelapi import FakeCUDAShared
    except ImportError:
        return False
    from numba.np import numpy_support

    if getattr(FakeCUDAShared.array, "locked", False):
        return True
    lock = threading.Lock()
    unlocked = FakeCUDAShared.array

    def shared_array(self, shape, dtype, alignment=None):
        """The simulator's ``cuda.shared.array``, its first allocation under a lock; the
        array is found by the caller's file and line, as the simulator does."""
        if shape == 0 or alignment is not None:  # dynamic shared memory: no lookup
            return unlocked(self, shape, dtype, alignment)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[-1][0:2])
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                if isinstance(dtype, numba.types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    shared_array.locked = True
    FakeCUDAShared.array = shared_array
    return True


install()
