"""The figure "The Mean Operation For Query, Key and Value", drawn from a store: one row
per input, one column per substituted tensor, a shared colour bar, the title under the
grid and a caption line under the title.

:func:`draw` is a sequence of steps, each a function here: what to show (:func:`_request`:
the rows, the columns, the layer and head, all checked before any map is read), the maps
and their colour scale (:func:`_maps`), the sizes (:func:`_layout`), the panels
(:func:`_panels`), the colour bar (:func:`_colorbar`) and the caption (:func:`_caption`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from ..engine.names import BASELINE
from ..files import InputError
from ..store import Store, open_store
from . import choice
from .common import (
    CMAP,
    COLORBAR_LABEL,
    DIFF_LABEL,
    TENSORS,
    check_title,
    condition_title,
    given_inputs,
    italic,
    nice_ceiling,
    pretty_tokens,
    substitution_of,
    tensor_columns,
    verb,
    wrap,
)

TITLE = r"The Mean Operation For $\it{Query}$, $\it{Key}$ and $\it{Value}$"
#: At most this many token labels per axis; longer inputs show every k-th.
MAX_LABELS = 40
#: Largest panel side (inches).
MAX_PANEL = 7.0
#: The caption line under the title (inches), and each further line it wraps to.
CAPTION_HEIGHT, CAPTION_LINE = 0.3, 0.16
#: The narrowest figure (inches): the title's width at 14 pt, with margins.
MIN_WIDTH = 5.8


def figure_title(store: Store) -> str:
    """The overall title: :data:`TITLE`, or for ``zero`` and ``resample`` stores what they
    do (``Zeroing Query, Key and Value``)."""
    word = verb(substitution_of(store))
    if word.startswith("Taking"):
        return TITLE
    return rf"{word} $\it{{Query}}$, $\it{{Key}}$ and $\it{{Value}}$"


def panel_title(condition: str, index: int, store: Store | None = None) -> str:
    """``Taking the Mean of Query (Input 1)``, the tensor in italics; inputs count from 1.
    With ``store``, the condition's own target and substitution (``Zeroing Key``...)."""
    if condition == BASELINE:
        return f"Baseline (Input {index + 1})"
    if store is not None:
        return f"{condition_title(store, condition)} (Input {index + 1})"
    return f"Taking the Mean of {italic(TENSORS[condition])} (Input {index + 1})"


@dataclass(frozen=True, eq=False)
class _Scale:
    """The colour scale of the panels: its limits, the colour bar's label and ticks (None:
    matplotlib's)."""

    vmin: float
    vmax: float
    label: str
    ticks: np.ndarray | None = None


@dataclass(frozen=True)
class _Layout:
    """The figure's size (inches): the grid with its colour bar and title (``height``),
    and the strip of the caption under it (``strip``, 0 without one) with its lines."""

    width: float
    height: float
    strip: float
    lines: list


