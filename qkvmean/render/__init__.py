"""The figure "The Mean Operation For Query, Key and Value", drawn from a store.

Reads only through :func:`qkvmean.open_store`, so anyone can redraw a colleague's run.
Uses matplotlib's object API (no pyplot, no GUI backend).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..engine.names import BASELINE, TENSOR_LABELS, condition_name
from ..files import (
    InputError,
    check_new_file,
    put_in_place,
    sweep_temporaries,
)
from ..store import Store, open_store
from . import choice

TENSORS = {condition_name(t): label for t, label in TENSOR_LABELS.items()}
FORMATS = (".png", ".pdf", ".svg")
TITLE = r"The Mean Operation For $\it{Query}$, $\it{Key}$ and $\it{Value}$"
COLORBAR_LABEL = "Attention Weight"
DIFF_LABEL = "Attention Weight − Baseline"
CMAP = "coolwarm"


def italic(word: str) -> str:
    """``word`` in italics (matplotlib mathtext)."""
    return rf"$\it{{{word}}}$"


def panel_title(condition: str, index: int) -> str:
    """``Taking the Mean of Query (Input 1)``, the tensor in italics; inputs count from 1."""
    if condition == BASELINE:
        return f"Baseline (Input {index + 1})"
    return f"Taking the Mean of {italic(TENSORS[condition])} (Input {index + 1})"


def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet back to bytes (the inverse of its bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTES = _byte_decoder()
#: Shown for a token's leading space, so that word starts stay visible.
SPACE = "▁"
#: At most this many token labels per axis; longer inputs show every k-th.
MAX_LABELS = 40
#: Largest panel side (inches), and largest raster image (pixels).
MAX_PANEL = 7.0
MAX_PIXELS = 200e6
#: The caption line under the title (inches), and each further line it wraps to.
CAPTION_HEIGHT, CAPTION_LINE = 0.3, 0.16
#: The narrowest figure (inches): the title's width at 14 pt, with margins.
MIN_WIDTH = 5.8


def pretty_tokens(tokens) -> list:
    """Token strings as text: byte-level BPE (GPT-2's ``Ġ``, ``Ã©``…) decoded to UTF-8."""
    tokens = list(tokens)
    if not any(("Ġ" in t or "Ċ" in t) for t in tokens) or not all(
        c in _BYTES for t in tokens for c in t
    ):
        return tokens
    out = []
    for t in tokens:
        text = bytes(_BYTES[c] for c in t).decode("utf-8", errors="replace")
        if text.startswith(" "):
            text = SPACE + text[1:]
        out.append(text.replace("\n", "\\n") or SPACE)
    return out


def _columns(store: Store, baseline: bool, diff: bool):
    present = [c for c in TENSORS if c in store.conditions]
    if not present:
        raise InputError(
            f"{store.path.name} holds none of {', '.join(TENSORS)} (it has "
            f"{', '.join(store.conditions)}); nothing to draw"
        )
    if diff and baseline:
        raise InputError(
            "--baseline and --diff do not combine (the baseline's difference from itself is zero)"
        )
    return ([BASELINE] if baseline else []) + present


def given_inputs(store: Store, inputs) -> list:
    """``inputs`` (input numbers from 0, negative counting from the end) as the store's
    indices, in the order given; a TypeError or a one-line InputError otherwise."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError(f"inputs must be a sequence of ints, got {inputs!r}")
    try:
        inputs = list(inputs)
    except TypeError:
        raise TypeError(f"inputs must be a sequence of ints, got {inputs!r}") from None
    if not inputs:
        raise InputError("--inputs is empty; give input numbers (counting from 0)")
    return [store.input_index(i) for i in inputs]  # type and range, in the store's words


def _inputs(store: Store, inputs):
    if inputs is None:
        return list(range(min(3, store.n_inputs)))
    return given_inputs(store, inputs)


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
    columns = _columns(store, baseline, diff)
    rows = _inputs(store, inputs)
    choice.check_layer(store, layer), choice.check_head(store, head)  # before reading maps
    if tokens and not store.has_tokens:
        if store.source == "model":
            raise InputError(
                f"{store.path.name} is a --model run's store but has no /input/tokens; the "
                "store is damaged: drop --tokens, or run it again"
            )
        raise InputError(
            f"{store.path.name} has no tokens (only stores of --model runs do); drop --tokens"
        )
    shown = choice.choose(store, rows, columns, layer, head)
    layer, head = shown.layer, shown.head
    maps = {(i, c): store.map(c, i, layer=layer, head=head) for i in rows for c in columns}
    if diff:
        maps = {
            (i, c): m - store.map(BASELINE, i, layer=layer, head=head) for (i, c), m in maps.items()
        }
        peak = max((float(np.abs(m).max(initial=0.0)) for m in maps.values()), default=0.0)
        limit = _nice_ceiling(peak)
        vmin, vmax, label = -limit, limit, DIFF_LABEL
    else:
        vmin, vmax, label = 0.0, 1.0, COLORBAR_LABEL

    longest = max(store.lengths[i] for i in rows)
    labelled = min(longest, MAX_LABELS) if tokens else 0
    cell = min(3.2 + 0.09 * labelled, MAX_PANEL)  # inches per panel
    height = cell * len(rows) + 0.9
    width = max(cell * len(columns) + 1.3, MIN_WIDTH)
    lines = []
    if caption:  # wrapped to the figure's width, a file name in it is text, not mathtext
        lines = wrap(choice.caption(store, shown).replace("$", r"\$"), width, 9)
    strip = CAPTION_HEIGHT + CAPTION_LINE * (len(lines) - 1) if caption else 0.0
    fig = Figure(figsize=(width, height + strip), layout="constrained")
    # the grid, its colour bar and title in one subfigure; the caption line under it
    grid, below = fig.subfigures(2, 1, height_ratios=[height, strip]) if caption else (fig, None)
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
                vmin=vmin,
                vmax=vmax,
                aspect="equal",
                interpolation="nearest",
            )
            ax.set_title(panel_title(cond, i), fontsize=11)
            _ticks(ax, labels, len(maps[(i, cond)]))
    bar = grid.colorbar(
        image, ax=axes, location="right", shrink=0.85, aspect=20 * max(1, len(rows)) ** 0.5
    )
    bar.set_label(label, fontsize=12)
    if not diff:
        bar.set_ticks(np.round(np.arange(0.0, 1.0001, 0.2), 1))
    heading = grid.supxlabel(TITLE if title is None else title, fontsize=14)
    line = None
    if caption:
        line = below.text(
            0.5, 0.55, "\n".join(lines), ha="center", va="center", fontsize=9, color="0.3"
        )
    fig.qkvmean = {
        "rows": rows,
        "columns": columns,
        "layer": layer,
        "head": head,
        "layer_id": int(store.layer_ids[layer]),
        "choice": shown,
        "title": heading,
        "caption": line,
        "colorbar": bar,
        "axes": axes,
        "maps": maps,
    }
    return fig


def wrap(text: str, width: float, fontsize: float) -> list:
    """``text`` in lines that fit ``width`` inches at ``fontsize`` points (by the mean width
    of a character of matplotlib's sans-serif font, about 0.55 em)."""
    import textwrap

    return textwrap.wrap(text, max(20, int(width * 72 / (0.55 * fontsize)) - 4)) or [""]


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


def _nice_ceiling(x: float) -> float:
    """A round upper limit for a symmetric scale (0.05 → 0.05, 0.37 → 0.4)."""
    if x <= 0:
        return 1e-3
    step = 10 ** math.floor(math.log10(x))
    return math.ceil(x / step - 1e-9) * step


def check_output(path, overwrite=False, inputs=()) -> Path:
    """Refuse an output we cannot or should not write, before any work: never one of
    ``inputs`` (the store being drawn), whatever ``overwrite`` says."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InputError(
            f"{path}: unknown format {path.suffix or '(none)'!r}; use .png, .pdf or .svg"
        )
    return check_new_file(path, overwrite, inputs, flag="-o", noun="image")


def check_title(title: str) -> str:
    """A title matplotlib can draw: its ``$...$`` parts must be valid mathtext."""
    from matplotlib import cbook
    from matplotlib.mathtext import MathTextParser

    if not isinstance(title, str):
        raise TypeError(f"title must be a string, got {title!r}")
    try:
        title.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line
        raise InputError(
            f"--title {title.encode('utf-8', 'backslashreplace').decode()!r} is not valid "
            "UTF-8 text; write it in UTF-8"
        ) from None
    if cbook.is_math_text(title):
        try:
            MathTextParser("path").parse(title, dpi=72)
        except (ValueError, RecursionError) as exc:
            reason = str(exc).strip().splitlines()[-1].split("Exception: ", 1)[-1]
            reason = reason if len(reason) <= 90 else reason[:87] + "..."
            if isinstance(exc, RecursionError):
                reason = "nested too deeply"
            raise InputError(
                f"--title {title!r} is not valid mathtext ({reason}); fix the $...$ part, "
                "or write \\$ for a dollar sign"
            ) from None
    return title


def save(fig: Figure, path, *, dpi=150, overwrite=True):
    """Write ``fig`` (format from the extension) whole or not at all: a temporary file put
    in place at the end (without ``overwrite`` never over a file that appeared since)."""
    path = Path(path)
    width, height = fig.get_size_inches()
    if path.suffix.lower() == ".png" and width * height * dpi * dpi > MAX_PIXELS:
        raise InputError(
            f"{path}: {width * dpi:.0f} x {height * dpi:.0f} pixels is too large an image; "
            "lower --dpi, draw fewer inputs, or write .pdf/.svg"
        )
    sweep_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower())
        put_in_place(tmp, path, overwrite, flag="-o", noun="image")
    finally:
        tmp.unlink(missing_ok=True)
    return path
