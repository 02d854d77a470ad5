"""qkvmean view: the interactive HTML page, tested in a real browser (headless Chromium
through Selenium), and its Jupyter forms (View, Store._repr_html_).

The browser tests need Debian's ``chromium`` and ``chromium-driver`` (/usr/bin/chromium,
/usr/bin/chromedriver) and the ``selenium`` client (the test extra); without them they are
skipped, or fail where ``QKVMEAN_REQUIRE_BROWSER=1`` (CI) says they must run. Selenium is
given both paths, so Selenium Manager never runs (it would download a browser).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
from matplotlib import colormaps
from support import run_qkv_store
from test_store import make_qkv

import qkvmean
from qkvmean.cli import main
from qkvmean.files import InputError
from qkvmean.render import choice, pretty_tokens
from qkvmean.render import view as qview

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CM = colormaps["coolwarm"]
TENSOR_WORDS = {"mean_q": "Query", "mean_k": "Key", "mean_v": "Value"}
TRICKY = 'Tags like </script><b>bold</b> & "quotes" stay text.'


# ------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    """A model run (tokens, texts) whose inputs have 8, 11, 5, 15 and 13 tokens; the
    last text holds markup, which must stay text in the page."""
    tmp = tmp_path_factory.mktemp("view_model")
    texts = tmp / "t.txt"
    texts.write_text(
        "The cat sat on the mat.\nMean keys make every query look the same way.\n"
        "A short one.\nShe read the letter twice, then put it away in the drawer.\n"
        f"{TRICKY}\n"
    )
    out = tmp / "m.h5"
    argv = ["run", "--model", "synthetic", "--text", str(texts), "--out", str(out)]
    assert main([*argv, "--over", "causal", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def qkv_store(tmp_path_factory):
    """Raw Q/K/V (no tokens), 14 inputs (more than a page embeds by default), layer
    numbers 3 and 7, input 2 without any valid token."""
    tmp = tmp_path_factory.mktemp("view_qkv")
    make_qkv(tmp / "in.h5", n=14, layers=2, heads=3, seq=10, seed=5)
    with h5py.File(tmp / "in.h5", "a") as f:
        f["lengths"][2] = 0
    out = tmp / "q.h5"
    assert main(["run", "--qkv", str(tmp / "in.h5"), "--out", str(out), "--quiet"]) == 0
    with h5py.File(out, "r+") as f:
        f["layer"][...] = [3, 7]
        f["map_layer"][...] = [3, 7]  # the maps are at every layer
    return out


@pytest.fixture(scope="module")
def metrics_only(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("view_nomaps")
    return run_qkv_store(tmp, "--no-maps", out="n.h5", n=3, layers=1, heads=2, seq=6)


def _page(store, tmp_path, name="page.html", **kw):
    out = tmp_path / name
    qview.write_view(store, out, overwrite=True, **kw)
    return out


def _meta(page_text: str) -> dict:
    body = re.search(
        r'<script type="application/json" id="qkv-meta">(.*?)</script>', page_text, re.S
    )
    assert body, "the page has no metadata element"
    return json.loads(body[1])


def _labels(store, i):
    return (
        pretty_tokens(store.tokens(i))
        if store.has_tokens
        else [str(t) for t in range(store.lengths[i])]
    )


# ------------------------------------------------------------------------ browser


def _need_browser():
    why = [f"{p} is missing" for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        why.append("the selenium client is not installed (pip install -e '.[test]')")
    if why:
        message = (
            "browser tests need headless Chromium: " + "; ".join(why) + " (apt-get install "
            "chromium chromium-driver)"
        )
        if os.environ.get("QKVMEAN_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, driven through Debian's chromedriver."""
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, path: Path, timeout=30.0):
    """Load the page, wait until its maps are decoded and drawn; return the browser's
    console messages (errors included) logged while it loaded."""
    driver.get_log("browser")  # (drop what earlier pages logged)
    driver.get(path.as_uri())
    return _wait_ready(driver, timeout)


