"""What replaces a substituted tensor: a :class:`Substitution` value.

Two kernel families cover every kind:

- **running means** of the input's own values (``tokens``: over every valid token;
  ``causal``: over the prefix ``t <= i``; ``window:W``: over the last ``W`` tokens, causal),
  one kernel with a window length (:func:`Substitution.window_length`);
- **given vectors per position** (``dataset``: the per-position mean over a data set;
  ``zero``: zeros; ``resample``: the same position of another input of the run, drawn
  with a recorded seed), one kernel that copies them in.

Adding a kind is one name here and, for a given kind, one producer of its vectors.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

#: Every kind, in the order the docs list them.
KINDS = ("tokens", "causal", "dataset", "window", "zero", "resample")
#: The kinds computed from the input's own values by the running-mean kernel.
RUNNING = ("tokens", "causal", "window")
#: How a kind is spelled with its parameter (``window:W``, ``resample:SEED``).
SPELLINGS = "tokens, causal, dataset, window:W, zero or resample[:SEED]"


@dataclass(frozen=True)
class Substitution:
    """A kind of substitution and its parameters: ``window`` (``kind="window"``, the
    number of tokens, >= 1) and ``seed`` (``kind="resample"``, which input's values each
    input gets)."""

    kind: str = "tokens"
    window: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown substitution {self.kind!r}; use {SPELLINGS}")
        for name in ("window", "seed"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"the substitution's {name} must be an int, got {value!r}")
        if self.kind == "window" and self.window < 1:
            raise ValueError(
                f"window:{self.window} averages no token; a window needs at least 1 token "
                "(window:1 is the identity, window:W over the last W tokens)"
            )
        if self.kind != "window" and self.window:
            raise ValueError(f"a window length applies to kind 'window', not {self.kind!r}")
        if self.seed < 0:
            raise ValueError(f"the resample seed must be >= 0, got {self.seed}")
        if self.kind != "resample" and self.seed:
            raise ValueError(f"a seed applies to kind 'resample', not {self.kind!r}")

    @classmethod
    def parse(cls, spec) -> Substitution:
        """``"tokens"``, ``"causal"``, ``"dataset"``, ``"window:8"``, ``"zero"``,
        ``"resample"`` or ``"resample:7"`` (a :class:`Substitution` is returned as it is)."""
        if isinstance(spec, Substitution):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a substitution is a string such as 'window:8', got {spec!r}")
        kind, _, param = spec.strip().partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown substitution {spec!r}; use {SPELLINGS}")
        if not param:
            if kind == "window":
                raise ValueError("window needs its length in tokens: window:W, e.g. window:8")
            return cls(kind)
        if kind not in ("window", "resample") or not param.strip().lstrip("-").isdigit():
            want = "window:W with W a whole number" if kind == "window" else (
                "resample:SEED with SEED a whole number" if kind == "resample"
                else f"{kind} without a parameter"
            )  # fmt: skip
            raise ValueError(f"bad substitution {spec!r}: use {want}")
        value = int(param)
        return cls(kind, window=value) if kind == "window" else cls(kind, seed=value)

    @property
    def spec(self) -> str:
        """The spelling :meth:`parse` reads back."""
        if self.kind == "window":
            return f"window:{self.window}"
        if self.kind == "resample" and self.seed:
            return f"resample:{self.seed}"
        return self.kind

    def __str__(self):
        return self.spec

    @property
    def running(self) -> bool:
        """Computed from the input's own values (a running mean), not given."""
        return self.kind in RUNNING

    @property
    def word(self) -> str:
        """The start of a condition's name: ``mean`` for the means, else the kind."""
        return self.kind if self.kind in ("zero", "resample") else "mean"

    def window_length(self, seq: int) -> int:
        """The running-mean kernel's window: 0 for every valid token, else the last
        ``window`` tokens (the causal prefix: ``seq``, at least every token)."""
        return {"tokens": 0, "causal": max(int(seq), 1)}.get(self.kind, self.window)

    def params(self) -> dict:
        """Its parameters, for the record (a store's condition table)."""
        if self.kind == "window":
            return {"window": self.window}
        if self.kind == "resample":
            return {"seed": self.seed}
        return {}


def resample_partners(lengths, seed) -> np.ndarray:
    """``(batch,)``: the input whose values each input takes (``kind="resample"``).

    Input ``b`` draws uniformly, with ``numpy.random.default_rng(seed)``, one of the other
    inputs with at least as many tokens (so that each of its positions has a value to
    take); where no other input is that long, one of the longest others (its positions
    past that input's length keep their own values). The draws depend on the lengths
    and the seed only, so a run gives every input the same partner however it is
    batched. Needs at least two inputs.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    batch = lengths.shape[0]
    if batch < 2:
        raise ValueError(
            f"resample takes each input's values from another input, and there is only "
            f"{batch}; give at least 2 inputs"
        )
    rng = np.random.default_rng(int(seed))
    partners = np.empty(batch, dtype=np.int64)
    index = np.arange(batch)
    for b in range(batch):
        others = index[index != b]
        long_enough = others[lengths[others] >= lengths[b]]
        if long_enough.size == 0:
            longest = lengths[others].max()
            long_enough = others[lengths[others] == longest]
        partners[b] = long_enough[rng.integers(long_enough.size)]
    return partners


def resampled(x, lengths, partners) -> np.ndarray:
    """``x`` ``(batch, *group, seq, dim)`` with each input's valid positions taken from its
    partner's same positions (where the partner has them; the others keep their own):
    the given vectors of ``resample``."""
    out = np.array(x, copy=True)
    lengths = np.asarray(lengths, dtype=np.int64)
    for b, r in enumerate(partners):
        n = int(min(lengths[b], lengths[r]))
        out[b, ..., :n, :] = x[r, ..., :n, :]
    return out
