"""Every engine function against the numpy reference, on random inputs (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import (
    assert_within,
    cases,
    output_tolerance,
    patched,
    weight_tolerance,
)

import qkvmean
from qkvmean.engine import reference as ref


def _allowed(case):
    """Boolean mask of allowed (query, key) pairs, broadcast to the weights' shape."""
    seq = case.q.shape[-2]
    masks = [ref.allowed_mask(n, seq, case.causal) for n in case.lengths]
    masks = np.array(masks, dtype=bool).reshape((len(case.lengths), seq, seq))
    extra = case.q.ndim - 3
    return masks.reshape((len(case.lengths),) + (1,) * extra + (seq, seq))


def _check_weights(w, w_ref, q, k, case):
    assert w.dtype == w_ref.dtype
    assert w.shape == case.q.shape[:-1] + (case.q.shape[-2],)
    tol = weight_tolerance(w_ref, q, k, case.scale, w.dtype)
    assert_within(w, w_ref, tol, "weights")
    # masked entries and padded rows are exactly zero, not merely small
    allowed = np.broadcast_to(_allowed(case), w.shape)
    assert np.all(w[~allowed] == 0.0)
    return tol


def _heads_strategy():
    return st.one_of(st.none(), st.lists(st.integers(-3, 2), min_size=0, max_size=3))


@given(
    cases(head_axis=True, min_heads=3),
    st.sampled_from(["q", "k", "v"]),
    st.sampled_from(["tokens", "causal", "dataset"]),
    _heads_strategy(),
    st.booleans(),
)
def test_ablate_matches_reference(case, target, over, heads, fast):
    with patched(ROW_BLOCK=case.row_block, FAST_PATHS=fast):
        w, o = qkvmean.ablate(
            case.q, case.k, case.v, target=target, over=over, heads=heads, **case.kw
        )
    w_ref, o_ref = ref.ablate(
        case.q, case.k, case.v, target=target, over=over, heads=heads, **case.kw
    )
    # the bounds use the substituted tensors, as the kernels saw them
    q2, k2, v2 = ref.substitute(
        case.q, case.k, case.v, target=target, over=over, heads=heads, lengths=case.lengths
    )
    tol = _check_weights(w, w_ref, q2, k2, case)
    assert_within(o, o_ref, output_tolerance(w_ref, tol, v2, o.dtype), f"mean-{target} output")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unbatched_seq_dim_input(dtype):
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(3, 6, 4)).astype(dtype)
    w, o = qkvmean.attention(q, k, v, lengths=4, causal=True)
    w_ref, o_ref = ref.attention(q, k, v, lengths=4, causal=True)
    assert w.shape == (6, 6) and o.shape == (6, 4)
    tol = weight_tolerance(w_ref, q, k, None, dtype)
    assert_within(w, w_ref, tol, "weights")
    assert_within(o, o_ref, output_tolerance(w_ref, tol, v, dtype), "output")


def test_float16_is_computed_in_float32():
    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(3, 2, 3, 5, 8)).astype(np.float16)
    w, o = qkvmean.attention(q, k, v)
    assert w.dtype == np.float32 and o.dtype == np.float32
    w32, o32 = qkvmean.attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    np.testing.assert_array_equal(w, w32)
    np.testing.assert_array_equal(o, o32)


def test_mixed_precision_promotes_to_float64():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 4, 8))
    w = qkvmean.attention_weights(q.astype(np.float32), q)
    assert w.dtype == np.float64


def test_long_rows_and_many_blocks_match_reference():
    """Sequences longer than a row block, padded and causal, in both dtypes."""
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        q, k, v = (rng.normal(size=(3, 2, 3, 200, 16)) * 3).astype(dtype)
        lengths = np.array([200, 77])
        w, o = qkvmean.attention(q, k, v, lengths=lengths, causal=True)
        w_ref, o_ref = ref.attention(q, k, v, lengths=lengths, causal=True)
        tol = weight_tolerance(w_ref, q, k, None, dtype)
        assert_within(w, w_ref, tol, "weights")
        assert_within(o, o_ref, output_tolerance(w_ref, tol, v, dtype), "output")


def test_empty_inputs_give_zero_rows():
    q = np.ones((2, 3, 4, 5), np.float32)
    w, o = qkvmean.attention(q, q, q, lengths=[0, 0])
    assert w.shape == (2, 3, 4, 4) and not w.any() and not o.any()
    w, o = qkvmean.attention(np.ones((2, 3, 0, 5)), np.ones((2, 3, 0, 5)), np.ones((2, 3, 0, 2)))
    assert w.shape == (2, 3, 0, 0) and o.shape == (2, 3, 0, 2)
    assert qkvmean.attention_weights(np.ones((0, 4, 5)), np.ones((0, 4, 5))).shape == (0, 4, 4)
    w, _ = qkvmean.ablate(q, q, q, target="k", lengths=[0, 2], heads=[1])
    assert not w[0].any() and np.all(w[1, :, :2, :2] == 0.5)


