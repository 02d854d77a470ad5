"""An interactive view of a store: one self-contained HTML page (``qkvmean view``).

The page shows the grid of the figure (rows: inputs; columns: the substituted tensors,
optionally the baseline) and lets the reader pick the inputs shown, the layer, the head
(or the mean over heads, computed in the page from the heads), the columns, and a
difference mode (condition − baseline on a symmetric scale). Hovering a cell shows its
query token, key token and weight. Everything is inline: no network, no server, no
framework; the maps are drawn in ``<canvas>`` elements, one canvas pixel per token pair.

What it embeds (``docs/view.md``): for each chosen input with ``n`` valid tokens, the
``n × n`` maps of every condition, layer and head, quantised to ``bits`` bits
(``round(w · (2**bits − 1))``; default 12 bits, steps of 1/4095, so a shown weight is
within :func:`max_error` of the store's), the two bytes of each value split into two
planes, deflated (zlib) and base64-encoded, one ``<script type="application/octet-stream">``
per input; the page inflates them with the browser's ``DecompressionStream``. At 12 bits
a page of 12 inputs × 6 layers × 12 heads × 4 conditions at 64 tokens stays under 20 MB
whatever the maps hold.
"""

from __future__ import annotations

import base64
import html
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import (
    InputError,
    check_new_file,
    put_in_place,
    refuse_inputs,
    sweep_temporaries,
)
from ..store.reader import Store, check_weights, open_store
from . import CMAP, COLORBAR_LABEL, DIFF_LABEL, TENSORS, choice, given_inputs, pretty_tokens

#: Output extensions.
FORMATS = (".html", ".htm")
#: Precision of the embedded weights, bits (8..16); 12 keeps the 20 MB bound above.
DEFAULT_BITS = 12
BIT_RANGE = (8, 16)
#: Inputs embedded when none are named.
DEFAULT_INPUTS = 12
#: Inputs shown when the page opens (the figure's default).
SHOWN_INPUTS = 3
#: At most this many weights in one page (about 80 MB of page at 12 bits): more is more
#: than a browser tab holds comfortably.
MAX_WEIGHTS = 64 * 2**20
#: Digits of the weights the page shows (hover, status line).
DIGITS = 5
#: Side of a panel the page aims at (CSS pixels); each cell is a whole, even number of
#: pixels where it can be.
PANEL_PX = 256
COLORBAR_LEVELS = 256
TITLE_HTML = "The Mean Operation For <i>Query</i>, <i>Key</i> and <i>Value</i>"
TITLE_TEXT = "The Mean Operation For Query, Key and Value"
#: zlib level: 6 is within 1 % of 9 on attention maps, and several times faster.
LEVEL = 6


def quantum(bits: int = DEFAULT_BITS) -> float:
    """The step between embedded weights: ``1 / (2**bits − 1)``."""
    return 1.0 / (2**bits - 1)


def max_error(bits: int = DEFAULT_BITS) -> float:
    """How far a weight the page shows may be from the store's: half a step of the
    quantisation plus the rounding to :data:`DIGITS` decimals (a difference of two
    weights: twice that)."""
    return quantum(bits) / 2 + 0.5 * 10.0**-DIGITS


def colormap_table(levels: int = COLORBAR_LEVELS) -> np.ndarray:
    """matplotlib's ``coolwarm`` at ``levels`` levels: ``(levels, 3)`` uint8 RGB."""
    from matplotlib import colormaps

    cmap = colormaps[CMAP].resampled(levels)
    return np.asarray(cmap(np.arange(levels), bytes=True))[:, :3]


def _check_bits(bits) -> int:
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {bits!r}")
    lo, hi = BIT_RANGE
    if not lo <= bits <= hi:
        raise InputError(f"--bits {bits}: the weights are embedded with {lo} to {hi} bits")
    return int(bits)


