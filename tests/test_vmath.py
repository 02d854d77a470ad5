"""The kernels' vectorised float32 functions against float64 math."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qkvmean.engine.kernels import activations, finite, vmath

f32 = st.floats(-12, 12, width=32, allow_nan=False)


def _gelu64(x, tanh_approx):
    """GELU in float64, written without cancellation (the reference's ``1 + erf`` form
    rounds the far negative tail to 0)."""
    x = np.asarray(x, np.float64)
    if tanh_approx:
        u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
        with np.errstate(over="ignore"):  # exp(-2u) = inf: the weight is exactly 0
            return x / (1 + np.exp(-2 * u))
    return np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.ravel()]).reshape(x.shape)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=f32), st.booleans())
def test_gelu_is_accurate_everywhere(x, tanh_approx):
    got = np.empty_like(x)
    vmath.gelu_array(x, tanh_approx, got)
    want = _gelu64(x, tanh_approx)
    assert np.all(np.abs(got - want) <= 6e-7 * np.maximum(1.0, np.abs(x)))
    big = np.abs(want) > 0.01
    assert np.all(np.abs(got - want)[big] <= 1e-6 * np.abs(want[big]))
    tail = (np.abs(want) > 1e-30) & ~big  # the tail keeps its relative accuracy too
    assert np.all(np.abs(got - want)[tail] <= 2e-5 * np.abs(want[tail]))


def test_gelu_at_the_edges():
    x = np.array([0.0, -0.0, 1e-30, -1e-30, 12, -12, 30, -30, 1e4, -1e4], np.float32)
    for tanh_approx in (False, True):
        got = np.empty_like(x)
        vmath.gelu_array(x, tanh_approx, got)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, _gelu64(x, tanh_approx), rtol=2e-5, atol=1e-37)


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 70),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_bias_gelu_kernels_apply_gelu_to_x_plus_bias(rows, cols, tanh_approx, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(rows, cols)) * 4).astype(np.float32)
    bias = rng.normal(size=cols).astype(np.float32)
    want = np.empty_like(x)
    vmath.gelu_array((x + bias).ravel(), tanh_approx, want.reshape(-1))
    serial, parallel = x.copy(), x.copy()
    activations.bias_activation_serial(serial, bias, int(tanh_approx), False, serial)
    activations.bias_gelu(parallel, bias, tanh_approx)
    # vectorised and scalar code may round x + bias and the polynomial differently (by
    # 5.6e-7 relative in erf's tail, x + bias = -2.8; by 2e-6 relative, 4e-14 absolute,
    # where GELU itself is ~2e-8: the kernels promise 1e-6 relative where |gelu| > 0.01)
    np.testing.assert_allclose(serial, want, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(parallel, serial)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(1, 200), elements=st.floats(-87, 0, width=32)))
def test_exp_is_accurate_on_the_softmax_range(x):
    got = np.empty_like(x)
    vmath.exp_array(x, got)
    want = np.exp(x.astype(np.float64))
    assert np.all(np.abs(got - want) <= 5e-7 * want + 1e-38)


@settings(max_examples=60)
@given(
    data=st.data(),
    dtype=st.sampled_from([np.float32, np.float64]),
    size=st.integers(1, 3 * finite.SCAN_BLOCK),
    parallel=st.booleans(),
)
def test_finite_scan_finds_the_first_bad_value_and_the_largest_magnitude(
    data, dtype, size, parallel
):
    """The one-pass scan (fmax of |x| and a sum of x * 0) against numpy, with NaN and
    infinities of either sign at drawn places, in any block of the parallel scan."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = (rng.normal(size=size) * data.draw(st.sampled_from([1e-30, 1.0, 1e30]))).astype(dtype)
    bad = data.draw(st.lists(st.integers(0, size - 1), max_size=3, unique=True), label="bad")
    for i in bad:
        x[i] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    index, top = finite.scan_finite(x, parallel=parallel)
    if bad:
        assert index == min(bad) and top == math.inf
    else:
        assert index == -1 and top == float(np.abs(x).max())
