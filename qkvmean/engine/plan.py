"""The substitution plan: which tensor is replaced, over what, in which heads and layers,
and which fast path (if any) computes the result — shared by the raw API and the model
path, so both make the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import config
from .modes import MODE_GENERAL, MODE_SHARED_ROW, MODE_UNIFORM
from .names import TARGETS, condition_names
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


@dataclass(frozen=True)
class Plan:
    """Conditions: the baseline, then one per target (each alone, from the same inputs)."""

    targets: tuple = TARGETS
    substitution: Substitution = field(default_factory=Substitution)
    heads: np.ndarray | None = None  # boolean mask over (query) heads; None: every head
    layers: frozenset = frozenset({0})  # the model path's substituted layers
    means: DatasetMeans | None = None  # over="dataset": what replaces each position

    @property
    def names(self) -> list:
        return condition_names(self.targets)

    @property
    def dataset(self) -> bool:
        """The per-position mean over a data set (``over="dataset"``), given as ``means``."""
        return self.substitution.kind == "dataset"

    @property
    def given(self) -> bool:
        """Given vectors per position replace the tensor (dataset, zero, resample), not a
        running mean of its own values."""
        return not self.substitution.running

    def window(self, seq) -> int:
        """The running-mean kernel's window length (0: every valid token)."""
        return self.substitution.window_length(seq)

    def first(self, n_layers) -> int:
        """The first layer where a condition differs from the baseline."""
        return min(self.layers) if self.targets and self.layers else n_layers

    def select(self, n_heads) -> np.ndarray:
        """The selected heads as a boolean ``(n_heads,)`` mask."""
        if self.heads is None:
            return np.ones(n_heads, np.bool_)
        return self.heads

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
