"""The page ``qkvmean view`` writes for a sweep store: the heatmaps of ``render --sweep``
(:mod:`qkvmean.render.sweep`) in one self-contained HTML document, with a selector of
the metric (the store's effects, then the attention metrics) and the condition label
and value of a cell on hover (click a cell to keep it in the status line).

It embeds, as JSON, the mean over the chosen inputs of every metric for every cell (a
few numbers per condition: a sweep of 432 conditions makes a page of about 100 KB), the
cells' condition labels, and the colour maps (sampled by matplotlib at 256 levels); no
maps, so stores without maps open too. The document, style and script are package data
beside this module (``static/sweep.html``, ``sweep.css``, ``sweep.js``).
"""

from __future__ import annotations

import html

import numpy as np

from ..engine.names import TENSOR_LABELS
from ..store.reader import Store
from .common import substitution_of, verb
from .metrics import chosen_inputs
from .page import COLORBAR_LEVELS, Page, _json, asset
from .sweep import CMAPS, check_metric, check_sweep, sweep_grid, sweep_metrics, title_of
from .sweep import caption_of as sweep_caption

#: The metric the page opens with: the first of these the store has.
START = ("kl_next_token", "embedding_cosine", "hidden_change", "kl_from_baseline")
#: Significant digits of the values the page shows.
DIGITS = 6
#: Missing cells' colour (RGB).
MISSING_RGB = (217, 217, 217)


def lut(name: str, levels: int = COLORBAR_LEVELS) -> list:
    """matplotlib's colour map ``name`` at ``levels`` levels, RGB bytes, flat."""
    from matplotlib import colormaps

    cmap = colormaps[name].resampled(levels)
    return np.asarray(cmap(np.arange(levels), bytes=True))[:, :3].reshape(-1).tolist()


def start_metric(store: Store) -> str:
    """The metric the page shows when it opens."""
    names = sweep_metrics(store)
    return next((m for m in START if m in names), names[0])


def _number(v: float):
    return None if not np.isfinite(v) else float(v)


def sweep_meta(store: Store, inputs=None, metric=None) -> dict:
    """What the page embeds (JSON-ready): the store, the rows and columns, the panels
    (titles, and each cell's condition label: None where none), and for each metric its
    panels' values (None where no condition), scale, title and caption."""
    kind = check_sweep(store)
    chosen = chosen_inputs(store, inputs, what="effect")
    start = start_metric(store) if metric is None else check_metric(store, metric)
    metrics, cmaps, layout = {}, {}, None
    for name in sweep_metrics(store):
        grid = sweep_grid(store, name, chosen)
        metrics[name] = {
            "title": title_of(grid),
            "label": grid.info.label,
            "caption": sweep_caption(store, grid),
            "vmin": grid.scale.vmin,
            "vmax": grid.scale.vmax,
            "cmap": grid.scale.cmap,
            "kind": grid.scale.kind,
            "effect": name in store.effects,
            "values": [[[_number(v) for v in row] for row in p.values] for p in grid.panels],
        }
        cmaps.setdefault(grid.scale.cmap, lut(grid.scale.cmap))
        layout = layout or grid
    word = verb(substitution_of(store))
    panels = [
        {
            "title": p.title.replace(r"$\it{", "").replace("}$", ""),
            "verb": word,
            "tensor": TENSOR_LABELS[p.target] if p.target else None,
            "target": p.target,
            "labels": [[p.label(store, r, k) for k in range(p.values.shape[1])]
                       for r in range(p.values.shape[0])],
        }
        for p in layout.panels
    ]  # fmt: skip
    cfg = store.config
    return {
        "kind": "sweep",
        "sweep": kind,
        "store": store.path.name,
        "model": None if cfg.get("model") is None else str(cfg.get("model")),
        "conditions": len(store.conditions) - 1,
        "row_name": layout.row_name,
        "col_name": layout.col_name,
        "rows": layout.rows,
        "cols": layout.cols,
        "inputs": [int(i) for i in chosen],
        "total_inputs": store.n_inputs,
        "panels": panels,
        "metrics": metrics,
        "order": list(metrics),
        "effects": list(store.effects),
        "start": start,
        "digits": DIGITS,
        "luts": cmaps,
        "missing": list(MISSING_RGB),
        "missing_cells": layout.missing,
        "cmaps": dict(CMAPS),
    }


def build_sweep_page(store: Store, inputs=None, metric=None) -> Page:
    """The page of a sweep store (an open Store): :class:`qkvmean.render.Page`
    (``kind="sweep"``; its ``inputs`` are those averaged)."""
    meta = sweep_meta(store, inputs, metric)
    page = (
        asset("sweep.html")
        .replace("@TITLE@", html.escape(f"qkvmean view: {store.path.name}"))
        .replace("@CSS@", asset("view.css") + asset("sweep.css"))
        .replace("@META@", _json(meta))
        .replace("@JS@", asset("sweep.js"))
    )
    rows = len(meta["rows"])
    height = 260 + rows * 28 + 120
    return Page(
        page, meta["inputs"], store.n_inputs, 0, False, [], height,
        kind="sweep", metrics=meta["order"],
    )  # fmt: skip