def _cell_px(n: int) -> int:
    """CSS pixels per cell for ``n`` tokens: about :data:`PANEL_PX` per panel, even
    where it can be (so a cell's centre lies on a whole pixel)."""
    cell = max(1, PANEL_PX // max(n, 1))
    return cell - 1 if cell > 2 and cell % 2 else cell


@dataclass
class Page:
    """A built page: its HTML and what went into it."""

    html: str
    inputs: list  # the store's input numbers embedded, in order
    total_inputs: int
    bits: int
    limited: bool  # the default choice stopped before DEFAULT_INPUTS at MAX_WEIGHTS
    columns: list  # the conditions that can be columns
    height: int  # about how tall the page is when it opens (CSS pixels)

    @property
    def bytes(self) -> int:
        return len(self.html.encode("utf-8"))


def _columns(store: Store) -> list:
    present = [c for c in TENSORS if c in store.conditions]
    if not present:
        raise InputError(
            f"{store.path.name} holds none of {', '.join(TENSORS)} (it has "
            f"{', '.join(store.conditions)}); nothing to view"
        )
    return present


def choose_inputs(store: Store, inputs=None):
    """The inputs a page embeds, and whether the default choice stopped early at
    :data:`MAX_WEIGHTS`: ``(indices, limited)``. ``inputs``: input numbers (negative
    count from the end), or None for the first :data:`DEFAULT_INPUTS` (or fewer)."""
    per_token2 = len(store.conditions) * store.n_layers * store.n_heads
    if store.n_inputs == 0:
        raise InputError(f"{store.path.name} has no inputs; nothing to view")
    if inputs is None:
        chosen, total = [], 0
        for i in range(min(DEFAULT_INPUTS, store.n_inputs)):
            total += int(store.lengths[i]) ** 2 * per_token2
            if total > MAX_WEIGHTS and chosen:
                return chosen, True
            chosen.append(i)
        indices, limited = chosen, False
    else:
        indices, limited = given_inputs(store, inputs), False
        twice = [i for n, i in enumerate(indices) if i in indices[:n]]
        if twice:
            raise InputError(f"--inputs names input {twice[0]} twice")
    weights = sum(int(store.lengths[i]) ** 2 for i in indices) * per_token2
    if weights > MAX_WEIGHTS:
        which = "its first input" if inputs is None else "these inputs"
        raise InputError(
            f"{store.path.name}: the maps of {which} are {weights:,} weights, more than "
            f"a page holds ({MAX_WEIGHTS:,}); choose fewer or shorter inputs with --inputs"
        )
    return indices, limited


def _quantised(store: Store, index: int, bits: int) -> bytes:
    """One input's maps, ``(condition, layer, head, n, n)``, as ``bits``-bit integers:
    the low bytes of every value, then (above 8 bits) the high bytes."""
    n = int(store.lengths[index])
    levels = 2**bits - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    out = np.empty((len(store.conditions), store.n_layers, store.n_heads, n, n), dtype)
    for c, cond in enumerate(store.conditions):
        for layer in range(store.n_layers):
            where = f"input {index}, condition {cond}, layer {store.layer_ids[layer]}"
            m = np.asarray(store.maps(cond, index, layer)[:, :n, :n], dtype=np.float64)
            check_weights(m, store.path, where)
            out[c, layer] = np.rint(np.clip(m, 0.0, 1.0) * levels)
    if dtype == np.uint8:
        return out.tobytes()
    planes = out.astype("<u2").view(np.uint8).reshape(-1, 2)
    return planes.T.tobytes()  # all low bytes, then all high bytes


def input_spans(indices) -> str:
    """Input numbers in short: ``[0, 1, 2, 5]`` -> ``"0..2,5"``."""
    spans = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}..{b}" for a, b in spans)


def _json(value) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _labels(store: Store, index: int) -> list:
    n = int(store.lengths[index])
    if store.has_tokens:
        return pretty_tokens(store.tokens(index))
    return [str(t) for t in range(n)]


