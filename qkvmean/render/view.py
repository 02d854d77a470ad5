"""An interactive view of a store: one self-contained HTML page (``qkvmean view``).

The page shows the grid of the figure (rows: inputs; columns: the substituted tensors,
optionally the baseline) and lets the reader pick the inputs shown, the layer, the head
(or the mean over heads, computed in the page from the heads), the columns, and a
difference mode (condition − baseline on a symmetric scale). Hovering a cell shows its
query token, key token and weight. Everything is inline: no network, no server, no
framework; the maps are drawn in ``<canvas>`` elements, one canvas pixel per token pair.
The document, its style and its script are package data beside this module
(``static/view.html``, ``view.css``, ``view.js``), read once with :func:`asset`.

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
import os
import zlib
from pathlib import Path

import numpy as np

from ..engine.names import TENSOR_LABELS
from ..files import (
    InputError,
    check_new_file,
    put_in_place,
    refuse_inputs,
    sweep_temporaries,
)
from ..store.reader import Store, check_weights, open_store
from . import choice
from .common import (
    CMAP,
    COLORBAR_LABEL,
    DIFF_LABEL,
    given_inputs,
    pretty_tokens,
    substitution_of,
    target_of,
    tensor_columns,
    verb,
)
from .page import COLORBAR_LEVELS, Page, _json, asset

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


def _columns(store: Store) -> list:
    """The conditions that can be columns: one per substituted tensor (the table's)."""
    try:
        return tensor_columns(store, baseline=False, diff=False, what="maps' grid")
    except InputError as exc:
        raise InputError(str(exc).replace("nothing to draw", "nothing to view")) from None


def choose_inputs(store: Store, inputs=None):
    """The inputs a page embeds, and whether the default choice stopped early at
    :data:`MAX_WEIGHTS`: ``(indices, limited)``. ``inputs``: input numbers (negative
    count from the end), or None for the first :data:`DEFAULT_INPUTS` (or fewer)."""
    per_token2 = len(store.conditions) * len(store.map_layer_ids) * store.n_heads
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
    """One input's maps, ``(condition, layer, head, n, n)`` (the layers whose maps the
    store keeps), as ``bits``-bit integers: the low bytes of every value, then (above 8
    bits) the high bytes."""
    n = int(store.lengths[index])
    levels = 2**bits - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    layers = store.map_layer_ids
    out = np.empty((len(store.conditions), len(layers), store.n_heads, n, n), dtype)
    for c, cond in enumerate(store.conditions):
        for layer, number in enumerate(layers):
            where = f"input {index}, condition {cond}, layer {number}"
            m = np.asarray(store.maps(cond, index, layer)[:, :n, :n], dtype=np.float64)
            check_weights(m, store.path, where)
            out[c, layer] = np.rint(np.clip(m, 0.0, 1.0) * levels)
    if dtype == np.uint8:
        return out.tobytes()
    planes = out.astype("<u2").view(np.uint8).reshape(-1, 2)
    return planes.T.tobytes()  # all low bytes, then all high bytes


def _heading(store: Store) -> str:
    """The page's title: :data:`TITLE_HTML`, or what a ``zero`` or ``resample`` store
    does (``Zeroing <i>Query</i>, ...``)."""
    word = verb(substitution_of(store))
    if word.startswith("Taking"):
        return TITLE_HTML
    return f"{word} <i>Query</i>, <i>Key</i> and <i>Value</i>"


def input_spans(indices) -> str:
    """Input numbers in short: ``[0, 1, 2, 5]`` -> ``"0..2,5"``."""
    spans = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}..{b}" for a, b in spans)


def _labels(store: Store, index: int) -> list:
    n = int(store.lengths[index])
    if store.has_tokens:
        return pretty_tokens(store.tokens(index))
    return [str(t) for t in range(n)]


def build_page(store: Store, inputs=None, *, bits: int = DEFAULT_BITS) -> Page:
    """The page of ``store`` (an open Store): see :func:`view_html`."""
    bits = _check_bits(bits)
    if store.sweep:
        from .sweep_view import build_sweep_page

        return build_sweep_page(store, inputs)
    if not store.has_maps:
        how = (
            "was written with --no-maps"
            if store.config.get("maps", True) is False or store.format_version == 1
            else "keeps no maps (--maps-layers named none)"
        )
        raise InputError(
            f"{store.path.name} {how}: it holds metrics only, and the view draws maps "
            "(qkvmean render --metrics draws its metrics)"
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
        "tensors": {c: TENSOR_LABELS[target_of(store, c)] for c in columns},
        "verb": verb(substitution_of(store)),
        "layers": store.map_layer_ids,
        "heads": store.n_heads,
        "total_inputs": store.n_inputs,
        "inputs": entries,
        "shown": list(range(min(SHOWN_INPUTS, len(entries)))),
        # it opens where the figure would: the layer and head where the columns differ most
        "start": {"layer": store.map_layer_index(start.layer), "head": start.head},
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
        asset("view.html")
        .replace("@TITLE@", html.escape(f"qkvmean view: {store.path.name}"))
        .replace("@HEADING@", _heading(store))
        .replace("@CSS@", asset("view.css"))
        .replace("@META@", _json(meta))
        .replace("@MAPS@", "\n".join(blobs))
        .replace("@JS@", asset("view.js"))
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
