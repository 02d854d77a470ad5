"""CPU backend: the protocol of :mod:`qkvmean.engine.backends` on the Numba kernels of
:mod:`qkvmean.engine.kernels` (all cores for the raw API's batches; for the model path,
one input per task of the pool, or an input alone on every core: ``run_inputs``)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np

from ... import config
from ..arch import activation_parts
from ..kernels import blas
from ..kernels.activations import bias_activation_kernel, bias_activation_serial
from ..kernels.attention import BLOCK, attention_kernel, attention_serial, check_modes, plain
from ..kernels.finite import scan_finite
from ..kernels.heads import (
    merge_heads_kernel,
    merge_heads_serial,
    rotary_kernel,
    rotary_serial,
    split_heads_kernel,
    split_heads_serial,
    token_norm_kernel,
    token_norm_serial,
)
from ..kernels.means import (
    given_substitute_kernel,
    given_substitute_serial,
    mean_substitute_kernel,
    mean_substitute_serial,
    position_sums,  # noqa: F401  (the protocol's: the host's sums, whichever backend)
)
from ..kernels.metrics import (
    COL_BLOCK,
    Metrics,
    no_metrics,
    reduce_metrics_kernel,
    reduce_metrics_serial,
)
from ..kernels.norms import add_norm_kernel, add_norm_serial
from ..kernels.products import matmul_kernel, matmul_serial

name = "cpu"

#: ``device="auto"`` may pick this backend whenever it runs.
skip_auto = None


def unavailable():
    """Why this backend cannot run here: never (None)."""
    return None


def describe():
    """Nothing to add (the CLI names the CPU's threads in its own line)."""
    return ""


# --------------------------------------------------------------------------------------
# Raw API: whole flattened batches, on every core.
# --------------------------------------------------------------------------------------


def attention(
    q, k, v, lengths, group, modes, causal, scale, row_block, with_output, metrics=False,
    base=None, maps=True,
):  # fmt: skip
    """Weights ``(BG, N, N)``, outputs ``(BG, N, E)`` or None, and row metrics or None.

    With ``metrics``, also returns ``(row_ent, row_kl, colsum)`` for
    :func:`reduce_metrics`; ``base`` (the baseline's weights and row metrics, from a
    metrics call without ``base``) adds the KL from the baseline. ``maps`` False: the
    caller will not read the weights (here they are computed all the same).
    """
    n_pairs, n_rows = q.shape[:2]
    threads = numba.config.NUMBA_NUM_THREADS
    if not row_block:
        row_block = _auto_row_block(n_pairs, n_rows)
    if row_block > COL_BLOCK:  # a task covers a whole pair, or one whole product block
        row_block = BLOCK if row_block <= BLOCK else n_rows
    row_block = max(row_block, 1)
    w = np.empty((n_pairs, n_rows, n_rows), dtype=q.dtype)
    if with_output:
        o = np.empty((n_pairs, n_rows, v.shape[2]), dtype=q.dtype)
    else:
        v = np.empty((n_pairs, n_rows, 0), dtype=q.dtype)
        o = np.empty((0, 0, 0), dtype=q.dtype)
    if metrics:
        # Column sums add up rows in blocks of COL_BLOCK whatever the task layout (a task
        # covers whole blocks: all of its pair, or whole ones), so top_key_mass does not
        # depend on the number of threads or how the rows were split.
        col_block = min(row_block, COL_BLOCK)
        n_blocks = (n_rows + col_block - 1) // col_block
        with_kl = base is not None
        mx = Metrics(
            True,
            with_kl,
            base[0] if with_kl else np.zeros((1, 1, n_rows), q.dtype),  # p = 0: no KL
            base[1][0] if with_kl else np.empty((0, 0)),  # the baseline's row entropies
            np.zeros((n_pairs, n_rows)),
            np.zeros((n_pairs, n_rows)),
            np.empty((n_pairs, n_blocks, n_rows)),
            col_block,
        )
    else:
        mx = no_metrics(q.dtype)
    scratch = np.empty((threads, n_rows), dtype=q.dtype)  # MODE_SHARED_ROW's logits
    gemm = blas.gemm(q.dtype)
    with config.kernel_guard(), config.blas_single_thread():
        attention_kernel(
            gemm, q, k, v, lengths, group, modes, causal, q.dtype.type(scale), plain(q.dtype),
            row_block, w, o, with_output, mx, scratch,
        )  # fmt: skip
    rows = (mx.row_ent, mx.row_kl, mx.colsum) if metrics else None
    return w, (o if with_output else None), rows


def _auto_row_block(n_pairs, n_rows):
    """Rows per task of :func:`attention_kernel`: whole pairs when there are at least four
    per thread to share out, else one product block (the same blocks either way)."""
    return n_rows if n_pairs >= 4 * numba.get_num_threads() else BLOCK


def reduce_metrics(rows, lengths, group):
    """``(entropy, kl, top_key_mass, top_key_index)`` per pair from the row metrics."""
    row_ent, row_kl, colsum = rows
    n_pairs = row_ent.shape[0]
    out = (
        np.empty(n_pairs),
        np.empty(n_pairs),
        np.empty(n_pairs),
        np.empty(n_pairs, dtype=np.int64),
    )
    with config.kernel_guard():
        reduce_metrics_kernel(row_ent, row_kl, colsum, lengths, group, *out)
    return out


def mean_substitute(x, lengths, group, select, window, shrink=1.0, means=None):
    """Mean-substituted copy of flattened ``x`` for the groups where ``select`` is true;
    with ``means`` ``(group, >= N, D)`` (``over="dataset"``), each valid position is
    replaced by its given mean instead."""
    out = np.empty_like(x)
    if means is not None:
        with config.kernel_guard():
            given_substitute_kernel(x, lengths, group, select, means, out)
        return out
    acc = np.empty((x.shape[0], x.shape[2]), dtype=np.float64)
    with config.kernel_guard():
        mean_substitute_kernel(x, lengths, group, select, int(window), float(shrink), acc, out)
    return out


# --------------------------------------------------------------------------------------
# Model-path interface: the operations on one input, as this module's functions (serial
# kernels: one input per task of the pool) or as :data:`spread`'s (the same work cut into
# the same blocks, shared out among the compute threads: an input with the cores to
# itself). Either way the same bits (tests/test_threads.py).
# --------------------------------------------------------------------------------------


def run_inputs(tasks):
    """Run the per-input tasks, each called with the operations to use.

    With at least as many inputs as compute threads (or one thread), one input per task
    on the pool of compute threads, BLAS at one thread each, on the serial operations
    (this module's own functions). With fewer,
    one input after another on the calling thread, each on every compute thread:
    ``task(spread)``.
    """
    threads = config.compute_threads()
    if len(tasks) >= threads or threads == 1:
        return config.run_tasks([functools.partial(task, _serial) for task in tasks])
    before = numba.get_num_threads()
    with config.kernel_guard(), config.blas_single_thread():
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            for task in tasks:
                task(spread)
        finally:
            numba.set_num_threads(before)


class _Kernels(NamedTuple):
    """The kernels behind :class:`ModelOps`: serial, or parallel over the same blocks."""

    matmul: object
    add_norm: object
    activation: object
    split_heads: object
    merge_heads: object
    rotary: object
    token_norm: object
    attention: object  # attention_serial, or attention_kernel (which takes row_block)
    parallel: bool


class ModelOps:
    """The model path's operations on one input (the protocol's MODEL_OPS, with the
    module's own functions for the rest)."""

    def __init__(self, kernels: _Kernels):
        self.k = kernels

    def __getattr__(self, name):  # xp, upload, to_host, add, substitute, InputScratch, ...
        try:
            return globals()[name]
        except KeyError:
            raise AttributeError(name) from None

    def matmul(self, a, b, out):
        """``out = a @ b`` (BLAS, in blocks of rows: kernels/products.py)."""
        self.k.matmul(blas.gemm(np.float32), a, b, out)

    host_matmul = matmul  # the buffers are on the host

    def add_norm(self, x, bias, residual, norm, out, store_sum=False):
        """``out = N(x + bias (+ residual))``; with ``store_sum`` also ``residual = x +
        bias + residual``. ``norm`` is ``(gamma, beta, rms, eps)``; ``residual`` None: no
        residual."""
        gamma, beta, rms, eps = norm
        self.k.add_norm(
            x, bias, x if residual is None else residual, residual is not None, store_sum, rms,
            gamma, beta, eps, out,
        )  # fmt: skip

    def head_norm(self, x, gamma, eps, zero):
        """In place, RMSNorm of every ``head_dim`` vector of ``x`` ``(P, n, dh)`` (Qwen3's
        q/k norm); ``zero`` is a ``(dh,)`` array of zeros."""
        flat = x.reshape(-1, x.shape[2])
        self.k.add_norm(flat, zero, flat, False, False, True, gamma, zero, eps, flat)

    def token_norm(self, x, heads, group, gamma, eps):
        """In place, the RMSNorm of each token's vectors of all ``heads`` of every copy in
        ``x`` ``(C * heads, n, dh)`` together (OLMo 2's q/k norm); ``gamma`` ``(heads /
        group * dh,)``: keys expanded to query heads in groups of ``group`` share theirs."""
        self.k.token_norm(x, heads, group, gamma, eps)

    def bias_activation(self, m, bias, code, out):
        """``out = act(m + bias)``: in place (``out`` is ``m``), or, gated, from the gate
        and up halves of ``m`` into ``out``; ``code`` from
        :data:`qkvmean.engine.arch.ACTIVATION_CODES`."""
        self.k.activation(m, bias, *activation_parts(code), out)

    def split_heads(self, qkv, bias, n_heads, n_kv_heads, q, k, v):
        self.k.split_heads(qkv, bias, n_heads, n_kv_heads, q, k, v)

    def merge_heads(self, o, n_heads, ctx):
        self.k.merge_heads(o, n_heads, ctx)

    def rotary(self, x, cos, sin, interleaved=False):
        self.k.rotary(x, cos, sin, bool(interleaved))

    def attention_one(
        self, q, k, v, modes, causal, scale, logits, c, w, o, scratch, metrics, reduced
    ):  # fmt: skip
        """Condition ``c``'s attention for every head of one input (``c = 0``: the
        baseline, which the KL of the later conditions of the same layer reads).

        ``q``, ``k``, ``v`` ``(H, n, dh)``; the map is written into ``w`` ``(H, S, S)``
        (its ``n x n`` corner; the rest stays zero), or kept in ``scratch`` when ``w`` is
        None (no maps wanted); the output into ``o``. With ``metrics``, the four metrics
        of each head are written into ``reduced`` (four ``(H,)`` arrays). Everything is
        the attention kernel: per block of query rows, a BLAS product for the scores, the
        mask, softmax, fast paths and metrics on them in cache, a BLAS product for the
        output.
        """
        check_modes(modes, logits)
        heads = q.shape[0]
        n = scratch.length[0]
        if w is None:
            w = scratch.own(c)
        if c == 0:
            scratch.base_map = w
        with_kl = c > 0
        mx = Metrics(
            metrics,
            with_kl,
            scratch.base_map if with_kl else scratch.no_base,
            scratch.base_ent if with_kl else scratch.no_ent,
            scratch.row_ent if with_kl else scratch.base_ent,
            scratch.row_kl,
            scratch.colsum,
            min(n, COL_BLOCK),
        )
        args = (q, k, v, scratch.length, heads, modes, causal, np.float32(scale), logits)
        if self.k.parallel:  # whole heads per task, or blocks of rows (see attention())
            row_block = _auto_row_block(heads, n)
            self.k.attention(
                scratch.gemm, *args, row_block, w, o, True, mx, scratch.logits
            )  # fmt: skip
        else:
            self.k.attention(scratch.gemm, *args, w, o, True, mx, scratch.logits[0])
        if metrics:
            reduce_metrics_serial(
                mx.row_ent, mx.row_kl, mx.colsum, scratch.length, heads, *reduced
            )  # fmt: skip

    def check_finite(self, x):
        """:func:`scan_finite` of any array."""
        return scan_finite(x.reshape(-1), parallel=self.k.parallel)


def add(a, b, out):
    """``out = a + b``, elementwise."""
    np.add(a, b, out=out)


def substitute(x, length, n_heads, select, window, acc, means=None):
    """In place, mean-substitute the selected heads of one condition's ``(H, n, dh)``;
    with ``means`` ``(H, >= n, dh)`` (``over="dataset"``), by those."""
    if means is not None:
        given_substitute_serial(x, length, n_heads, select, means, x)
    else:
        mean_substitute_serial(x, length, n_heads, select, int(window), 1.0, acc, x)


class InputScratch:
    """Per-input buffers of :meth:`ModelOps.attention_one` (row metrics, per-thread
    logits, the baseline's map of the current layer for the KL of the other conditions)."""

    def __init__(self, n_heads, n, seq, stack, maps):
        n_blocks = -(-n // COL_BLOCK)  # blocks of min(n, COL_BLOCK) rows (n >= 1)
        self.length = np.array([n], dtype=np.int64)
        self.base_ent = np.zeros((n_heads, n))
        self.row_ent = np.zeros((n_heads, n))
        self.row_kl = np.zeros((n_heads, n))
        self.colsum = np.empty((n_heads, n_blocks, seq))
        self.no_base = np.zeros((1, 1, seq), np.float32)
        self.no_ent = np.empty((0, 0))
        self.logits = np.empty((numba.config.NUMBA_NUM_THREADS, n), np.float32)
        self.gemm = blas.gemm(np.float32)
        self.stack = stack
        self._own = None  # where the maps that are not kept go (made when first needed)
        self.base_map = None

    def own(self, c):
        """Where condition ``c``'s map goes when it is not kept: the baseline's (which the
        other conditions' KL reads) or the current condition's."""
        if self._own is None:
            shape = (min(self.stack, 2), *self.row_ent.shape, self.row_ent.shape[1])
            self._own = np.zeros(shape, np.float32)
        return self._own[min(c, 1)]

    def finish(self):
        """Every result of this input is in place (they are written as computed here)."""

    def abort(self):
        """After an error: nothing is in flight here."""


_serial = ModelOps(
    _Kernels(
        matmul_serial, add_norm_serial, bias_activation_serial,
        split_heads_serial, merge_heads_serial, rotary_serial, token_norm_serial,
        attention_serial, False,
    )
)  # fmt: skip
#: The operations for an input that has the compute threads to itself (:func:`run_inputs`).
spread = ModelOps(
    _Kernels(
        matmul_kernel, add_norm_kernel, bias_activation_kernel,
        split_heads_kernel, merge_heads_kernel, rotary_kernel, token_norm_kernel,
        attention_kernel, True,
    )
)  # fmt: skip

# this module as a backend: the serial operations
matmul = _serial.matmul
host_matmul = _serial.host_matmul
add_norm = _serial.add_norm
head_norm = _serial.head_norm
token_norm = _serial.token_norm
bias_activation = _serial.bias_activation
split_heads = _serial.split_heads
merge_heads = _serial.merge_heads
rotary = _serial.rotary
attention_one = _serial.attention_one
check_finite = _serial.check_finite


#: The model path's array module (allocation, slicing, indexing of the buffers).
xp = np


def upload(model):
    """The model's weights where this backend computes: here, as they are."""
    return model


def to_host(x):
    """``x`` as a numpy array: here, itself."""
    return x
