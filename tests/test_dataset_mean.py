"""``over="dataset"``: the per-position mean over a data set (the raw API, the model path,
``run --over dataset`` and ``--mean-from``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkvmean
from qkvmean.engine import reference as ref


def _inputs(seed, batch=4, heads=3, seq=6, dim=5):
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(3, batch, heads, seq, dim))
    lengths = rng.integers(0, seq + 1, size=batch)
    return q, k, v, lengths


def test_each_position_is_the_mean_over_the_inputs_that_have_it():
    x = np.arange(24, dtype=np.float64).reshape(3, 1, 4, 2)  # 3 inputs, 4 positions
    out = qkvmean.mean_substitute(x, over="dataset", lengths=[4, 2, 1])
    # position 0: all three inputs; 1: inputs 0 and 1; 2, 3: input 0 alone
    np.testing.assert_array_equal(out[0, 0, 0], x[:, 0, 0].mean(axis=0))
    np.testing.assert_array_equal(out[:2, 0, 1], [x[:2, 0, 1].mean(axis=0)] * 2)
    np.testing.assert_array_equal(out[0, 0, 2:], x[0, 0, 2:])
    np.testing.assert_array_equal(out[1, 0, 2:], x[1, 0, 2:])  # padding is left as it was
    np.testing.assert_array_equal(out[2, 0, 1:], x[2, 0, 1:])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["q", "k", "v"]), st.booleans())
def test_given_means_are_substituted_as_the_reference_does(seed, target, causal):
    """``means=`` (a reference set's) replace the batch's own, KV heads expanded."""
    q, k, v, lengths = _inputs(seed)
    other = _inputs(seed + 1, batch=7, seq=9)
    means = ref.dataset_means(dict(zip("qkv", other[:3], strict=True))[target], lengths=other[3])
    kw = dict(target=target, over="dataset", lengths=lengths, causal=causal, heads=[0, 2])
    w, o = qkvmean.ablate(q, k, v, means=means, **kw)
    w_ref, o_ref = ref.ablate(q, k, v, means=means[:, :6], **kw)
    np.testing.assert_allclose(w, w_ref, atol=1e-12)
    np.testing.assert_allclose(o, o_ref, atol=1e-12)
    own, _ = qkvmean.ablate(q, k, v, **kw)
    if target != "v" and lengths.max() > 1:  # the batch's own means give other maps
        # (a map of one token is [[1]] whatever the means)
        assert not np.allclose(own, w)


def test_key_means_of_kv_heads_are_read_by_their_query_heads():
    q, k, v, lengths = _inputs(3, heads=4)
    kv = k[:, ::2]  # two KV heads, read by query heads (0, 1) and (2, 3)
    means = ref.dataset_means(kv, lengths=lengths)
    a = qkvmean.ablate(q, kv, v[:, ::2], target="k", over="dataset", lengths=lengths, means=means)
    b = qkvmean.ablate(
        q, np.repeat(kv, 2, axis=1), np.repeat(v[:, ::2], 2, axis=1), target="k",
        over="dataset", lengths=lengths, means=np.repeat(means, 2, axis=0),
    )  # fmt: skip
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(over="tokens", means=np.zeros((3, 6, 5))), "means apply to over='dataset' only"),
        (dict(over="dataset", means=np.zeros((3, 5, 5))), r"means of k have shape \(3, 5, 5\)"),
        (dict(over="dataset", means=np.zeros((2, 6, 5))), r"must be \(\*k.shape\[1:-2\]"),
        (dict(over="dataset", means=np.full((3, 6, 5), np.nan)), "must be finite"),
    ],
)
def test_bad_means_are_one_line_errors(kw, message):
    q, k, v, lengths = _inputs(0)
    with pytest.raises(ValueError, match=message):
        qkvmean.ablate(q, k, v, target="k", lengths=lengths, **kw)


def test_conditions_takes_means_per_target():
    q, k, v, lengths = _inputs(5)
    mk = ref.dataset_means(k * 2, lengths=lengths)
    c = qkvmean.conditions(q, k, v, over="dataset", lengths=lengths, means={"k": mk})
    r = ref.conditions(q, k, v, over="dataset", lengths=lengths, means={"k": mk})
    for name in c.names:
        np.testing.assert_allclose(c.weights[name], r.weights[name], atol=1e-12)
    with pytest.raises(TypeError, match="means must be a dict"):
        qkvmean.conditions(q, k, v, over="dataset", lengths=lengths, means=mk)


# ------------------------------------------------------------------- run --over dataset

import sys  # noqa: E402

import h5py  # noqa: E402
from model_support import padded_ids  # noqa: E402
from support import killed_at, store_maps, texts_file  # noqa: E402
from test_run import _assert_same_store  # noqa: E402
from test_store import make_qkv  # noqa: E402

from qkvmean.cli import main  # noqa: E402
from qkvmean.engine import synthetic  # noqa: E402
from qkvmean.engine import transformer as T  # noqa: E402
from qkvmean.engine.plan import DatasetMeans, position_counts  # noqa: E402
from qkvmean.run import batching, sources  # noqa: E402
from qkvmean.run.options import Options  # noqa: E402
from qkvmean.store import workdir  # noqa: E402

TEXTS = [
    "the cat sat on the mat",
    "mean keys make every row uniform",
    "a b c d e f g h i j k",
    "short",
    "positions past the shorter inputs are averaged over fewer of them",
]


@pytest.fixture
def texts(tmp_path):
    return texts_file(tmp_path / "texts.txt", TEXTS)


def _store(path):
    with qkvmean.open_store(path) as s:
        return store_maps(s), s.dataset_means(), s.lengths, s.attrs


def test_model_run_substitutes_the_mean_over_every_input_of_the_run(tmp_path, texts):
    """Batches of 2: the means are those of all five texts (not of each batch), at both
    ablated layers from the baseline pass; every layer's maps against the reference."""
    out = tmp_path / "d.h5"
    argv = ["run", "--model", "synthetic", "--text", str(texts), "--over", "dataset",
            "--batch-size", "2", "--ablate-layers", "0,2", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    maps, means, lengths, attrs = _store(out)
    assert attrs["over"] == "dataset"
    weights, tok = synthetic.build()
    ids, lens = padded_ids(tok, TEXTS)
    np.testing.assert_array_equal(lens, lengths)
    np.testing.assert_array_equal(means.counts, position_counts(lens, ids.shape[1]))
    taken = ref.projections(weights, ids, lens)
    assert means.layers == (0, 2)
    for target in "qkv":
        for i, layer in enumerate((0, 2)):
            want = ref.dataset_means(taken[layer][target], lengths=lens)
            np.testing.assert_allclose(means.values[target][i], want, atol=1e-5)
        want_maps, _ = ref.transformer_forward(
            weights, ids, lens, target=target, over="dataset", ablate_layers=(0, 2)
        )
        for layer, w in enumerate(want_maps):
            for b, n in enumerate(lens):
                got = maps[f"mean_{target}"][b, layer, :, :n, :n]
                np.testing.assert_allclose(got, w[b, :, :n, :n], atol=1e-5)


def test_the_batch_size_changes_only_the_last_bits(tmp_path, texts):
    runs = []
    for size in ("1", "3"):
        out = tmp_path / f"b{size}.h5"
        argv = ["run", "--model", "synthetic", "--text", str(texts), "--over", "dataset",
                "--batch-size", size, "--out", str(out), "-q"]  # fmt: skip
        assert main(argv) == 0
        runs.append(_store(out))
    (a, ma, _, _), (b, mb, _, _) = runs
    for t in "qkv":
        np.testing.assert_allclose(ma.values[t], mb.values[t], rtol=1e-6, atol=1e-7)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6)


def test_qkv_run_over_dataset_is_the_reference_over_the_whole_file(tmp_path):
    src = tmp_path / "in.h5"
    data, lens = make_qkv(src, n=11, layers=2, heads=3, seq=7, dim=4, dim_v=3, seed=4)
    out = tmp_path / "o.h5"
    assert main(["run", "--qkv", str(src), "--over", "dataset", "--batch-size", "4",
                 "--out", str(out), "-q"]) == 0  # fmt: skip
    maps, means, _, _ = _store(out)
    assert sorted(means.values) == ["k", "q"]  # mean-V of raw Q/K/V is the baseline
    want = ref.conditions(data["q"], data["k"], data["v"], over="dataset", lengths=lens)
    for name in maps:
        np.testing.assert_allclose(maps[name], want.weights[name], atol=2e-6)
    for t in "qk":
        np.testing.assert_allclose(means.values[t], ref.dataset_means(data[t], lengths=lens),
                                   atol=1e-6)  # fmt: skip
    with h5py.File(out) as f:  # named axes, as the rest of the store
        d = f["means/q"]
        assert [d.dims[i][0].name for i in range(4)] == [
            "/means/layer", "/head", "/means/position", "/means/dim"
        ]  # fmt: skip
        assert f["means/count"].dims[0][0].name == "/means/position"


def test_sigkill_in_either_pass_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Kill -9 right after the first pass saved its 5th batch, then (resumed) right after
    the second pass's 2nd journal entry; resume; compare."""
    src = tmp_path / "in.h5"
    make_qkv(src, n=1200, layers=1, heads=2, seq=10, dim=4, dim_v=3, seed=9)
    args = ["run", "--qkv", str(src), "--over", "dataset", "--batch-size", "20", "-q"]
    ref_out = tmp_path / "ref.h5"
    assert main([*args, "--out", str(ref_out)]) == 0
    out = tmp_path / "out.h5"
    work = workdir.partial_dir(out)
    cmd = [sys.executable, "-m", "qkvmean", *args, "--out", str(out)]

    def summed():  # batches in the first pass's totals
        with np.load(work / workdir.MEANS_STATE) as z:
            return int(z["done"])

    killed_at(cmd, "means-journaled:5")  # in the first pass
    assert summed() == 5 and not list(work.glob("batch-*.npz"))
    killed_at(cmd + ["--resume"], "journaled:2")
    assert summed() == 60  # the first pass was finished, then the second one killed
    assert len(list(work.glob("batch-*.npz"))) == 2
    assert main([*args, "--out", str(out), "--resume"]) == 0
    _assert_same_store(out, ref_out)


def test_a_damaged_first_pass_state_is_summed_again(tmp_path):
    src = tmp_path / "in.h5"
    make_qkv(src, n=30, layers=1, heads=2, seq=6, dim=4, dim_v=3, seed=1)
    args = ["run", "--qkv", str(src), "--over", "dataset", "--batch-size", "7", "-q"]
    assert main([*args, "--out", str(tmp_path / "ref.h5")]) == 0
    source = sources.QKVSource(str(src), Options(over="dataset"))
    batches = batching.batches(30, 7)
    work = tmp_path / "w"
    work.mkdir()
    totals = source.position_sums(source.read(0, 7)[0], 0, 7, ["q", "k"])
    workdir.save_means_state(work, batches, ["q", "k"], 1, totals)
    assert workdir.load_means_state(work, batches, ["q", "k"])[0] == 1
    raw = bytearray((work / workdir.MEANS_STATE).read_bytes())
    raw[len(raw) // 2] ^= 1  # inside the totals
    (work / workdir.MEANS_STATE).write_bytes(bytes(raw))
    assert workdir.load_means_state(work, batches, ["q", "k"]) == (0, None)
    assert workdir.load_means_state(work, batches[:-1], ["q", "k"]) == (0, None)


# ------------------------------------------------------------------------- --mean-from


def test_mean_from_substitutes_the_reference_sets_means(tmp_path, texts):
    reference = tmp_path / "ref.h5"
    assert main(["run", "--model", "synthetic", "--text", str(texts), "--over", "dataset",
                 "--ablate-layers", "0,1", "--out", str(reference), "-q"]) == 0  # fmt: skip
    other = tmp_path / "other.txt"
    other.write_text("the mat sat\nkeys\n")
    out = tmp_path / "o.h5"
    assert main(["run", "--model", "synthetic", "--text", str(other), "--mean-from",
                 str(reference), "--ablate-layers", "1", "--out", str(out), "-q"]) == 0  # fmt: skip
    maps, used, _, attrs = _store(out)
    _, recorded, _, _ = _store(reference)
    assert attrs["over"] == "dataset" and used.layers == (1,)
    assert used.attrs["taken_from"] == str(reference.resolve())
    for t in "qkv":
        np.testing.assert_array_equal(used.values[t], recorded.values[t][1:2])
    weights, tok = synthetic.build()
    ids, lens = padded_ids(tok, ["the mat sat", "keys"])
    want = T.model_conditions(weights, ids, lens, over="dataset", ablate_layers=(1,),
                              means=DatasetMeans((1,), used.values, used.counts))  # fmt: skip
    for name in maps:
        np.testing.assert_allclose(maps[name], want.weights[name], atol=1e-6)
    own = tmp_path / "own.h5"  # the inputs' own means give other maps
    assert main(["run", "--model", "synthetic", "--text", str(other), "--over", "dataset",
                 "--ablate-layers", "1", "--out", str(own), "-q"]) == 0  # fmt: skip
    assert not np.allclose(_store(own)[0]["mean_k"], maps["mean_k"])


def test_mean_from_refusals_are_one_line(tmp_path, texts, capsys):
    plain = tmp_path / "plain.h5"
    assert main(["run", "--model", "synthetic", "--text", str(texts), "--out", str(plain),
                 "-q"]) == 0  # fmt: skip
    short = tmp_path / "short.txt"
    short.write_text("ab\n")
    small = tmp_path / "small.h5"
    assert main(["run", "--model", "synthetic", "--text", str(short), "--over", "dataset",
                 "--out", str(small), "-q"]) == 0  # fmt: skip
    base = ["run", "--model", "synthetic", "--text", str(texts), "--out", str(tmp_path / "x.h5")]
    cases = [
        (["--mean-from", str(plain)], "has no /means (it was not made with --over dataset)"),
        (["--mean-from", str(small)], "its means cover positions 0..1 (its inputs' tokens), but"),
        (["--mean-from", str(small), "--ablate-layers", "2"], "has means at layers 0 only"),
        (["--mean-from", str(small), "--over", "tokens"], "--mean-from takes the means"),
    ]
    src = tmp_path / "in.h5"
    make_qkv(src, n=3, layers=1, heads=4, seq=5, dim=16, dim_v=16)
    qkv = ["run", "--qkv", str(src), "--out", str(tmp_path / "x.h5"), "--mean-from", str(small)]
    cases.append((qkv, "is a store of model inputs, this run reads qkv inputs"))
    capsys.readouterr()
    for extra, message in cases:
        assert main(extra if extra[0] == "run" else [*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


def test_inspect_names_the_means_and_resume_refuses_a_changed_reference(tmp_path, texts, capsys):
    reference = tmp_path / "ref.h5"
    base = ["run", "--model", "synthetic", "--text", str(texts), "-q"]
    assert main([*base, "--over", "dataset", "--out", str(reference)]) == 0
    out = tmp_path / "o.h5"
    assert main([*base, "--mean-from", str(reference), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("means")]
    assert lines == [
        f"means        of q, k, v at layers [0], over 5 inputs at 12 positions, taken from "
        f"{reference.resolve()} (/means)"
    ]
    assert main([*base, "--mean-from", str(reference), "--out", str(out), "--resume"]) == 0
    with h5py.File(reference, "r+") as f:  # the reference changes
        f["means/k"][0, 0, 0, 0] += 1.0
    capsys.readouterr()
    assert main([*base, "--mean-from", str(reference), "--out", str(out), "--resume"]) == 2
    assert "made with a different configuration: other means contents" in capsys.readouterr().err
