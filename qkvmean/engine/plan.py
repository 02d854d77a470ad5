"""The substitution plan: which tensor is replaced, over what, in which heads and layers,
and which fast path (if any) computes the result — shared by the raw API and the model
path, so both make the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import config
from .modes import MODE_GENERAL, MODE_SHARED_ROW, MODE_UNIFORM
from .names import OVER, TARGETS, condition_names


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
    over: str = OVER[0]
    heads: np.ndarray | None = None  # boolean mask over (query) heads; None: every head
    layers: frozenset = frozenset({0})  # the model path's substituted layers

    @property
    def names(self) -> list:
        return condition_names(self.targets)

    @property
    def prefix(self) -> bool:
        """The causal prefix mean (``over="causal"``) rather than the mean over tokens."""
        return self.over == OVER[1]  # "causal"

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
        - the causal prefix mean changes every row, and a rotary embedding makes identical
          projections differ by position (``exact_fast`` false): the general path.

        V never reaches the weights: mean-V has the baseline's weights (the caller reuses
        them) and only changes the attention output.
        """
        fast = config.FAST_PATHS and exact_fast and not self.prefix
        if target == "k" and fast:
            return Step(False, MODE_UNIFORM)
        if target == "q" and fast and not causal:
            return Step(True, MODE_SHARED_ROW)
        return Step(True, MODE_GENERAL)

    @staticmethod
    def weights_unchanged(target) -> bool:
        """Does substituting ``target`` leave the attention weights as the baseline's?"""
        return target == "v"
