"""``qkvmean capture``: a model's Q/K/V in the exchange format, round-tripped through
``run --qkv``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from model_support import write_family_dir
from support import store_maps, texts_file

import qkvmean
from qkvmean.cli import main
from qkvmean.engine import reference as ref

TEXTS = ["the quick brown fox jumps", "mean keys and values", "a", "every row becomes uniform"]


@pytest.fixture
def texts(tmp_path):
    return texts_file(tmp_path / "texts.txt", TEXTS)


def _maps(path):
    with qkvmean.open_store(path) as s:
        return store_maps(s), s.lengths


def _round_trip(tmp_path, model, texts, at, extra=()):
    qkv, direct, via = (tmp_path / f"{n}-{at}.h5" for n in ("qkv", "model", "via"))
    assert main(["capture", "--model", model, "--text", str(texts), "--at", at,
                 "--out", str(qkv), "-q"]) == 0  # fmt: skip
    assert main(["run", "--model", model, "--text", str(texts), *extra, "--out", str(direct),
                 "-q"]) == 0  # fmt: skip
    assert main(["run", "--qkv", str(qkv), *extra, "--out", str(via), "-q"]) == 0
    return qkv, _maps(direct), _maps(via)


def test_a_bert_capture_gives_the_models_maps_through_run_qkv(tmp_path, texts):
    """MiniLM has no rotary: the projections are what the attention sees. Baseline maps at
    every layer, and the substitutions at layer 0 (where run --model substitutes), are the
    model's."""
    from qkvmean.io.models import minilm_available

    model = "minilm" if minilm_available() else "synthetic"
    qkv, (direct, lengths), (via, via_lengths) = _round_trip(tmp_path, model, texts, "projection")
    np.testing.assert_array_equal(lengths, via_lengths)
    np.testing.assert_allclose(via["baseline"], direct["baseline"], atol=1e-5)
    for name in ("mean_q", "mean_k"):
        np.testing.assert_allclose(via[name][:, 0], direct[name][:, 0], atol=1e-5)
    with h5py.File(qkv) as f:
        assert f.attrs["format"] == "qkvmean-qkv" and f.attrs["captured_at"] == "projection"
        assert [s.decode() if isinstance(s, bytes) else s for s in f["text"][...]] == TEXTS
        np.testing.assert_array_equal(f["lengths"][...], lengths)


def test_a_rotary_capture_at_the_attention_gives_the_models_maps(tmp_path, texts):
    """Llama (GQA, rotary): at the attention, run --qkv gives the model's baseline maps; keys
    and values keep their KV heads in the file."""
    d = write_family_dir("llama", tmp_path / "llama")
    qkv, (direct, _), (via, _) = _round_trip(tmp_path, str(d), texts, "attention")
    np.testing.assert_allclose(via["baseline"], direct["baseline"], atol=1e-5)
    with h5py.File(qkv) as f:
        assert f["k"].shape[2] < f["q"].shape[2]  # KV heads
        assert bool(f.attrs["causal"]) is True


def test_the_dataset_means_are_those_of_the_captured_projections(tmp_path, texts):
    qkv, out = tmp_path / "q.h5", tmp_path / "d.h5"
    base = ["--model", "synthetic", "--text", str(texts)]
    assert main(["capture", *base, "--out", str(qkv), "-q"]) == 0
    assert main(["run", *base, "--over", "dataset", "--ablate-layers", "1,2",
                 "--out", str(out), "-q"]) == 0  # fmt: skip
    with h5py.File(qkv) as f, qkvmean.open_store(out) as s:
        means, lengths = s.dataset_means(), f["lengths"][...]
        for t in "qkv":
            for i, layer in enumerate(means.layers):
                want = ref.dataset_means(f[t][:, layer], lengths=lengths)
                np.testing.assert_allclose(means.values[t][i], want, atol=1e-6)


def test_capture_refuses_to_clobber_and_leaves_nothing_behind(tmp_path, texts, capsys):
    out = tmp_path / "q.h5"
    out.write_bytes(b"precious")
    argv = ["capture", "--model", "synthetic", "--text", str(texts), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --overwrite" in err[0]
    assert out.read_bytes() == b"precious"
    assert main([*argv, "--out", str(texts)]) == 2  # its own input
    assert "is an input of this command" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "-q"]) == 0 and h5py.is_hdf5(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5", "texts.txt"]