def _wait_ready(driver, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.execute_script(
            "return window.qkvView ? [qkvView.ready, qkvView.error] : [false, null]"
        )
        if state[1]:
            pytest.fail(f"the page failed: {state[1]}")
        if state[0]:
            return driver.get_log("browser")
        time.sleep(0.02)
    pytest.fail(f"the page was not ready within {timeout} s")


def _errors(log) -> list:
    return [e for e in log if e.get("level") in ("SEVERE", "ERROR")]


def _set(driver, **changes):
    driver.execute_script("qkvView.set(arguments[0])", changes)


def _pixels(driver, index, cond) -> np.ndarray:
    """The RGB pixels of a panel's canvas, ``(n, n, 3)``."""
    data = driver.execute_script(
        """const c = document.querySelector(
             `.panel[data-input="${arguments[0]}"][data-condition="${arguments[1]}"] canvas`);
           if (!c) return null;
           return [c.width, Array.from(c.getContext("2d").getImageData(0, 0, c.width,
             c.height).data)];""",
        index,
        cond,
    )
    assert data is not None, f"no panel for input {index}, {cond}"
    n, flat = data
    return np.asarray(flat, dtype=np.uint8).reshape(n, n, 4)[..., :3]


def _js_map(driver, pos, cond, layer, head) -> np.ndarray:
    flat = driver.execute_script(
        "return Array.from(qkvView.map(arguments[0], arguments[1], arguments[2], arguments[3]))",
        pos,
        cond,
        layer,
        head,
    )
    n = math.isqrt(len(flat))
    return np.asarray(flat).reshape(n, n)


def _assert_colours(pixels, values, vmin, vmax, tol, what):
    """Every pixel is coolwarm's colour of its value on [vmin, vmax], allowing the
    neighbouring level where the value lies within ``tol`` of a level's edge."""
    x = (np.asarray(values, np.float64) - vmin) / (vmax - vmin)
    step = tol / (vmax - vmin)
    ok = np.zeros(pixels.shape[:2], dtype=bool)
    for d in (-step, 0.0, step):
        want = CM(np.clip(x + d, 0.0, 1.0), bytes=True)[..., :3]
        ok |= (pixels == want).all(axis=-1)
    assert ok.all(), (
        f"{what}: {int((~ok).sum())} of {ok.size} cells are not the colour of their value "
        f"(first at {tuple(int(v) for v in np.argwhere(~ok)[0])})"
    )


def _panels(driver):
    return driver.execute_script(
        """return Array.from(document.querySelectorAll(".panel")).map(
             (p) => [Number(p.dataset.input), p.dataset.condition,
                     p.querySelector(".ptitle").textContent,
                     Array.from(p.querySelectorAll(".ptitle i")).map((i) => i.textContent)]);"""
    )


def _hover(driver, index, cond, row, col):
    """Move the mouse onto the centre of cell (row, col) of a panel; the tooltip's text."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(
        By.CSS_SELECTOR, f'.panel[data-input="{index}"][data-condition="{cond}"] canvas'
    )
    n, size = driver.execute_script(
        """arguments[0].scrollIntoView({block: "center"});
           return [arguments[0].width, arguments[0].getBoundingClientRect().width];""",
        canvas,
    )
    # the page hides the tooltip on scroll, and a scroll's event comes with the next frame:
    # let it come (two frames) before the mouse moves, or it may hide what the move showed
    driver.execute_async_script(
        "const done = arguments[0];"
        "requestAnimationFrame(() => requestAnimationFrame(() => done()));"
    )
    cell = size / n
    dx = (col + 0.5) * cell - size / 2
    dy = (row + 0.5) * cell - size / 2
    ActionChains(driver).move_to_element_with_offset(canvas, round(dx), round(dy)).perform()
    return driver.execute_script(
        """const tip = {};
           for (const name of ["query", "key", "weight", "baseline", "diff", "panel"])
             tip[name] = document.getElementById("tip-" + name).textContent;
           const box = document.getElementById("tip");
           tip.visible = !box.hidden && box.getBoundingClientRect().width > 0;
           tip.status = document.getElementById("status").textContent;
           const mark = document.getElementById("mark"), m = mark.getBoundingClientRect();
           const c = arguments[0].getBoundingClientRect(), n = arguments[0].width;
           tip.mark = mark.hidden ? null : [m.left, m.top, m.width, m.height];
           tip.cell = [c.left + arguments[2] * c.width / n, c.top + arguments[1] * c.height / n,
                       c.width / n, c.height / n];
           return tip;""",
        canvas,
        int(row),
        int(col),
    )


def _cell_text(text):
    """``3 “sat”`` -> (3, "sat")."""
    match = re.fullmatch(r"(\d+) \u201c(.*)\u201d", text, re.S)
    assert match, text
    return int(match[1]), match[2]


def _number(text) -> float:
    return float(text.replace("\u2212", "-"))


# ------------------------------------------------------------------ browser tests


def test_page_loads_without_errors_and_draws_the_figure_grid(browser, model_store, tmp_path):
    page = _page(model_store, tmp_path)
    text = page.read_text(encoding="utf-8")
    # self-contained: nothing fetched from anywhere, scripts inline
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    assert "<script src" not in text and "Content-Security-Policy" in text
    log = _open(browser, page)
    assert not _errors(log), log
    assert browser.execute_script("return qkvView.errors") == []
    from selenium.webdriver.common.by import By

    store = qkvmean.open_store(model_store)
    title = browser.find_element(By.ID, "title")
    assert title.text == "The Mean Operation For Query, Key and Value"
    assert [i.text for i in title.find_elements(By.TAG_NAME, "i")] == ["Query", "Key", "Value"]
    assert browser.find_element(By.ID, "cbar-label").text == "Attention Weight"
    ticks = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "#cbar-ticks span")]
    assert ticks == [f"{v / 5:.1f}" for v in range(6)]
    # rows: the first three inputs; columns: Query, Key, Value
    panels = _panels(browser)
    columns = [c for c in store.conditions if c != "baseline"]
    assert [(i, c) for i, c, _, _ in panels] == [(i, c) for i in range(3) for c in columns]
    for i, c, words, italic in panels:
        assert words == f"Taking the Mean of {TENSOR_WORDS[c]} (Input {i + 1})"
        assert italic == [TENSOR_WORDS[c]]
    # the selectors offer the store's layers and heads, the mean first
    layers = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#layer option")]
    assert layers == [str(x) for x in store.layer_ids]
    heads = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#head option")]
    assert heads == ["mean", *map(str, range(store.n_heads))]
    inputs = browser.find_elements(By.CSS_SELECTOR, "#inputs input")
    assert [b.is_selected() for b in inputs] == [i < 3 for i in range(store.n_inputs)]
    # token labels on both axes: the store's tokens, as text (markup stays text)
    for axis in ("ylabels", "xlabels"):
        got = browser.execute_script(
            f"""return Array.from(document.querySelectorAll(
                 '.panel[data-input="0"][data-condition="mean_k"] .{axis} span')).map(
                 (s) => [Number(s.dataset.position), s.title]);"""
        )
        labels = _labels(store, 0)
        assert got and all(labels[p] == t for p, t in got), got
        assert got[0][0] == 0
    box = browser.find_element(By.ID, "input-4").find_element(By.XPATH, "..")
    assert box.get_attribute("title") == TRICKY
    assert not browser.find_elements(By.CSS_SELECTOR, "#inputs b")


def test_panels_are_the_stored_maps_and_the_head_mean_is_the_mean_of_heads(
    browser, model_store, tmp_path
):
    page = _page(model_store, tmp_path)
    _open(browser, page)
    store = qkvmean.open_store(model_store)
    res = qview.quantum(qview.DEFAULT_BITS)
    # it opens at the figure's default: the layer and head where the columns differ most
    start = choice.choose(store, [0, 1, 2], ["mean_q", "mean_k", "mean_v"])
    opened = browser.execute_script("return [qkvView.state.layer, qkvView.state.head]")
    assert opened == [start.layer, start.head]
    for cond in ("mean_q", "mean_k", "mean_v"):
        want = store.map(cond, 1, layer=start.layer, head=start.head)
        _assert_colours(_pixels(browser, 1, cond), want, 0.0, 1.0, res / 2 + 1e-7, cond)
    last = store.n_layers - 1
    _set(browser, layer=last, head="mean")
    for pos in range(3):
        n = store.lengths[pos]
        for cond in ("mean_q", "mean_k", "mean_v"):
            heads = store.maps(cond, pos, last)[:, :n, :n].astype(np.float64)
            # the page's head mean, from its heads, is the store's mean over heads
            got = _js_map(browser, pos, cond, last, "mean")
            np.testing.assert_allclose(got, heads.mean(axis=0), rtol=0, atol=res / 2 + 1e-7)
            np.testing.assert_allclose(
                got, store.map(cond, pos, layer=-1, head="mean"), rtol=0, atol=res / 2 + 1e-7
            )
            for h in (0, store.n_heads - 1):
                np.testing.assert_allclose(
                    _js_map(browser, pos, cond, last, h), heads[h], rtol=0, atol=res / 2 + 1e-9
                )
            _assert_colours(
                _pixels(browser, pos, cond),
                store.map(cond, pos, layer=-1, head="mean"),
                0.0,
                1.0,
                res / 2 + 1e-7,
                f"input {pos}, {cond}, last layer, mean",
            )


def test_layer_head_and_columns_change_the_drawn_map(browser, model_store, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = _page(model_store, tmp_path)
    _open(browser, page)
    store = qkvmean.open_store(model_store)
    tol = qview.quantum(qview.DEFAULT_BITS) / 2 + 1e-7
    before = _pixels(browser, 1, "mean_q")
    Select(browser.find_element(By.ID, "layer")).select_by_visible_text(str(store.layer_ids[1]))
    Select(browser.find_element(By.ID, "head")).select_by_visible_text("2")
    after = _pixels(browser, 1, "mean_q")
    assert (before != after).any(), "choosing layer 1, head 2 did not change the map"
    for pos in range(3):
        for cond in ("mean_q", "mean_k", "mean_v"):
            want = store.map(cond, pos, layer=1, head=2)
            _assert_colours(_pixels(browser, pos, cond), want, 0, 1, tol, f"{pos} {cond} 1/2")
    # columns: drop Key, add the baseline (first, as in the figure)
    browser.find_element(By.ID, "col-mean_k").click()
    browser.find_element(By.ID, "col-baseline").click()
    panels = [(i, c) for i, c, _, _ in _panels(browser)]
    assert panels == [(i, c) for i in range(3) for c in ("baseline", "mean_q", "mean_v")]
    assert _panels(browser)[0][2] == "Baseline (Input 1)"
    want = store.map("baseline", 2, layer=1, head=2)
    _assert_colours(_pixels(browser, 2, "baseline"), want, 0, 1, tol, "baseline column")
    # inputs: show input 4 (index 3), hide input 1 (index 0)
    browser.find_element(By.ID, "input-3").click()
    browser.find_element(By.ID, "input-0").click()
    assert sorted({i for i, _, _, _ in _panels(browser)}) == [1, 2, 3]
    want = store.map("mean_v", 3, layer=1, head=2)
    _assert_colours(_pixels(browser, 3, "mean_v"), want, 0, 1, tol, "input 3 after ticking it")


def test_diff_mode_draws_condition_minus_baseline_on_a_symmetric_scale(
    browser, model_store, tmp_path
):
    from selenium.webdriver.common.by import By

    page = _page(model_store, tmp_path)
    _open(browser, page)
    store = qkvmean.open_store(model_store)
    layer = 1
    _set(browser, layer=layer, head="mean")
    browser.find_element(By.ID, "diff").click()
    assert browser.find_element(By.ID, "cbar-label").text == "Attention Weight − Baseline"
    assert not browser.find_element(By.ID, "col-baseline").is_enabled()
    diffs = {
        (i, c): store.map(c, i, layer=layer).astype(np.float64)
        - store.map("baseline", i, layer=layer)
        for i in range(3)
        for c in ("mean_q", "mean_k", "mean_v")
    }
    peak = max(float(np.abs(d).max()) for d in diffs.values())
    limit = browser.execute_script("return qkvView.limit")
    err = 2 * qview.quantum(qview.DEFAULT_BITS) / 2 + 1e-7
    # a round limit just above the largest difference: k * 10^e, with (k - 1) * 10^e below it
    e = 10.0 ** math.floor(math.log10(limit) + 1e-9)
    k = limit / e
    assert abs(k - round(k)) < 1e-6 and 1 <= round(k) <= 10, limit
    assert limit >= peak - err and (round(k) - 1) * e < peak + err, (limit, peak)
    ticks = browser.execute_script(
        "return Array.from(document.querySelectorAll('#cbar-ticks span')).map((s) => "
        "[Number(s.dataset.value), s.textContent])"
    )
    assert ticks[0][0] == pytest.approx(-limit) and ticks[-1][0] == pytest.approx(limit)
    assert _number(ticks[-1][1]) == pytest.approx(limit) and ticks[2][0] == 0
    for (i, c), d in diffs.items():
        _assert_colours(_pixels(browser, i, c), d, -limit, limit, err, f"diff {i} {c}")
    # hover in diff mode: weight, baseline and their difference
    n = store.lengths[0]
    r, col = n - 1, 1
    tip = _hover(browser, 0, "mean_q", r, col)
    weight = store.map("mean_q", 0, layer=layer)[r, col]
    base = store.map("baseline", 0, layer=layer)[r, col]
    tol = qview.max_error(qview.DEFAULT_BITS)
    assert abs(_number(tip["weight"]) - weight) <= tol
    assert abs(_number(tip["baseline"]) - base) <= tol
    assert abs(_number(tip["diff"]) - (weight - base)) <= 2 * tol
    assert "difference" in tip["status"]


def test_hover_shows_the_query_token_key_token_and_weight(browser, model_store, tmp_path):
    page = _page(model_store, tmp_path)
    _open(browser, page)
    store = qkvmean.open_store(model_store)
    tol = qview.max_error(qview.DEFAULT_BITS)
    rng = np.random.default_rng(1)
    for head in ("mean", 1):
        _set(browser, head=head, layer=store.n_layers - 1)
        for pos, cond in ((0, "mean_k"), (1, "mean_q"), (2, "mean_v")):
            n = int(store.lengths[pos])
            labels = _labels(store, pos)
            want = store.map(cond, pos, layer=-1, head=head)
            for r, c in [(n - 1, 0), (0, n - 1), tuple(rng.integers(0, n, 2))]:
                tip = _hover(browser, pos, cond, int(r), int(c))
                assert tip["visible"]
                # the hovered cell is outlined
                assert tip["mark"] is not None
                np.testing.assert_allclose(tip["mark"], tip["cell"], atol=1.0)
                assert _cell_text(tip["query"]) == (r, labels[r]), tip
                assert _cell_text(tip["key"]) == (c, labels[c]), tip
                assert abs(_number(tip["weight"]) - want[r, c]) <= tol, (tip, want[r, c])
                assert tip["weight"] in tip["status"] and f"query {r}" in tip["status"]
                which = "mean over heads" if head == "mean" else f"head {head}"
                assert f"(Input {pos + 1})" in tip["panel"] and which in tip["panel"]


def test_raw_qkv_pages_label_positions_and_embed_the_first_12_inputs(browser, qkv_store, tmp_path):
    from selenium.webdriver.common.by import By

    page = _page(qkv_store, tmp_path)
    meta = _meta(page.read_text(encoding="utf-8"))
    assert [e["index"] for e in meta["inputs"]] == list(range(12))
    log = _open(browser, page)
    assert not _errors(log), log
    store = qkvmean.open_store(qkv_store)
    assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#layer option")] == ["3", "7"]
    # input 2 has no valid token: titled panels without a canvas
    empty = browser.find_elements(By.CSS_SELECTOR, '.panel[data-input="2"]')
    assert len(empty) == 3 and all(not p.find_elements(By.TAG_NAME, "canvas") for p in empty)
    n = int(store.lengths[1])
    tip = _hover(browser, 1, "mean_k", n - 1, 0)
    assert _cell_text(tip["query"]) == (n - 1, str(n - 1))
    assert abs(_number(tip["weight"]) - store.map("mean_k", 1, layer=-1)[n - 1, 0]) <= (
        qview.max_error(qview.DEFAULT_BITS)
    )
    # with other inputs chosen: only those are embedded, in that order
    page = _page(qkv_store, tmp_path, "some.html", inputs=[13, -10, 0])
    assert [e["index"] for e in _meta(page.read_text(encoding="utf-8"))["inputs"]] == [13, 4, 0]
    _open(browser, page)
    want = store.map("mean_q", 13, layer=0, head=1)
    _set(browser, layer=0, head=1)
    tol = qview.quantum(qview.DEFAULT_BITS) / 2 + 1e-7
    _assert_colours(_pixels(browser, 13, "mean_q"), want, 0, 1, tol, "input 13 on its page")


@pytest.mark.parametrize("bits", [8, 16])
def test_other_precisions_decode_to_their_resolution(browser, model_store, tmp_path, bits):
    page = _page(model_store, tmp_path, f"b{bits}.html", bits=bits)
    _open(browser, page)
    store = qkvmean.open_store(model_store)
    res = qview.quantum(bits)
    for h in range(store.n_heads):
        got = _js_map(browser, 3, "mean_k", 2, h)
        want = store.maps("mean_k", 3, 2)[h, : store.lengths[3], : store.lengths[3]]
        np.testing.assert_allclose(got, want, rtol=0, atol=res / 2 + 1e-9)
        # and no coarser: the values are whole steps of 1/(2**bits - 1)
        steps = got / res
        np.testing.assert_allclose(steps, np.rint(steps), atol=1e-6)
    note = browser.execute_script("return document.getElementById('note').textContent")
    assert f"{bits} bits" in note
    shown = float(re.search(r"within ±([0-9.e-]+) of the store", note)[1])
    assert shown == pytest.approx(qview.max_error(bits), rel=0.05)


def test_a_12_input_6_layer_12_head_page_at_64_tokens_stays_under_20_mb(browser, tmp_path_factory):
    """The size bound, for the pipeline's store of that shape, and for the worst case:
    every map of every condition replaced by the most varied weights there are (each
    row a normalised draw of exponentials, the largest entropy per weight)."""
    tmp = tmp_path_factory.mktemp("view_big")
    make_qkv(tmp / "in.h5", n=12, layers=6, heads=12, seq=64, dim=16, dim_v=8, lengths=False)
    store_path = tmp / "big.h5"
    assert main(["run", "--qkv", str(tmp / "in.h5"), "--out", str(store_path), "-q"]) == 0
    sizes = {"pipeline": _page(store_path, tmp, "pipeline.html").stat().st_size}
    rng = np.random.default_rng(7)
    with h5py.File(store_path, "r+") as f:
        for cond in f["attention"]:
            e = rng.exponential(size=f["attention"][cond].shape).astype(np.float32)
            f["attention"][cond][...] = e / e.sum(axis=-1, keepdims=True)
    page = _page(store_path, tmp, "worst.html")
    sizes["worst"] = page.stat().st_size
    assert max(sizes.values()) < 20e6, sizes
    print(f"page sizes: {sizes}")
    # and it opens, with the maps of the last input intact
    log = _open(browser, page, timeout=60)
    assert not _errors(log), log
    store = qkvmean.open_store(store_path)
    assert store.n_inputs == 12 and store.n_layers == 6 and store.n_heads == 12
    for cond in store.conditions:
        got = _js_map(browser, 11, cond, 5, 11)
        want = store.maps(cond, 11, 5)[11]
        np.testing.assert_allclose(got, want, rtol=0, atol=qview.quantum(12) / 2 + 1e-9)


def test_jupyter_view_is_an_iframe_of_the_page_that_runs(browser, model_store, tmp_path):
    from selenium.webdriver.common.by import By

    store = qkvmean.open_store(model_store)
    v = qview.View(store, inputs=[1, 4])
    shown = v._repr_html_()
    frames = _parse(shown).tags("iframe")
    assert len(frames) == 1 and shown.startswith("<iframe") and shown.endswith("</iframe>")
    attrs = frames[0]
    assert attrs["srcdoc"] == v.html == qview.view_html(model_store, inputs=[1, 4])
    assert "allow-scripts" in attrs["sandbox"] and "<script" not in shown  # all escaped
    wrapper = tmp_path / "notebook.html"
    wrapper.write_text(f"<!DOCTYPE html><html><body>{shown}</body></html>", encoding="utf-8")
    browser.get_log("browser")
    browser.get(wrapper.as_uri())
    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    try:
        log = _wait_ready(browser)
        assert not _errors(log), log
        assert sorted({i for i, _, _, _ in _panels(browser)}) == [1, 4]
        start = choice.choose(store, [1, 4], ["mean_q", "mean_k", "mean_v"])
        want = store.map("mean_v", 4, layer=start.layer, head=start.head)
        tol = qview.quantum(qview.DEFAULT_BITS) / 2 + 1e-7
        _assert_colours(_pixels(browser, 4, "mean_v"), want, 0, 1, tol, "in the iframe")
    finally:
        browser.switch_to.default_content()


# -------------------------------------------------------------- HTML and the API


class _Tags(HTMLParser):
    """The start tags of a document, their attributes, and whether it nests properly."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "col", "wbr", "source"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found, self.stack, self.text, self.bad = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.bad.append(tag)
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def tags(self, name):
        return [a for t, a in self.found if t == name]


def _parse(text) -> _Tags:
    p = _Tags()
    p.feed(text)
    p.close()
    assert not p.bad and not p.stack, (p.bad, p.stack)
    return p


def test_store_repr_html_is_a_table_of_what_the_store_holds(model_store, metrics_only, tmp_path):
    store = qkvmean.open_store(model_store)
    shown = store._repr_html_()
    table = _parse(shown)
    cells = {
        html.unescape(k): html.unescape(v)
        for k, v in re.findall(r"<th[^>]*>(.*?)</th><td[^>]*>(.*?)</td>", shown)
    }
    assert table.tags("table") and len(table.tags("tr")) == len(cells) == 8
    assert cells["file"] == str(store.path)
    assert cells["conditions"] == ", ".join(store.conditions)
    assert cells["inputs"].startswith(f"{store.n_inputs} (")
    assert cells["layers"].startswith(f"{store.n_layers} (")
    assert cells["heads"] == str(store.n_heads)
    assert cells["model"] == "synthetic" and cells["maps"].startswith("yes")
    none = qkvmean.open_store(metrics_only)._repr_html_()
    assert "no (--no-maps" in "".join(_parse(none).text)
    # a file name with markup in it is text
    odd = tmp_path / 'a<b>&"c.h5'
    odd.write_bytes(Path(metrics_only).read_bytes())
    shown = qkvmean.open_store(odd)._repr_html_()
    parsed = _parse(shown)
    assert not parsed.tags("b") and str(odd) in parsed.text and odd.name in parsed.text


def test_the_page_embeds_only_the_valid_region_quantised(model_store, tmp_path):
    page = _page(model_store, tmp_path).read_text(encoding="utf-8")
    meta = _meta(page)
    store = qkvmean.open_store(model_store)
    assert meta["bits"] == qview.DEFAULT_BITS and meta["conditions"] == store.conditions
    assert [e["n"] for e in meta["inputs"]] == store.lengths.tolist()
    assert meta["inputs"][4]["text"] == TRICKY and "</script><b>" not in page.split("<script")[0]
    import base64
    import zlib

    lut = np.asarray(meta["lut"], np.uint8).reshape(-1, 3)
    assert len(lut) == 256 and (lut == CM(np.arange(256), bytes=True)[:, :3]).all()
    for pos, e in enumerate(meta["inputs"]):
        blob = re.search(rf'id="qkv-maps-{pos}" data-input="{e["index"]}">([^<]*)<', page)[1]
        raw = np.frombuffer(zlib.decompress(base64.b64decode(blob)), np.uint8)
        n = e["n"]
        count = len(store.conditions) * store.n_layers * store.n_heads * n * n
        assert raw.size == 2 * count  # n x n per map, two bytes each, nothing more
        q = (raw[:count].astype(np.uint16) | (raw[count:].astype(np.uint16) << 8)).reshape(
            len(store.conditions), store.n_layers, store.n_heads, n, n
        )
        assert q.max() < 2**qview.DEFAULT_BITS
        for c, cond in enumerate(store.conditions):
            want = store.maps(cond, pos)[:, :, :n, :n]
            np.testing.assert_allclose(
                q[c] * qview.quantum(), want, rtol=0, atol=qview.quantum() / 2 + 1e-9
            )


def test_the_page_is_the_package_data_files_filled_in(model_store, tmp_path):
    """The document, style and script are files (qkvmean/render/static/), in the page whole."""
    page = _page(model_store, tmp_path).read_text(encoding="utf-8")
    static = Path(qview.__file__).parent / "static"
    css, js, doc = (static / name for name in ("view.css", "view.js", "view.html"))
    assert f"<style>\n{css.read_text(encoding='utf-8')}</style>" in page
    assert f"<script>\n{js.read_text(encoding='utf-8')}</script>\n</body>" in page
    assert page.startswith(doc.read_text(encoding="utf-8").split("@TITLE@")[0])


def test_every_file_of_the_page_is_package_data_of_the_wheel():
    """pyproject's package-data names every file in qkvmean/render/static/ (an editable
    install reads them from the tree whatever it says; a wheel carries only those)."""
    import fnmatch
    import re

    root = Path(__file__).resolve().parents[1]
    # the one line of [tool.setuptools.package-data] (no tomllib before Python 3.11)
    line = re.search(r'^"qkvmean\.render" = \[(.*)\]$', (root / "pyproject.toml").read_text(), re.M)
    globs = re.findall(r'"([^"]+)"', line[1])
    files = sorted(p.name for p in (root / "qkvmean" / "render" / "static").iterdir())
    assert files == ["sweep.css", "sweep.html", "sweep.js", "view.css", "view.html", "view.js"]
    assert all(any(fnmatch.fnmatch(f"static/{f}", g) for g in globs) for f in files)


def test_view_api_refusals_are_one_line_value_errors(model_store, metrics_only, tmp_path):
    store = qkvmean.open_store(model_store)
    for inputs, rx in [
        ([0, 9], r"has 5 inputs \(0..4\); there is no input 9"),
        ([1, -4], r"names input 1 twice"),
        ([], r"--inputs is empty"),
    ]:
        with pytest.raises(InputError, match=rx) as info:
            qview.view_html(store, inputs)
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError):
        qview.view_html(store, "0,1")
    with pytest.raises(InputError, match="--bits 17"):
        qview.view_html(store, bits=17)
    with pytest.raises(ValueError, match="--no-maps: it holds metrics only"):
        qview.view_html(metrics_only)
    with pytest.raises(ValueError, match="--no-maps"):
        qview.View(metrics_only)
    out = tmp_path / "p.html"
    out.write_text("mine")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        qview.write_view(store, out)
    assert out.read_text() == "mine"
    with pytest.raises(InputError, match="is an input of this command"):
        qview.write_view(model_store, model_store, overwrite=True)
    v = qview.View(store, inputs=[0])
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        v.save(out)
    assert v.save(out, overwrite=True) == out and out.read_text(encoding="utf-8") == v.html
    link = tmp_path / "store.html"
    link.symlink_to(model_store)
    with pytest.raises(InputError, match="is an input of this command"):
        v.save(link, overwrite=True)


