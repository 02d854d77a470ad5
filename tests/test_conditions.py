"""``qkvmean.conditions``: every map against the reference, every metric against the maps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import cases, patched

import qkvmean
from qkvmean.engine.kernels.attention import BLOCK

TARGET_LISTS = st.sampled_from([["q", "k", "v"], ["k"], ["v", "q"], []])


def test_metric_values_on_known_maps():
    """Uniform rows have entropy log(n); a condition equal to the baseline has KL 0."""
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(3, 2, 3, 7, 4)).astype(np.float32)
    c = qkvmean.conditions(q, k, v, lengths=[7, 4])
    mean_k = c.names.index("mean_k")
    np.testing.assert_allclose(c.metrics["entropy"][mean_k, 0], np.log(7), rtol=1e-6)
    np.testing.assert_allclose(c.metrics["entropy"][mean_k, 1], np.log(4), rtol=1e-6)
    np.testing.assert_allclose(c.metrics["top_key_mass"][mean_k, 1], 1 / 4, rtol=1e-6)
    mean_v = c.names.index("mean_v")
    assert np.all(c.metrics["kl_from_baseline"][mean_v] == 0.0)
    assert np.all(c.metrics["kl_from_baseline"][0] == 0.0)
    # KL from the baseline to the uniform rows is log(n) - H(baseline), row by row
    w0 = c.weights["baseline"].astype(np.float64)
    row_h = -(w0 * np.log(np.where(w0 > 0, w0, 1))).sum(-1)
    expected = np.log(7) - row_h[0].mean(-1)
    np.testing.assert_allclose(c.metrics["kl_from_baseline"][mean_k, 0], expected, rtol=1e-5)


def test_empty_input_metrics_are_zero_and_index_minus_one():
    q = np.ones((2, 3, 5, 4), np.float32)
    c = qkvmean.conditions(q, q, lengths=[0, 5])
    assert np.all(c.metrics["entropy"][:, 0] == 0)
    assert np.all(c.metrics["top_key_index"][:, 0] == -1)
    assert np.all(c.metrics["top_key_index"][:, 1] >= 0)


@pytest.mark.parametrize(
    ("targets", "exc", "match"),
    [
        ("qk", TypeError, r"targets must be a sequence"),
        (["q", "x"], ValueError, r"targets must be one of"),
        (["q", "q"], ValueError, r"targets has a duplicate"),
    ],
)
def test_bad_targets(targets, exc, match):
    q = np.ones((1, 2, 3, 4), np.float32)
    with pytest.raises(exc, match=match):
        qkvmean.conditions(q, q, targets=targets)


@settings(max_examples=30)
@given(case=cases(dtypes=(np.float32, np.float64), head_axis=True, max_seq=70))
def test_metrics_do_not_depend_on_how_rows_are_shared_out(case):
    """Bit for bit: the rows of a pair are computed by one task or by one per BLOCK rows
    (the split follows the batch size and the threads), and the metrics must not notice,
    the mean-Q rows that copy a shared row included."""
    results = []
    for row_block in (0, BLOCK, 10**6):
        with patched(ROW_BLOCK=row_block):
            c = qkvmean.conditions(case.q, case.k, targets=["q", "k"], **case.kw)
        results.append(c)
    for other in results[1:]:
        for name, value in results[0].metrics.items():
            np.testing.assert_array_equal(other.metrics[name], value, err_msg=name)
        for name, value in results[0].weights.items():
            np.testing.assert_array_equal(other.weights[name], value, err_msg=name)
