"""The sweep figure: what substituting each head (or each layer) alone does, as heatmaps
(``qkvmean render STORE --sweep METRIC``, and the page ``qkvmean view`` writes for a
sweep store).

A ``--sweep heads`` store has one condition per target, layer and head (``mean_k@L3H5``):
one panel per target (Query, Key, Value, those present), rows the layers, columns the
heads, each cell the mean over the inputs of METRIC for that cell's condition. A
``--sweep layers`` store has one per target and layer (``mean_k@L3``, its heads all
together): one panel, rows the targets, columns the layers. The cells are found through
the store's condition table (target, layers, heads), not by reading the labels; a cell
that no condition fills (a sweep of some heads only) is grey.

METRIC is an effect on the output (:data:`qkvmean.engine.names.EFFECTS`, those in the
store: one number per condition and input), or an attention metric (``entropy``,
``kl_from_baseline``, ``top_key_mass``), read where the condition substitutes: the
substituted head at the substituted layer (``--sweep layers``: the mean over its
substituted heads at that layer), the head's own change. Colours: a diverging scale
centred on 0 for signed metrics (``ce_change``), sequential from 0 for the others, the
cosine from its smallest value up to 1 (reversed, so that a larger effect is brighter
on every scale). Reads only the metrics and effects, so stores without maps draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from ..engine.names import EFFECTS, METRICS, TARGETS, TENSOR_LABELS, substitution_phrase
from ..files import InputError
from ..store import Store, open_store
from .choice import model_label
from .common import check_title, italic, nice_ceiling, substitution_of, verb, wrap
from .metrics import BLOCK, chosen_inputs

#: The attention metrics a sweep draws (``top_key_index`` is a position, not a size).
ATTENTION_METRICS = METRICS[:3]
SIGNED, SEQUENTIAL, COSINE, UNIT = "signed", "sequential", "cosine", "unit"
#: The colour map of each kind of scale (matplotlib names).
CMAPS = {SIGNED: "RdBu_r", SEQUENTIAL: "viridis", COSINE: "viridis_r", UNIT: "viridis"}
#: Cells that no condition fills.
MISSING = "0.85"


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is named and drawn: the figure's title, the colour bar's label (the
    metric's name first) and the kind of scale."""

    title: str
    label: str
    scale: str


METRIC_INFO = {
    "hidden_change": MetricInfo(
        "Relative Change of the Final Hidden State",
        "hidden_change (relative)",
        SEQUENTIAL,
    ),
    "kl_next_token": MetricInfo(
        "Next-Token KL(baseline ‖ condition)",
        "kl_next_token (nats)",
        SEQUENTIAL,
    ),
    "ce_change": MetricInfo(
        "Change in the Next-Token Cross-Entropy (Condition − Baseline)",
        "ce_change (nats)",
        SIGNED,
    ),
    "embedding_cosine": MetricInfo(
        "Cosine of the Mean-Pooled Embedding to the Baseline's",
        "embedding_cosine",
        COSINE,
    ),
    "entropy": MetricInfo(
        "Attention Entropy of the Substituted Head", "entropy (nats)", SEQUENTIAL
    ),
    "kl_from_baseline": MetricInfo(
        "Attention KL(baseline ‖ condition) of the Substituted Head",
        "kl_from_baseline (nats)",
        SEQUENTIAL,
    ),
    "top_key_mass": MetricInfo("Top Key Mass of the Substituted Head", "top_key_mass", UNIT),
}


@dataclass(frozen=True, eq=False)
class Scale:
    """A colour scale: its limits, its matplotlib colour map and the kind it is."""

    vmin: float
    vmax: float
    cmap: str
    kind: str


@dataclass(eq=False)
class Panel:
    """One heatmap: ``values`` ``(row, column)`` float64 (NaN where no condition fills
    the cell), ``conditions`` the index in ``store.conditions`` of each cell's condition
    (-1: none), ``target`` (None for a ``--sweep layers`` panel, whose rows are the
    targets) and its title."""

    title: str
    target: str | None
    values: np.ndarray
    conditions: np.ndarray

    def label(self, store: Store, row: int, col: int) -> str | None:
        """The condition label of cell ``(row, col)`` (None where none fills it)."""
        c = int(self.conditions[row, col])
        return None if c < 0 else store.conditions[c]