@pytest.mark.parametrize(("dtype", "bar"), [(np.float32, 2e-5), (np.float64, 1e-10)])
def test_acceptance_accuracy_on_typical_inputs(dtype, bar):
    """The acceptance bar: |error| < 2e-5 (float32) / 1e-10 (float64) for typical inputs."""
    rng = np.random.default_rng(11)
    q, k = (rng.normal(size=(2, 4, 6, 300, 64)) * 1.5).astype(dtype)
    v = rng.normal(size=(4, 6, 300, 48)).astype(dtype)
    lengths = np.array([300, 1, 177, 0])
    for causal in (False, True):
        w, o = qkvmean.attention(q, k, v, lengths=lengths, causal=causal)
        w_ref, o_ref = ref.attention(q, k, v, lengths=lengths, causal=causal)
        assert np.abs(w - w_ref).max() < bar
        assert np.abs(o - o_ref).max() < bar * 10
        for target in "qkv":
            w, o = qkvmean.ablate(q, k, v, target=target, lengths=lengths, causal=causal)
            w_ref, o_ref = ref.ablate(q, k, v, target=target, lengths=lengths, causal=causal)
            assert np.abs(w - w_ref).max() < bar
            assert np.abs(o - o_ref).max() < bar * 10


def test_big_endian_input_is_accepted():
    rng = np.random.default_rng(12)
    q, k = rng.normal(size=(2, 2, 3, 5, 4)).astype(np.float32)
    w = qkvmean.attention_weights(q.astype(">f4"), k.astype(">f4"))
    np.testing.assert_array_equal(w, qkvmean.attention_weights(q, k))


def test_empty_batch_with_empty_lengths_list():
    w = qkvmean.attention_weights(np.ones((0, 3, 2)), np.ones((0, 3, 2)), lengths=[])
    assert w.shape == (0, 3, 3)


@pytest.mark.parametrize("over", ["tokens", "causal"])
def test_mean_of_values_near_the_float64_limit_does_not_overflow(over):
    big = np.finfo(np.float64).max / 2
    x = np.array([[[big], [big], [big / 2]]])
    out = qkvmean.mean_substitute(x, over=over)
    expected = [big / 6 * 5] * 3 if over == "tokens" else [big, big, big / 6 * 5]
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-15)
    z = np.zeros((1, 3, 1))
    w, o = qkvmean.ablate(z, z, x, target="v", over=over)
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(o))


def test_ablate_without_v_gives_the_weights_only():
    rng = np.random.default_rng(13)
    q, k, v = rng.normal(size=(3, 2, 3, 6, 4)).astype(np.float32)
    for target in "qk":
        w, o = qkvmean.ablate(q, k, None, target=target, lengths=[6, 2])
        assert o is None
        np.testing.assert_array_equal(w, qkvmean.ablate(q, k, v, target=target, lengths=[6, 2])[0])


def test_every_backend_provides_the_protocol():
    from qkvmean.engine import backends

    for name in qkvmean.engine.BACKENDS:
        ops, why = backends.load(name)
        if ops is None:  # (CUDA where it cannot run)
            assert why, name
            continue
        assert backends.missing(ops) == [], name
    every = ["name", *backends.DEVICE_OPS, *backends.BATCH_OPS, *backends.MODEL_OPS]
    assert backends.missing(object()) == every


def test_raw_api_and_model_path_go_through_the_backend_seam(monkeypatch):
    """A backend registered under a new name is what both paths call: the CPU module's own
    functions are made to fail, a recording backend holds the originals, and the results
    are the CPU's."""
    import types

    from qkvmean.engine import backends, transformer
    from qkvmean.engine.backends import cpu
    from qkvmean.io.models import load_model

    calls = []
    recorder = types.SimpleNamespace(name="recorder")
    for name in (*backends.DEVICE_OPS, *backends.BATCH_OPS, *backends.MODEL_OPS):
        original = getattr(cpu, name)
        if not callable(original):  # the array module
            setattr(recorder, name, original)
            continue

        def traced(*args, _f=original, _n=name, **kwargs):
            calls.append(_n)
            return _f(*args, **kwargs)

        setattr(recorder, name, traced)

    def run_inputs(tasks):  # a backend hands each input its own operations
        calls.append("run_inputs")
        for task in tasks:
            task(recorder)

    recorder.run_inputs = run_inputs
    model = load_model("synthetic")
    ids = np.array([[1, 5, 9, 2, 7], [1, 3, 3, 0, 0]])
    want = transformer.model_conditions(model.weights, ids, [5, 3], ablate_layers=(1,))
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 2, 3, 6, 4))
    want_raw = qkvmean.conditions(q, k, lengths=[6, 4])

    def fail(*args, **kwargs):
        raise AssertionError("a kernel module was called past the backend seam")

    for name in (*backends.BATCH_OPS, *backends.MODEL_OPS):
        monkeypatch.setattr(cpu, name, fail)
    monkeypatch.setitem(backends.BACKENDS, "recorder", recorder)
    got = transformer.model_conditions(
        model.weights, ids, [5, 3], ablate_layers=(1,), device="recorder"
    )
    got_raw = qkvmean.conditions(q, k, lengths=[6, 4], device="recorder")
    for name in want.names:
        np.testing.assert_array_equal(got.weights[name], want.weights[name])
        np.testing.assert_array_equal(got_raw.weights[name], want_raw.weights[name])
    assert {"attention_one", "add_norm", "split_heads", "substitute", "attention"} <= set(calls)
