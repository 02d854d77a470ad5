"""The kinds of substitution (qkvmean.engine.substitution): their values, the partners of
``resample``, and each kind through a whole run against the reference.

The kernels themselves are compared with the reference for every kind in
test_comparisons (raw API, both backends) and test_models (the forward pass)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_support import padded_ids
from support import store_maps, texts_file
from test_store import make_qkv

import qkvmean
from qkvmean.cli import main
from qkvmean.engine import reference as ref
from qkvmean.engine import synthetic
from qkvmean.engine import transformer as T
from qkvmean.engine.substitution import KINDS, Substitution, resample_partners

TEXTS = [
    "the cat sat on the mat",
    "mean keys make every row uniform",
    "a b c d e f g h i j k",
    "short",
    "positions past the shorter inputs are averaged over fewer of them",
]


SPELLINGS = ["tokens", "causal", "dataset", "window:1", "window:8", "zero", "resample",
             "resample:7"]  # fmt: skip


@pytest.mark.parametrize("spec", SPELLINGS)
def test_spellings_read_back(spec):
    sub = Substitution.parse(spec)
    assert sub.spec == spec and Substitution.parse(sub.spec) == sub
    assert sub.kind in KINDS and sub.running == (sub.kind in ("tokens", "causal", "window"))
    assert Substitution.parse("resample:0").spec == "resample"  # one spelling per meaning


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("window:0", "at least 1 token"),
        ("window:-2", "at least 1 token"),
        ("window", "needs its length"),
        ("window:x", "window:W with W a whole number"),
        ("zero:1", "zero without a parameter"),
        ("resample:-1", "seed must be >= 0"),
        ("heads", "unknown substitution"),
    ],
)
def test_bad_spellings_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        Substitution.parse(spec)
    assert "\n" not in str(info.value)


def test_window_of_w_is_the_mean_of_the_last_w_tokens():
    x = np.arange(1.0, 7.0)[None, :, None] ** 2  # 1, 4, 9, 16, 25, 36
    got = qkvmean.mean_substitute(x, over="window:3", lengths=[5])[0, :, 0]
    np.testing.assert_allclose(got, [1, 2.5, 14 / 3, 29 / 3, 50 / 3, 36])  # padding kept
    same = qkvmean.mean_substitute(x, over="window:1")
    np.testing.assert_array_equal(same, x)  # window:1 is the identity
    long = qkvmean.mean_substitute(x, over="window:6")
    np.testing.assert_array_equal(long, qkvmean.mean_substitute(x, over="causal"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=2, max_size=12), st.integers(0, 2**31))
def test_resample_partners_are_other_inputs_long_enough(lengths, seed):
    lengths = np.array(lengths)
    partners = resample_partners(lengths, seed)
    np.testing.assert_array_equal(partners, resample_partners(lengths, seed))  # recorded seed
    for b, r in enumerate(partners):
        assert r != b
        others = np.delete(lengths, b)
        if (others >= lengths[b]).any():
            assert lengths[r] >= lengths[b]
        else:  # no other input is as long: one of the longest others
            assert lengths[r] == others.max()


def test_resample_draws_differ_by_seed():
    lengths = np.full(20, 5)
    assert not np.array_equal(resample_partners(lengths, 0), resample_partners(lengths, 1))


@pytest.fixture
def texts(tmp_path):
    return texts_file(tmp_path / "texts.txt", TEXTS)


def _maps(path):
    with qkvmean.open_store(path) as s:
        return store_maps(s), s.attrs


@pytest.mark.parametrize("over", ["window:2", "zero", "resample:3"])
def test_model_run_of_each_kind_is_the_reference_whatever_the_batches(tmp_path, texts, over):
    """A run in batches of 2 against the reference over all five texts: a resample
    partner is drawn among all of the run's inputs, not among its batch's."""
    out = tmp_path / "r.h5"
    argv = ["run", "--model", "synthetic", "--text", str(texts), "--over", over,
            "--batch-size", "2", "--ablate-layers", "0,2", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    maps, attrs = _maps(out)
    assert attrs["over"] == over
    weights, tok = synthetic.build()
    ids, lens = padded_ids(tok, TEXTS)
    word = over.partition(":")[0] if over != "window:2" else "mean"  # zero_q, resample_q
    assert list(maps) == ["baseline"] + [f"{word}_{t}" for t in "qkv"]
    for target in "qkv":
        want, _ = ref.transformer_forward(
            weights, ids, lens, target=target, over=over, ablate_layers=(0, 2)
        )
        for layer, w in enumerate(want):
            for b, n in enumerate(lens):
                got = maps[f"{word}_{target}"][b, layer, :, :n, :n]
                np.testing.assert_allclose(got, w[b, :, :n, :n], atol=1e-5)
    # and the kind made a difference where it substitutes
    base = maps["baseline"][:, 1]
    assert np.abs(maps[f"{word}_q"][:, 1] - base).max() > 1e-3


def test_model_conditions_takes_given_partners(texts):
    """``partners=`` (their ids and lengths) gives the same maps as drawing them over the
    same inputs."""
    weights, tok = synthetic.build()
    ids, lens = padded_ids(tok, TEXTS)
    drawn = T.model_conditions(weights, ids, lens, over="resample:5", targets=("q", "k"))
    chosen = resample_partners(lens, 5)
    part = T.model_conditions(
        weights, ids[:2], lens[:2], over="resample", targets=("q", "k"), seq=ids.shape[1],
        partners=(ids[chosen[:2]], lens[chosen[:2]]),
    )  # fmt: skip
    for name in part.names:
        np.testing.assert_allclose(part.weights[name], drawn.weights[name][:2], atol=1e-6)
    with pytest.raises(ValueError, match="partners apply to over='resample' only"):
        T.model_conditions(weights, ids, lens, over="zero", partners=(ids, lens))
    with pytest.raises(ValueError, match="one per input"):
        T.model_conditions(weights, ids, lens, over="resample", partners=(ids[:2], lens[:2]))


@pytest.mark.parametrize("over", ["window:3", "zero", "resample:1"])
def test_qkv_run_of_each_kind_is_the_reference_over_the_whole_file(tmp_path, over):
    src = tmp_path / "in.h5"
    data, lens = make_qkv(src, n=9, layers=2, heads=3, seq=7, dim=4, dim_v=3, seed=4)
    out = tmp_path / "o.h5"
    assert main(["run", "--qkv", str(src), "--over", over, "--batch-size", "4",
                 "--out", str(out), "-q"]) == 0  # fmt: skip
    maps, _ = _maps(out)
    want = ref.conditions(data["q"], data["k"], data["v"], over=over, lengths=lens)
    for name in maps:
        np.testing.assert_allclose(maps[name], want.weights[name], atol=2e-6)


def test_resample_of_one_input_is_refused(tmp_path, capsys):
    texts = tmp_path / "one.txt"
    texts.write_text("a single text\n")
    argv = ["run", "--model", "synthetic", "--text", str(texts), "--over", "resample",
            "--out", str(tmp_path / "x.h5")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give at least 2 inputs" in err[0]
    assert not (tmp_path / "x.h5").exists()
