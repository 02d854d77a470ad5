"""The model path's kernels against the numpy reference: RMSNorm, rotary embedding,
SwiGLU, SiLU, grouped-query head splitting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvmean.engine import reference as R
from qkvmean.engine.arch import ACTIVATION_CODES, Rotary
from qkvmean.engine.backends import cpu
from qkvmean.engine.kernels import vmath
from qkvmean.engine.modes import MODE_SHARED_ROW, MODE_UNIFORM

SEEDS = st.integers(0, 2**32 - 1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 70), st.booleans(), SEEDS)
def test_add_norm_rms_and_layer_match_the_reference(rows, dim, rms, seed):
    rng = np.random.default_rng(seed)
    x, res = (rng.normal(size=(2, rows, dim)) * 3).astype(np.float32)
    bias, gamma, beta = rng.normal(size=(3, dim)).astype(np.float32)
    if rms:
        beta = np.zeros(dim, np.float32)
    out = np.empty_like(x)
    h = res.copy()
    cpu.add_norm(x, bias, h, (gamma, beta, rms, 1e-6), out, store_sum=True)
    s = x.astype(np.float64) + bias + res
    want = R.rms_norm(s, gamma, 1e-6) if rms else R.layer_norm(s, gamma, beta, 1e-6)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h, s, rtol=1e-6, atol=1e-6)  # the residual sum, stored


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 40),
    st.sampled_from([(8, 8), (8, 2), (16, 4), (6, 6)]),
    st.sampled_from(["default", "linear", "llama3"]),
    st.booleans(),
    SEEDS,
)
def test_rotary_kernel_matches_the_reference(pairs, n, dims, scaling, interleaved, seed):
    """Both pair layouts (rotate-half and GPT-J's interleaved), full and partial."""
    head_dim, rot = dims
    rotary = Rotary(
        theta=500.0, dim=rot, scaling=scaling, factor=4.0, original_max_positions=16,
        interleaved=interleaved,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(pairs, n, head_dim)).astype(np.float32)
    got = x.copy()
    cpu.rotary(got, *rotary.tables(n + 3), rotary.interleaved)  # tables longer than the input
    want = R.rotate(x.astype(np.float64), rotary, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(got[..., rot:], x[..., rot:])  # partial: the rest passes


def test_llama3_frequencies_follow_the_published_rule():
    """High frequencies kept, low ones divided by the factor, a smooth band between."""
    r = Rotary(theta=500000.0, dim=64, scaling="llama3", factor=32.0, original_max_positions=8192)
    base = Rotary(theta=500000.0, dim=64).inv_freq()
    got = r.inv_freq()
    wavelen = 2 * np.pi / base
    np.testing.assert_array_equal(got[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
    np.testing.assert_allclose(got[wavelen > 8192], base[wavelen > 8192] / 32)
    band = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert band.any() and np.all((got[band] < base[band]) & (got[band] > base[band] / 32))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 7), st.integers(1, 60), st.sampled_from(sorted(ACTIVATION_CODES)), SEEDS)
def test_bias_activation_matches_the_reference(rows, f, kind, seed):
    """Every activation, plain or gated, in place or into its own array."""
    rng = np.random.default_rng(seed)
    code = ACTIVATION_CODES[kind]
    gated = kind.endswith("_gated")
    m = (rng.normal(size=(rows, 2 * f if gated else f)) * 4).astype(np.float32)
    bias = rng.normal(size=m.shape[1]).astype(np.float32)
    out = np.empty((rows, f), np.float32) if gated else m.copy()
    src = m.copy()
    cpu.bias_activation(src if gated else out, bias, code, out)
    want = R.activation(kind, m.astype(np.float64) + bias)
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-6)


@given(st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=50))
def test_silu_is_x_sigmoid_x(values):
    x = np.array(values, np.float32)
    out = np.empty_like(x)
    vmath.silu_array(x, out)
    np.testing.assert_allclose(out, R.silu(x.astype(np.float64)), rtol=1e-6, atol=1e-30)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.sampled_from([(4, 4), (4, 2), (6, 1)]), SEEDS)
