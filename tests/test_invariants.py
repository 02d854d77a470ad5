"""Exact invariants of SPEC section 3, and the fast paths against the general path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import assert_within, cases, patched, unit_roundoff, weight_tolerance

import qkvmean
from qkvmean.engine import reference as ref


def _valid_rows(case):
    """(b, n) for each input, to walk the valid region."""
    return list(enumerate(int(n) for n in case.lengths))


@given(cases(head_axis=True), st.booleans())
def test_mean_k_over_tokens_gives_exactly_uniform_rows(case, fast):
    with patched(FAST_PATHS=fast, ROW_BLOCK=case.row_block):
        w, _ = qkvmean.ablate(case.q, case.k, case.v, target="k", **case.kw)
    one = w.dtype.type(1.0)
    for b, n in _valid_rows(case):
        for i in range(n):
            allowed = min(n, i + 1) if case.causal else n
            row = w[b, ..., i, :]
            assert np.all(row[..., :allowed] == one / w.dtype.type(allowed))
            assert np.all(row[..., allowed:] == 0.0)
        assert np.all(w[b, ..., n:, :] == 0.0)


@given(cases(head_axis=True), st.booleans())
def test_mean_q_over_tokens_without_causal_mask_gives_identical_rows(case, fast):
    kw = dict(case.kw, causal=False)
    with patched(FAST_PATHS=fast, ROW_BLOCK=case.row_block):
        w, _ = qkvmean.ablate(case.q, case.k, case.v, target="q", **kw)
    for b, n in _valid_rows(case):
        rows = w[b, ..., :n, :]
        assert np.array_equal(rows, np.broadcast_to(rows[..., :1, :], rows.shape))


@given(cases(head_axis=True), st.sampled_from(["tokens", "causal", "dataset"]))
def test_mean_v_leaves_weights_unchanged_and_outputs_the_mean(case, over):
    w, o = qkvmean.ablate(case.q, case.k, case.v, target="v", over=over, **case.kw)
    w0, _ = qkvmean.attention(case.q, case.k, case.v, **case.kw)
    np.testing.assert_array_equal(w, w0)
    if over == "tokens" and case.v.size:
        # every valid output row is the mean of v (the weights of a row sum to one)
        vbar = ref.mean_substitute(case.v, lengths=case.lengths)
        tol = 2 * (case.q.shape[-2] + 4) * unit_roundoff(o.dtype) * np.abs(case.v).max()
        for b, n in _valid_rows(case):
            assert_within(o[b, ..., :n, :], vbar[b, ..., :n, :], tol, "mean-V output")


@given(
    cases(head_axis=True, min_heads=2),
    st.sampled_from(["q", "k", "v"]),
    st.sampled_from(["tokens", "causal", "dataset"]),
    st.lists(st.integers(0, 1), max_size=2),
)
def test_fast_paths_equal_the_general_path(case, target, over, heads):
    """The shortcuts give the general path's weights bit for bit, and its outputs."""
    kw = dict(case.kw, target=target, over=over, heads=heads)
    with patched(ROW_BLOCK=case.row_block):
        with patched(FAST_PATHS=True):
            w_fast, o_fast = qkvmean.ablate(case.q, case.k, case.v, **kw)
        with patched(FAST_PATHS=False):
            w_slow, o_slow = qkvmean.ablate(case.q, case.k, case.v, **kw)
    np.testing.assert_array_equal(w_fast, w_slow)
    np.testing.assert_array_equal(o_fast, o_slow)


