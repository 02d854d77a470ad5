"""Figures and the HTML view of a store: the figure "The Mean Operation For Query, Key and
Value" (:mod:`.figure`), the metrics heatmaps (:mod:`.metrics`), the page (:mod:`.view`).

Reads only through :func:`qkvmean.open_store`, so anyone can redraw a colleague's run.
Uses matplotlib's object API (no pyplot, no GUI backend).

The modules: :mod:`~qkvmean.render.figure` (the grid figure, :func:`draw`),
:mod:`~qkvmean.render.choice` (which layer and head it shows),
:mod:`~qkvmean.render.metrics` (the KL heatmaps), :mod:`~qkvmean.render.sweep` (a sweep
store's layer x head heatmaps of an effect or attention metric, ``render --sweep``),
:mod:`~qkvmean.render.view` (the HTML page of the maps) and
:mod:`~qkvmean.render.sweep_view` (a sweep store's page), :mod:`~qkvmean.render.page`
(what the pages share), :mod:`~qkvmean.render.image` (writing an image file) and
:mod:`~qkvmean.render.common` (what they share: names, colours, token labels, inputs).
"""

from __future__ import annotations

from . import choice
from .common import (
    CMAP,
    COLORBAR_LABEL,
    DIFF_LABEL,
    SPACE,
    TENSORS,
    check_title,
    given_inputs,
    italic,
    pretty_tokens,
    wrap,
)
from .figure import (
    CAPTION_HEIGHT,
    CAPTION_LINE,
    MAX_LABELS,
    MAX_PANEL,
    MIN_WIDTH,
    TITLE,
    draw,
    panel_title,
)
from .image import FORMATS, MAX_PIXELS, check_output, save

__all__ = [
    "CAPTION_HEIGHT",
    "CAPTION_LINE",
    "CMAP",
    "COLORBAR_LABEL",
    "DIFF_LABEL",
    "FORMATS",
    "MAX_LABELS",
    "MAX_PANEL",
    "MAX_PIXELS",
    "MIN_WIDTH",
    "SPACE",
    "TENSORS",
    "TITLE",
    "check_output",
    "check_title",
    "choice",
    "draw",
    "given_inputs",
    "italic",
    "panel_title",
    "pretty_tokens",
    "save",
    "wrap",
]
