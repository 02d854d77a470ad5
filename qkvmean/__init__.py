"""qkvmean: attention weights under mean substitution of Query, Key or Value.

>>> import numpy as np, qkvmean
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.normal(size=(3, 2, 4, 5, 8)).astype(np.float32)  # (batch, head, seq, dim)
>>> weights, output = qkvmean.ablate(q, k, v, target="k", lengths=[5, 3])
>>> weights.shape, float(weights[1, 0, 0, 0])
((2, 4, 5, 5), 0.3333333432674408)
"""

from . import config  # noqa: F401  (chooses a thread-safe Numba threading layer first)
from ._version import __version__
from .engine import ablate, attention, attention_weights, conditions, mean_substitute
from .store import open_store

__all__ = [
    "__version__",
    "ablate",
    "attention",
    "attention_weights",
    "conditions",
    "mean_substitute",
    "open_store",
]