@dataclass(eq=False)
class Grid:
    """What a sweep figure shows: the panels, their rows and columns (names and numbers:
    layer numbers, heads, or targets), the inputs averaged and the scale."""

    metric: str
    kind: str  # "heads" or "layers"
    panels: list
    row_name: str
    col_name: str
    rows: list  # labels of the rows (layer numbers as strings, or tensor names)
    cols: list  # labels of the columns (head or layer numbers)
    inputs: np.ndarray
    scale: Scale
    info: MetricInfo = field(default=None)

    @property
    def missing(self) -> bool:
        """Whether some cell has no condition."""
        return any(bool((p.conditions < 0).any()) for p in self.panels)


def sweep_metrics(store: Store) -> list:
    """The metrics a sweep of ``store`` can be drawn by: its effects, then the attention
    metrics."""
    return [*store.effects, *ATTENTION_METRICS]


def check_sweep(store: Store) -> str:
    """``"heads"`` or ``"layers"``, or the one-line InputError for a store that is not a
    sweep's."""
    if store.sweep not in ("heads", "layers"):
        raise InputError(
            f"{store.path.name} was not written with --sweep (it has the conditions "
            f"{_few(store.conditions)}); use render --metrics for its KL heatmaps, or run "
            "qkvmean run --sweep heads"
        )
    return store.sweep


def check_metric(store: Store, metric) -> str:
    """``metric`` if ``store`` can be drawn by it (:func:`sweep_metrics`), or a one-line
    InputError naming those it can."""
    have = ", ".join(sweep_metrics(store))
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a string, got {metric!r}")
    if metric in ATTENTION_METRICS or metric in store.effects:
        return metric
    if metric in EFFECTS:
        effects = ", ".join(store.effects) or "none"
        raise InputError(
            f"{store.path.name} has no effect {metric!r} (its effects: {effects}; "
            f"{metric} is computed for {_model_kind(metric)}); choose one of {have}"
        )
    if metric == METRICS[3]:
        raise InputError(f"{metric} is a key position, not a size to draw; choose one of {have}")
    raise InputError(f"unknown metric {metric!r}; {store.path.name} has {have}")


def _model_kind(effect: str) -> str:
    if effect == "embedding_cosine":
        return "encoders (MiniLM, BERT)"
    if effect in ("kl_next_token", "ce_change"):
        return "language models with a head (GPT-2, Llama-like)"
    return "every model"


def _few(names, most=6) -> str:
    names = list(names)
    return ", ".join(names) if len(names) <= most else ", ".join(names[:most]) + ", ..."


def _cells(store: Store, kind: str):
    """``[(target, layer index, head or None, condition index)]`` of every condition but
    the baseline, from the condition table; one-line InputErrors for a row that is not
    one cell of a ``kind`` sweep."""
    cells, seen = [], {}
    numbers = {int(n): i for i, n in enumerate(store.layer_ids)}
    for c, row in enumerate(store.condition_table):
        if c == 0:
            continue
        target, layers, heads = row["target"], row["layers"], row["heads"]
        one_head = isinstance(heads, list) and len(heads) == 1
        if target not in TARGETS or len(layers) != 1 or (kind == "heads" and not one_head):
            raise InputError(
                f"{store.path}: condition {row['label']!r} (target {target!r}, layers "
                f"{layers}, heads {heads}) is not one cell of a --sweep {kind} grid; the "
                "store is damaged"
            )
        if int(layers[0]) not in numbers:
            raise InputError(
                f"{store.path}: condition {row['label']!r} substitutes layer {layers[0]}, "
                "which /layer does not have; the store is damaged"
            )
        head = heads[0] if kind == "heads" else None
        if head is not None and not 0 <= head < store.n_heads:
            raise InputError(
                f"{store.path}: condition {row['label']!r} substitutes head {head}, and the "
                f"store has {store.n_heads} heads; the store is damaged"
            )
        cell = (target, numbers[int(layers[0])], head)
        if cell in seen:
            raise InputError(
                f"{store.path}: conditions {store.conditions[seen[cell]]!r} and "
                f"{row['label']!r} substitute the same {'head' if head is not None else 'layer'}"
                "; the store is damaged"
            )
        seen[cell] = c
        cells.append((*cell, c))
    if not cells:
        raise InputError(f"{store.path.name}: the sweep has no condition; nothing to draw")
    return cells


def json_heads(heads) -> str:
    """A condition table's heads (``"all"`` or a list) as one hashable string."""
    return "all" if heads == "all" else ",".join(map(str, heads))


def _substituted_heads(store: Store, c: int) -> np.ndarray:
    heads = store.condition_table[c]["heads"]
    return np.arange(store.n_heads) if heads == "all" else np.asarray(heads, dtype=np.int64)


