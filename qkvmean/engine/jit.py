"""Every Numba compilation option set of the package, in one place, each with its reason.

Every ``@njit`` in qkvmean takes one of these (``@njit(**jit.SERIAL)``,
``@njit(parallel=True, **jit.HOT)``); ``cache=True`` throughout, so that a command starts
from the on-disk cache instead of compiling. The CUDA kernels (``@cuda.jit``) take no
options.
"""

from __future__ import annotations

from .. import config

#: The fast-math flags of every kernel that may see NaN or infinity: everything except
#: ``nnan``/``ninf`` (STUMPY's practice), so that NaN and infinity semantics survive.
FASTMATH = frozenset(config.FASTMATH)

#: The kernels that are not the attention's (means, norms, head layout, metric
#: reductions): :data:`FASTMATH`.
SERIAL = dict(cache=True, fastmath=set(FASTMATH), nogil=True)

#: The attention kernels see only validated, finite values (no NaN, no infinity ever
#: enters or arises: masked entries are skipped, not set to -inf), so they may use every
#: fast-math flag; that lets LLVM vectorise the max and sum reductions of the softmax.
#: (One policy for all, :data:`FASTMATH` here too, was tried for issue 23: it changes the
#: bits of the outputs, of float64 maps and of every model map, so the two sets stay.)
HOT = dict(cache=True, fastmath=True, nogil=True)

#: The vectorised elementwise kernels (GELU, SwiGLU): :data:`HOT` with numpy's error
#: model, so that a division is a plain division (Python's raises on zero, and that
#: branch keeps LLVM from vectorising the loop; the divisors there are never zero).
VEC = dict(HOT, error_model="numpy")

#: Byte codecs (the store's shuffle of a chunk): integer work, no floating point, so no
#: fast-math flags; ``nogil`` since the store compresses chunks on several threads.
CODEC = dict(cache=True, nogil=True)
