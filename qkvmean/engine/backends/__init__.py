"""The backend seam: what a device provides, and the registry that finds it by name.

:data:`BACKENDS` names each backend's module (``"cpu"``: :mod:`.cpu`; ``"cuda"``:
:mod:`.cuda`), imported only when :func:`load` is first asked for it, so that numba-cuda
and CuPy are imported only where CUDA is wanted. :mod:`qkvmean.engine.api` validates,
flattens and plans; :mod:`qkvmean.engine.transformer` runs the forward pass; both call
only the names of :class:`Backend`, so a new device is one module that provides them plus
one entry in :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
from typing import Protocol

#: The backends by device name: the module that implements :class:`Backend` (or, for
#: tests, the backend object itself).
BACKENDS = {"cpu": "qkvmean.engine.backends.cpu", "cuda": "qkvmean.engine.backends.cuda"}
#: What to install when a backend's module cannot be imported: ``(package, extra)``.
REQUIRES = {"cuda": ("numba-cuda", "qkvmean[cuda]")}
#: What ``device="auto"`` tries, in order; the last one always runs.
AUTO = ("cuda", "cpu")

#: What every device says about itself (:func:`load`, ``device="auto"``, the CLI).
DEVICE_OPS = ("unavailable", "describe", "skip_auto")

#: What the raw API (qkvmean.attention, ablate, conditions, mean_substitute) calls, on
#: whole flattened batches.
BATCH_OPS = ("attention", "reduce_metrics", "mean_substitute", "position_sums")
#: What the model path calls, one input at a time (inside ``run_inputs``, on the
#: operations it hands each input).
MODEL_OPS = (
    "xp",
    "upload",
    "to_host",
    "run_inputs",
    "matmul",
    "host_matmul",
    "add",
    "add_norm",
    "head_norm",
    "token_norm",
    "bias_activation",
    "split_heads",
    "merge_heads",
    "rotary",
    "substitute",
    "InputScratch",
    "attention_one",
    "check_finite",
)


class Backend(Protocol):
    """The protocol, for type checkers and readers; see :mod:`qkvmean.engine.backends.cpu` for the
    reference implementation and the meaning of each argument."""

    name: str

    # the device
    skip_auto: str | None  # why device="auto" passes this backend over although it runs

    def unavailable(self) -> str | None: ...  # why it cannot run here (one line), or None
    def describe(self) -> str: ...  # which device computes, for the CLI ("" if nothing)

    # raw API
    def attention(self, q, k, v, lengths, group, modes, causal, scale, row_block,
                  with_output, metrics=False, base=None, maps=True): ...  # fmt: skip
    def reduce_metrics(self, rows, lengths, group): ...
    def mean_substitute(self, x, lengths, group, select, window, shrink=1.0, means=None): ...
    def position_sums(self, x, lengths, group, sums): ...  # float64 sums, on the host

    # model path
    xp: object  # the array module of the model path's buffers (numpy, CuPy)

    def upload(self, model): ...  # the Weights where this backend computes
    def to_host(self, x): ...  # a buffer as a numpy array
    def run_inputs(self, tasks): ...  # calls each task(ops): the operations for its input
    def matmul(self, a, b, out): ...
    def host_matmul(self, a, b, out): ...  # numpy arrays (the effects' logits)
    def add(self, a, b, out): ...
    def add_norm(self, x, bias, residual, norm, out, store_sum=False): ...
    def head_norm(self, x, gamma, eps, zero): ...
    def token_norm(self, x, heads, group, gamma, eps): ...
    def bias_activation(self, m, bias, code, out): ...
    def split_heads(self, qkv, bias, n_heads, n_kv_heads, q, k, v): ...
    def merge_heads(self, o, n_heads, ctx): ...
    def rotary(self, x, cos, sin, interleaved=False): ...
    def substitute(self, x, length, n_heads, select, window, acc, means=None): ...
    def InputScratch(self, n_heads, n, seq, stack, maps): ...  # with finish(), abort()
    def attention_one(self, q, k, v, modes, causal, scale, logits, c, w, o, scratch,
                      metrics, reduced): ...  # fmt: skip
    def check_finite(self, x): ...


def missing(ops) -> list:
    """The protocol's names that ``ops`` does not provide."""
    return [
        name for name in ("name", *DEVICE_OPS, *BATCH_OPS, *MODEL_OPS) if not hasattr(ops, name)
    ]


_loaded: dict = {}  # name: the backend, once it has been found usable


def load(name):
    """``(the backend registered as name, None)``, or ``(None, why it cannot run here)``
    (one line: the package to install, or the device's own reason). A KeyError for a
    name that is not registered."""
    entry = BACKENDS[name]
    found = _loaded.get(name)
    if found is not None and found[0] is entry:
        return found[1], None
    if isinstance(entry, str):
        try:
            ops = importlib.import_module(entry)
        except ImportError as exc:
            package, extra = REQUIRES.get(name, (entry, "qkvmean"))
            return None, f"{package} is not installed ({exc}): pip install '{extra}'"
    else:
        ops = entry
    reason = ops.unavailable()
    if reason is not None:
        return None, reason
    _loaded[name] = (entry, ops)
    return ops, None
