"""Vectorisable elementary functions for the kernels.

Numba's ``exp`` compiles to a call into the C library, one element at a time, which keeps
LLVM from vectorising the softmax loop. :func:`exp` below is pure arithmetic (range
reduction, a polynomial, and the exponent written straight into the float's bits), so a
loop of them becomes AVX code. float32 arguments get the float32 algorithm (Cephes
``expf``: relative error below 5e-7 on the softmax range); float64 arguments keep the C
library's ``exp`` (the float64 path is for accuracy, not speed).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

#: Below this, exp(x) is under float32's smallest normal number: the result is 0.
_EXP32_MIN = np.float32(-87.33654)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)
_P = tuple(
    np.float32(c)
    for c in (
        1.9875691500e-4,
        1.3981999507e-3,
        8.3334519073e-3,
        4.1665795894e-2,
        1.6666665459e-1,
        5.0000001201e-1,
    )
)


@intrinsic
def _int32_bits_to_float32(typingctx, x):
    """Reinterpret an int32's bits as a float32 (LLVM ``bitcast``, vectorisable)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


def exp(x):  # pragma: no cover - replaced by the overload inside compiled code
    """``exp(x)`` for a float32 or float64 scalar, inside Numba-compiled code."""
    return math.exp(x)


@overload(exp)
def _exp_overload(x):
    if x == types.float32:
        p0, p1, p2, p3, p4, p5 = _P

        def exp32(x):
            below = x < _EXP32_MIN
            x = max(x, _EXP32_MIN)
            n = np.floor(x * _LOG2E + np.float32(0.5))
            r = (x - n * _LN2_HI) - n * _LN2_LO
            p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
            p = p * r * r + r + np.float32(1.0)
            scale = _int32_bits_to_float32(np.int32(n) * np.int32(1 << 23) + np.int32(127 << 23))
            result = p * scale
            if below:
                result = np.float32(0.0)
            return result

        return exp32
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


@njit(cache=True, fastmath=True)
def exp_array(x, out):
    """``out[i] = exp(x[i])`` with the kernels' :func:`exp` (for tests)."""
    for i in range(x.size):
        out[i] = exp(x[i])
