"""Matrix products inside the kernels: numpy's own CBLAS ``gemm``, called through ctypes.

The attention kernels compute each block of query rows' scores ``scale q kᵀ`` and outputs
``A v`` with one ``gemm`` call each and run the softmax and the metrics on the block while
it is in cache (:mod:`qkvmean.engine.kernels.attention`). The ``gemm`` is the one numpy
itself calls (the OpenBLAS of its wheel, or the BLAS it was built against): found through
threadpoolctl, bound with ctypes and handed to the kernels as an argument (a first-class
function: the compiled code does not embed the library's address, so it caches).

Where numpy's BLAS cannot be told apart from other loaded ones, has no known ``gemm`` or
answers wrongly, :func:`gemm` returns a plain compiled loop with the same signature instead
(correct, a few times slower); the CLI's ``--version --verbose`` says which one runs
(:func:`describe`).

Only what the kernels use is supported: row-major operands, ``A`` not transposed, ``B``
transposed or not, strides (``lda``, ``ldb``, ``ldc``) in elements. Callers hold BLAS at
one thread while the kernels run on their own threads
(:func:`qkvmean.config.blas_single_thread`).
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading

import numpy as np
from numba import carray, cfunc, types

#: CBLAS's enumerations.
ROW_MAJOR = 101
NO_TRANS = 111
TRANS = 112

#: Where a C ``int`` argument is read from the low half of a 64-bit one (in a register, or
#: an 8-byte stack slot, little-endian): the System V and Windows x64 conventions and Linux's
#: AArch64 one. There a CBLAS whose integers are 32-bit (LP64) and one whose are 64-bit
#: (ILP64) both read 64-bit integers right, so a ``cblas_?gemm`` without a suffix, which may
#: be either (MKL's ILP64 layer, Debian's openblas64 in some builds), is bound with 64-bit
#: integers. Elsewhere (Apple's arm64 packs stack arguments) it is bound with C ``int``.
_WIDE_INT_ABI = platform.machine().lower() in ("x86_64", "amd64", "aarch64") and (
    sys.platform.startswith("linux") or sys.platform == "win32"
)
_PLAIN = ctypes.c_int64 if _WIDE_INT_ABI else ctypes.c_int

#: Symbol names of ``{s,d}gemm`` in the CBLAS builds numpy ships with or links against,
#: with the width of their integers, in the order they are looked for: numpy's wheels
#: (scipy-openblas64), scipy-openblas32, OpenBLAS built with ILP64 suffixes, oneMKL's
#: ILP64 names, and the plain CBLAS of OpenBLAS, MKL and BLIS.
SYMBOLS = (
    ("scipy_cblas_{}gemm64_", ctypes.c_int64),
    ("scipy_cblas_{}gemm", _PLAIN),
    ("cblas_{}gemm64_", ctypes.c_int64),
    ("cblas_{}gemm_64", ctypes.c_int64),
    ("cblas_{}gemm", _PLAIN),
)

_CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
_LETTER = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


def _signature(real, integer):
    """``(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)``."""
    enum, ptr = ctypes.c_int, ctypes.c_void_p
    return [enum, enum, enum, integer, integer, integer, real, ptr, integer, ptr, integer]


def _bind(function, real, integer):
    function.argtypes = [*_signature(real, integer), real, ctypes.c_void_p, integer]
    function.restype = None
    return function


def _fallback_gemm(nb_real):
    """The same CBLAS signature (64-bit integers) as a compiled loop: ``C = alpha A op(B)
    + beta C`` for the cases the kernels use."""
    sig = types.void(
        types.intc, types.intc, types.intc, types.int64, types.int64, types.int64, nb_real,
        types.voidptr, types.int64, types.voidptr, types.int64, nb_real, types.voidptr,
        types.int64,
    )  # fmt: skip

    def gemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        if m == 0 or n == 0:
            return
        A = carray(a, ((m - 1) * lda + k,), nb_real)
        C = carray(c, ((m - 1) * ldc + n,), nb_real)
        if transb == TRANS:  # B is (n, k): C[i, j] = alpha A[i] . B[j]
            B = carray(b, ((n - 1) * ldb + k,), nb_real)
            for i in range(m):
                for j in range(n):
                    acc = alpha - alpha  # 0 in the operands' type
                    for p in range(k):
                        acc += A[i * lda + p] * B[j * ldb + p]
                    C[i * ldc + j] = alpha * acc + (beta * C[i * ldc + j] if beta != 0 else 0)
        else:  # B is (k, n): rows of C accumulate rows of B
            B = carray(b, ((k - 1) * ldb + n,), nb_real) if k else carray(b, (0,), nb_real)
            for i in range(m):
                for j in range(n):
                    C[i * ldc + j] = beta * C[i * ldc + j] if beta != 0 else 0
                for p in range(k):
                    x = alpha * A[i * lda + p]
                    for j in range(n):
                        C[i * ldc + j] += x * B[p * ldb + j]

    return cfunc(sig, cache=True)(gemm)


_lock = threading.Lock()
_chosen: dict = {}
_kept: list = []


def _library_paths():
    """The files of the BLAS that numpy itself calls: only one told apart positively (in
    numpy's wheel, or of the version numpy was built against), never another library's
    that happens to be loaded (SciPy's, PyTorch's MKL), whose bits and threads are not
    numpy's."""
    from threadpoolctl import threadpool_info

    from ... import config

    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return [p["filepath"] for p in config._numpy_blas(pools, strict=True) if p.get("filepath")]


def from_library(path, dtype):
    """The first of :data:`SYMBOLS` in the library at ``path`` that answers a small product
    right, as a bound ctypes function, and its name; or ``(None, None)``."""
    dtype = np.dtype(dtype)
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None, None
    for pattern, integer in SYMBOLS:
        name = pattern.format(_LETTER[dtype])
        function = getattr(library, name, None)
        if function is not None:
            bound = _bind(function, _CTYPES[dtype], integer)
            if _answers_right(bound, dtype):
                return bound, f"{name} ({path.rsplit('/', 1)[-1]})"
    return None, None


def _numpy_gemm(dtype):
    """numpy's BLAS ``gemm`` for ``dtype`` as a bound ctypes function, and its name; or
    ``(None, why)``."""
    paths = _library_paths()
    if not paths:
        return None, "numpy's BLAS not identified among the loaded ones"
    for path in paths:
        function, name = from_library(path, dtype)
        if function is not None:
            return function, name
    return None, "no CBLAS gemm found in numpy's BLAS"


def _answers_right(function, dtype) -> bool:
    """One small product of each kind the kernels use, against numpy's."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5)).astype(dtype)
    b = rng.normal(size=(4, 5)).astype(dtype)
    c = np.zeros((3, 4), dtype)
    e = np.zeros((3, 5), dtype)
    call(function, TRANS, a, b, c, 2.0)
    call(function, NO_TRANS, c, b, e, 1.0)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    return bool(
        np.allclose(c, 2.0 * a @ b.T, rtol=tol, atol=tol)
        and np.allclose(e, c @ b, rtol=tol, atol=tol)
    )


def call(function, transb, a, b, c, alpha):
    """``c = alpha a op(b)`` from Python, on 2-d C-contiguous arrays (for tests)."""
    m, k = a.shape
    n = c.shape[1]
    real = _CTYPES[a.dtype]
    function(
        ROW_MAJOR, NO_TRANS, transb, m, n, k, real(alpha), a.ctypes.data, a.shape[1],
        b.ctypes.data, b.shape[1], real(0.0), c.ctypes.data, c.shape[1],
    )  # fmt: skip


def fallback(dtype):
    """The compiled loop's ctypes function for ``dtype``."""
    nb_real = types.float32 if np.dtype(dtype) == np.float32 else types.float64
    compiled = _fallback_gemm(nb_real)
    _kept.append(compiled)  # the CFunc owns the code its ctypes address points into
    return compiled.ctypes


def gemm(dtype):
    """The ``gemm`` the kernels call for ``dtype`` (float32 or float64)."""
    dtype = np.dtype(dtype)
    with _lock:
        if dtype not in _chosen:
            function, name = _numpy_gemm(dtype)
            if function is None:
                function, name = fallback(dtype), f"compiled loops ({name})"
            _chosen[dtype] = (function, name)
        return _chosen[dtype][0]


def describe() -> str:
    """Which ``gemm`` the kernels call, for ``--version --verbose``."""
    gemm(np.float32)
    return _chosen[np.dtype(np.float32)][1]