def _values(store: Store, metric: str, cells, inputs: np.ndarray) -> dict:
    """``{condition index: mean over inputs}`` of ``metric`` for each cell (float64); a
    one-line InputError where the store holds NaN or infinity."""
    out = {}
    if metric in EFFECTS:
        data = store.effect(metric)[:, inputs].astype(np.float64)
        for *_, c in cells:
            out[c] = data[c]
    else:
        selected = np.zeros(store.n_inputs, dtype=bool)
        selected[inputs] = True
        for _, layer, head, c in cells:
            heads = [head] if head is not None else _substituted_heads(store, c)
            parts = []
            for start in range(0, store.n_inputs, BLOCK):
                stop = min(start + BLOCK, store.n_inputs)
                if selected[start:stop].any():
                    block = store.metric_block(metric, store.conditions[c], start, stop)
                    part = block[selected[start:stop], layer][:, heads]
                    parts.append(part.astype(np.float64).mean(axis=1))
            out[c] = np.concatenate(parts)
    for c, v in out.items():
        if not np.isfinite(v).all():
            where = "/effects" if metric in EFFECTS else "/metrics"
            raise InputError(
                f"{store.path}: {where}/{metric} of {store.conditions[c]} holds NaN or "
                "infinity; the store is damaged"
            )
    return {c: float(v.mean()) for c, v in out.items()}


def scale_of(metric: str, values) -> Scale:
    """The colour scale of ``metric`` for these values (NaN ignored): symmetric about 0 up
    to a round limit (signed), 0 up to a round limit (sequential), 0..1 (top key mass),
    or a round lower limit up to 1 (the cosine)."""
    info = METRIC_INFO[metric]
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    kind = info.scale
    if kind == SIGNED:
        limit = nice_ceiling(float(np.abs(v).max(initial=0.0)))
        return Scale(-limit, limit, CMAPS[kind], kind)
    if kind == COSINE:
        low = max(-1.0, 1.0 - nice_ceiling(1.0 - float(v.min(initial=1.0))))
        return Scale(low, 1.0, CMAPS[kind], kind)
    if kind == UNIT:
        return Scale(0.0, 1.0, CMAPS[kind], kind)
    return Scale(0.0, nice_ceiling(float(v.max(initial=0.0))), CMAPS[kind], kind)


def sweep_grid(store: Store, metric: str, inputs=None) -> Grid:
    """The panels of the sweep figure of ``store`` (an open Store) by ``metric``, the mean
    over ``inputs`` (default: every input with a valid token): see the module's
    docstring."""
    kind = check_sweep(store)
    metric = check_metric(store, metric)
    chosen = chosen_inputs(store, inputs, what=metric)
    cells = _cells(store, kind)
    means = _values(store, metric, cells, chosen)
    targets = [t for t in TARGETS if any(cell[0] == t for cell in cells)]
    layers = sorted({cell[1] for cell in cells})
    word = verb(substitution_of(store))
    panels = []
    if kind == "heads":
        heads = sorted({cell[2] for cell in cells})
        for t in targets:
            values = np.full((len(layers), len(heads)), np.nan)
            index = np.full(values.shape, -1, dtype=np.int64)
            for target, layer, head, c in cells:
                if target == t:
                    r, k = layers.index(layer), heads.index(head)
                    values[r, k], index[r, k] = means[c], c
            panels.append(Panel(f"{word} {italic(TENSOR_LABELS[t])}", t, values, index))
        rows = [str(store.layer_ids[i]) for i in layers]
        cols = [str(h) for h in heads]
        row_name, col_name = "Layer", "Head"
    else:
        values = np.full((len(targets), len(layers)), np.nan)
        index = np.full(values.shape, -1, dtype=np.int64)
        for target, layer, _, c in cells:
            r, k = targets.index(target), layers.index(layer)
            values[r, k], index[r, k] = means[c], c
        heads = {json_heads(store.condition_table[c]["heads"]) for *_, c in cells}
        which = "Every Head" if heads == {"all"} else "the Swept Heads"
        title = f"{word} Each Tensor at Each Layer ({which})"
        panels.append(Panel(title, None, values, index))
        rows = [TENSOR_LABELS[t] for t in targets]
        cols = [str(store.layer_ids[i]) for i in layers]
        row_name, col_name = "Tensor", "Layer"
    every = np.concatenate([p.values.ravel() for p in panels])
    return Grid(
        metric, kind, panels, row_name, col_name, rows, cols, chosen,
        scale_of(metric, every), METRIC_INFO[metric],
    )  # fmt: skip