@given(cases(head_axis=True), st.sampled_from(["q", "k", "v"]))
def test_mean_substitution_over_tokens_is_idempotent(case, target):
    x = case.q if target != "v" else case.v
    once = qkvmean.mean_substitute(x, lengths=case.lengths)
    twice = qkvmean.mean_substitute(once, lengths=case.lengths)
    if once.dtype == np.float32:
        np.testing.assert_array_equal(twice, once)  # n equal float32 values sum exactly in f64
    else:
        tol = (case.q.shape[-2] + 2) * unit_roundoff(np.float64) * np.abs(once).max(initial=0)
        assert_within(twice, once, tol, "mean of means")
    args = {"q": case.q, "k": case.k, "v": case.v}
    args[target] = once
    w1, o1 = qkvmean.ablate(case.q, case.k, case.v, target=target, **case.kw)
    w2, o2 = qkvmean.ablate(args["q"], args["k"], args["v"], target=target, **case.kw)
    if once.dtype == np.float32:
        np.testing.assert_array_equal(w2, w1)
        np.testing.assert_array_equal(o2, o1)
    else:  # the mean of the means is within float64 rounding of the mean
        exact = ref.ablate(case.q, case.k, case.v, target=target, **case.kw)[0]
        q2, k2, _ = ref.substitute(case.q, case.k, case.v, target=target, lengths=case.lengths)
        tol = weight_tolerance(exact, q2, k2, case.scale, np.float64)
        assert_within(w2, w1, 2 * tol, "weights after substituting twice")


@given(cases())
def test_rows_sum_to_one_over_allowed_keys(case):
    w = qkvmean.attention_weights(case.q, case.k, **case.kw)
    sums = w.astype(np.float64).sum(axis=-1)
    seq = case.q.shape[-2]
    for b, n in _valid_rows(case):
        assert_within(sums[b, ..., :n], 1.0, (seq + 4) * unit_roundoff(w.dtype), "row sum")
        assert np.all(sums[b, ..., n:] == 0.0)


@given(cases(), st.integers(0, 2**32 - 1))
def test_adding_one_vector_to_every_key_changes_no_weight(case, seed):
    rng = np.random.default_rng(seed)
    shift = rng.normal(size=case.k.shape[-1]) * np.abs(case.k).max(initial=1.0)
    k2 = (case.k.astype(np.float64) + shift).astype(np.result_type(case.k.dtype, np.float32))
    w1 = qkvmean.attention_weights(case.q, case.k, **case.kw)
    w2 = qkvmean.attention_weights(case.q, k2, **case.kw)
    # both are within their rounding bound of the same exact weights
    exact = ref.attention_weights(case.q.astype(np.float64), case.k.astype(np.float64), **case.kw)
    tol = weight_tolerance(exact, case.q, case.k, case.scale, w1.dtype)
    tol2 = weight_tolerance(exact, case.q, k2, case.scale, w1.dtype)
    # k2 itself is rounded to the dtype: that moves each logit by u |q| |k2| more
    assert_within(w1, w2, tol + 2 * tol2, "shifted keys")


@given(cases(dtypes=(np.float64,)), st.integers(0, 2**32 - 1))
def test_permuting_tokens_permutes_rows_and_columns(case, seed):
    kw = dict(case.kw, causal=False, lengths=None)
    seq = case.q.shape[-2]
    perm = np.random.default_rng(seed).permutation(seq)
    w = qkvmean.attention_weights(case.q, case.k, **kw)
    wp = qkvmean.attention_weights(case.q[..., perm, :], case.k[..., perm, :], **kw)
    expected = w[..., perm, :][..., :, perm]
    # the same logits, summed in another order: a few roundoffs of each weight
    tol = 4 * (seq + 2) * unit_roundoff(w.dtype) * np.maximum(expected, 1e-300) + 1e-300
    assert_within(wp, expected, tol, "permuted")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite_and_exact_where_they_saturate(dtype):
    """Logits of +-1e4 (and 1e30 in float64): no overflow, the max takes all the weight."""
    q = np.zeros((1, 1, 3, 2), dtype)
    k = np.zeros((1, 1, 3, 2), dtype)
    big = 1e4 if dtype == np.float32 else 1e30
    q[..., 0] = 1.0
    k[0, 0, :, 0] = [big, -big, 0.0]
    w = qkvmean.attention_weights(q, k, scale=1.0)
    assert np.all(np.isfinite(w))
    np.testing.assert_array_equal(w[0, 0, :, 0], 1.0)
    np.testing.assert_array_equal(w[0, 0, :, 1:], 0.0)
