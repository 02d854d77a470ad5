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
    w, o, _ = cuda_kernels.attention(q, k, v, lengths, group, modes, causal, 0.5, with_output)
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
    w, _, _ = cuda_kernels.attention(q, k, k, lengths, group, modes, causal, 1.0, False)
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


@settings(max_examples=12, deadline=None)
@given(SHAPES, st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_metrics_match_the_reference(shape, causal, uniform, seed):
    """Entropy, KL from the baseline, top-key mass and index of a condition (mean-K in
    the uniform mode, or other keys) against the reference's metrics of the same maps."""
    batch, group, seq, dim = shape
    rng = np.random.default_rng(seed)
    q, k, k2 = (rng.normal(size=(3, batch * group, seq, dim)) * 2).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch).astype(np.int64)
    per_input = np.repeat(lengths, group)
    general = np.zeros(group, np.int8)
    w0, _, rows0 = cuda_kernels.attention(
        q, k, k, lengths, group, general, causal, 1.0, False, True
    )
    modes = np.full(group, MODE_UNIFORM if uniform else 0, np.int8)
    _, _, rows1 = cuda_kernels.attention(
        q, k2, k2, lengths, group, modes, causal, 1.0, False, True, base=(w0, rows0[0])
    )
    got = cuda_kernels.reduce_metrics(rows1, lengths, group)
    keys = R.mean_substitute(k2, lengths=per_input) if uniform else k2
    log_a = R.log_attention_weights(q, keys, lengths=per_input, causal=causal, scale=1.0)
    log_p = R.log_attention_weights(q, k, lengths=per_input, causal=causal, scale=1.0)
    want = R.metrics(log_a[:, None], log_p[:, None], per_input)  # pairs as inputs
    names = ("entropy", "kl_from_baseline", "top_key_mass")
    for name, value in zip(names, got[:3], strict=False):
        np.testing.assert_allclose(value, want[name][:, 0], atol=2e-5, rtol=1e-5, err_msg=name)
    mass = want["top_key_mass"][:, 0]
    index_ok = (got[3] == want["top_key_index"][:, 0]) | np.isclose(mass, got[2], atol=1e-6)
    assert index_ok.all()
