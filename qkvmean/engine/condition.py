"""A condition as a value: which tensor is substituted (``target``), at which layers and
in which heads, and by what (a :class:`~qkvmean.engine.substitution.Substitution`).

A run computes the baseline and a tuple of these. The plain run has one per target, all
at the run's layers and heads (``mean_q``, ``mean_k``, ``mean_v``: the figure's
columns); a sweep has one per target and layer (``--sweep layers``: ``mean_k@L3``) or per
target, layer and head (``--sweep heads``: ``mean_k@L3H5``). The label names the
condition in the store; the table of the store records every field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .names import BASELINE, TARGETS
from .substitution import Substitution

#: What ``--sweep`` varies: one condition per target and layer (every head), or per
#: target, layer and head.
SWEEPS = ("layers", "heads")


@dataclass(frozen=True)
class Condition:
    """``target`` (q, k or v) replaced at ``layers`` (model layer numbers, ascending;
    empty for raw Q/K/V, which has no layers to choose) in ``heads`` (query heads,
    ascending; None: every head) by ``substitution``; ``label``: its name."""

    target: str
    layers: tuple = ()
    heads: tuple | None = None
    substitution: Substitution = field(default_factory=Substitution)
    label: str = ""

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose from q, k, v")
        object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(sorted({int(h) for h in self.heads})))
        object.__setattr__(self, "substitution", Substitution.parse(self.substitution))
        if not self.label:
            object.__setattr__(self, "label", f"{self.substitution.word}_{self.target}")

    @property
    def first(self) -> int:
        """Its first substituted layer (0 without layers)."""
        return self.layers[0] if self.layers else 0

    def select(self, n_heads) -> np.ndarray:
        """Its heads as a boolean ``(n_heads,)`` mask."""
        if self.heads is None:
            return np.ones(n_heads, np.bool_)
        mask = np.zeros(n_heads, np.bool_)
        mask[list(self.heads)] = True
        return mask

    def record(self) -> dict:
        """The fields of the store's condition table (strings; JSON for the lists)."""
        return {
            "target": self.target,
            "layers": json.dumps(list(self.layers)),
            "heads": "all" if self.heads is None else json.dumps(list(self.heads)),
            "substitution": self.substitution.spec,
        }


#: The baseline's row of the condition table.
BASELINE_RECORD = {"target": "", "layers": "[]", "heads": "[]", "substitution": ""}


def table(conditions) -> dict:
    """``{field: [value per condition]}`` of the store's condition table, the baseline
    first."""
    rows = [BASELINE_RECORD] + [c.record() for c in conditions]
    return {name: [row[name] for row in rows] for name in BASELINE_RECORD}


def from_record(label, record: dict) -> Condition | None:
    """The condition of one row of :func:`table` (None for the baseline's)."""
    if label == BASELINE:
        return None
    heads = record["heads"]
    return Condition(
        record["target"],
        tuple(json.loads(record["layers"])),
        None if heads == "all" else tuple(json.loads(heads)),
        Substitution.parse(record["substitution"]),
        label,
    )


def plain(targets, substitution="tokens", layers=(), heads=None) -> tuple:
    """The plain run's conditions: each target alone, at ``layers`` in ``heads``."""
    sub = Substitution.parse(substitution)
    return tuple(Condition(t, tuple(layers), heads, sub) for t in targets)


def sweep(kind, targets, layers, n_heads, substitution="tokens", heads=None) -> tuple:
    """The conditions of ``--sweep kind``: per target (outermost), layer and (``heads``)
    head, each alone; ``heads`` limits the heads swept (None: all ``n_heads``)."""
    if kind not in SWEEPS:
        raise ValueError(f"unknown sweep {kind!r}; choose from {', '.join(SWEEPS)}")
    sub = Substitution.parse(substitution)
    word = sub.word
    found = []
    for t in targets:
        for layer in layers:
            if kind == "layers":
                found.append(Condition(t, (layer,), heads, sub, f"{word}_{t}@L{layer}"))
                continue
            for h in range(n_heads) if heads is None else heads:
                found.append(Condition(t, (layer,), (h,), sub, f"{word}_{t}@L{layer}H{h}"))
    return tuple(found)
