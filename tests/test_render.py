"""The figure, tested through its matplotlib objects, and the render/figure commands."""

from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from test_store import make_qkv

from qkvmean import render
from qkvmean.cli import main

TITLE = r"The Mean Operation For $\it{Query}$, $\it{Key}$ and $\it{Value}$"


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render")
    texts = tmp / "t.txt"
    texts.write_text(
        "\n".join(
            [
                "The cat sat on the mat while the old dog slept nearby.",
                "Mean keys make every query look at all words the same way.",
                "She read the letter twice, then put it in the drawer.",
                "A short one.",
                "Every head looks back at the first word again and again in this long line.",
            ]
        )
    )
    out = tmp / "m.h5"
    assert (
        main(
            [
                "run",
                "--model",
                "synthetic",
                "--text",
                str(texts),
                "--out",
                str(out),
                "--over",
                "causal",
                "--quiet",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def qkv_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("renderqkv")
    make_qkv(tmp / "in.h5", n=14, layers=2, heads=3, seq=10)
    out = tmp / "q.h5"
    assert main(["run", "--qkv", str(tmp / "in.h5"), "--out", str(out), "--quiet"]) == 0
    return out


def test_default_grid_layout_titles_and_colour_bar(model_store):
    fig = render.draw(model_store)
    axes = fig.qkvmean["axes"]
    assert axes.shape == (3, 3)
    for r in range(3):
        titles = [axes[r, c].get_title() for c in range(3)]
        assert titles == [
            rf"Taking the Mean of $\it{{{word}}}$ (Input {r + 1})"
            for word in ("Query", "Key", "Value")
        ]
        for c in range(3):
            assert axes[r, c].get_xticks().size == 0 and axes[r, c].get_yticks().size == 0
            assert axes[r, c].get_xlabel() == "" and axes[r, c].get_ylabel() == ""
    bar = fig.qkvmean["colorbar"]
    assert bar.ax.get_ylabel() == "Attention Weight"
    np.testing.assert_allclose(bar.get_ticks(), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    image = axes[0, 0].images[0]
    assert image.get_cmap().name == "coolwarm"
    assert image.norm.vmin == 0.0 and image.norm.vmax == 1.0
    assert all(ax.images[0].colorbar is None or ax.images[0].colorbar is bar for ax in axes.flat)
    # one shared bar, on the right of every panel
    FigureCanvasAgg(fig).draw()
    right_edge = max(ax.get_position().x1 for ax in axes.flat)
    assert bar.ax.get_position().x0 > right_edge
    sup = fig.qkvmean["title"]
    assert sup.get_text() == TITLE
    assert sup.get_position()[0] == pytest.approx(0.5) and sup.get_ha() == "center"
    lowest = min(ax.get_window_extent().y0 for ax in axes.flat)
    assert sup.get_window_extent().y1 < lowest  # at the bottom
    # the caption line under it, centred under the grid
    caption = fig.qkvmean["caption"]
    assert caption.get_window_extent().y1 <= sup.get_window_extent().y0
    middle = (caption.get_window_extent().x0 + caption.get_window_extent().x1) / 2
    assert middle / fig.bbox.width == pytest.approx(0.5, abs=0.02)
    assert render.draw(model_store, caption=False).qkvmean["caption"] is None


def test_panel_images_are_the_stored_maps(model_store):
    fig = render.draw(model_store, inputs=[3, 0], layer=1, head="mean")
    axes = fig.qkvmean["axes"]
    with h5py.File(model_store) as f:
        lengths = f["input/lengths"][...]
        for r, b in enumerate([3, 0]):
            n = lengths[b]
            for c, cond in enumerate(["mean_q", "mean_k", "mean_v"]):
                want = f["attention"][cond][b, 1].astype(np.float64).mean(axis=0)[:n, :n]
                got = np.asarray(axes[r, c].images[0].get_array())
                assert got.shape == (n, n)
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert axes[0, 0].get_title().endswith("(Input 4)")
        fig = render.draw(model_store, inputs=[2], layer=-1, head=3)
        got = np.asarray(fig.qkvmean["axes"][0, 1].images[0].get_array())
        n = lengths[2]
        np.testing.assert_array_equal(got, f["attention/mean_k"][2, -1, 3, :n, :n])


def test_baseline_column_and_diff_view(model_store):
    fig = render.draw(model_store, baseline=True, inputs=[0])
    axes = fig.qkvmean["axes"]
    assert axes.shape == (1, 4) and axes[0, 0].get_title() == "Baseline (Input 1)"
    fig = render.draw(model_store, diff=True, inputs=[0, 1], layer="last", head="mean")
    axes = fig.qkvmean["axes"]
    with h5py.File(model_store) as f:
        n = f["input/lengths"][1]
        base = f["attention/baseline"][1, -1].astype(np.float64).mean(0)[:n, :n]
        cond = f["attention/mean_v"][1, -1].astype(np.float64).mean(0)[:n, :n]
    image = axes[1, 2].images[0]
    np.testing.assert_allclose(image.get_array(), cond - base, atol=1e-6)
    assert image.norm.vmin == -image.norm.vmax > -1.0
    peak = max(np.abs(ax.images[0].get_array()).max() for ax in axes.flat)
    assert peak <= image.norm.vmax < 2 * peak + 1e-3  # symmetric and tight
    assert fig.qkvmean["colorbar"].ax.get_ylabel() == "Attention Weight − Baseline"


def test_token_labels(model_store):
    fig = render.draw(model_store, tokens=True, inputs=[1])
    ax = fig.qkvmean["axes"][0, 0]
    expected = [
        "<s>",
        "mean",
        "keys",
        "make",
        "every",
        "query",
        "look",
        "at",
        "all",
        "words",
        "the",
        "same",
        "way",
        ".",
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == expected
    assert [t.get_text() for t in ax.get_yticklabels()] == expected


def test_twelve_inputs_stay_legible_with_nothing_overlapping(qkv_store):
    fig = render.draw(qkv_store, inputs=range(12), baseline=True)
    width, height = fig.get_size_inches()
    assert height >= 12 * 3 and width >= 4 * 3
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.qkvmean["axes"].flat]
    boxes += [ax.get_window_extent(renderer) for ax in fig.qkvmean["axes"].flat]
    boxes += [
        fig.qkvmean["title"].get_window_extent(renderer),
        fig.qkvmean["caption"].get_window_extent(renderer),
        fig.qkvmean["colorbar"].ax.get_window_extent(renderer),
    ]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    for ax in fig.qkvmean["axes"].flat:
        assert ax.title.get_fontsize() >= 10


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
@pytest.mark.parametrize("which", ["model", "qkv"])
def test_render_writes_each_format(tmp_path, model_store, qkv_store, fmt, which, capsys):
    store = model_store if which == "model" else qkv_store
    out = tmp_path / f"fig.{fmt}"
    assert main(["render", str(store), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    head = out.read_bytes()[:64]
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}[fmt]
    assert head.startswith(magic)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_render_refusals_exit_2(tmp_path, model_store, qkv_store, capsys):
    cases = [
        ([str(model_store), "--layer", "4"], r"has 4 layers \(0..3\); there is no layer 4"),
        ([str(model_store), "--head", "9"], r"has 4 heads \(0..3\); there is no head 9"),
        ([str(model_store), "--inputs", "0,5"], r"has 5 inputs \(0..4\); there is no input 5"),
        ([str(qkv_store), "--tokens"], r"has no tokens"),
        ([str(model_store), "--baseline", "--diff"], r"--baseline and --diff do not combine"),
        ([str(tmp_path / "none.h5")], r"no such file"),
        ([str(tmp_path / "notes.txt")], r"not an HDF5 file"),
    ]
    (tmp_path / "notes.txt").write_text("hi")
    for argv, rx in cases:
        assert main(["render", *argv, "-o", str(tmp_path / "f.png")]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and __import__("re").search(rx, err), err
    for out, rx in [
        (tmp_path / "no" / "f.png", "does not exist"),
        ("/proc/f.png", "not writable"),
        (tmp_path / "f.gif", "unknown format '.gif'"),
    ]:
        assert main(["render", str(model_store), "-o", str(out)]) == 2
        assert rx in capsys.readouterr().err
    existing = tmp_path / "keep.png"
    existing.write_bytes(b"mine")
    assert main(["render", str(model_store), "-o", str(existing)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"mine"
    metrics_only = tmp_path / "m.h5"
    make_qkv(tmp_path / "in.h5")
    assert (
        main(
            ["run", "--qkv", str(tmp_path / "in.h5"), "--out", str(metrics_only), "--no-maps", "-q"]
        )
        == 0
    )
    assert main(["render", str(metrics_only), "-o", str(tmp_path / "g.png")]) == 2
    assert "metrics only" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists() and not (tmp_path / "g.png").exists()


def test_figure_command_runs_the_demo_and_keeps_the_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["figure", "--model", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "model:  the synthetic model; 3 built-in sentences; mean over causal" in out
    assert "store:  figure.h5" in out and "figure: figure.png" in out
    assert (tmp_path / "figure.png").read_bytes().startswith(b"\x89PNG")
    with h5py.File(tmp_path / "figure.h5") as f:
        assert list(f.attrs["ablate_layers"]) == [0]
    before = (tmp_path / "figure.png").read_bytes()
    assert main(["figure", "--model", "synthetic"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "figure.png").read_bytes() == before
    (tmp_path / "figure.png").unlink()
    assert main(["figure", "--model", "synthetic"]) == 2  # the store is still there
    assert "figure.h5: exists" in capsys.readouterr().err
    assert (
        main(["figure", "--model", "synthetic", "--overwrite", "-o", "figure.svg", "--quiet"]) == 0
    )
    assert capsys.readouterr().out == ""
    assert (tmp_path / "figure.svg").read_bytes().startswith(b"<?xml")


def test_byte_level_tokens_read_as_text():
    assert render.pretty_tokens(["the", "Ġqu", "ick", "Ġcaf", "Ã©", "Ċ"]) == [
        "the",
        "▁qu",
        "ick",
        "▁caf",
        "é",
        "\\n",
    ]
    # word pieces (no byte-level marks) are left alone
    assert render.pretty_tokens(["[CLS]", "caf", "##é"]) == ["[CLS]", "caf", "##é"]


def test_long_inputs_get_thinned_labels_and_a_bounded_size(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text(" ".join(["the cat sat on the mat"] * 20) + "\n")
    out = tmp_path / "long.h5"
    assert main(["run", "--model", "synthetic", "--text", str(texts), "--out", str(out), "-q"]) == 0
    fig = render.draw(out, tokens=True)
    ax = fig.qkvmean["axes"][0, 0]
    n = len(ax.images[0].get_array())
    assert n == 121 and 20 <= len(ax.get_xticklabels()) <= render.MAX_LABELS
    assert max(fig.get_size_inches()) <= 3 * render.MAX_PANEL + 1.5
    FigureCanvasAgg(fig).draw()
    boxes = [t.get_window_extent() for t in ax.get_yticklabels()]
    assert not any(a.overlaps(b) for a, b in itertools.pairwise(boxes))


def test_resolution_limits(tmp_path, model_store, capsys):
    for dpi in ("0", "5000"):
        with pytest.raises(SystemExit) as exc:
            main(["render", str(model_store), "-o", str(tmp_path / "a.png"), "--dpi", dpi])
        assert exc.value.code == 2
    assert "expected a resolution from 10 to 1200" in capsys.readouterr().err
    qkv = tmp_path / "in.h5"
    make_qkv(qkv, n=12)
    assert main(["run", "--qkv", str(qkv), "--out", str(tmp_path / "s.h5"), "-q"]) == 0
    code = main(
        [
            "render",
            str(tmp_path / "s.h5"),
            "-o",
            str(tmp_path / "big.png"),
            "--dpi",
            "1200",
            "--inputs",
            ",".join(map(str, range(12))),
            "--baseline",
        ]
    )
    assert code == 2 and "is too large an image" in capsys.readouterr().err
    assert not (tmp_path / "big.png").exists()


def test_figure_checks_layer_and_head_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["figure", "--model", "synthetic", "--layer", "9"]) == 2
    assert "--layer 9: the model has 4 layers (0..3)" in capsys.readouterr().err
    assert main(["figure", "--model", "synthetic", "--head", "4"]) == 2
    assert not list(tmp_path.iterdir())
