"""The engine: masked softmax attention and mean substitution.

:mod:`~qkvmean.engine.api` validates and dispatches to a backend (:mod:`~qkvmean.engine.cpu`
today); :mod:`~qkvmean.engine.reference` is the plain numpy reference of the same functions.
"""

from .api import (
    BACKENDS,
    CONDITIONS,
    METRICS,
    Conditions,
    ablate,
    attention,
    attention_weights,
    conditions,
    mean_substitute,
)

__all__ = [
    "BACKENDS",
    "CONDITIONS",
    "METRICS",
    "Conditions",
    "ablate",
    "attention",
    "attention_weights",
    "conditions",
    "mean_substitute",
]
