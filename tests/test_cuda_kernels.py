"""The CUDA backend against the numpy reference and the CPU backend.

Under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set by tests/conftest.py unless the
environment says otherwise) on machines without a GPU; the same tests run on a GPU with
NUMBA_ENABLE_CUDASIM=0. Small shapes: the simulator runs every GPU thread as a Python
thread.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkvmean
from qkvmean.engine import api
from qkvmean.engine import reference as R
from qkvmean.engine.arch import ACTIVATION_CODES
from qkvmean.engine.backends import cpu
from qkvmean.engine.backends import cuda as cuda_kernels  # numba-cuda: in the test extra
from qkvmean.engine.modes import MODE_UNIFORM

# seq up to 9: more keys than the simulator's 4 threads per row, so that the rows'
# strided loops and the shared-memory reductions combine several keys per thread
SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 9), st.integers(1, 4))


@contextlib.contextmanager
def blocks_of_one_pair():
    """The raw API's pipeline with one pair per block: every block boundary, offset and
    alternating slot of the copies is exercised."""
    saved = cuda_kernels.BLOCK_BYTES
    cuda_kernels.BLOCK_BYTES = 1
    try:
        yield
    finally:
        cuda_kernels.BLOCK_BYTES = saved


def _maybe_blocks(flag):
    return blocks_of_one_pair() if flag else contextlib.nullcontext()


@settings(max_examples=12, deadline=None)
@given(SHAPES, st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_attention_matches_the_reference(shape, causal, with_output, small_blocks, seed):
    batch, group, seq, dim = shape
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(3, batch * group, seq, dim)).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch).astype(np.int64)
    modes = np.zeros(group, np.int8)
    with _maybe_blocks(small_blocks):
        w, o, _ = cuda_kernels.attention(
            q, k, v, lengths, group, modes, causal, 0.5, 0, with_output
        )
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
    w, _, _ = cuda_kernels.attention(q, k, k, lengths, group, modes, causal, 1.0, 0, False)
    per_input = np.repeat(lengths, group)
    mean_k = R.mean_substitute(k, lengths=per_input)
    want = R.attention_weights(q, mean_k, lengths=per_input, causal=causal, scale=1.0)
    np.testing.assert_allclose(w, want, atol=2e-6, rtol=0)


@settings(max_examples=12, deadline=None)
@given(SHAPES, st.sampled_from([0, 1, 2, 3, 100]), st.integers(0, 2**32 - 1))
def test_mean_substitute_matches_the_reference(shape, window, seed):
    """The running means: over every token (window 0), the last W tokens, the prefix."""
    batch, group, seq, dim = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch * group, seq, dim)).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch).astype(np.int64)
    select = rng.random(group) < 0.7
    got = cuda_kernels.mean_substitute(x, lengths, group, select, window)
    per_input = np.repeat(lengths, group)
    over = {0: "tokens", 100: "causal"}.get(window, f"window:{window}")
    want = R.mean_substitute(x, over=over, lengths=per_input)
    chosen = np.tile(select, batch)
    np.testing.assert_allclose(got[chosen], want[chosen], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got[~chosen], x[~chosen])


@settings(max_examples=12, deadline=None)
@given(SHAPES, st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_metrics_match_the_reference(shape, causal, uniform, small_blocks, seed):
    """Entropy, KL from the baseline, top-key mass and index of a condition (mean-K in
    the uniform mode, or other keys) against the reference's metrics of the same maps;
    the baseline's weights are read where its call left them, on the device."""
    batch, group, seq, dim = shape
    rng = np.random.default_rng(seed)
    q, k, k2 = (rng.normal(size=(3, batch * group, seq, dim)) * 2).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch).astype(np.int64)
    per_input = np.repeat(lengths, group)
    general = np.zeros(group, np.int8)
    modes = np.full(group, MODE_UNIFORM if uniform else 0, np.int8)
    with _maybe_blocks(small_blocks):
        w0, _, rows0 = cuda_kernels.attention(
            q, k, k, lengths, group, general, causal, 1.0, 0, False, True, maps=False
        )
        assert w0 is None  # nothing came back but the row metrics' handle
        _, _, rows1 = cuda_kernels.attention(
            q, k2, k2, lengths, group, modes, causal, 1.0, 0, False, True, base=(w0, rows0)
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


# ----------------------------------------------------------------------------- public API


def _api_inputs(data):
    batch = data.draw(st.integers(1, 3), label="batch")
    heads = data.draw(st.integers(1, 3), label="heads")
    seq = data.draw(st.integers(1, 7), label="seq")
    dim = data.draw(st.integers(1, 4), label="dim")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(3, batch, heads, seq, dim)).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch)
    return q, k, v, lengths