def title_of(grid: Grid) -> str:
    """``KL Divergence of ... per Layer and Head`` (``per Layer`` for a layers sweep)."""
    return f"{grid.info.title}, per {'Layer and Head' if grid.kind == 'heads' else 'Layer'}"


def caption_of(store: Store, grid: Grid) -> str:
    """The model, the substitution, what each cell is, the number of inputs."""
    n = len(grid.inputs)
    spec = substitution_of(store)
    alone = "each head alone" if grid.kind == "heads" else "each layer alone, its heads together"
    cells = len(store.conditions) - 1
    where = ""
    if grid.metric in ATTENTION_METRICS:
        where = (
            " · the substituted head at its layer"
            if grid.kind == "heads"
            else " · the mean of the substituted heads at their layer"
        )
    missing = " · grey: not swept" if grid.missing else ""
    return (
        f"{model_label(store)} · {substitution_phrase(spec)}, {alone} ({cells} conditions, "
        f"--sweep {grid.kind}){where} · mean over {n} input{'s' if n != 1 else ''}{missing}"
    )


#: Cell side (inches) and the bounds of a panel (as in the metrics figure).
MIN_CELL, MAX_CELL, MAX_PANEL, MIN_WIDTH, FIGURE_MIN_WIDTH = 0.12, 0.45, 6.0, 3.4, 7.0


def _ticks(n: int, inches: float) -> list:
    step = max(1, math.ceil(n / max(1, int(inches * 7))))
    return list(range(0, n, step))


def draw_sweep(store, metric, *, inputs=None, title=None, caption=True) -> Figure:
    """The sweep figure of ``store`` (an open Store or a path) by ``metric``: per target a
    layer × head heatmap (``--sweep heads``), or one target × layer heatmap (``--sweep
    layers``) of the mean over ``inputs`` (default: every input with a valid token), one
    colour bar labelled with the metric, the title at the bottom with a caption line
    (``caption=False``: none). Returns a :class:`matplotlib.figure.Figure`; its
    ``qkvmean`` attribute holds the :class:`Grid`, the axes and the colour bar.
    """
    if not isinstance(store, Store):
        with open_store(store) as opened:
            return draw_sweep(opened, metric, inputs=inputs, title=title, caption=caption)
    if title is not None:
        check_title(title)
    grid = sweep_grid(store, metric, inputs)
    from matplotlib import colormaps

    cmap = colormaps[grid.scale.cmap].with_extremes(bad=MISSING)
    n_rows, n_cols = len(grid.rows), len(grid.cols)
    cell = min(MAX_CELL, max(MIN_CELL, MAX_PANEL / max(n_rows, n_cols, 1)))
    width = max(MIN_WIDTH, cell * n_cols)
    height = max(cell * n_rows, 0.9 if grid.kind == "layers" else 1.0)
    total = max(len(grid.panels) * (width + 0.25) + 1.9, FIGURE_MIN_WIDTH)
    fig = Figure(figsize=(total, height + 2.1), layout="constrained")
    axes = fig.subplots(1, len(grid.panels), squeeze=False, sharey=True)[0]
    rows, cols = _ticks(n_rows, height), _ticks(n_cols, width)
    image = None
    for ax, panel in zip(axes, grid.panels, strict=True):
        image = ax.imshow(
            panel.values, cmap=cmap, vmin=grid.scale.vmin, vmax=grid.scale.vmax,
            aspect="auto", interpolation="nearest",
        )  # fmt: skip
        ax.set_title(panel.title, fontsize=10)
        ax.set_xticks(cols, [grid.cols[k] for k in cols], fontsize=8)
        ax.set_xlabel(grid.col_name, fontsize=10)
        ax.tick_params(length=2)
    axes[0].set_yticks(rows, [grid.rows[r] for r in rows], fontsize=8)
    axes[0].set_ylabel(grid.row_name, fontsize=10)
    bar = fig.colorbar(image, ax=axes, location="right", shrink=0.9, aspect=25)
    bar.set_label(grid.info.label, fontsize=10)
    lines = wrap(caption_of(store, grid), total, 12) if caption else []
    heading = title_of(grid) if title is None else title
    fig.supxlabel("\n".join([heading, *lines]), fontsize=12)
    fig.qkvmean = {
        "grid": grid,
        "metric": grid.metric,
        "panels": grid.panels,
        "axes": axes,
        "colorbar": bar,
        "inputs": grid.inputs.tolist(),
        "title": heading,
        "caption": lines,
    }
    return fig