def draw(
    store,
    *,
    inputs=None,
    layer="auto",
    head="auto",
    baseline=False,
    diff=False,
    tokens=False,
    title=None,
    caption=True,
) -> Figure:
    """The grid figure: one row per input, one column per substituted tensor.

    Parameters
    ----------
    store : Store or path
        An open store, or the path of one.
    inputs : sequence of int, optional
        Input indices (from 0); default the first three.
    layer : int, "auto" or "last"
        Layer (negative counts from the last). ``"auto"`` (default): with ``head``, where
        the columns differ most, at or after the first substituted layer
        (:mod:`qkvmean.render.choice`).
    head : int, "mean" or "auto"
        One head, the mean over heads, or ``"auto"`` (default, as for ``layer``).
    baseline : bool
        Add a baseline column.
    diff : bool
        Draw condition − baseline on a symmetric diverging scale.
    tokens : bool
        Label the axes with the tokens (stores of model runs).
    title : str, optional
        Replace the overall title.
    caption : bool
        A line under the title: the model, the substitution, the layer and head shown.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not isinstance(store, Store):
        with open_store(store) as opened:
            return draw(
                opened,
                inputs=inputs,
                layer=layer,
                head=head,
                baseline=baseline,
                diff=diff,
                tokens=tokens,
                title=title,
                caption=caption,
            )
    if title is not None:
        check_title(title)
    rows, columns, shown = _request(store, inputs, layer, head, baseline, diff, tokens)
    maps, scale = _maps(store, rows, columns, shown, diff)
    layout = _layout(store, rows, columns, shown, tokens, caption)
    fig = Figure(figsize=(layout.width, layout.height + layout.strip), layout="constrained")
    # the grid, its colour bar and title in one subfigure; the caption line under it
    grid, below = (
        fig.subfigures(2, 1, height_ratios=[layout.height, layout.strip])
        if caption
        else (fig, None)
    )
    axes, image = _panels(grid, store, rows, columns, maps, scale, tokens)
    bar = _colorbar(grid, image, axes, scale)
    heading = grid.supxlabel(figure_title(store) if title is None else title, fontsize=14)
    line = _caption(below, layout.lines) if caption else None
    fig.qkvmean = {
        "rows": rows,
        "columns": columns,
        "layer": shown.layer,
        "head": shown.head,
        "layer_id": int(store.layer_ids[shown.layer]),
        "choice": shown,
        "title": heading,
        "caption": line,
        "colorbar": bar,
        "axes": axes,
        "maps": maps,
    }
    return fig


def _request(store: Store, inputs, layer, head, baseline, diff, tokens):
    """What to show: the rows (input indices), the columns (conditions) and the
    :class:`~qkvmean.render.choice.Choice` of layer and head; every part of the request
    checked (one-line InputErrors) before any map is read."""
    columns = tensor_columns(store, baseline, diff)
    rows = list(range(min(3, store.n_inputs))) if inputs is None else given_inputs(store, inputs)
    layer = choice.check_layer(store, layer)
    choice.check_head(store, head)
    choice.check_maps(store, layer)
    if tokens and not store.has_tokens:
        if store.source == "model":
            raise InputError(
                f"{store.path.name} is a --model run's store but has no /input/tokens; the "
                "store is damaged: drop --tokens, or run it again"
            )
        raise InputError(
            f"{store.path.name} has no tokens (only stores of --model runs do); drop --tokens"
        )
    return rows, columns, choice.choose(store, rows, columns, layer, head)


def _maps(store: Store, rows, columns, shown, diff):
    """The shown layer and head's valid maps, ``{(input, condition): (n, n)}`` (with
    ``diff``: minus the baseline's), and the scale they are drawn on (0..1, or symmetric
    about 0 up to a round ceiling of the largest difference)."""
    layer, head = shown.layer, shown.head
    maps = {(i, c): store.map(c, i, layer=layer, head=head) for i in rows for c in columns}
    if not diff:
        return maps, _Scale(0.0, 1.0, COLORBAR_LABEL, np.round(np.arange(0.0, 1.0001, 0.2), 1))
    maps = {
        (i, c): m - store.map(BASELINE, i, layer=layer, head=head) for (i, c), m in maps.items()
    }
    peak = max((float(np.abs(m).max(initial=0.0)) for m in maps.values()), default=0.0)
    limit = nice_ceiling(peak)
    return maps, _Scale(-limit, limit, DIFF_LABEL)


def _layout(store: Store, rows, columns, shown, tokens, caption) -> _Layout:
    """Square panels, larger where token labels need the room (up to :data:`MAX_PANEL`),
    the figure at least :data:`MIN_WIDTH` wide, and the caption wrapped to its width."""
    longest = max(store.lengths[i] for i in rows)
    labelled = min(longest, MAX_LABELS) if tokens else 0
    cell = min(3.2 + 0.09 * labelled, MAX_PANEL)  # inches per panel
    height = cell * len(rows) + 0.9
    width = max(cell * len(columns) + 1.3, MIN_WIDTH)
    if not caption:
        return _Layout(width, height, 0.0, [])
    # wrapped to the figure's width, a file name in it is text, not mathtext
    lines = wrap(choice.caption(store, shown).replace("$", r"\$"), width, 9)
    return _Layout(width, height, CAPTION_HEIGHT + CAPTION_LINE * (len(lines) - 1), lines)


def _panels(grid, store: Store, rows, columns, maps, scale: _Scale, tokens):
    """One titled panel per input (row) and condition (column), labelled with the tokens
    where asked: the axes, and the last image (the colour bar's)."""
    axes = grid.subplots(len(rows), len(columns), squeeze=False)
    image = None
    for r, i in enumerate(rows):
        labels = pretty_tokens(store.tokens(i)) if tokens else None
        for c, cond in enumerate(columns):
            ax = axes[r, c]
            data = maps[(i, cond)]
            if data.size == 0:  # an input without tokens: an empty, titled panel
                data = np.full((1, 1), np.nan)
            image = ax.imshow(
                data,
                cmap=CMAP,
                vmin=scale.vmin,
                vmax=scale.vmax,
                aspect="equal",
                interpolation="nearest",
            )
            ax.set_title(panel_title(cond, i, store), fontsize=11)
            _ticks(ax, labels, len(maps[(i, cond)]))
    return axes, image


def _ticks(ax, labels, n):
    if labels is None or n == 0:
        ax.set_xticks([])
        ax.set_yticks([])
        return
    step = math.ceil(n / MAX_LABELS)  # every k-th label on long inputs
    ticks = range(0, n, step)
    shown = [labels[t].replace("$", r"\$") for t in ticks]  # a token is text, not mathtext
    ax.set_xticks(ticks, shown, rotation=90, fontsize=7)
    ax.set_yticks(ticks, shown, fontsize=7)
    ax.tick_params(length=0)


def _colorbar(grid, image, axes, scale: _Scale):
    """The one colour bar of every panel, right of the grid (longer with more rows)."""
    bar = grid.colorbar(
        image, ax=axes, location="right", shrink=0.85, aspect=20 * max(1, axes.shape[0]) ** 0.5
    )
    bar.set_label(scale.label, fontsize=12)
    if scale.ticks is not None:
        bar.set_ticks(scale.ticks)
    return bar


def _caption(below, lines):
    """The caption's lines in the strip under the title."""
    return below.text(
        0.5, 0.55, "\n".join(lines), ha="center", va="center", fontsize=9, color="0.3"
    )
