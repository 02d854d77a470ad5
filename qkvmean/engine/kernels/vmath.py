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
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from .. import jit

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


@intrinsic
def fmax(typingctx, a, b):
    """``max(a, b)`` of two floats of one type as LLVM's ``maxnum``, which the vectoriser
    turns into ``vmaxps`` reductions. Numba's ``max`` (a compare and a select) stays
    scalar in a reduction: a row's max took 0.36 ns an entry, this 0.03. (The operands are
    never NaN here: ``maxnum`` would return the other one.)"""
    if not (isinstance(a, types.Float) and a == b):
        return None
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(signature.return_type)
        name = "llvm.maxnum.f32" if a == types.float32 else "llvm.maxnum.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty]), name)
        return builder.call(fn, args, fastmath=("fast",))

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


@njit(**jit.HOT)
def exp_array(x, out):
    """``out[i] = exp(x[i])`` with the kernels' :func:`exp` (for tests)."""
    for i in range(x.size):
        out[i] = exp(x[i])


# GELU, exact and tanh-approximated, in float32 arithmetic on top of :func:`exp` (so that a
# loop of them vectorises; a C-library ``erf`` or ``tanh`` call per element does not), and
# compiled inside their caller (``register_jitable``: a call per element would not). Both
# are written so that no subtraction cancels: against float64 on [-12, 12], absolute error
# below 6e-7, relative error below 1e-6 where |gelu| > 0.01 and below 2e-5 in the far
# negative tail (values under 1e-10, where ``0.5 x (1 + erf)`` in float64 gives 0).
_ERFC = tuple(
    np.float32(c)
    for c in (
        0.17087277,
        -0.82215223,
        1.48851587,
        -1.13520398,
        0.27886807,
        -0.18628806,
        0.09678418,
        0.37409196,
        1.00002368,
        -1.26551223,
    )
)
_F32_HALF = np.float32(0.5)
_F32_ONE = np.float32(1.0)
_F32_TWO = np.float32(2.0)
_SQRT_HALF = np.float32(0.7071067811865476)
_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_GELU_CUBIC = np.float32(0.044715)


@register_jitable
def erfc_pos(z):
    """``erfc(z)`` for float32 ``z >= 0``: the Chebyshev fit of Numerical Recipes
    (``erfcc``, fractional error below 1.2e-7 everywhere)."""
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9 = _ERFC
    t = _F32_ONE / (_F32_ONE + _F32_HALF * z)
    p = (((((((c0 * t + c1) * t + c2) * t + c3) * t + c4) * t + c5) * t + c6) * t + c7) * t + c8
    return t * exp(-z * z + (p * t + c9))


@register_jitable
def gelu_erf(x):
    """Exact GELU ``x Φ(x) = x erfc(-x / √2) / 2`` of a float32 (BERT's ``gelu``)."""
    c = erfc_pos(abs(x) * _SQRT_HALF)
    phi2 = c if x < 0 else _F32_TWO - c  # erfc(-z) = 2 - erfc(z), no cancellation: c <= 1
    return _F32_HALF * x * phi2


@register_jitable
def gelu_tanh(x):
    """GPT-2's ``gelu_new``: ``x (1 + tanh(u)) / 2``, ``u = √(2/π) (x + 0.044715 x³)``,
    from ``1 + tanh(u) = 2 / (1 + e^{-2u})`` with the exponent always negative."""
    u = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    e = exp(-_F32_TWO * abs(u))
    one_plus_tanh = _F32_TWO / (_F32_ONE + e) if u >= 0 else _F32_TWO * e / (_F32_ONE + e)
    return _F32_HALF * x * one_plus_tanh


@register_jitable
def silu(x):
    """``x sigmoid(x)`` of a float32 (SwiGLU's gate), from ``e^{-|x|}`` (never overflows)."""
    e = exp(-abs(x))
    sigmoid = _F32_ONE / (_F32_ONE + e) if x >= 0 else e / (_F32_ONE + e)
    return x * sigmoid


@njit(**jit.VEC)
def gelu_array(x, tanh_approx, out):
    """``out[i] = gelu(x[i])`` with the kernels' functions (for tests)."""
    for i in range(x.size):
        out[i] = gelu_tanh(x[i]) if tanh_approx else gelu_erf(x[i])


@njit(**jit.VEC)
def silu_array(x, out):
    """``out[i] = silu(x[i])`` with the kernels' function (for tests)."""
    for i in range(x.size):
        out[i] = silu(x[i])
