"""The backend seam: what a device provides, for the raw API and the model path alike.

A backend is registered in :data:`qkvmean.engine.api.BACKENDS` under its device name
(``"cpu"``: :mod:`qkvmean.engine.cpu`; ``"cuda"``: :mod:`qkvmean.engine.cuda`, on first
use). :mod:`qkvmean.engine.api` validates, flattens and
plans; :mod:`qkvmean.engine.transformer` runs the forward pass; both call only the names
below, so a new device is one module that provides them plus one registration.
"""

from __future__ import annotations

from typing import Protocol

#: What the raw API (qkvmean.attention, ablate, conditions, mean_substitute) calls, on
#: whole flattened batches.
BATCH_OPS = ("attention", "reduce_metrics", "mean_substitute", "position_sums")
#: What the model path calls, one input at a time (inside ``run_tasks``).
MODEL_OPS = (
    "xp",
    "upload",
    "to_host",
    "run_tasks",
    "matmul",
    "add",
    "add_norm",
    "head_norm",
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
    """The protocol, for type checkers and readers; see :mod:`qkvmean.engine.cpu` for the
    reference implementation and the meaning of each argument."""

    name: str

    # raw API
    def attention(self, q, k, v, lengths, group, modes, causal, scale, row_block,
                  with_output, metrics=False, base=None, maps=True): ...  # fmt: skip
    def reduce_metrics(self, rows, lengths, group): ...
    def mean_substitute(self, x, lengths, group, select, prefix, shrink=1.0, means=None): ...
    def position_sums(self, x, lengths, group, sums): ...  # float64 sums, on the host

    # model path
    xp: object  # the array module of the model path's buffers (numpy, CuPy)

    def upload(self, model): ...  # the Weights where this backend computes
    def to_host(self, x): ...  # a buffer as a numpy array
    def run_tasks(self, tasks): ...
    def matmul(self, a, b, out): ...
    def add(self, a, b, out): ...
    def add_norm(self, x, bias, residual, norm, out, store_sum=False): ...
    def head_norm(self, x, gamma, eps, zero): ...
    def bias_activation(self, m, bias, code, out): ...
    def split_heads(self, qkv, bias, n_heads, n_kv_heads, q, k, v): ...
    def merge_heads(self, o, n_heads, ctx): ...
    def rotary(self, x, cos, sin): ...
    def substitute(self, x, length, n_heads, select, prefix, acc, means=None): ...
    def InputScratch(self, n_heads, n, seq, stack, maps): ...  # with finish(), abort()
    def attention_one(self, q, k, v, modes, causal, scale, c, w, o, scratch, metrics,
                      reduced): ...  # fmt: skip
    def check_finite(self, x): ...


def missing(ops) -> list:
    """The protocol's names that ``ops`` does not provide."""
    return [name for name in ("name", *BATCH_OPS, *MODEL_OPS) if not hasattr(ops, name)]
