"""The kernels' matrix products: numpy's CBLAS called from compiled code, and the compiled
loop that stands in where numpy's BLAS cannot be found."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import cases

import qkvmean
from qkvmean import config
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


def _lp64_library():
    """scipy-openblas32's library (a test extra on Linux): a CBLAS with 32-bit integers."""
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None:
        assert not sys.platform.startswith("linux"), "the test extra scipy-openblas32"
        pytest.skip("scipy-openblas32 has wheels for Linux only")
    import scipy_openblas32

    return os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so")


@settings(max_examples=25)
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_a_cblas_with_32_bit_integers_is_bound_right(data, dtype):
    """A CBLAS whose integers are 32-bit (LP64) binds through :data:`blas.SYMBOLS` and
    gives numpy's products: on this ABI it reads the 64-bit integers it is given."""
    function, name = blas.from_library(_lp64_library(), dtype)
    assert function is not None and name.startswith("scipy_cblas_"), name
    a, b = _operands(data, dtype)
    c = np.full((a.shape[0], b.shape[0]), np.nan, dtype)
    blas.call(function, blas.TRANS, a, b, c, 0.5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, 0.5 * (a.astype(float) @ b.T.astype(float)), atol=tol)


def test_a_blas_not_told_apart_as_numpys_is_never_bound(monkeypatch):
    """Where the loaded BLAS cannot be told to be numpy's (another directory, another
    version: SciPy's, PyTorch's MKL), the kernels take the stand-in loop, not its gemm."""
    import threadpoolctl

    other = {
        "user_api": "blas", "internal_api": "openblas", "version": "0.0.1",
        "filepath": "/elsewhere/scipy.libs/libscipy_openblas.so",
    }  # fmt: skip
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: [other])
    assert blas._library_paths() == []
    assert blas._numpy_gemm(np.dtype(np.float32)) == (
        None, "numpy's BLAS not identified among the loaded ones",
    )  # fmt: skip


def _blas_threads():
    """The thread counts of numpy's BLAS (others a test loaded, scipy-openblas32's, aside)."""
    from threadpoolctl import threadpool_info

    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return {p["num_threads"] for p in config._numpy_blas(pools, strict=True)}


def test_the_one_thread_hold_lasts_while_any_caller_is_inside():
    """Two callers on two threads enter and leave crossed (the first in leaves first):
    BLAS stays at one thread until the last one leaves, then is back as it was."""
    import threading

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        assert _blas_threads() == {2}
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with config.blas_single_thread():
                first_in.set()
                second_in.wait(10)
            first_out.set()

        def second():
            first_in.wait(10)
            with config.blas_single_thread():
                second_in.set()
                first_out.wait(10)
                seen["after the first left"] = _blas_threads()
            seen["after both left"] = _blas_threads()

        threads = [threading.Thread(target=f) for f in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert seen == {"after the first left": {1}, "after both left": {2}}