def build_page(store: Store, inputs=None, *, bits: int = DEFAULT_BITS) -> Page:
    """The page of ``store`` (an open Store): see :func:`view_html`."""
    bits = _check_bits(bits)
    if not store.has_maps:
        raise InputError(
            f"{store.path.name} was written with --no-maps: it holds metrics only, and the "
            "view draws maps (qkvmean render --metrics draws its metrics)"
        )
    columns = _columns(store)
    indices, limited = choose_inputs(store, inputs)
    texts = store.texts
    entries, blobs = [], []
    for pos, i in enumerate(indices):
        n = int(store.lengths[i])
        entries.append(
            {
                "index": i,
                "n": n,
                "cell": _cell_px(n),
                "tokens": _labels(store, i),
                "text": texts[i] if texts is not None else None,
            }
        )
        data = base64.b64encode(zlib.compress(_quantised(store, i, bits), LEVEL)).decode()
        blobs.append(
            f'<script type="application/octet-stream" id="qkv-maps-{pos}" '
            f'data-input="{i}">{data}</script>'
        )
    start = choice.choose(store, indices[:SHOWN_INPUTS], columns)
    cfg = store.config
    model = cfg.get("model") or cfg.get("input")
    meta = {
        "store": store.path.name,
        "source": store.source,
        "model": None if model is None else str(model),
        "conditions": store.conditions,
        "columns": columns,
        "tensors": {c: TENSORS[c] for c in columns},
        "layers": store.layer_ids,
        "heads": store.n_heads,
        "total_inputs": store.n_inputs,
        "inputs": entries,
        "shown": list(range(min(SHOWN_INPUTS, len(entries)))),
        # it opens where the figure would: the layer and head where the columns differ most
        "start": {"layer": start.layer, "head": start.head},
        "bits": bits,
        "levels": 2**bits - 1,
        "planes": 1 if bits <= 8 else 2,
        "digits": DIGITS,
        "max_error": max_error(bits),
        "lut": colormap_table().reshape(-1).tolist(),
        "label": COLORBAR_LABEL,
        "diff_label": DIFF_LABEL,
        "limited": limited,
        "panel": PANEL_PX,
    }
    shown = [entries[p] for p in meta["shown"]]
    panel = max((e["n"] * e["cell"] for e in shown), default=PANEL_PX)
    height = 330 + len(shown) * (panel + 140)
    page = (
        _TEMPLATE.replace("@TITLE@", html.escape(f"qkvmean view: {store.path.name}"))
        .replace("@HEADING@", TITLE_HTML)
        .replace("@CSS@", _CSS)
        .replace("@META@", _json(meta))
        .replace("@MAPS@", "\n".join(blobs))
        .replace("@JS@", _JS)
    )
    return Page(page, indices, store.n_inputs, bits, limited, columns, height)


def view_html(store, inputs=None, *, bits: int = DEFAULT_BITS) -> str:
    """The interactive page of a store, as one self-contained HTML document.

    Parameters
    ----------
    store : Store or path
        An open store, or the path of one (it must hold maps: not ``--no-maps``).
    inputs : sequence of int, optional
        The inputs to embed (from 0; negative counts from the end); default the first
        :data:`DEFAULT_INPUTS`, or fewer where more would pass :data:`MAX_WEIGHTS`.
        The page opens showing the first three of them.
    bits : int
        Precision of the embedded weights, 8..16 (default 12: steps of 1/4095).

    Examples
    --------
    >>> from qkvmean.render.view import view_html
    >>> page = view_html("run.h5", inputs=[0, 4])  # doctest: +SKIP
    """
    if not isinstance(store, Store):
        with open_store(store) as opened:
            return build_page(opened, inputs, bits=bits).html
    return build_page(store, inputs, bits=bits).html


def check_output(path, overwrite=False, inputs=()) -> Path:
    """Refuse a page we cannot or should not write, before any work: never one of
    ``inputs`` (the store), whatever ``overwrite`` says; an existing file only with
    ``overwrite``."""
    path = Path(path)
    if not str(path):
        raise InputError("-o is empty; give a file name ending in .html")
    refuse_inputs(path, inputs, flag="-o")  # never the store, whatever its name
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"-o {path}: the view is an HTML page; give a file name ending in .html")
    return check_new_file(path, overwrite, inputs, flag="-o", noun="page")


def save_page(text: str, path, *, overwrite=False) -> Path:
    """Write ``text`` at ``path`` whole or not at all: a temporary file beside it, put in
    place at the end (without ``overwrite`` through a hard link, so that a file that
    appeared meanwhile is not replaced either)."""
    path = Path(path)
    sweep_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        put_in_place(tmp, path, overwrite, flag="-o", noun="page")
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_view(
    store_or_path, out, *, inputs=None, overwrite=False, bits: int = DEFAULT_BITS
) -> Path:
    """Write the interactive page of a store (:func:`view_html`) at ``out`` (``.html``).

    Never over the store itself, and over an existing file only with ``overwrite``; the
    page appears whole or not at all. Returns the page's path.
    """
    if isinstance(store_or_path, Store):
        out = check_output(out, overwrite, inputs=[store_or_path.path])
        page = build_page(store_or_path, inputs, bits=bits)
    else:
        out = check_output(out, overwrite, inputs=[store_or_path])
        with open_store(store_or_path) as store:
            page = build_page(store, inputs, bits=bits)
    return save_page(page.html, out, overwrite=overwrite)


