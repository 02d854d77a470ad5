"""Metrics out of the store: Store.to_xarray(), qkvmean export, render --metrics."""

from __future__ import annotations

import csv
import re
import shutil
import sys

import h5py
import numpy as np
import pytest
from support import run_qkv_store
from test_store import make_qkv

import qkvmean
from qkvmean.cli import main
from qkvmean.files import InputError
from qkvmean.render import metrics as kl_figure
from qkvmean.store.export import COLUMNS, MissingExtra, columns, export_metrics

CONDITIONS = ["baseline", "mean_q", "mean_k", "mean_v"]
FLOATS = ("entropy", "kl_from_baseline", "top_key_mass")


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    """A model run's store (texts, tokens) with the dataset means in /means."""
    tmp = tmp_path_factory.mktemp("export_model")
    texts = tmp / "t.txt"
    texts.write_text(
        "The cat sat on the mat.\nMean keys make every query look the same way.\n"
        "She read the letter twice, then put it away.\nA short one.\n"
    )
    out = tmp / "m.h5"
    argv = ["run", "--model", "synthetic", "--text", str(texts), "--out", str(out)]
    assert main([*argv, "--over", "dataset", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def qkv_store(tmp_path_factory):
    """A raw Q/K/V store whose layer numbers are 3 and 7 (a capture of two layers of a
    deeper model), substituted at layer 7 only, with one input of no valid token."""
    tmp = tmp_path_factory.mktemp("export_qkv")
    make_qkv(tmp / "in.h5", n=7, layers=2, heads=3, seq=10, seed=3)
    with h5py.File(tmp / "in.h5", "a") as f:
        f["lengths"][4] = 0
    out = tmp / "q.h5"
    assert main(["run", "--qkv", str(tmp / "in.h5"), "--out", str(out), "--quiet"]) == 0
    with h5py.File(out, "r+") as f:
        f["layer"][...] = [3, 7]
        f["map_layer"][...] = [3, 7]  # the maps are at every layer
        f.attrs["ablate_layers"] = np.array([7], dtype=np.int32)
    return out


@pytest.fixture(scope="module")
def metrics_only(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_nomaps")
    return run_qkv_store(tmp, "--no-maps", out="n.h5", n=5, layers=2, heads=2, seq=8)


def _one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


# ----------------------------------------------------------------------- to_xarray


@pytest.fixture
def reads(monkeypatch):
    """The HDF5 datasets whose values are read (h5py's Dataset.__getitem__, which
    h5netcdf and the Store read through), by name."""
    seen = []
    original = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        seen.append(self.name)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    return seen


def test_to_xarray_opens_lazily_and_holds_the_store(model_store, reads):
    with qkvmean.open_store(model_store) as store:
        reads.clear()
        ds = store.to_xarray()
        opened = set(reads)
        means = store.dataset_means()
        expected = {
            "metrics": {m: store.metric(m) for m in (*FLOATS, "top_key_index")},
            "maps": {c: store.maps(c) for c in store.conditions},
            "texts": store.texts,
            "lengths": store.lengths,
            "layers": store.layer_ids,
        }
    assert not any(name.startswith(("/attention/", "/metrics/e", "/metrics/k")) for name in opened)
    assert not ds["attention_baseline"].variable._in_memory
    # ... it still reads after the Store is closed, and reading it reads the file
    with ds:
        reads.clear()
        np.testing.assert_array_equal(ds["attention_mean_k"].values, expected["maps"]["mean_k"])
        assert "/attention/mean_k" in reads and "/attention/mean_q" not in reads
        for cond in CONDITIONS:
            var = ds[f"attention_{cond}"]
            assert var.dims == ("batch", "map_layer", "head", "query", "key")
            np.testing.assert_array_equal(var.values, expected["maps"][cond])
        for name, values in expected["metrics"].items():
            assert ds[name].dims == ("condition", "batch", "layer", "head")
            assert ds[name].dtype == values.dtype
            np.testing.assert_array_equal(ds[name].values, values)
        assert list(ds["condition"].values) == CONDITIONS
        assert list(ds["layer"].values) == expected["layers"]
        assert list(ds["batch"].values) == [0, 1, 2, 3] and list(ds["head"].values) == [0, 1, 2, 3]
        np.testing.assert_array_equal(ds["lengths"].values, expected["lengths"])
        assert list(ds["text"].values) == expected["texts"]
        assert ds["tokens"].dims == ("batch", "seq")
        assert ds.attrs["format"] == "qkvmean-store" and ds.attrs["over"] == "dataset"
        assert ds.attrs["source"] == "model" and ds.attrs["ablate_layers"] == [0]
        for target in ("q", "k", "v"):
            var = ds[f"means_{target}"]
            assert var.dims[:3] == ("means_layer", "head", "position")
            np.testing.assert_array_equal(var.values, means.values[target])
        assert list(ds["means_layer"].values) == list(means.layers)
        np.testing.assert_array_equal(ds["means_count"].values, means.counts)
        # the metrics by name: mean entropy of mean-K per layer
        per_layer = ds["entropy"].sel(condition="mean_k").mean(["batch", "head"]).values
        np.testing.assert_allclose(per_layer, expected["metrics"]["entropy"][2].mean((0, 2)))


def test_to_xarray_closes_its_own_files(model_store, tmp_path):
    path = tmp_path / "copy.h5"
    shutil.copy(model_store, path)
    with qkvmean.open_store(path) as store:
        ds = store.to_xarray()
    with pytest.raises(OSError, match="already open"):  # the Dataset holds the file
        h5py.File(path, "r+")
    ds.close()
    h5py.File(path, "r+").close()  # no handle left


def test_to_xarray_of_stores_without_maps_means_or_texts(metrics_only, qkv_store):
    with qkvmean.open_store(metrics_only) as store, store.to_xarray() as ds:
        assert not [v for v in ds.variables if v.startswith(("attention", "means"))]
        np.testing.assert_array_equal(
            ds["kl_from_baseline"].values, store.metric("kl_from_baseline")
        )
    with qkvmean.open_store(qkv_store) as store, store.to_xarray() as ds:
        assert "text" not in ds and "tokens" not in ds and "means_q" not in ds
        assert list(ds["layer"].values) == [3, 7]
        np.testing.assert_array_equal(ds["attention_mean_v"].values, store.maps("mean_v"))


@pytest.mark.parametrize("missing", ["xarray", "h5netcdf"])
def test_to_xarray_without_the_extra_says_what_to_install(model_store, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails
    with qkvmean.open_store(model_store) as store, pytest.raises(MissingExtra) as info:
        store.to_xarray()
    assert isinstance(info.value, ImportError) and isinstance(info.value, InputError)
    message = str(info.value)
    assert "\n" not in message and missing in message
    assert "pip install 'qkvmean[xarray]'" in message


# -------------------------------------------------------------------------- export


def _expected_rows(store):
    """Every row of the table, computed from the store's own arrays."""
    out = []
    metrics = {m: store.metric(m) for m in (*FLOATS, "top_key_index")}
    for c, cond in enumerate(store.conditions):
        for b in range(store.n_inputs):
            for i, layer in enumerate(store.layer_ids):
                for h in range(store.n_heads):
                    key = (cond, b, int(store.lengths[b]), layer, h)
                    out.append(key + tuple(metrics[m][c, b, i, h] for m in metrics))
    return out


@pytest.mark.parametrize("which", ["model_store", "qkv_store"])
def test_export_csv_has_every_row_and_round_trips_exactly(which, request, tmp_path, capsys):
    path = request.getfixturevalue(which)
    out = tmp_path / "metrics.csv"
    assert main(["export", str(path), "--metrics", str(out)]) == 0
    with qkvmean.open_store(path) as store:
        expected = _expected_rows(store)
        shape = store.n_inputs, store.n_layers, store.n_heads
        header = columns(store)
        effects = {name: store.effect(name) for name in store.effects}
    assert (which == "model_store") == bool(effects)  # a model run stores its effects
    assert capsys.readouterr().out.strip() == (
        f"wrote {out}: {len(expected)} rows (4 conditions x {shape[0]} inputs x "
        f"{shape[1]} layers x {shape[2]} heads)"
    )
    with open(out, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        assert tuple(next(reader)) == header == (*COLUMNS, *effects)
        rows = list(reader)
    assert len(rows) == len(expected) == 4 * np.prod(shape)
    for row, want in zip(rows, expected, strict=True):
        assert row[0] == want[0]
        assert [int(x) for x in row[1:5]] == list(want[1:5])
        for text, value in zip(row[5:8], want[5:8], strict=True):
            assert float(text) == float(value) and np.float32(float(text)) == value
        assert int(row[8]) == want[8]
        c, b = CONDITIONS.index(row[0]), int(row[1])
        for text, name in zip(row[9:], effects, strict=True):  # per condition and input
            assert np.float32(float(text)) == effects[name][c, b], name
    if which == "qkv_store":  # the layer column holds the store's numbers, not 0, 1
        assert {int(r[3]) for r in rows} == {3, 7}
        assert {r[8] for r in rows if r[1] == "4"} == {"-1"}  # the input with no token


def test_export_writes_the_same_table_in_any_block_size(qkv_store, tmp_path):
    with qkvmean.open_store(qkv_store) as store:
        seen = []
        rows = export_metrics(store, tmp_path / "small.csv", block_rows=4, progress=seen.append)
        export_metrics(store, tmp_path / "large.csv")
    assert rows == 4 * 7 * 2 * 3 and sum(seen) == rows and len(seen) == 4 * 7  # one input each
    assert (tmp_path / "small.csv").read_bytes() == (tmp_path / "large.csv").read_bytes()


def test_export_parquet_keeps_the_dtypes_and_values(model_store, tmp_path, capsys):
    fastparquet = pytest.importorskip("fastparquet")
    out = tmp_path / "m.parquet"
    with qkvmean.open_store(model_store) as store:
        assert export_metrics(store, out, block_rows=20) == 4 * 4 * 4 * 4
        expected = _expected_rows(store)
    with open(out, "rb") as fh:
        table = fastparquet.ParquetFile(fh)
        assert len(table.row_groups) == 4 * 4  # blocks of one input (16 rows)
        frame = table.to_pandas()
    with qkvmean.open_store(model_store) as store:
        header, effects = columns(store), {n: store.effect(n) for n in store.effects}
    assert tuple(frame.columns) == header == (*COLUMNS, *effects) and len(frame) == len(expected)
    for name, value in effects.items():  # one value per condition and input, float32
        assert frame[name].dtype == np.float32
        c = frame["condition"].astype(str).map(CONDITIONS.index).to_numpy()
        np.testing.assert_array_equal(frame[name].to_numpy(), value[c, frame["input"].to_numpy()])
    assert list(frame["condition"].cat.categories) == CONDITIONS
    for name in FLOATS:
        assert frame[name].dtype == np.float32
    for name in ("input", "length", "layer", "head", "top_key_index"):
        assert frame[name].dtype == np.int32
    for i, name in enumerate(COLUMNS):
        got = frame[name].astype(str if i == 0 else frame[name].dtype).to_numpy()
        np.testing.assert_array_equal(got, np.array([row[i] for row in expected], dtype=got.dtype))
    # the command line writes the same table
    cli = tmp_path / "cli.parquet"
    assert main(["export", str(model_store), "--metrics", str(cli), "-q"]) == 0
    assert capsys.readouterr().out == ""
    with open(cli, "rb") as fh:
        again = fastparquet.ParquetFile(fh).to_pandas()
    assert again.equals(frame)


def test_export_refusals_exit_2_and_leave_files_alone(model_store, tmp_path, capsys, monkeypatch):
    store = str(model_store)
    keep = tmp_path / "keep.csv"
    keep.write_text("mine")
    (tmp_path / "adir.csv").mkdir()
    (tmp_path / "link.csv").symlink_to(model_store)
    cases = [
        ([store, "--metrics", str(tmp_path / "m.txt")], r"unknown format '\.txt'; use \.csv or"),
        ([store, "--metrics", str(tmp_path / "m")], r"unknown format '\(no extension\)'"),
        ([store, "--metrics", str(keep)], r"keep\.csv: exists; pass --overwrite"),
        ([store, "--metrics", str(tmp_path / "link.csv")], r"is an input of this command"),
        ([store, "--metrics", str(tmp_path / "adir.csv")], r"is a directory"),
        ([store, "--metrics", str(tmp_path / "no" / "m.csv")], r"does not exist"),
        ([store, "--metrics", ""], r"--metrics is empty"),
        ([str(tmp_path / "none.h5"), "--metrics", str(tmp_path / "m.csv")], r"no such file"),
    ]
    for argv, pattern in cases:
        assert main(["export", *argv]) == 2, argv
        _one_line_error(capsys, r"^qkvmean export: error: .*" + pattern)
    assert keep.read_text() == "mine"
    assert main(["export", store, "--metrics", str(keep), "--overwrite", "-q"]) == 0
    assert keep.read_text().startswith(",".join(COLUMNS))
    monkeypatch.setitem(sys.modules, "fastparquet", None)
    assert main(["export", store, "--metrics", str(tmp_path / "m.parquet")]) == 2
    _one_line_error(capsys, r"needs pandas and fastparquet .*pip install 'qkvmean\[parquet\]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.csv", "keep.csv", "link.csv"]


def test_an_interrupted_export_leaves_no_file(model_store, tmp_path, monkeypatch, capsys):
    calls = []
    original = qkvmean.store.Store.metric_block

    def interrupted(self, *args):
        calls.append(args)
        if len(calls) > 4:  # after the first block is written
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(qkvmean.store.Store, "metric_block", interrupted)
    for name in ("m.csv", "m.parquet"):
        calls.clear()
        assert main(["export", str(model_store), "--metrics", str(tmp_path / name)]) == 130
        assert "interrupted" in capsys.readouterr().err and len(calls) == 5
    assert list(tmp_path.iterdir()) == []  # neither the table nor its temporary file


def test_export_help_lists_the_columns_and_formats(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in (*COLUMNS, ".csv", ".parquet", "qkvmean[parquet]", "--overwrite", "examples:"):
        assert word in text, word
    with pytest.raises(SystemExit) as info:
        main(["export", "run.h5"])
    assert info.value.code == 2
    _one_line_error(capsys, r"the following arguments are required: --metrics")


# --------------------------------------------------------------- render --metrics


def test_metrics_figure_panels_are_the_mean_kl(model_store):
    fig = kl_figure.draw_metrics(model_store)
    with qkvmean.open_store(model_store) as store:
        kl = store.metric("kl_from_baseline").astype(np.float64)
        layers = store.layer_ids
    axes = fig.qkvmean["axes"]
    assert len(axes) == 3
    titles = [ax.get_title() for ax in axes]
    assert titles == [
        rf"KL from baseline: Taking the Mean of $\it{{{w}}}$" for w in ("Query", "Key", "Value")
    ]
    for c, ax in enumerate(axes, start=1):
        (image,) = ax.images
        np.testing.assert_allclose(image.get_array(), kl[c].mean(axis=0), rtol=1e-12, atol=0)
        assert image.get_clim()[0] == 0.0 and image.get_clim()[1] >= kl[c].mean(axis=0).max()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
        assert ax.get_xlabel() == "Head"
    assert len({ax.images[0].get_clim() for ax in axes}) == 1  # one shared scale
    assert fig.qkvmean["colorbar"].ax.get_ylabel() == "KL(baseline ‖ condition), nats"
    ticks = [t.get_text() for t in axes[0].get_yticklabels()]
    assert ticks == ["▸ 0", *map(str, layers[1:])]  # the substitution is at layer 0
    assert axes[0].get_yticklabels()[0].get_fontweight() == "bold"
    assert axes[0].get_ylabel() == "Layer"
    assert "mean over 4 inputs" in fig.get_supxlabel()


def test_metrics_figure_averages_inputs_with_tokens_and_labels_layer_numbers(qkv_store):
    with qkvmean.open_store(qkv_store) as store:
        kl = store.metric("kl_from_baseline").astype(np.float64)
        assert store.lengths[4] == 0
        fig = kl_figure.draw_metrics(store)
        picked = kl_figure.draw_metrics(store, inputs=[6, 1, 1])
        with pytest.raises(InputError, match=r"input 4 .* has no valid token"):
            kl_figure.draw_metrics(store, inputs=[3, 4])
    with_tokens = [0, 1, 2, 3, 5, 6]
    for c, ax in enumerate(fig.qkvmean["axes"], start=1):
        drawn = ax.images[0].get_array()
        np.testing.assert_allclose(drawn, kl[c, with_tokens].mean(axis=0), rtol=1e-12)
        if c < 3:  # (mean-V moves no weight of raw Q/K/V: its KL is 0 throughout)
            assert not np.allclose(drawn, kl[c].mean(axis=0))  # the empty input is left out
    for c, ax in enumerate(picked.qkvmean["axes"], start=1):
        np.testing.assert_allclose(ax.images[0].get_array(), kl[c, [1, 6]].mean(axis=0))
    assert picked.qkvmean["inputs"] == [1, 6]
    ticks = [t.get_text() for t in fig.qkvmean["axes"][0].get_yticklabels()]
    assert ticks == ["3", "▸ 7"]  # the store's layer numbers; substituted at layer 7 only


def test_render_metrics_writes_a_png_also_without_maps(metrics_only, model_store, tmp_path, capsys):
    from matplotlib.image import imread

    for store in (metrics_only, model_store):
        out = tmp_path / f"{store.stem}.png"
        assert main(["render", str(store), "--metrics", "-o", str(out), "--dpi", "60"]) == 0
        assert capsys.readouterr().out.strip() == f"wrote {out}"
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(out).shape
        assert width > height > 50
    svg = tmp_path / "t.svg"
    argv = ["render", str(model_store), "--metrics", "-o", str(svg), "--title", "My KL", "-q"]
    assert main(argv) == 0 and "My KL" in svg.read_text()
    assert not list(tmp_path.glob(".*.tmp*"))


def test_render_metrics_refusals(model_store, tmp_path, capsys):
    out = tmp_path / "k.png"
    for flag in (["--diff"], ["--baseline"], ["--tokens"], ["--layer", "0"], ["--head", "1"]):
        assert main(["render", str(model_store), "--metrics", *flag, "-o", str(out)]) == 2
        _one_line_error(capsys, rf"render: error: {flag[0]} does not apply with --metrics")
    assert main(["render", str(model_store), "--metrics", "--inputs", "9", "-o", str(out)]) == 2
    _one_line_error(capsys, r"has 4 inputs \(0..3\); there is no input 9")
    out.write_bytes(b"mine")
    assert main(["render", str(model_store), "--metrics", "-o", str(out)]) == 2
    _one_line_error(capsys, r"exists; pass --overwrite")
    assert out.read_bytes() == b"mine"
    assert main(["render", str(model_store), "--metrics", "-o", str(tmp_path / "k.csv")]) == 2
    _one_line_error(capsys, r"unknown format '\.csv'")
