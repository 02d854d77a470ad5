"""What the figure shows when nobody says: the layer and head where the columns differ.

The maps of one layer and head are the figure's whole content, and the obvious default
(the last layer, the mean over heads) is a poor one: a mean over twelve heads is nearly
uniform, and after a mean over the tokens of K or of V at layer L every later layer's
maps are the same for both, *exactly* (uniform weights over the tokens give every
position the mean value vector, and so do any weights over mean values). So the choice
is made from the maps themselves:

- ``layer="auto"``: a stored layer at or after the first substituted one;
- ``head="auto"``: one of the heads, or their mean;

taken together where the shown columns are most unlike each other: the smallest, over
pairs of columns, of the mean absolute difference of their maps over the shown inputs'
valid regions (with one column, its difference from the baseline). Ties go to the
earlier layer and the lower head. Only the shown inputs' maps are read, a layer at a
time, and at most :data:`READ_BUDGET` values of them (later layers are left out first).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.names import BASELINE, substitution_phrase
from ..files import InputError
from ..store import Store

#: The words ``layer`` and ``head`` take besides a number.
AUTO, LAST, MEAN = "auto", "last", "mean"
#: Map values read at most to choose (4 bytes each): about 256 MB.
READ_BUDGET = 64 * 2**20
#: How the models the CLI names are called in the caption.
MODEL_NAMES = {"minilm": "all-MiniLM-L6-v2", "synthetic": "the synthetic model"}


@dataclass(frozen=True)
class Choice:
    """The layer (an index into the store's layers) and head (an index or ``"mean"``)
    drawn, whether each was chosen automatically, and the score that chose them."""

    layer: int
    head: int | str
    auto_layer: bool = False
    auto_head: bool = False
    score: float | None = None


def check_layer(store: Store, layer) -> int | str:
    """``"auto"``, or a valid layer index (``"last"`` is -1, negative counts from the end)."""
    if isinstance(layer, str):
        word = layer.strip().lower()
        if word == AUTO:
            return AUTO
        if word == LAST:
            return store.n_layers - 1
        raise InputError(f"layer must be a number, 'auto' or 'last', got {layer!r}")
    return store.layer_index(layer)


def layer_by_number(store: Store, layer):
    """``--layer N`` on the command line: a layer number as the store's ``/layer`` holds it
    (a run of captured Q/K/V of layers 3, 5 and 7 has those), turned into the position
    that :func:`check_layer` and ``draw`` take; words and negative positions pass as
    they are. Where the numbers are 0, 1, ... the two are the same."""
    ids = [int(i) for i in store.layer_ids]
    if isinstance(layer, str) or layer < 0 or ids == list(range(len(ids))):
        return layer
    if layer not in ids:
        raise InputError(f"{store.path.name} has layers {_numbers(ids)}; there is no layer {layer}")
    return ids.index(layer)


def check_head(store: Store, head) -> int | str:
    """``"auto"``, ``"mean"`` or a valid head index (negative counts from the end)."""
    if isinstance(head, str):
        word = head.strip().lower()
        if word in (AUTO, MEAN):
            return word
        raise InputError(f"head must be a number, 'auto' or 'mean', got {head!r}")
    return store.head_index(head)


def named_indices(store: Store, key: str) -> list:
    """The indices the root attribute ``key`` names, sorted: ``ablate_layers`` holds layer
    numbers (mapped onto the store's layer axis), ``ablate_heads`` head indices; [] where
    it names none."""
    values = store.attrs.get(key)
    wanted = set() if values is None else {int(v) for v in np.atleast_1d(values)}
    if key == "ablate_layers":
        return [i for i, n in enumerate(store.layer_ids) if int(n) in wanted]
    return sorted(v for v in wanted if 0 <= v < store.n_heads)


def map_layers(store: Store) -> list:
    """The store's layer indices whose maps it keeps (every layer of a version 1 store;
    those of ``--maps-layers`` of a version 2 one); [] without maps."""
    if not store.has_maps:
        return []
    kept = {int(n) for n in store.map_layer_ids}
    return [i for i, n in enumerate(store.layer_ids) if int(n) in kept]


def check_maps(store: Store, layer) -> None:
    """A one-line InputError where the maps to draw are not in the store: none at all
    (``--no-maps``, or a run that kept none), or none at the layer asked for (an index,
    or ``"auto"``: any)."""
    if not map_layers(store):
        if store.config.get("maps", True) is False or store.format_version == 1:
            raise InputError(f"{store.path.name} was written with --no-maps: it holds metrics only")
        raise InputError(
            f"{store.path.name} keeps no maps (metrics only; rerun with --maps-layers to keep some)"
        )
    if layer != AUTO:
        store.map_layer_index(layer)  # its one-line error names the layers that have maps


def substituted_layers(store: Store) -> list:
    """The store's layer indices where the substitution happened; every layer where the
    store does not say."""
    return named_indices(store, "ablate_layers") or list(range(store.n_layers))


def choose(store: Store, rows, columns, layer=AUTO, head=AUTO) -> Choice:
    """The :class:`Choice` for drawing ``columns`` (conditions) of inputs ``rows``."""
    layer, head = check_layer(store, layer), check_head(store, head)
    if layer != AUTO and head != AUTO:
        return Choice(layer, head)
    shown = [c for c in columns if c != BASELINE]
    compared = shown if len(shown) > 1 else [BASELINE, *shown]
    pairs = list(itertools.combinations(compared, 2))
    if layer == AUTO:  # among the layers with maps, at or after the first substituted
        first = min(substituted_layers(store))
        kept = map_layers(store)
        layers = [i for i in kept if i >= first] or kept
        if not layers:
            check_maps(store, layer)  # (raises: no maps at all)
    else:
        layers = [layer]
    per_layer = len(compared) * store.n_heads * sum(int(store.lengths[i]) ** 2 for i in rows)
    layers = layers[: max(1, READ_BUDGET // max(per_layer, 1))]
    heads = list(range(store.n_heads)) + [MEAN] if head == AUTO else [head]
    scores = np.zeros((len(layers), len(heads)))
    for li, lay in enumerate(layers):
        scores[li] = _layer_scores(store, rows, lay, heads, pairs)
    li, hi = np.unravel_index(int(np.argmax(scores)), scores.shape)  # the first of the best
    return Choice(
        layers[li], heads[hi], auto_layer=layer == AUTO, auto_head=head == AUTO,
        score=float(scores[li, hi]),
    )  # fmt: skip


def _layer_scores(store, rows, layer, heads, pairs) -> np.ndarray:
    """For each of ``heads`` at ``layer``: the smallest over ``pairs`` of the mean over
    ``rows`` of the mean absolute difference of the two conditions' maps."""
    distance = np.zeros((len(pairs), len(heads)))
    used = [i for i in rows if store.lengths[i] > 0]
    for i in used:
        maps = {}
        for c in {c for pair in pairs for c in pair}:
            m = store.layer_maps(c, i, layer).astype(np.float64)
            maps[c] = np.concatenate([m, m.mean(axis=0, keepdims=True)])  # heads, then mean
        pick = [h if h != MEAN else -1 for h in heads]
        for p, (a, b) in enumerate(pairs):
            distance[p] += np.abs(maps[a][pick] - maps[b][pick]).mean(axis=(1, 2))
    return distance.min(axis=0) / max(len(used), 1)


def model_label(store: Store) -> str:
    """The model (or Q/K/V file) the store was computed from, for the caption."""
    config = store.config if isinstance(getattr(store, "config", None), dict) else {}
    if store.source == "model":
        model = str(config.get("model", "") or "a model")
        return MODEL_NAMES.get(model, Path(model.rstrip("/")).name or model)
    name = Path(str(config.get("input", "") or "")).name
    return f"Q/K/V of {name}" if name else "captured Q/K/V"


def _numbers(values) -> str:
    values = [int(v) for v in values]
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def caption(store: Store, choice: Choice) -> str:
    """One line under the title: the model, where the substitution is, what is shown."""
    over = str(store.attrs.get("over", "tokens"))
    where = [store.layer_ids[i] for i in substituted_layers(store)]
    heads = store.attrs.get("ablate_heads")
    all_heads = heads is None or len(np.atleast_1d(heads)) == store.n_heads
    what = f"{substitution_phrase(over)} at layer{'s' if len(where) > 1 else ''} {_numbers(where)}"
    what += ", all heads" if all_heads else f", heads {_numbers(np.atleast_1d(heads))}"
    head = "mean of the heads" if choice.head == MEAN else f"head {choice.head}"
    shown = f"shown: layer {store.layer_ids[choice.layer]}, {head}"
    if choice.auto_layer or choice.auto_head:
        picked = " and ".join(
            w for w, auto in (("layer", choice.auto_layer), ("head", choice.auto_head)) if auto
        )
        if choice.score:
            shown += f" ({picked} chosen where the columns differ most)"
        else:  # nothing to choose between: say so rather than claim a difference
            shown += f" (the columns are alike at every {picked} looked at)"
    return f"{model_label(store)} · {what} · {shown}"