class View:
    """The page of a store, shown inline in Jupyter (an ``<iframe srcdoc=...>``).

    >>> from qkvmean.render.view import View
    >>> View("run.h5")  # doctest: +SKIP

    ``View(store, inputs=None, bits=12)`` takes what :func:`view_html` takes;
    ``.html`` is the page, ``.save(path, overwrite=False)`` writes it.
    """

    def __init__(self, store, inputs=None, *, bits: int = DEFAULT_BITS, height=None):
        if isinstance(store, Store):
            page = build_page(store, inputs, bits=bits)
            self.store_path = store.path
        else:
            with open_store(store) as opened:
                page = build_page(opened, inputs, bits=bits)
            self.store_path = Path(store)
        self.page = page
        self.html = page.html
        self.height = int(height) if height is not None else page.height

    def _repr_html_(self) -> str:
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" '
            f'style="width: 100%; height: {self.height}px; border: 0" '
            'sandbox="allow-scripts" title="qkvmean view"></iframe>'
        )

    def save(self, path, *, overwrite=False) -> Path:
        out = check_output(path, overwrite, inputs=[self.store_path])
        return save_page(self.html, out, overwrite=overwrite)

    def __repr__(self):
        return (
            f"<qkvmean View: {len(self.page.inputs)} of {self.page.total_inputs} inputs, "
            f"{self.page.bytes / 1e6:.1f} MB>"
        )


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; \
script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>@TITLE@</title>
<style>@CSS@</style>
</head>
<body>
<header>
<div id="info"></div>
<form id="controls" onsubmit="return false">
<fieldset id="inputs"><legend>Inputs</legend></fieldset>
<fieldset><legend>Map</legend>
<label>Layer <select id="layer"></select></label>
<label>Head <select id="head"></select></label>
</fieldset>
<fieldset id="columns"><legend>Columns</legend></fieldset>
<fieldset><legend>Mode</legend>
<label><input type="checkbox" id="diff"> Difference from the baseline</label>
</fieldset>
</form>
<div id="status" role="status" aria-live="polite">Loading the maps…</div>
</header>
<main>
<div id="figure">
<div id="grid"></div>
<div id="colorbar"><div id="cbar-ticks"></div><canvas id="cbar" width="1" height="256">\
</canvas><div id="cbar-label"></div></div>
</div>
<h1 id="title">@HEADING@</h1>
<p id="note"></p>
</main>
<div id="mark" hidden></div>
<div id="tip" hidden>
<div id="tip-panel"></div>
<table>
<tr><th>query</th><td id="tip-query"></td></tr>
<tr><th>key</th><td id="tip-key"></td></tr>
<tr><th>weight</th><td id="tip-weight"></td></tr>
<tr class="diff-only"><th>baseline</th><td id="tip-baseline"></td></tr>
<tr class="diff-only"><th>difference</th><td id="tip-diff"></td></tr>
</table>
</div>
<script type="application/json" id="qkv-meta">@META@</script>
@MAPS@
<script>@JS@</script>
</body>
</html>
"""

_CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 12px; color: #222;
  background: #fff; }
header { margin-bottom: 10px; }
#info { font-size: 13px; color: #555; margin-bottom: 6px; }
#controls { display: flex; flex-wrap: wrap; gap: 8px; font-size: 13px; }
fieldset { border: 1px solid #ccc; border-radius: 4px; padding: 4px 8px; margin: 0; }
fieldset label { margin-right: 10px; white-space: nowrap; }
#status { font-size: 13px; min-height: 1.4em; margin-top: 6px; font-family: monospace; }
#status.error { color: #b00; font-family: inherit; }
#figure { display: flex; align-items: flex-start; gap: 14px; }
#grid { display: grid; gap: 18px 22px; align-items: start; }
.panel { display: grid; grid-template-columns: auto auto; grid-template-rows: auto auto auto;
  justify-content: start; }
.ptitle { grid-column: 2; font-size: 14px; text-align: center; padding-bottom: 4px;
  white-space: nowrap; }
.ylabels { grid-column: 1; grid-row: 2; position: relative; min-width: 4px; }
.panel canvas { grid-column: 2; grid-row: 2; image-rendering: pixelated;
  image-rendering: crisp-edges; display: block; cursor: crosshair; }
.xlabels { grid-column: 2; grid-row: 3; position: relative; }
.ylabels span, .xlabels span { position: absolute; white-space: nowrap; color: #333;
  line-height: 1; }
.ylabels span { right: 3px; transform: translateY(-50%); }
.xlabels span { top: 3px; writing-mode: vertical-rl; transform: translateX(-50%) rotate(180deg); }
.empty { display: flex; align-items: center; justify-content: center; color: #888;
  background: #f3f3f3; font-size: 12px; grid-column: 2; grid-row: 2; }
#colorbar { position: sticky; top: 10px; display: grid; grid-template-columns: 20px auto auto;
  align-items: stretch; margin-top: 26px; }
#cbar { grid-column: 1; width: 20px; height: 300px; image-rendering: pixelated;
  border: 1px solid #999; }
#cbar-ticks { grid-column: 2; grid-row: 1; position: relative; width: 52px; font-size: 12px; }
#cbar-ticks span { position: absolute; left: 5px; transform: translateY(-50%); }
#cbar-label { grid-column: 3; grid-row: 1; writing-mode: vertical-rl; transform: rotate(180deg);
  text-align: center; font-size: 14px; }
#title { font-size: 18px; font-weight: normal; text-align: center; margin: 18px 0 6px; }
#note { font-size: 12px; color: #666; text-align: center; margin: 0; }
#mark { position: fixed; pointer-events: none; box-sizing: border-box;
  border: 2px solid #000; outline: 1px solid #fff; }
#tip { position: fixed; pointer-events: none; background: rgba(255, 255, 255, 0.95);
  border: 1px solid #888; border-radius: 3px; padding: 4px 6px; font-size: 12px; z-index: 10;
  box-shadow: 0 1px 4px rgba(0, 0, 0, 0.25); }
#tip th { text-align: left; font-weight: normal; color: #666; padding-right: 8px; }
#tip td { font-family: monospace; }
#tip:not(.diff) .diff-only { display: none; }
"""

