"""The substitution plan: which tensor is replaced, over what, in which heads and layers,
and which fast path (if any) computes the result — shared by the raw API and the model
path, so both make the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import config
from . import condition
from .modes import MODE_GENERAL, MODE_SHARED_ROW, MODE_UNIFORM
from .names import BASELINE, TARGETS
from .substitution import Substitution


def position_counts(lengths, seq) -> np.ndarray:
    """``(seq,)``: how many of the inputs with these ``lengths`` have a valid token at
    each position."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return (lengths[None, :] > np.arange(seq)[:, None]).sum(axis=1).astype(np.int64)


def means_from_sums(sums, counts, dtype) -> np.ndarray:
    """Per-position means ``sums / counts`` over the position axis (-2) in float64, then
    in ``dtype``; 0 where no input has a token (such a position is never substituted)."""
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)[: sums.shape[-2], None]
    return (sums / np.maximum(counts, 1.0)).astype(dtype)


@dataclass(frozen=True)
class DatasetMeans:
    """The per-position means that ``over="dataset"`` substitutes, for the model path.

    ``values[target]``: float32 ``(len(layers), n_heads, positions, dim)``, one per query
    head (a key or value head's mean repeated over the query heads that read it);
    ``counts``: ``(positions,)`` inputs with a valid token at each position. ``layers``
    are the model's layer numbers, ascending (for raw Q/K/V: every layer of the input).
    """

    layers: tuple
    values: dict
    counts: np.ndarray
    attrs: dict = field(default_factory=dict)  # where they come from (the store's /means)

    def at(self, target, layer):
        """``(n_heads, positions, dim)`` of ``target`` at model layer ``layer``."""
        return self.values[target][self.layers.index(layer)]


@dataclass(frozen=True)
class Step:
    """How one target is substituted: is the tensor replaced (``substitute``), and the
    attention mode of the selected heads (a fast path, or the general one)."""

    substitute: bool
    mode: int


#: The most rows (stacked copies x tokens) one input's pass computes together: a chunk of
#: conditions that branch at the same layer holds at most ``STACK_ROWS // n - 1`` of them
#: (and at least 3, the plain run's), beside the baseline's copy. A constant: an input's
#: bits depend on its chunks, never on the batch or the threads.
STACK_ROWS = 4096


@dataclass(frozen=True)
class Plan:
    """What the model path computes: the baseline, then each :class:`Condition` (each
    alone, from the same inputs), all with one substitution (the given vectors of a run
    come from one producer)."""

    conditions: tuple = ()
    substitution: Substitution = field(default_factory=Substitution)
    means: DatasetMeans | None = None  # over="dataset": what replaces each position

    def __post_init__(self):
        object.__setattr__(self, "substitution", Substitution.parse(self.substitution))
        for c in self.conditions:
            if c.substitution != self.substitution:
                raise ValueError(
                    f"condition {c.label} substitutes {c.substitution.spec}, the run "
                    f"{self.substitution.spec}: a run has one substitution"
                )
        names = self.names
        if len(set(names)) != len(names):
            twice = next(x for x in names if names.count(x) > 1)
            raise ValueError(f"two conditions are named {twice!r}; give each its own label")

    @classmethod
    def of(cls, targets=TARGETS, substitution="tokens", heads=None, layers=(0,), means=None):
        """The plain run's plan: each target alone at ``layers`` in ``heads``."""
        sub = Substitution.parse(substitution)
        return cls(condition.plain(targets, sub, layers, heads), sub, means)

    @property
    def names(self) -> list:
        return [BASELINE] + [c.label for c in self.conditions]

    @property
    def targets(self) -> tuple:
        """The targets substituted somewhere, in the store's order."""
        found = {c.target for c in self.conditions}
        return tuple(t for t in TARGETS if t in found)

    @property
    def layers(self) -> tuple:
        """Every layer where some condition substitutes, ascending."""
        return tuple(sorted({layer for c in self.conditions for layer in c.layers}))

    def window(self, seq) -> int:
        """The running-mean kernel's window length (0: every valid token)."""
        return self.substitution.window_length(seq)

    def chunks(self, n, n_layers) -> list:
        """How one input of ``n`` tokens is computed: ``[(layer, members), ...]``, each a
        stack of the baseline's copy and the conditions ``members`` (indices into
        :attr:`names`) that branch from it at ``layer``, their first substituted layer.

        The first chunk starts at the embeddings (a stack of one up to its layer) and
        its baseline is the one recorded; every later chunk starts from the baseline's
        rows at its layer, which the first one keeps. The layers before a condition's
        first are computed once, for all of them. Without conditions: one chunk that
        never branches (``layer = n_layers``).
        """
        if not self.conditions:
            return [(n_layers, ())]
        size = max(3, STACK_ROWS // max(n, 1) - 1)
        by_layer = {}
        for index, c in enumerate(self.conditions, start=1):
            by_layer.setdefault(c.first, []).append(index)
        return [
            (layer, tuple(members[i : i + size]))
            for layer, members in sorted(by_layer.items())
            for i in range(0, len(members), size)
        ]

    def step(self, target, *, causal, exact_fast=True) -> Step:
        """How ``target`` is substituted for attention with this mask.

        - mean-K over tokens: every valid key is the same vector, so each allowed weight
          is ``1 / n_allowed`` (the keys are not even replaced);
        - mean-Q over tokens without a causal mask: every valid row is the same, one row
          is computed and copied;
        - the causal prefix mean changes every row, the dataset mean differs by position,
          and a rotary embedding makes identical projections differ by position
          (``exact_fast`` false): the general path.

        V never reaches the weights: mean-V has the baseline's weights (the caller reuses
        them) and only changes the attention output.
        """
        fast = config.FAST_PATHS and exact_fast and self.substitution.kind == "tokens"
        if target == "k" and fast:
            return Step(False, MODE_UNIFORM)
        if target == "q" and fast and not causal:
            return Step(True, MODE_SHARED_ROW)
        return Step(True, MODE_GENERAL)

    @staticmethod
    def weights_unchanged(target) -> bool:
        """Does substituting ``target`` leave the attention weights as the baseline's?"""
        return target == "v"