def test_split_heads_expands_grouped_kv(stack, n, heads_kv, seed):
    heads, kv = heads_kv
    dh = 3
    rng = np.random.default_rng(seed)
    qkv = rng.normal(size=(stack * n, (heads + 2 * kv) * dh)).astype(np.float32)
    bias = rng.normal(size=qkv.shape[1]).astype(np.float32)
    q, k, v = (np.empty((stack * heads, n, dh), np.float32) for _ in range(3))
    cpu.split_heads(qkv, bias, heads, kv, q, k, v)
    full = (qkv + bias).reshape(stack, n, heads + 2 * kv, dh).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(q, full[:, :heads].reshape(-1, n, dh))
    group = heads // kv
    for h in range(heads):
        np.testing.assert_array_equal(
            k.reshape(stack, heads, n, dh)[:, h], full[:, heads + h // group]
        )
        np.testing.assert_array_equal(
            v.reshape(stack, heads, n, dh)[:, h], full[:, heads + kv + h // group]
        )


def _attention_pair(ops, q, q2, k, v, causal, scale, logits):
    """One input's baseline (``q``) and a condition (``q2``) through ``ops.attention_one``
    (the model path, the condition's KL read against the baseline): per condition the
    weights, outputs and the four metrics per head."""
    heads, n, dh = q.shape
    scratch = ops.InputScratch(heads, n, n, 2, True)
    modes = np.zeros(heads, np.int8)
    results = []
    for c, query in enumerate((q, q2)):
        w = np.zeros((heads, n, n), np.float32)
        o = np.empty((heads, n, dh), np.float32)
        reduced = (*(np.zeros(heads) for _ in range(3)), np.zeros(heads, np.int64))
        ops.attention_one(query, k, v, modes, causal, scale, logits, c, w, o, scratch, True,
                          reduced)  # fmt: skip
        results.append((w, o, reduced))
    scratch.finish()
    return results


#: Query counts within one block of rows, and across two or three (the kernels' BLOCK).
LENGTHS = st.one_of(st.integers(1, 40), st.integers(120, 300))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["serial", "spread"]),
    st.integers(1, 3),
    LENGTHS,
    st.booleans(),
    st.integers(0, 12) | st.integers(100, 200),
    st.sampled_from([0.0, 0.7, 5.0]),
    st.booleans(),
    SEEDS,
)
def test_windows_softcap_and_alibi_match_the_reference(ops, heads, n, causal, window, cap,
                                                       alibi, seed):  # fmt: skip
    """The model path's attention with a sliding (causal) or local (bidirectional) window,
    soft-capped logits and ALiBi slopes, serial and on every thread, against the
    reference: weights, outputs and all four metrics, the KL of a condition against its
    baseline included; a key outside a query's window has weight exactly 0, and every
    row sums to 1."""
    from qkvmean.engine.kernels.attention import Logits
    from qkvmean.engine.kernels.rows import key_range

    rng = np.random.default_rng(seed)
    q, q2, k, v = (rng.normal(size=(heads, n, 8)).astype(np.float32) * 2 for _ in range(4))
    slopes = (rng.random(heads) * 0.5).astype(np.float32) if alibi else np.zeros(0, np.float32)
    logits = Logits(window, cap, slopes)
    ops = cpu if ops == "serial" else cpu.spread
    (w, o, reduced), (w2, _, reduced2) = _attention_pair(ops, q, q2, k, v, causal, 0.35, logits)
    kw = dict(causal=causal, scale=0.35, window=window, softcap=cap, slopes=slopes)
    want_w, want_o = (x[0] for x in R.attention(q[None].astype(np.float64), k[None], v[None], **kw))
    np.testing.assert_allclose(w, want_w, atol=2e-6)
    np.testing.assert_allclose(o, want_o, atol=2e-5)
    allowed = R.allowed_mask(n, n, causal, window)
    assert np.all(w[:, ~allowed] == 0.0) and np.all(w2[:, ~allowed] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    for i in range(n):  # the kernels' key range is the reference's mask
        lo, hi = key_range(i, n, causal, window)
        np.testing.assert_array_equal(np.flatnonzero(allowed[i]), np.arange(lo, hi))
    log_p, log_a = (
        R.log_attention_weights(x[None].astype(np.float64), k[None], **kw) for x in (q, q2)
    )
    for got, log_w, log_base in ((reduced, log_p, log_p), (reduced2, log_a, log_p)):
        want = R.metrics(log_w, log_base, [n])
        np.testing.assert_allclose(got[0], want["entropy"][0], atol=1e-5)
        np.testing.assert_allclose(got[1], want["kl_from_baseline"][0], atol=1e-5)
        np.testing.assert_allclose(got[2], want["top_key_mass"][0], atol=1e-6)
        columns = np.sort(np.exp(log_w[0]).mean(-2), axis=-1)  # (heads, keys), ascending
        clear = columns[:, -1] - (columns[:, -2] if n > 1 else 0.0) > 1e-5  # no near-tie
        np.testing.assert_array_equal(got[3][clear], want["top_key_index"][0][clear])
    assert np.all(reduced[1] == 0.0)  # the baseline against itself
    assert reduced2[1].max() > 0.0 or n == 1 or window == 1


@pytest.mark.parametrize("mode", [MODE_UNIFORM, MODE_SHARED_ROW])
@pytest.mark.parametrize("logits", [(4, 0.0, []), (0, 0.0, [0.25, 0.5])])
def test_fast_modes_with_windows_or_alibi_are_refused(mode, logits):
    """The fast modes read rows alike; with a window or ALiBi they are not, and the
    caller never substituted the keys a uniform row stands for: an error, not the
    baseline's map under the condition's name (as a quiet fall back to the general path
    would give)."""
    from qkvmean.engine.kernels.attention import Logits

    window, cap, slopes = logits
    q = np.ones((2, 5, 4), np.float32)
    scratch = cpu.InputScratch(2, 5, 5, 1, True)
    modes = np.array([0, mode], np.int8)
    lg = Logits(window, cap, np.array(slopes, np.float32))
    w, o = np.zeros((2, 5, 5), np.float32), np.empty((2, 5, 4), np.float32)
    reduced = (*(np.zeros(2) for _ in range(3)), np.zeros(2, np.int64))
    cause = "a sliding window of 4" if window else "ALiBi slopes"
    with pytest.raises(ValueError, match=f"fast modes .* which {cause} breaks"):
        cpu.attention_one(q, q, q, modes, False, 0.5, lg, 0, w, o, scratch, True, reduced)
    assert np.all(w == 0.0)  # refused before any kernel ran
