"""The kernels' matrix products: numpy's CBLAS called from compiled code, and the compiled
loop that stands in where numpy's BLAS cannot be found."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from support import cases

import qkvmean
from qkvmean.engine import reference as ref
from qkvmean.engine.kernels import blas

DTYPES = (np.float32, np.float64)


def _operands(data, dtype):
    m = data.draw(st.integers(1, 9), label="m")
    n = data.draw(st.integers(1, 9), label="n")
    k = data.draw(st.integers(0, 9), label="k")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return rng.normal(size=(m, k)).astype(dtype), rng.normal(size=(n, k)).astype(dtype)


@settings(max_examples=40)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), which=st.sampled_from(["numpy", "loop"]))
def test_both_products_match_numpy(data, dtype, which):
    """``c = alpha a bᵀ`` and ``e = c b``, the two products the kernels use, on any shapes
    (an empty inner dimension included: the products are then 0)."""
    a, b = _operands(data, dtype)
    gemm = blas.gemm(dtype) if which == "numpy" else blas.fallback(dtype)
    c = np.full((a.shape[0], b.shape[0]), np.nan, dtype)
    blas.call(gemm, blas.TRANS, a, b, c, 0.5)
    e = np.full(a.shape, np.nan, dtype)
    blas.call(gemm, blas.NO_TRANS, c, b, e, 1.0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, 0.5 * (a.astype(float) @ b.T.astype(float)), atol=tol)
    np.testing.assert_allclose(e, c.astype(float) @ b.astype(float), atol=10 * tol)


def test_numpys_own_blas_is_found_here():
    """The kernels call numpy's own BLAS (with numpy's wheel, the scipy-openblas symbols
    of its OpenBLAS), not the stand-in loop."""
    name = blas.describe()
    assert not name.startswith("compiled loops"), name
    assert any(name.startswith(p.format("s")) for p, _ in blas.SYMBOLS), name


@contextmanager
def loop_products():
    """The kernels on the stand-in loop, as where numpy's BLAS cannot be found."""
    saved = dict(blas._chosen)
    blas._chosen.update({np.dtype(d): (blas.fallback(d), "compiled loops") for d in DTYPES})
    try:
        yield
    finally:
        blas._chosen.clear()
        blas._chosen.update(saved)


@settings(max_examples=15)
@given(case=cases(dtypes=DTYPES, head_axis=True, max_seq=40))
def test_attention_on_the_stand_in_loop_matches_the_reference(case):
    """Without numpy's BLAS the same kernels give the same maps and outputs."""
    with loop_products():
        w, o = qkvmean.attention(case.q, case.k, case.v, **case.kw)
    ew, eo = ref.attention(case.q, case.k, case.v, **case.kw)
    tol = 2e-5 if case.q.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(w, ew, atol=tol)
    np.testing.assert_allclose(o, eo, atol=tol * max(1.0, float(np.abs(case.v).max())))


def test_one_token_views_with_a_zero_stride_are_read_right():
    """A one-token axis may have any stride (0 in a broadcast view, which
    ``np.ascontiguousarray`` returns as it is): the products' leading dimensions are at
    least a row long, as BLAS requires, so the output is ``v`` and no BLAS error."""
    rng = np.random.default_rng(1)
    base, vals = rng.normal(size=(2, 3, 8)).astype(np.float32)
    q, v = base[:, None, :], vals[:, None, :]  # (batch 3, 1 token, dim 8)
    assert q.strides[1] == 0
    w, o = qkvmean.attention(q, q, v)
    np.testing.assert_array_equal(w, np.ones((3, 1, 1), np.float32))
    np.testing.assert_allclose(o, v, rtol=1e-6)
