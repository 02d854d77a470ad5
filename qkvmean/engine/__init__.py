"""The engine: masked softmax attention and mean substitution.

:mod:`~qkvmean.engine.api` validates and dispatches to a backend of
:mod:`~qkvmean.engine.backends` (``cpu``, or ``cuda`` with ``device="cuda"``), which runs
the kernels of :mod:`~qkvmean.engine.kernels`; :mod:`~qkvmean.engine.transformer` is the
model path; :mod:`~qkvmean.engine.reference` is the plain numpy reference of the same
functions.
"""

from .api import (
    BACKENDS,
    CONDITIONS,
    DEVICES,
    METRICS,
    Conditions,
    ablate,
    attention,
    attention_weights,
    choose_device,
    conditions,
    mean_substitute,
)

__all__ = [
    "BACKENDS",
    "CONDITIONS",
    "DEVICES",
    "METRICS",
    "Conditions",
    "ablate",
    "attention",
    "attention_weights",
    "choose_device",
    "conditions",
    "mean_substitute",
]