def test_conditions_without_maps_keep_the_metrics():
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(2, 2, 3, 7, 4)).astype(np.float32)
    full = qkvmean.conditions(q, k, lengths=[7, 5], device="cuda")
    bare = qkvmean.conditions(q, k, lengths=[7, 5], device="cuda", maps=False)
    assert bare.weights == {} and bare.names == full.names
    for name, value in full.metrics.items():
        np.testing.assert_array_equal(bare.metrics[name], value)
    with pytest.raises(TypeError, match="maps must be True or False"):
        qkvmean.conditions(q, k, maps="no")


def test_the_cuda_backend_provides_the_protocol():
    from qkvmean.engine import backends

    assert backends.missing(api.backend("cuda")) == []
    assert api.backend("cuda") is cuda_kernels
    name, what = api.choose_device("auto")
    assert name == "cpu" if cuda_kernels.SIMULATOR else "cuda"
    assert "simulator" in what if cuda_kernels.SIMULATOR else what
    with pytest.raises(ValueError, match=r"device must be one of \['auto', 'cpu', 'cuda'"):
        api.backend("tpu")


# ----------------------------------------------------------------------------- model path


@settings(max_examples=10, deadline=None)
@given(
    st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.booleans(),
    st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_model_ops_match_the_cpu_backend(rows, kv_heads, per_kv, rms, store_sum, seed):
    """Norms (with residual and stored sum; RMS), head norm, the three activations, head
    split with grouped keys and values, merge, rotary and the per-head substitution: the
    CUDA backend's model-path operations (on device arrays) against the CPU backend's."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    dev, host = cuda_kernels.xp.asarray, cuda_kernels.to_host

    def both(op, *arrays, **kw):
        """``op`` of each backend on copies of ``arrays`` (host, then device); the arrays
        after it, as numpy."""
        cpu_args = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]
        cuda_args = [dev(a) if isinstance(a, np.ndarray) else a for a in arrays]
        getattr(cpu, op)(*cpu_args, **kw)
        getattr(cuda_kernels, op)(*cuda_args, **kw)
        pick = [i for i, a in enumerate(arrays) if isinstance(a, np.ndarray)]
        return [cpu_args[i] for i in pick], [host(cuda_args[i]) for i in pick]

    def close(pair, **tol):
        for a, b in zip(*pair, strict=True):
            np.testing.assert_allclose(b, a, **tol)

    heads, dh, d = kv_heads * per_kv, 4, 6
    x, residual = rng.normal(size=(2, rows, d)).astype(f32)
    bias, gamma, beta = rng.normal(size=(3, d)).astype(f32)
    norm = (dev(gamma), dev(np.zeros(d, f32) if rms else beta), rms, 1e-5)
    cpu_norm = tuple(host(v) if not isinstance(v, (bool, float)) else v for v in norm)
    out = np.empty_like(x)
    res_cpu, out_cpu = residual.copy(), out.copy()
    cpu.add_norm(x, bias, res_cpu, cpu_norm, out_cpu, store_sum=store_sum)
    res_d, out_d = dev(residual), dev(out)
    cuda_kernels.add_norm(dev(x), dev(bias), res_d, norm, out_d, store_sum=store_sum)
    close(([res_cpu, out_cpu], [host(res_d), host(out_d)]), atol=2e-5)

    hx = rng.normal(size=(heads, rows, dh)).astype(f32)
    close(both("head_norm", hx, gamma[:dh], 1e-6, np.zeros(dh, f32)), atol=2e-5)

    m = (rng.normal(size=(rows, 2 * d)) * 3).astype(f32)
    b1 = rng.normal(size=2 * d).astype(f32)
    for act, code in ACTIVATION_CODES.items():
        if act.endswith("_gated"):
            pair = both("bias_activation", m, b1, code, np.empty((rows, d), f32))
        else:  # in place: out is m
            m_cpu, m_dev = m.copy(), dev(m)
            cpu.bias_activation(m_cpu, b1, code, m_cpu)
            cuda_kernels.bias_activation(m_dev, dev(b1), code, m_dev)
            pair = ([m_cpu], [host(m_dev)])
        close(pair, atol=1e-5, rtol=1e-5, err_msg=act)

    stack = 2
    qkv = rng.normal(size=(stack * rows, (heads + 2 * kv_heads) * dh)).astype(f32)
    bqkv = rng.normal(size=qkv.shape[1]).astype(f32)
    qkv_out = [np.empty((stack * heads, rows, dh), f32) for _ in range(3)]
    got = both("split_heads", qkv, bqkv, heads, kv_heads, *qkv_out)
    for a, b in zip(*got, strict=True):
        np.testing.assert_array_equal(b, a)
    ctx = np.empty((stack * rows, heads * dh), f32)
    merged = both("merge_heads", got[0][2], heads, ctx)
    np.testing.assert_array_equal(merged[1][1], merged[0][1])

    half = 1 + seed % 2
    angle = rng.normal(size=(rows, half)).astype(f32)
    for interleaved in (False, True):
        close(both("rotary", hx, np.cos(angle), np.sin(angle), interleaved), atol=1e-6)

    select = rng.random(heads) < 0.6
    length = np.array([max(rows - 1, 1)], np.int64)
    for window in (0, 2, rows):  # every token, the last two, the prefix
        cpu_x, dev_x = hx.copy(), dev(hx)
        cpu.substitute(cpu_x, length, heads, select, window, np.empty(dh))
        cuda_kernels.substitute(dev_x, dev(length), heads, select, window, np.empty(dh))
        np.testing.assert_allclose(host(dev_x), cpu_x, atol=1e-6)

    bad = hx.copy()
    bad[0, 0, 1] = np.nan
    assert cuda_kernels.check_finite(dev(bad)) == cpu.check_finite(bad)
    assert cuda_kernels.check_finite(dev(hx)) == cpu.check_finite(hx)


def _close(got, want, atol=1e-4):
    assert got.names == want.names
    for name in want.names:
        np.testing.assert_allclose(got.weights[name], want.weights[name], atol=atol, err_msg=name)
    for name in ("entropy", "kl_from_baseline", "top_key_mass"):
        np.testing.assert_allclose(got.metrics[name], want.metrics[name], atol=atol, err_msg=name)


@pytest.mark.parametrize(
    "over, layers, heads",
    [("tokens", (0,), None), ("causal", (1,), [1]), ("dataset", (0, 2), [0, 2])],
)  # fmt: skip
def test_synthetic_model_agrees_across_devices(over, layers, heads):
    """The model path (BERT-shaped synthetic model; mean-V reused at the first ablated
    layer, conditions stacked) on ``device="cuda"``: maps, metrics and hidden states within
    1e-4 of the CPU's; without maps, the same metrics. The dataset means, taken on either
    device, agree too."""
    from qkvmean.engine.transformer import dataset_means, model_conditions
    from qkvmean.io.models import load_model

    weights = load_model("synthetic").weights
    ids = np.array([[1, 5, 9, 2, 7, 4], [1, 3, 3, 0, 0, 0]])
    kw = dict(over=over, ablate_layers=layers, heads=heads, hidden=True, seq=7)
    if over == "dataset":
        kw["means"] = dataset_means(weights, ids, [6, 3], layers=layers)
        on_gpu = dataset_means(weights, ids, [6, 3], layers=layers, device="cuda")
        for t in "qkv":
            np.testing.assert_allclose(on_gpu.values[t], kw["means"].values[t], atol=1e-5)
    want = model_conditions(weights, ids, [6, 3], **kw)
    got = model_conditions(weights, ids, [6, 3], device="cuda", **kw)
    _close(got, want)
    for name in want.names:
        np.testing.assert_allclose(got.hidden[name], want.hidden[name], atol=1e-4)
    if over == "causal":
        return
    bare = model_conditions(weights, ids, [6, 3], device="cuda", maps=False, **kw)
    assert bare.weights == {}
    for name, value in got.metrics.items():
        np.testing.assert_array_equal(bare.metrics[name], value)


#: Each piece of the Arch vocabulary on the device once (GQA: qwen3, olmo2; partial
#: rotate-half rotary, parallel residual: gpt_neox; interleaved rotary: gptj; windows,
#: soft-caps, local rotary, output and q/k norms: gemma2, gemma3, modernbert; ALiBi:
#: bloom; the token-wide q/k norm: olmo2). The simulator runs every GPU thread in Python:
#: inputs of a few tokens, the longer one beyond the windows of 4.
DEVICE_FAMILIES = ("qwen3", "gpt_neox", "gemma2", "gemma3", "bloom", "gptj", "olmo2", "modernbert")


@pytest.fixture(scope="module")
def small_families(tmp_path_factory):
    from model_support import write_family_dir

    from qkvmean.io.models import load_model

    root = tmp_path_factory.mktemp("cuda_families")
    return {n: load_model(str(write_family_dir(n, root / n))) for n in DEVICE_FAMILIES}


@pytest.mark.parametrize("family", DEVICE_FAMILIES)
def test_families_agree_across_devices(small_families, family):
    from qkvmean.engine.transformer import model_conditions

    model = small_families[family]
    enc = model.tokenizer.encode_batch(["mean keys and values", "the"])
    n = max(len(e.ids) for e in enc)
    assert n > 4 > min(len(e.ids) for e in enc)  # beyond the windows; a padded input
    ids = np.zeros((2, n), np.int64)
    for row, e in enumerate(enc):
        ids[row, : len(e.ids)] = e.ids
    lengths = [len(e.ids) for e in enc]
    # partial GQA groups, except for OLMo 2, whose key norm takes keys by whole KV heads
    heads = [0, 1] if family == "olmo2" else [0, 3]
    kw = dict(over="causal", ablate_layers=(0, 1), heads=heads)
    want = model_conditions(model.weights, ids, lengths, **kw)
    got = model_conditions(model.weights, ids, lengths, device="cuda", **kw)
    _close(got, want)


def test_fast_modes_with_a_window_are_refused_on_the_device():
    """As on the CPU (test_model_kernels): a uniform row with a window is an error before
    any kernel runs, not the general path on keys that were never substituted."""
    from qkvmean.engine.kernels.attention import Logits

    q = cuda_kernels.xp.asarray(np.ones((2, 5, 4), np.float32))
    scratch = cuda_kernels.InputScratch(2, 5, 5, 1, True)
    o = cuda_kernels.xp.asarray(np.empty((2, 5, 4), np.float32))
    reduced = (*(np.zeros(2) for _ in range(3)), np.zeros(2, np.int64))
    lg = Logits(4, 0.0, np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="fast modes"):
        cuda_kernels.attention_one(
            q, q, q, np.array([0, MODE_UNIFORM], np.int8), False, 0.5, lg, 0, None, o, scratch,
            True, reduced,
        )  # fmt: skip
    scratch.abort()
