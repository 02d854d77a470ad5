"""The CUDA kernels under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set by
tests/conftest.py unless the environment says otherwise) against the numpy reference.
Small shapes: the simulator runs every GPU thread as a Python thread."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvmean.engine import cuda as cuda_kernels  # numba-cuda: in the test extra
from qkvmean.engine import reference as R
from qkvmean.engine.modes import MODE_UNIFORM

SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 6), st.integers(1, 4))


@settings(max_examples=12, deadline=None)
@given(SHAPES, st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_attention_matches_the_reference(shape, causal, with_output, seed):
    batch, group, seq, dim = shape
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(3, batch * group, seq, dim)).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch).astype(np.int64)
    modes = np.zeros(group, np.int8)
    w, o = cuda_kernels.attention(q, k, v, lengths, group, modes, causal, 0.5, with_output)
    per_input = np.repeat(lengths, group)
    want_w, want_o = R.attention(q, k, v, lengths=per_input, causal=causal, scale=0.5)
    np.testing.assert_allclose(w, want_w, atol=2e-6, rtol=0)
    if with_output:
        np.testing.assert_allclose(o, want_o, atol=5e-6, rtol=0)
    else:
        assert o is None


@settings(max_examples=8, deadline=None)
@given(SHAPES, st.booleans(), st.integers(0, 2**32 - 1))
def test_uniform_mode_is_mean_k(shape, causal, seed):
    batch, group, seq, dim = shape
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, batch * group, seq, dim)).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch).astype(np.int64)
    modes = np.full(group, MODE_UNIFORM, np.int8)
    w, _ = cuda_kernels.attention(q, k, k, lengths, group, modes, causal, 1.0, False)
    per_input = np.repeat(lengths, group)
    mean_k = R.mean_substitute(k, lengths=per_input)
    want = R.attention_weights(q, mean_k, lengths=per_input, causal=causal, scale=1.0)
    np.testing.assert_allclose(w, want, atol=2e-6, rtol=0)


@settings(max_examples=12, deadline=None)
@given(SHAPES, st.booleans(), st.integers(0, 2**32 - 1))
def test_mean_substitute_matches_the_reference(shape, prefix, seed):
    batch, group, seq, dim = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch * group, seq, dim)).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch).astype(np.int64)
    select = rng.random(group) < 0.7
    got = cuda_kernels.mean_substitute(x, lengths, group, select, prefix)
    per_input = np.repeat(lengths, group)
    want = R.mean_substitute(x, over="causal" if prefix else "tokens", lengths=per_input)
    chosen = np.tile(select, batch)
    np.testing.assert_allclose(got[chosen], want[chosen], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got[~chosen], x[~chosen])
