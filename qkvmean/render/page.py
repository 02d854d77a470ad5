"""What the pages ``qkvmean view`` writes share: the package data they are made of
(:func:`asset`), the built page (:class:`Page`) and JSON safe inside a ``<script>``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

#: Levels of the colour tables a page embeds.
COLORBAR_LEVELS = 256


@cache
def asset(name: str) -> str:
    """A file of a page, from the package data in ``qkvmean/render/static/``: the maps'
    page ``view.html`` (the document, with ``@NAME@`` slots filled in by
    :func:`qkvmean.render.view.build_page`), ``view.css``, ``view.js``; the sweep's page
    ``sweep.html``, ``sweep.css``, ``sweep.js``."""
    static = resources.files(__package__).joinpath("static")
    return static.joinpath(name).read_text(encoding="utf-8")


@dataclass
class Page:
    """A built page: its HTML and what went into it (a sweep page: the inputs averaged,
    ``bits`` 0, no columns)."""

    html: str
    inputs: list  # the store's input numbers embedded, in order
    total_inputs: int
    bits: int
    limited: bool  # the default choice stopped before DEFAULT_INPUTS at MAX_WEIGHTS
    columns: list  # the conditions that can be columns
    height: int  # about how tall the page is when it opens (CSS pixels)
    kind: str = "maps"  # "maps", or "sweep": the heatmaps of a sweep store
    metrics: tuple = ()  # a sweep page's metrics, in its selector's order

    @property
    def bytes(self) -> int:
        return len(self.html.encode("utf-8"))


def _json(value) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