def _exit_code(argv) -> int:
    """``main``'s exit status, also where argparse exits (a bad option value)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


def test_view_command_writes_the_page_and_says_what_it_embedded(qkv_store, tmp_path, capsys):
    out = tmp_path / "q.html"
    assert main(["view", str(qkv_store), "-o", str(out)]) == 0
    line = capsys.readouterr().out
    store = qkvmean.open_store(qkv_store)
    assert line.count("\n") == 1 and line.startswith(f"wrote {out} (")
    assert f"12 of {store.n_inputs} inputs embedded (0..11; --inputs picks others)" in line
    assert f"{qview.DEFAULT_BITS} bits" in line
    meta = _meta(out.read_text(encoding="utf-8"))
    assert [e["index"] for e in meta["inputs"]] == list(range(12))
    first = out.read_bytes()
    assert (
        main(["view", str(qkv_store), "-o", str(out), "--inputs", "13", "--overwrite", "-q"]) == 0
    )
    assert capsys.readouterr().out == ""
    assert out.read_bytes() != first
    assert [e["index"] for e in _meta(out.read_text(encoding="utf-8"))["inputs"]] == [13]
    assert not list(tmp_path.glob(".*.tmp*"))


def test_view_command_refusals_exit_2_on_one_line(qkv_store, metrics_only, tmp_path, capsys):
    page = str(tmp_path / "p.html")
    for argv, rx in [
        ([str(metrics_only), "-o", page], r"written with --no-maps: it holds metrics only"),
        ([str(qkv_store), "-o", page, "--inputs", "0,14"], r"has 14 inputs.*no input 14"),
        ([str(qkv_store), "-o", page, "--inputs", "3,3"], r"names input 3 twice"),
        ([str(qkv_store), "-o", page, "--inputs", ""], r"--inputs is empty"),
        ([str(qkv_store), "-o", page, "--inputs", "1,x"], r"expected comma-separated integers"),
        ([str(qkv_store), "-o", page, "--bits", "4"], r"--bits 4: .*8 to 16 bits"),
        ([str(qkv_store), "-o", str(tmp_path / "p.png")], r"give a file name ending in .html"),
        ([str(qkv_store), "-o", str(tmp_path / "no" / "p.html")], r"does not exist"),
        ([str(tmp_path / "none.h5"), "-o", page], r"no such file"),
    ]:
        assert _exit_code(["view", *argv]) == 2, argv
        _one_line_error(capsys, rx)
    assert not Path(page).exists()
    # never over an existing page without --overwrite, never over the store at all
    Path(page).write_text("mine")
    assert main(["view", str(qkv_store), "-o", page]) == 2
    _one_line_error(capsys, r"exists; pass --overwrite to replace it")
    assert Path(page).read_text() == "mine"
    before = Path(qkv_store).read_bytes()
    link = tmp_path / "store.html"
    link.symlink_to(qkv_store)
    assert main(["view", str(qkv_store), "-o", str(link), "--overwrite"]) == 2
    _one_line_error(capsys, r"is an input of this command")
    assert Path(qkv_store).read_bytes() == before


def test_too_large_pages_are_cut_by_default_and_refused_when_asked_for(
    qkv_store, tmp_path, capsys, monkeypatch
):
    store = qkvmean.open_store(qkv_store)
    per = len(store.conditions) * store.n_layers * store.n_heads
    lengths = store.lengths.tolist()
    # a bound that the first three inputs fit, the fourth does not
    bound = sum(n * n for n in lengths[:3]) * per
    monkeypatch.setattr(qview, "MAX_WEIGHTS", bound)
    out = tmp_path / "cut.html"
    assert main(["view", str(qkv_store), "-o", str(out)]) == 0
    line = capsys.readouterr().out
    assert (
        f"3 of {store.n_inputs} inputs embedded (0..2; more would make the page too large" in line
    )
    assert [e["index"] for e in _meta(out.read_text(encoding="utf-8"))["inputs"]] == [0, 1, 2]
    assert main(["view", str(qkv_store), "-o", str(out), "--inputs", "0,1,2,3", "--overwrite"]) == 2
    _one_line_error(capsys, r"more than a page holds.*choose fewer or shorter inputs")


def test_view_help_describes_it_with_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["view", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "self-contained HTML page" in text and "examples:" in text
    assert re.search(r"qkvmean view \S+\.h5 -o \S+\.html", text)
    assert "--inputs" in text and "--overwrite" in text and "DecompressionStream" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert re.search(r"\bview\b.*interactive HTML page", capsys.readouterr().out)


def test_escaped_page_text_round_trips_through_html_unescape(model_store):
    v = qview.View(model_store)
    attrs = re.search(r'srcdoc="([^"]*)"', v._repr_html_())[1]
    assert html.unescape(attrs) == v.html


def test_without_chromium_browser_tests_skip_or_fail_where_required(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("QKVMEAN_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium is missing"):
        _need_browser()
    monkeypatch.setenv("QKVMEAN_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium chromium-driver"):
        _need_browser()


def test_the_docs_python_example_runs_and_state_the_resolution(qkv_store, tmp_path, monkeypatch):
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "view.md").read_text(encoding="utf-8")
    shutil.copy(qkv_store, tmp_path / "run.h5")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/view.md", "exec"), {})
    meta = _meta((tmp_path / "run.html").read_text(encoding="utf-8"))
    assert [e["index"] for e in meta["inputs"]] == [0, 4, 7]
    # the resolution the docs and the README state is the page's
    assert f"{qview.max_error(12):.3g}" in doc and f"{qview.quantum(12) / 2:.3g}" in doc
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert f"{qview.max_error(12):.2g}" in readme
    assert "(docs/view.png)" in readme
    assert (root / "docs" / "view.png").read_bytes()[:4] == b"\x89PNG"
