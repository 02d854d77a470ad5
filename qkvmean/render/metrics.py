"""The metrics figure: how far each substitution moves each head's attention from the
baseline, as layer × head heatmaps of the KL divergence (``qkvmean render --metrics``).

One panel per substituted tensor (Query, Key, Value: the columns of the main figure),
rows the layers (the store's layer numbers), columns the heads, each cell the mean over
the inputs of ``KL(baseline ‖ condition)`` (``/metrics/kl_from_baseline``), on one shared
scale from 0. The layers where the substitution happens are marked ``▸`` on the layer
axis. Reads only the metrics, so ``--no-maps`` stores draw too. matplotlib's object API.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from ..engine.names import substitution_phrase
from ..files import InputError
from ..store import Store, open_store
from . import choice
from .common import (
    TENSORS,
    check_title,
    condition_title,
    given_inputs,
    italic,
    nice_ceiling,
    substitution_of,
    tensor_columns,
    wrap,
)

TITLE = "KL Divergence From the Baseline, per Layer and Head"
COLORBAR_LABEL = "KL(baseline ‖ condition), nats"
CMAP = "viridis"
#: Marks a layer where the substitution happens (before its number).
MARK = "▸"
#: Cell side (inches): within these bounds, panels at most MAX_PANEL wide or high, and at
#: least MIN_WIDTH wide (their titles).
MIN_CELL, MAX_CELL, MAX_PANEL, MIN_WIDTH = 0.12, 0.45, 6.0, 3.4
#: The narrowest figure (inches): the title's width at 12 pt, with margins.
FIGURE_MIN_WIDTH = 6.2
#: Inputs read at once (a block of /metrics/kl_from_baseline).
BLOCK = 4096


def panel_title(condition: str, store: Store | None = None) -> str:
    """``KL from baseline: Taking the Mean of Query``, the tensor in italics (with
    ``store``: the condition's own target and substitution, ``Zeroing Key``...)."""
    if store is not None:
        return f"KL from baseline: {condition_title(store, condition)}"
    return f"KL from baseline: Taking the Mean of {italic(TENSORS[condition])}"


def chosen_inputs(store: Store, inputs, what: str = "KL") -> np.ndarray:
    """The inputs averaged, as a sorted array of indices: by default every input with a
    valid token (one without has ``what``, its KL or effect, 0 by convention, not by
    measurement)."""
    if inputs is None:
        chosen = np.flatnonzero(store.lengths > 0)
        if chosen.size == 0:
            raise InputError(
                f"{store.path.name}: no input has a valid token (all lengths are 0); "
                "nothing to average"
            )
        return chosen
    chosen = sorted(set(given_inputs(store, inputs)))
    empty = [i for i in chosen if store.lengths[i] == 0]
    if empty:
        raise InputError(
            f"input {empty[0]} of {store.path.name} has no valid token (length 0): its "
            f"{what} is 0 by convention, not a measurement; leave it out of --inputs"
        )
    return np.asarray(chosen)


def kl_means(store: Store, conditions, inputs: np.ndarray) -> dict:
    """``{condition: (layer, head) float64}``: the mean over ``inputs`` of the stored KL,
    read a block of inputs at a time."""
    selected = np.zeros(store.n_inputs, dtype=bool)
    selected[inputs] = True
    out = {}
    for cond in conditions:
        total = np.zeros((store.n_layers, store.n_heads))
        for start in range(0, store.n_inputs, BLOCK):
            stop = min(start + BLOCK, store.n_inputs)
            if not selected[start:stop].any():
                continue
            kl = store.metric_block("kl_from_baseline", cond, start, stop)
            kl = kl[selected[start:stop]].astype(np.float64)
            if not np.isfinite(kl).all():
                raise InputError(
                    f"{store.path}: /metrics/kl_from_baseline of {cond} holds NaN or "
                    "infinity; the store is damaged"
                )
            total += kl.sum(axis=0)
        out[cond] = total / inputs.size
    return out


def _ticks(n: int, inches: float, always=()) -> list:
    """Positions to label on an axis of ``n`` cells ``inches`` long: every one when they
    fit (about 7 per inch), else every k-th, and always those in ``always``."""
    step = max(1, math.ceil(n / max(1, int(inches * 7))))
    return sorted(set(range(0, n, step)) | set(always))


def draw_metrics(store, *, inputs=None, title=None, caption=True) -> Figure:
    """The KL figure of ``store`` (an open Store or a path): one layer × head heatmap per
    substituted tensor, the mean over ``inputs`` (default: every input with a valid
    token) of ``KL(baseline ‖ condition)``, a shared colour bar from 0, substituted layers
    marked ``▸``. ``title`` replaces the overall title (at the bottom, as in the main
    figure), with a caption line under it (``caption=False``: none). Returns a
    :class:`matplotlib.figure.Figure`.
    """
    if not isinstance(store, Store):
        with open_store(store) as opened:
            return draw_metrics(opened, inputs=inputs, title=title, caption=caption)
    if title is not None:
        check_title(title)
    columns = tensor_columns(store, baseline=False, diff=False, what="KL heatmaps")
    chosen = chosen_inputs(store, inputs)
    kl = kl_means(store, columns, chosen)
    n_layers, n_heads = store.n_layers, store.n_heads
    peak = max(float(m.max(initial=0.0)) for m in kl.values())
    vmax = nice_ceiling(peak)
    layers = choice.named_indices(store, "ablate_layers")
    heads = choice.named_indices(store, "ablate_heads")
    every_layer = len(layers) == n_layers
    every_head = len(heads) == n_heads

    cell = min(MAX_CELL, max(MIN_CELL, MAX_PANEL / max(n_heads, n_layers, 1)))
    # (cells are square unless a panel would be too narrow for its title)
    width, height = max(MIN_WIDTH, cell * max(n_heads, 1)), cell * max(n_layers, 1)
    total = max(len(columns) * (width + 0.25) + 1.9, FIGURE_MIN_WIDTH)
    fig = Figure(figsize=(total, max(height, 1.0) + 1.9), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False, sharey=True)[0]
    rows = _ticks(n_layers, height, () if every_layer else layers)
    cols = _ticks(n_heads, width, () if every_head else heads)
    image = None
    for ax, cond in zip(axes, columns, strict=True):
        image = ax.imshow(
            kl[cond], cmap=CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        ax.set_title(panel_title(cond, store), fontsize=10)
        ax.set_xticks(cols, [str(h) for h in cols], fontsize=8)
        ax.set_xlabel("Head", fontsize=10)
        for h, label in zip(cols, ax.get_xticklabels(), strict=True):
            if h in heads and not every_head:
                label.set_fontweight("bold")
        ax.tick_params(length=2)
    names = [
        f"{MARK} {store.layer_ids[i]}" if i in layers and not every_layer else
        str(store.layer_ids[i]) for i in rows
    ]  # fmt: skip
    axes[0].set_yticks(rows, names, fontsize=8)
    axes[0].set_ylabel("Layer", fontsize=10)
    for i, label in zip(rows, axes[0].get_yticklabels(), strict=True):
        if i in layers and not every_layer:
            label.set_fontweight("bold")
    bar = fig.colorbar(image, ax=axes, location="right", shrink=0.9, aspect=25)
    bar.set_label(COLORBAR_LABEL, fontsize=11)
    lines = wrap(_caption(store, chosen, layers, heads), total, 12) if caption else []
    fig.supxlabel("\n".join([TITLE if title is None else title, *lines]), fontsize=12)
    fig.qkvmean = {
        "columns": columns,
        "axes": axes,
        "colorbar": bar,
        "kl": kl,
        "inputs": chosen.tolist(),
        "ablated_layers": layers,
        "ablated_heads": heads,
    }
    return fig


def _caption(store: Store, chosen, layers, heads) -> str:
    n = len(chosen)
    over = substitution_of(store)
    where = (
        "every layer"
        if len(layers) == store.n_layers
        else f"layer{'s' if len(layers) != 1 else ''} "
        f"{', '.join(str(store.layer_ids[i]) for i in layers) or 'none'} ({MARK})"
    )
    which = "every head" if len(heads) == store.n_heads else (
        f"head{'s' if len(heads) != 1 else ''} {', '.join(map(str, heads)) or 'none'} (bold)"
    )  # fmt: skip
    return (
        f"mean over {n} input{'s' if n != 1 else ''}; {substitution_phrase(over)}, substituted at "
        f"{where}, {which}"
    )