_JS = r"""
"use strict";
(function () {
  const meta = JSON.parse(document.getElementById("qkv-meta").textContent);
  const LEVELS = meta.levels, LUT = meta.lut, H = meta.heads, L = meta.layers.length;
  const COND = meta.conditions, PANEL = meta.panel;
  const $ = (id) => document.getElementById(id);
  const state = {
    shown: meta.shown.slice(), layer: meta.start.layer, head: meta.start.head,
    columns: meta.columns.slice(), baseline: false, diff: false,
  };
  const blocks = [];
  const view = {
    meta: meta, state: state, ready: false, error: null, errors: [], limit: null,
    map: map, shownMap: shownMap, render: render, set: set,
  };
  window.qkvView = view;
  window.addEventListener("error", (e) => view.errors.push(String(e.message)));
  window.addEventListener("scroll", () => { $("tip").hidden = $("mark").hidden = true; },
    { passive: true });  // both are placed where the pointer was

  function fail(err) {
    view.error = String(err && err.message ? err.message : err);
    const s = $("status");
    s.className = "error";
    s.textContent = "The page cannot show the maps: " + view.error;
    console.error("qkvmean view: " + view.error);
  }

  function bytesOf(text) {
    const bin = atob(text.replace(/\s+/g, ""));
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  async function decode(pos) {
    const n = meta.inputs[pos].n, count = COND.length * L * H * n * n;
    const raw = await inflate(bytesOf($("qkv-maps-" + pos).textContent));
    if (raw.length !== count * meta.planes) {
      throw new Error("the maps of input " + meta.inputs[pos].index + " are " + raw.length +
        " bytes, not " + count * meta.planes + ": the page is damaged");
    }
    if (meta.planes === 1) return raw;
    const out = new Uint16Array(count);
    for (let i = 0; i < count; i++) out[i] = raw[i] | (raw[count + i] << 8);
    return out;
  }

  // One map of an embedded input (position pos in meta.inputs), as weights, n*n row-major:
  // query rows, key columns. head: a number, or "mean" (the mean over the heads).
  function map(pos, cond, layer, head) {
    const n = meta.inputs[pos].n, nn = n * n, c = COND.indexOf(cond), blk = blocks[pos];
    if (c < 0) throw new Error("no condition " + cond);
    const out = new Float64Array(nn);
    const first = ((c * L + layer) * H) * nn;
    if (head === "mean") {
      for (let h = 0; h < H; h++) {
        const base = first + h * nn;
        for (let j = 0; j < nn; j++) out[j] += blk[base + j];
      }
      const scale = 1 / (H * LEVELS);
      for (let j = 0; j < nn; j++) out[j] *= scale;
    } else {
      const base = first + head * nn;
      for (let j = 0; j < nn; j++) out[j] = blk[base + j] / LEVELS;
    }
    return out;
  }

  // What a panel shows: the weights, or (diff mode) the weights minus the baseline's.
  function shownMap(pos, cond) {
    const m = map(pos, cond, state.layer, state.head);
    if (!state.diff) return m;
    const b = map(pos, "baseline", state.layer, state.head);
    for (let j = 0; j < m.length; j++) m[j] -= b[j];
    return m;
  }

  // A round upper limit for the symmetric scale: 0.05 -> 0.05, 0.37 -> 0.4.
  function niceCeiling(x) {
    if (!(x > 0)) return 1e-3;
    const step = Math.pow(10, Math.floor(Math.log10(x)));
    return Math.ceil(x / step - 1e-9) * step;
  }

  function colorIndex(v, vmin, vmax) {
    const x = (v - vmin) / (vmax - vmin);
    return Math.min(255, Math.max(0, Math.floor(x * 256)));
  }

  function fmt(v, signed) {
    const s = v.toFixed(meta.digits);
    return signed && v >= 0 ? "+" + s : s.replace("-", "\u2212");
  }

  function columnsShown() {
    const cols = [];
    if (state.baseline && !state.diff) cols.push("baseline");
    for (const c of meta.columns) if (state.columns.includes(c)) cols.push(c);
    return cols;
  }

  function titleOf(cond, index) {
    const t = document.createElement("div");
    t.className = "ptitle";
    if (cond === "baseline") {
      t.textContent = "Baseline (Input " + (index + 1) + ")";
    } else {
      t.append("Taking the Mean of ");
      const i = document.createElement("i");
      i.textContent = meta.tensors[cond];
      t.append(i, " (Input " + (index + 1) + ")");
    }
    return t;
  }

  function short(label) {
    return label.length > 14 ? label.slice(0, 13) + "\u2026" : label;
  }

  function axisLabels(inp, side) {
    const box = document.createElement("div");
    box.className = side === "y" ? "ylabels" : "xlabels";
    const n = inp.n, cell = inp.cell, px = n * cell;
    const font = Math.max(7, Math.min(11, cell + 2));
    const step = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(px / (font + 2)))));
    let longest = 0;
    for (let t = 0; t < n; t += step) {
      const s = document.createElement("span");
      s.textContent = short(inp.tokens[t]);
      s.title = inp.tokens[t];
      s.style.fontSize = font + "px";
      s.dataset.position = t;
      if (side === "y") s.style.top = (t + 0.5) * cell + "px";
      else s.style.left = (t + 0.5) * cell + "px";
      longest = Math.max(longest, s.textContent.length);
      box.append(s);
    }
    const extent = Math.ceil(longest * font * 0.62) + 6;
    if (side === "y") { box.style.height = px + "px"; box.style.width = extent + "px"; }
    else { box.style.width = px + "px"; box.style.height = extent + "px"; }
    return box;
  }

  function panel(pos, cond, m, vmin, vmax) {
    const inp = meta.inputs[pos], n = inp.n, px = n * inp.cell;
    const div = document.createElement("div");
    div.className = "panel";
    div.dataset.input = inp.index;
    div.dataset.condition = cond;
    div.append(titleOf(cond, inp.index));
    if (n === 0) {
      const e = document.createElement("div");
      e.className = "empty";
      e.style.width = e.style.height = PANEL + "px";
      e.textContent = "no tokens";
      div.append(e);
      return div;
    }
    const canvas = document.createElement("canvas");
    canvas.width = n;
    canvas.height = n;
    canvas.style.width = px + "px";
    canvas.style.height = px + "px";
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(n, n);
    for (let j = 0; j < n * n; j++) {
      const k = 3 * colorIndex(m[j], vmin, vmax);
      img.data[4 * j] = LUT[k];
      img.data[4 * j + 1] = LUT[k + 1];
      img.data[4 * j + 2] = LUT[k + 2];
      img.data[4 * j + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    canvas.addEventListener("mousemove", (e) => hover(e, canvas, pos, cond));
    canvas.addEventListener("mouseleave", () => { $("tip").hidden = $("mark").hidden = true; });
    div.append(axisLabels(inp, "y"), canvas, axisLabels(inp, "x"));
    return div;
  }

  function hover(e, canvas, pos, cond) {
    const inp = meta.inputs[pos], n = inp.n, r = canvas.getBoundingClientRect();
    const col = Math.min(n - 1, Math.max(0, Math.floor((e.clientX - r.left) / r.width * n)));
    const row = Math.min(n - 1, Math.max(0, Math.floor((e.clientY - r.top) / r.height * n)));
    const w = map(pos, cond, state.layer, state.head)[row * n + col];
    const mark = $("mark"), cw = r.width / n, ch = r.height / n;  // the cell, outlined
    mark.style.left = r.left + col * cw + "px";
    mark.style.top = r.top + row * ch + "px";
    mark.style.width = cw + "px";
    mark.style.height = ch + "px";
    mark.hidden = false;
    const tip = $("tip");
    const where = (cond === "baseline" ? "Baseline" : "Taking the Mean of " +
      meta.tensors[cond]) + " (Input " + (inp.index + 1) + "), layer " +
      meta.layers[state.layer] + ", " + (state.head === "mean" ? "mean over heads" :
      "head " + state.head);
    $("tip-panel").textContent = where;
    $("tip-query").textContent = row + " \u201c" + inp.tokens[row] + "\u201d";
    $("tip-key").textContent = col + " \u201c" + inp.tokens[col] + "\u201d";
    $("tip-weight").textContent = fmt(w, false);
    let line = where + " \u00b7 query " + row + " \u201c" + inp.tokens[row] + "\u201d \u00b7 key " +
      col + " \u201c" + inp.tokens[col] + "\u201d \u00b7 weight " + fmt(w, false);
    if (state.diff) {
      const b = map(pos, "baseline", state.layer, state.head)[row * n + col];
      $("tip-baseline").textContent = fmt(b, false);
      $("tip-diff").textContent = fmt(w - b, true);
      line += " \u00b7 baseline " + fmt(b, false) + " \u00b7 difference " + fmt(w - b, true);
    }
    tip.classList.toggle("diff", state.diff);
    tip.dataset.input = inp.index;
    tip.dataset.condition = cond;
    tip.dataset.query = row;
    tip.dataset.key = col;
    tip.hidden = false;
    const x = e.clientX + 14, y = e.clientY + 14;
    tip.style.left = Math.min(x, window.innerWidth - tip.offsetWidth - 4) + "px";
    tip.style.top = Math.min(y, window.innerHeight - tip.offsetHeight - 4) + "px";
    $("status").textContent = line;
  }

  function colorbar(vmin, vmax, label) {
    const c = $("cbar"), ctx = c.getContext("2d"), img = ctx.createImageData(1, 256);
    for (let i = 0; i < 256; i++) {
      const k = 3 * (255 - i);  // the top row is the highest value
      img.data.set([LUT[k], LUT[k + 1], LUT[k + 2], 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    const ticks = $("cbar-ticks");
    ticks.textContent = "";
    ticks.style.height = c.getBoundingClientRect().height + "px";
    const values = state.diff ? [-1, -0.5, 0, 0.5, 1].map((f) => f * view.limit)
      : [0, 0.2, 0.4, 0.6, 0.8, 1.0];
    for (const v of values) {
      const s = document.createElement("span");
      s.textContent = state.diff ? fmt(v, v !== 0).replace(/0+$/, "").replace(/\.$/, "")
        : v.toFixed(1);
      s.dataset.value = v;
      s.style.top = (1 - (v - vmin) / (vmax - vmin)) * 100 + "%";
      ticks.append(s);
    }
    $("cbar-label").textContent = label;
  }

  function render() {
    const grid = $("grid");
    grid.textContent = "";
    const cols = columnsShown();
    const rows = state.shown.slice().sort((a, b) => a - b);
    if (!cols.length || !rows.length) {
      grid.textContent = "Tick at least one input and one column.";
      return;
    }
    grid.style.gridTemplateColumns = "repeat(" + cols.length + ", auto)";
    const maps = [];
    let peak = 0;
    for (const pos of rows) {
      for (const cond of cols) {
        const m = shownMap(pos, cond);
        if (state.diff) for (let j = 0; j < m.length; j++) peak = Math.max(peak, Math.abs(m[j]));
        maps.push([pos, cond, m]);
      }
    }
    view.limit = state.diff ? niceCeiling(peak) : null;
    const vmin = state.diff ? -view.limit : 0, vmax = state.diff ? view.limit : 1;
    for (const [pos, cond, m] of maps) grid.append(panel(pos, cond, m, vmin, vmax));
    colorbar(vmin, vmax, state.diff ? meta.diff_label : meta.label);
    $("tip").hidden = true;
  }

  // Change the view from a script (tests, notebooks): set({layer: 0, head: 3, diff: true}).
  function set(changes) {
    Object.assign(state, changes);
    sync();
    render();
  }

  function sync() {
    $("layer").value = String(state.layer);
    $("head").value = String(state.head);
    $("diff").checked = state.diff;
    $("col-baseline").checked = state.baseline;
    $("col-baseline").disabled = state.diff;
    for (const c of meta.columns) $("col-" + c).checked = state.columns.includes(c);
    meta.inputs.forEach((inp, pos) => { $("input-" + pos).checked = state.shown.includes(pos); });
  }

  function checkbox(parent, id, text, title) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = id;
    label.append(box, " " + text);
    if (title) label.title = title;
    parent.append(label);
    return box;
  }

  function controls() {
    const info = [meta.store, meta.source === "model" ? "model " + meta.model : "raw Q/K/V",
      meta.inputs.length + " of " + meta.total_inputs + " inputs embedded",
      L + " layers", H + " heads"];
    $("info").textContent = info.join(" \u00b7 ");
    const inputs = $("inputs");
    meta.inputs.forEach((inp, pos) => {
      const box = checkbox(inputs, "input-" + pos, "Input " + (inp.index + 1), inp.text ||
        inp.n + " tokens");
      box.addEventListener("change", () => {
        state.shown = state.shown.filter((p) => p !== pos);
        if (box.checked) state.shown.push(pos);
        render();
      });
    });
    const layer = $("layer");
    meta.layers.forEach((id, i) => layer.add(new Option(String(id), String(i))));
    layer.addEventListener("change", () => { state.layer = Number(layer.value); render(); });
    const head = $("head");
    head.add(new Option("mean", "mean"));
    for (let h = 0; h < H; h++) head.add(new Option(String(h), String(h)));
    head.addEventListener("change", () => {
      state.head = head.value === "mean" ? "mean" : Number(head.value);
      render();
    });
    const columns = $("columns");
    const base = checkbox(columns, "col-baseline", "Baseline");
    base.addEventListener("change", () => { state.baseline = base.checked; render(); });
    for (const c of meta.columns) {
      const box = checkbox(columns, "col-" + c, meta.tensors[c]);
      box.addEventListener("change", () => {
        state.columns = state.columns.filter((x) => x !== c);
        if (box.checked) state.columns.push(c);
        render();
      });
    }
    $("diff").addEventListener("change", () => {
      state.diff = $("diff").checked;
      sync();
      render();
    });
    sync();
    const step = (1 / LEVELS).toPrecision(3);
    $("note").textContent = "Weights embedded to " + meta.bits + " bits (steps of " + step +
      "): a weight shown is within \u00b1" + meta.max_error.toPrecision(2) +
      " of the store's, a difference within \u00b1" + (2 * meta.max_error).toPrecision(2) +
      ". Hover a cell for its tokens and weight." +
      (meta.limited ? " More inputs would make the page too large: qkvmean view --inputs " +
        "picks others." : "");
  }

  async function start() {
    if (typeof DecompressionStream !== "function") {
      throw new Error("this browser has no DecompressionStream (Chrome 80, Firefox 113, " +
        "Safari 16.4 or later have it)");
    }
    controls();
    const decoded = await Promise.all(meta.inputs.map((_, pos) => decode(pos)));
    decoded.forEach((b, pos) => { blocks[pos] = b; });
    render();
    $("status").textContent = "Hover a cell for its query token, key token and weight.";
    view.ready = true;
    document.documentElement.dataset.ready = "true";
  }

  start().catch(fail);
})();
"""
