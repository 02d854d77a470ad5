"""CUDA backend: numba-cuda kernels, CuPy (cuBLAS) for the matrix products.

Registered as ``device="cuda"`` in :data:`qkvmean.engine.backends.BACKENDS` and imported on
first use, with the names of :mod:`qkvmean.engine.backends`'s protocol, so the raw API and
the model path run here unchanged. Imported only when CUDA is asked for: the core package
never needs numba-cuda or CuPy (``pip install 'qkvmean[cuda]'``).

How the work is laid out:

- **Products on cuBLAS**: every matrix product (``q·kᵀ``, ``A·v``, the model's
  projections) is one CuPy ``matmul``; the kernels here do what is not a product: the
  masked softmax with its metrics, the mean substitution, norms, activations, head
  layout, rotary embedding, column sums and the per-pair reduction.
- **Inputs copied once per batch**, to the device; nothing returns but what is asked for:
  the maps (in blocks, see below) unless ``maps`` is off, and the metrics, reduced on the
  device (:func:`qkvmean.engine.kernels.rows.reduce_pair`, the CPU backend's own code,
  compiled for the GPU). The baseline's maps stay on the device for the KL of the other conditions.
- **Copies overlap the compute**: maps go back block by block (the raw API: blocks of
  pairs of about :data:`BLOCK_BYTES`; the model path: each layer's maps of each
  condition) on a copy stream of their own, into pinned host buffers, while the next
  block computes on the default stream; a block's device buffer is written again only
  after its copy has finished (two slots, alternating).
- **One block of threads per attention row**: the threads of a block read a row's scores
  side by side (coalesced) and combine maximum and sums in shared memory.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, how the tests run without a GPU)
the arrays are numpy arrays, the products numpy's ``matmul``, the copies plain
assignments, and a block has :data:`ROW_THREADS` = 4 threads (each simulated thread is a
Python thread) and the other kernels' blocks are smaller; everything else is the same
code.
"""

from __future__ import annotations

import math
import os
import sys
import weakref
from dataclasses import fields, replace

import numba
import numba_cuda  # noqa: F401  (the maintained CUDA target; an ImportError without it)
import numpy as np

# Small grids are the rule here (one input's rows, one head's pairs): no warning per launch.
# (The environment too: Numba re-reads its NUMBA_* variables when they change.)
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

from numba import cuda
from numba.cuda.core import config as _cuda_config

from ..arch import activation_parts
from ..kernels.attention import check_modes
from ..kernels.finite import scan_finite
from ..kernels.means import position_sums as _host_position_sums
from ..kernels.rows import (
    key_range,
    merge_heads_row,
    norm_row,
    reduce_pair,
    rotary_vector,
    split_heads_row,
    token_norm_vector,
    window_mean_feature,
)
from ..modes import MODE_UNIFORM

_cuda_config.CUDA_LOW_OCCUPANCY_WARNINGS = int(os.environ["NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"])

name = "cuda"

#: Numba's CUDA simulator: numpy arrays and products, Python threads.
SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

_MISSING = None
if SIMULATOR:
    xp = np
else:
    try:
        import cupy as xp
        import cupyx
    except ImportError as exc:  # reported by unavailable()
        xp = None
        _MISSING = f"CuPy is not installed ({exc}): pip install 'qkvmean[cuda]'"

#: Why ``device="auto"`` passes this backend over although it runs (None: it may pick it).
skip_auto = "Numba's CUDA simulator is not a GPU (pass 'cuda' to use it)" if SIMULATOR else None

#: Threads per attention row (a power of two).
ROW_THREADS = 4 if SIMULATOR else 128
#: Threads per block of the elementwise kernels, along their two grid axes, and of the
#: one-axis kernels (fewer under the simulator: each thread beyond the work is a Python
#: thread that only checks its bounds).
BLOCK = (2, 8) if SIMULATOR else (4, 32)
THREADS = 8 if SIMULATOR else 64
#: Maps per block of the raw API's pipeline (bytes): a block computes while the previous
#: one is copied back.
BLOCK_BYTES = 64 * 2**20


_checked: list = []  # the result of unavailable(), once computed


def unavailable() -> str | None:
    """None when this backend can run here, else why not (one line). The first call
    compiles and launches a small kernel and runs a product (the driver, NVVM, NVRTC and
    cuBLAS all have to be there), so that ``auto`` falls back instead of failing later."""
    if _MISSING:
        return _MISSING
    if SIMULATOR:
        return None
    if not _checked:
        try:
            cuda.current_context()
            x = xp.ones((1, 1, 1), np.float32)
            out = xp.empty_like(x)
            one = xp.ones(1, np.int64)
            _launch(_mean_kernel, (1, 1), (1, 1))(x, one, np.int64(1), one.astype(bool),
                                                  np.int64(0), 1.0, out)  # fmt: skip
            xp.matmul(x[0], x[0])
            xp.cuda.runtime.deviceSynchronize()
            _checked.append(None)
        except Exception as exc:  # the driver's, the compiler's and the runtime's errors
            _checked.append(" ".join(str(exc).split()) or type(exc).__name__)
    return _checked[0]


def describe() -> str:
    """Which GPU computes (for the CLI's ``--device auto`` line and ``--version``)."""
    if SIMULATOR:
        return "Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), products in numpy"
    dev = cuda.get_current_device()
    label = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    total = xp.cuda.runtime.memGetInfo()[1]
    major, minor = dev.compute_capability
    return f"{label}, {total / 2**30:.0f} GiB, compute capability {major}.{minor}"


def _grid(n_a, n_b):
    return (
        (max(n_a, 1) + BLOCK[0] - 1) // BLOCK[0],
        (max(n_b, 1) + BLOCK[1] - 1) // BLOCK[1],
    )


def _grid1(n):
    return (max(n, 1) + THREADS - 1) // THREADS, THREADS


def _strided(n):
    """Blocks for a grid-stride loop over ``n`` elements (a few under the simulator)."""
    blocks = (max(n, 1) + THREADS - 1) // THREADS
    return min(blocks, 2 if SIMULATOR else 8192), THREADS


_constants: dict = {}


def constant(arr):
    """A small host array (modes, head selection, a length) on the device, kept for reuse
    (a copy from pageable memory would make the host wait for the device every time)."""
    arr = np.ascontiguousarray(arr)
    if SIMULATOR:
        return arr
    key = (arr.dtype.str, arr.shape, arr.tobytes())
    found = _constants.get(key)
    if found is None:
        if len(_constants) > 1024:
            _constants.clear()
        found = _constants[key] = xp.asarray(arr)
    return found


def to_host(x):
    """``x`` as a numpy array."""
    return x if SIMULATOR or x is None else xp.asnumpy(x)


def _launch(kernel, grid, block=None):
    """``kernel[grid, block]`` (``grid`` may be the pair). Under the simulator the numpy
    arguments are passed as they are (it would copy each one in and back out, and an array
    passed twice — in place, ``out`` is ``x`` — would be written back from a stale copy),
    and the interpreter switches threads often while the kernel runs (the simulator's
    barriers poll its threads)."""
    launch = kernel[grid] if block is None else kernel[grid, block]
    if not SIMULATOR:

        def checked(*args):
            if any(isinstance(a, np.ndarray) and a.ndim for a in args):
                raise TypeError("a host array reached a CUDA kernel: move it with xp.asarray")
            return launch(*args)

        return checked

    def run(*args):
        saved = sys.getswitchinterval()
        sys.setswitchinterval(2e-5)
        try:
            return launch(*(_Fake(a) if isinstance(a, np.ndarray) and a.ndim else a for a in args))
        finally:
            sys.setswitchinterval(saved)

    return run


if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _Fake


def _out_of_memory(exc) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"


# ----------------------------------------------------------------------------- copies


#: Pinned staging buffers, one per slot, grow-only (doubling), shared by every link (the
#: device is used by one call at a time): page-locked memory is what the largest copy of
#: a slot needs, not one buffer per size ever seen.
_staging: dict = {}


def _staged(slot, nbytes):
    """A flat pinned uint8 buffer of at least ``nbytes`` for ``slot``."""
    buf = _staging.get(slot)
    if buf is None or buf.size < nbytes:
        size = 1 << max(int(nbytes) - 1, 1).bit_length()
        buf = _staging[slot] = cupyx.empty_pinned(size, np.uint8)
    return buf


class _Link:
    """Device-to-host copies that overlap the compute.

    ``send(slot, pairs)`` queues the copy of each ``(device array, host view)`` pair on a
    copy stream, after everything queued so far on the default stream, into the slot's
    pinned staging buffer; ``retire(slot)`` waits for that slot's copy and moves it into
    its host views (call it before the slot's device buffers are written again);
    ``finish`` retires every slot; ``abort`` (after an error) waits for the copies in
    flight and drops them, so that no buffer is reused while a copy still writes it.
    """

    def __init__(self, slots):
        self.pending = [None] * slots
        self.stream = None if SIMULATOR else xp.cuda.Stream(non_blocking=True)

    def send(self, slot, pairs):
        self.retire(slot)
        if SIMULATOR:
            for src, dest in pairs:
                dest[...] = src
            return
        ready = xp.cuda.Event(disable_timing=True)
        ready.record()
        self.stream.wait_event(ready)
        offsets = np.cumsum([0] + [-(-src.nbytes // 256) * 256 for src, _ in pairs])
        buf = _staged(slot, int(offsets[-1]))
        staged = []
        for (src, dest), start in zip(pairs, offsets, strict=False):
            pinned = buf[start : start + src.nbytes].view(src.dtype).reshape(src.shape)
            src.get(stream=self.stream, out=pinned, blocking=False)
            staged.append((pinned, dest))
        done = xp.cuda.Event(disable_timing=True)
        done.record(self.stream)
        self.pending[slot] = (done, staged)

    def retire(self, slot):
        job = self.pending[slot]
        if job is None:
            return
        self.pending[slot] = None
        done, staged = job
        done.synchronize()
        for pinned, dest in staged:
            dest[...] = pinned

    def finish(self):
        for slot in range(len(self.pending)):
            self.retire(slot)

    def abort(self):
        if self.stream is not None:
            self.stream.synchronize()
        self.pending = [None] * len(self.pending)


# ----------------------------------------------------------------------------- kernels


@cuda.jit
def _softmax_kernel(
    w, lengths, group, offset, modes, causal, scale, window, softcap, slopes, metrics, with_kl,
    base, base_ent, row_ent, row_kl,
):  # fmt: skip
    """In place, the scores ``w`` (``q·kᵀ``, unscaled) of pairs ``offset + bg`` become the
    masked softmax weights; with ``metrics``, the row entropies (and the KL from ``base``,
    the baseline's weights, with ``with_kl``); ``window``, ``softcap`` and ``slopes`` as
    :class:`~qkvmean.engine.kernels.attention.Logits` has them (the keys ``jmin <= j <
    jmax`` of :func:`~qkvmean.engine.kernels.attention.key_range`; ALiBi's ``slope * j``,
    then the cap). One block per row ``(bg, i)``: the threads
    stride over the keys and combine their maximum, then their four sums, in shared
    memory (written out here, not in device functions: the simulator's barriers are only
    sound in the kernel itself).

    With ``d_j = s_j - max`` and ``Z = sum exp(d_j)``: entropy ``= log Z - sum p d / Z``,
    ``KL(b || a) = -H(b) - sum b d + log Z sum b`` — from the scores, so finite where a
    weight underflows, as on the CPU.
    """
    n_rows = w.shape[1]
    row = cuda.blockIdx.x
    lane = cuda.threadIdx.x
    bg = row // n_rows
    i = row - bg * n_rows
    red = cuda.shared.array((4, ROW_THREADS), numba.float64)
    pair = offset + bg
    n = lengths[pair // group]
    if i >= n:  # a padded query: its row is 0
        for j in range(lane, n_rows, ROW_THREADS):
            w[bg, i, j] = 0.0
        if metrics and lane == 0:
            row_ent[bg, i] = 0.0
            row_kl[bg, i] = 0.0
        return
    jmin, jmax = key_range(i, n, causal, window)  # allowed keys: jmin <= j < jmax
    slope = slopes[pair % group] if slopes.shape[0] else 0.0
    uniform = modes[pair % group] == MODE_UNIFORM  # (never with a window or slopes: check_modes)
    top = 0.0
    for j in range(lane, jmin, ROW_THREADS):
        w[bg, i, j] = 0.0
    if not uniform:
        top = -math.inf
        for j in range(jmin + lane, jmax, ROW_THREADS):
            s = w[bg, i, j] * scale + slope * j
            if softcap > 0.0:
                s = softcap * math.tanh(s / softcap)
            w[bg, i, j] = s
            top = max(top, s)
        red[0, lane] = top
        cuda.syncthreads()
        step = ROW_THREADS // 2
        while step > 0:
            if lane < step:
                red[0, lane] = max(red[0, lane], red[0, lane + step])
            cuda.syncthreads()
            step //= 2
        top = red[0, 0]
        cuda.syncthreads()  # everyone has read it before it is written again
    total = 0.0  # sum p
    sad = 0.0  # sum p d
    spd = 0.0  # sum base d
    sp = 0.0  # sum base
    for j in range(jmin + lane, jmax, ROW_THREADS):
        if uniform:  # identical keys: d = 0 and p = 1
            w[bg, i, j] = 1.0
            total += 1.0
        else:
            d = w[bg, i, j] - top
            p = math.exp(d)
            w[bg, i, j] = p
            total += p
            sad += p * d
            if with_kl:
                spd += base[bg, i, j] * d
        if with_kl:
            sp += base[bg, i, j]
    red[0, lane] = total
    red[1, lane] = sad
    red[2, lane] = spd
    red[3, lane] = sp
    cuda.syncthreads()
    step = ROW_THREADS // 2
    while step > 0:
        if lane < step:
            for r in range(4):
                red[r, lane] += red[r, lane + step]
        cuda.syncthreads()
        step //= 2
    total = red[0, 0]
    for j in range(jmin + lane, jmax, ROW_THREADS):
        w[bg, i, j] = w[bg, i, j] / total
    for j in range(jmax + lane, n_rows, ROW_THREADS):
        w[bg, i, j] = 0.0
    if metrics and lane == 0:
        log_z = math.log(total)
        row_ent[bg, i] = log_z - red[1, 0] / total
        kl = -base_ent[bg, i] - red[2, 0] + log_z * red[3, 0]
        row_kl[bg, i] = max(kl, 0.0) if with_kl else 0.0


@cuda.jit
def _colsum_kernel(w, lengths, group, offset, colsum):
    """``colsum[bg, 0, j]``: the sum of column ``j`` of pair ``offset + bg`` over its valid
    rows, in row order (the CPU backend's ``(BG, blocks, N)`` layout, one block)."""
    bg, j = cuda.grid(2)
    if bg >= w.shape[0] or j >= w.shape[2]:
        return
    acc = 0.0
    for i in range(lengths[(offset + bg) // group]):
        acc += w[bg, i, j]
    colsum[bg, 0, j] = acc


@cuda.jit
def _reduce_kernel(row_ent, row_kl, colsum, lengths, group, ent, kl, mass, index):
    """Per pair: :func:`qkvmean.engine.kernels.rows.reduce_pair`, the CPU backend's own code."""
    bg = cuda.grid(1)
    if bg < row_ent.shape[0]:
        reduce_pair(bg, row_ent, row_kl, colsum, lengths, group, ent, kl, mass, index)


@cuda.jit
def _mean_kernel(x, lengths, group, select, window, shrink, out):
    """The running mean over valid tokens of the selected pairs (``window`` as in
    :func:`qkvmean.engine.kernels.means._mean_pair`), one thread per (pair, feature),
    summed in float64 times ``shrink`` (as on the CPU); ``out`` may be ``x``."""
    bg, d = cuda.grid(2)
    if bg >= x.shape[0] or d >= x.shape[2]:
        return
    n = lengths[bg // group]
    if not select[bg % group]:
        n = 0  # copied through untouched
    acc = 0.0
    if window >= n and window > 0:
        for t in range(n):
            acc += x[bg, t, d] * shrink
            out[bg, t, d] = acc / (t + 1) / shrink
    elif window > 0:  # backwards, so that out may be x (the CPU's code)
        window_mean_feature(x, bg, d, n, window, shrink, out)
    else:
        for t in range(n):
            acc += x[bg, t, d] * shrink
        for t in range(n):
            out[bg, t, d] = acc / n / shrink
    for t in range(n, x.shape[1]):
        out[bg, t, d] = x[bg, t, d]


@cuda.jit
def _given_kernel(x, lengths, group, select, means, out):
    """Given per-position vectors (one set per pair ``bg % means.shape[0]``, as on the
    CPU) into the valid positions of the selected pairs, one thread per (pair, feature);
    ``out`` may be ``x``."""
    bg, d = cuda.grid(2)
    if bg >= x.shape[0] or d >= x.shape[2]:
        return
    g = bg % means.shape[0]
    n = lengths[bg // group] if select[bg % group] else 0
    for t in range(n):
        out[bg, t, d] = means[g, t, d]
    for t in range(n, x.shape[1]):
        out[bg, t, d] = x[bg, t, d]


@cuda.jit
def _norm_kernel(x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out):
    r = cuda.grid(1)
    if r < x.shape[0]:
        norm_row(r, x, bias, residual, with_residual, store_sum, rms, gamma, beta, eps, out)


@cuda.jit
def _activation_kernel(m, bias, code, gated, out):
    """``out = act(m + bias)`` (base function ``code``: 0 exact GELU, 1 tanh GELU, 2 SiLU,
    3 ReLU) in place, or gated (``act(gate) * up``) from the gate and up halves of ``m``. A
    grid-stride loop over the elements of ``out``."""
    f = out.shape[1]
    for e in range(cuda.grid(1), out.shape[0] * f, cuda.gridsize(1)):
        r = e // f
        d = e - r * f
        x = m[r, d] + bias[d]
        if code == 0:
            y = 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
        elif code == 1:
            c = math.sqrt(2.0 / math.pi)
            y = 0.5 * x * (1.0 + math.tanh(c * (x + 0.044715 * x * x * x)))
        elif code == 2:
            y = x / (1.0 + math.exp(-x))
        else:
            y = x if x > 0 else x * 0
        if gated:
            y *= m[r, f + d] + bias[f + d]
        out[r, d] = y


@cuda.jit
def _split_kernel(qkv, bias, n_heads, n_kv_heads, q, k, v):
    r = cuda.grid(1)
    if r < qkv.shape[0]:
        split_heads_row(r, qkv, bias, n_heads, n_kv_heads, q, k, v)


@cuda.jit
def _merge_kernel(o, n_heads, ctx):
    r = cuda.grid(1)
    if r < ctx.shape[0]:
        merge_heads_row(r, o, n_heads, ctx)


@cuda.jit
def _rotary_kernel(x, cos, sin, interleaved):
    p, t = cuda.grid(2)
    if p < x.shape[0] and t < x.shape[1]:
        rotary_vector(x, p, t, cos, sin, interleaved)


# ----------------------------------------------------------------------------- raw API


class _Rows:
    """Row metrics on the device (what :func:`reduce_metrics` reduces), and the weights
    they came from, kept on the device for the KL of the other conditions."""

    def __init__(self, row_ent, row_kl, colsum, weights):
        self.row_ent, self.row_kl, self.colsum, self.weights = row_ent, row_kl, colsum, weights


def _softmax(w, lengths, group, offset, modes, causal, scale, base, rows):
    """The softmax kernel on block ``w`` of pairs ``offset...``: row metrics into
    ``rows`` (None: none), the KL from ``base`` (the baseline's :class:`_Rows`, or None)."""
    n_pairs, n_rows = w.shape[0], w.shape[1]
    if n_pairs * n_rows == 0:
        return
    stop = offset + n_pairs
    metrics, with_kl = rows is not None, base is not None
    none = None if metrics else xp.zeros((1, 1))  # no row metrics: not written
    row_ent = rows.row_ent[offset:stop] if metrics else none
    row_kl = rows.row_kl[offset:stop] if metrics else none
    _launch(_softmax_kernel, n_pairs * n_rows, ROW_THREADS)(
        w, lengths, np.int64(group), np.int64(offset), modes, bool(causal),
        w.dtype.type(scale), np.int64(0), 0.0, constant(np.zeros(0, np.float32)), metrics,
        with_kl,
        base.weights[offset:stop] if with_kl else w,
        base.row_ent[offset:stop] if with_kl else row_ent, row_ent, row_kl,
    )  # fmt: skip


def attention(
    q, k, v, lengths, group, modes, causal, scale, row_block, with_output, metrics=False,
    base=None, maps=True,
):  # fmt: skip
    """Weights ``(BG, N, N)`` (None when not ``maps``), outputs ``(BG, N, E)`` or None,
    and row metrics or None — the CPU backend's conventions (``row_block`` is the CPU's
    and unused here). ``base`` is the baseline's ``(weights, rows)`` from a metrics call
    without it: its weights are read on the device, where that call left them.
    """
    n_pairs, n_rows, _ = q.shape
    base = None if base is None else base[1]
    link = _Link(2)
    try:
        qd, kd = xp.asarray(q), xp.asarray(k)  # each input once per batch
        vd = xp.asarray(v) if with_output else None
        lengths_d, modes_d = xp.asarray(lengths), xp.asarray(modes)
        wd = xp.empty((n_pairs, n_rows, n_rows), q.dtype)
        od = xp.empty((n_pairs, n_rows, v.shape[2]), q.dtype) if with_output else None
        rows = None
        if metrics:
            rows = _Rows(
                xp.zeros((n_pairs, n_rows)), xp.zeros((n_pairs, n_rows)),
                xp.empty((n_pairs, 1, n_rows)), wd,
            )  # fmt: skip
        host = np.empty((n_pairs, n_rows, n_rows), q.dtype) if maps else None
        uniform = bool(np.all(modes == MODE_UNIFORM))
        per_block = max(1, BLOCK_BYTES // max(n_rows * n_rows * q.dtype.itemsize, 1))
        for index, start in enumerate(range(0, n_pairs, per_block)):
            stop = min(start + per_block, n_pairs)
            link.retire(index % 2)
            block = wd[start:stop]
            if not uniform:  # (uniform rows read no scores)
                xp.matmul(qd[start:stop], kd[start:stop].transpose(0, 2, 1), out=block)
            _softmax(block, lengths_d, group, start, modes_d, causal, scale, base, rows)
            if with_output:
                xp.matmul(block, vd[start:stop], out=od[start:stop])
            if metrics:
                _launch(_colsum_kernel, _grid(stop - start, n_rows), BLOCK)(
                    block, lengths_d, np.int64(group), np.int64(start), rows.colsum[start:stop]
                )
            if maps:
                link.send(index % 2, [(block, host[start:stop])])
        link.finish()
        return host, to_host(od), rows
    except Exception as exc:
        link.abort()
        if _out_of_memory(exc):
            raise MemoryError(str(exc)) from None
        raise


def reduce_metrics(rows, lengths, group):
    """``(entropy, kl, top_key_mass, top_key_index)`` per pair, reduced on the device from
    :func:`attention`'s row metrics; only these come back."""
    n_pairs = rows.row_ent.shape[0]
    out = (xp.empty(n_pairs), xp.empty(n_pairs), xp.empty(n_pairs), xp.empty(n_pairs, np.int64))
    if n_pairs:
        _launch(_reduce_kernel, _grid1(n_pairs))(
            rows.row_ent, rows.row_kl, rows.colsum, xp.asarray(lengths), np.int64(group), *out
        )
    return tuple(to_host(x) for x in out)


def mean_substitute(x, lengths, group, select, window, shrink=1.0, means=None):
    """Mean-substituted copy of flattened ``x`` for the groups where ``select`` is true
    (with ``means``: by those, as on the CPU)."""
    xd = xp.asarray(x)
    out = xp.empty_like(xd)
    if means is not None:
        _launch(_given_kernel, _grid(x.shape[0], x.shape[2]), BLOCK)(
            xd, xp.asarray(lengths), np.int64(group), xp.asarray(select), xp.asarray(means), out
        )
        return to_host(out)
    _launch(_mean_kernel, _grid(x.shape[0], x.shape[2]), BLOCK)(
        xd, xp.asarray(lengths), np.int64(group), xp.asarray(select), np.int64(window),
        float(shrink), out,
    )  # fmt: skip
    return to_host(out)


def position_sums(x, lengths, group, sums):
    """The CPU's :func:`qkvmean.engine.kernels.means.position_sums`: the dataset sums are
    taken on the host (a pass over memory the inputs are in already)."""
    _host_position_sums(to_host(x), lengths, group, sums)


# ----------------------------------------------------------------------------- model path


def run_inputs(tasks):
    """One input after another, on this module's operations: they queue on the device in
    order (the device is the parallel part)."""
    this = sys.modules[__name__]
    for task in tasks:
        task(this)


_uploaded: list = []  # [(weakref to the host model, its device copy)]


def _to_device(value):
    if isinstance(value, np.ndarray):
        return xp.asarray(value)
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    return value


def upload(model):
    """The model's weights on the device (kept while the host model lives; one model)."""
    if SIMULATOR:
        return model
    if _uploaded and _uploaded[0][0]() is model:
        return _uploaded[0][1]
    _uploaded.clear()
    layers = [
        replace(layer, **{f.name: _to_device(getattr(layer, f.name)) for f in fields(layer)})
        for layer in model.layers
    ]
    arrays = {
        f.name: _to_device(getattr(model, f.name))
        for f in fields(model)
        if f.name not in ("layers", "arch", "extra", "name", "max_positions")
    }
    device = replace(model, layers=layers, **arrays)
    _uploaded.append((weakref.ref(model), device))
    return device


def matmul(a, b, out):
    """``out = a @ b`` (cuBLAS)."""
    xp.matmul(a, b, out=out)


def host_matmul(a, b, out):
    """``out = a @ b`` of host arrays (the effects' logits, computed on the host): the
    CPU's product, in its blocks."""
    from .. import effects

    effects.host_matmul(a, b, out)


def add(a, b, out):
    xp.add(a, b, out=out)


def add_norm(x, bias, residual, norm, out, store_sum=False):
    """See :func:`qkvmean.engine.backends.cpu.add_norm`."""
    gamma, beta, rms, eps = norm
    _launch(_norm_kernel, _grid1(x.shape[0]))(
        x, bias, x if residual is None else residual, residual is not None, store_sum, rms,
        gamma, beta, eps, out,
    )  # fmt: skip


@cuda.jit
def _token_norm_kernel(x, heads, group, gamma, eps):
    task = cuda.grid(1)
    n = x.shape[1]
    if task < (x.shape[0] // heads) * n:
        token_norm_vector(x, task // n, task % n, heads, group, gamma, eps)


def token_norm(x, heads, group, gamma, eps):
    """See :func:`qkvmean.engine.backends.cpu.token_norm`."""
    tasks = (x.shape[0] // heads) * x.shape[1]
    _launch(_token_norm_kernel, _grid1(tasks))(x, np.int64(heads), np.int64(group), gamma, eps)


def head_norm(x, gamma, eps, zero):
    """See :func:`qkvmean.engine.backends.cpu.head_norm`."""
    flat = x.reshape(-1, x.shape[2])
    _launch(_norm_kernel, _grid1(flat.shape[0]))(
        flat, zero, flat, False, False, True, gamma, zero, eps, flat
    )


def bias_activation(m, bias, code, out):
    """See :func:`qkvmean.engine.backends.cpu.bias_activation`."""
    _launch(_activation_kernel, _strided(out.size))(m, bias, *activation_parts(code), out)


def split_heads(qkv, bias, n_heads, n_kv_heads, q, k, v):
    _launch(_split_kernel, _grid1(qkv.shape[0]))(qkv, bias, n_heads, n_kv_heads, q, k, v)


def merge_heads(o, n_heads, ctx):
    _launch(_merge_kernel, _grid1(ctx.shape[0]))(o, n_heads, ctx)


def rotary(x, cos, sin, interleaved=False):
    _launch(_rotary_kernel, _grid(x.shape[0], x.shape[1]), BLOCK)(x, cos, sin, bool(interleaved))


def substitute(x, length, n_heads, select, window, acc, means=None):
    """In place, mean-substitute the selected heads of one condition's ``(H, n, dh)``
    (with ``means``, a device array ``(H, >= n, dh)``: by those)."""
    if means is not None:
        _launch(_given_kernel, _grid(x.shape[0], x.shape[2]), BLOCK)(
            x, length, np.int64(n_heads), constant(select), means, x
        )
        return
    _launch(_mean_kernel, _grid(x.shape[0], x.shape[2]), BLOCK)(
        x, length, np.int64(n_heads), constant(select), np.int64(window), 1.0, x
    )


class InputScratch:
    """One input's device buffers: per condition and layer parity, its maps and metrics
    (two layers' worth, so that one layer's copies back overlap the next one's compute),
    the row metrics, and the copy link."""

    def __init__(self, n_heads, n, seq, stack, maps):
        self.n, self.stack, self.maps = n, stack, maps
        self.length = constant(np.array([n], dtype=np.int64))
        self.base_ent = xp.zeros((n_heads, n))
        self.row_ent = xp.zeros((n_heads, n))
        self.row_kl = xp.zeros((n_heads, n))
        self.colsum = xp.empty((n_heads, 1, n))
        slots = 2 * stack
        self.w = [xp.empty((n_heads, n, n), np.float32) for _ in range(slots)]
        self.met = [
            (xp.empty(n_heads), xp.empty(n_heads), xp.empty(n_heads), xp.empty(n_heads, np.int64))
            for _ in range(slots)
        ]
        self.link = _Link(slots)
        self.layer = -1

    def slot(self, c):
        """The slot of condition ``c`` at the current layer (``c = 0`` starts a layer),
        free to be written."""
        if c == 0:
            self.layer += 1
        slot = (self.layer % 2) * self.stack + c
        self.link.retire(slot)
        return slot

    def finish(self):
        """Every map and metric of this input is in its host array."""
        self.link.finish()

    def abort(self):
        """After an error: no copy of this input is still in flight."""
        self.link.abort()


def attention_one(q, k, v, modes, causal, scale, logits, c, w, o, scratch, metrics, reduced):
    """See :func:`qkvmean.engine.backends.cpu.attention_one`; the maps and metrics are
    queued to go back (they are in ``w`` and ``reduced`` after ``scratch.finish()``)."""
    check_modes(modes, logits)
    heads, n = q.shape[0], scratch.n
    slot = scratch.slot(c)
    dev = scratch.w[slot]
    if not np.all(modes == MODE_UNIFORM):
        xp.matmul(q, k.transpose(0, 2, 1), out=dev)
    with_kl = c > 0
    _launch(_softmax_kernel, heads * n, ROW_THREADS)(
        dev, scratch.length, np.int64(heads), np.int64(0), constant(modes), bool(causal),
        np.float32(scale), np.int64(logits.window), float(logits.softcap),
        constant(np.asarray(logits.slopes, np.float32)), bool(metrics), with_kl,
        scratch.w[slot - c] if with_kl else dev, scratch.base_ent,
        scratch.row_ent if with_kl else scratch.base_ent, scratch.row_kl,
    )  # fmt: skip
    xp.matmul(dev, v, out=o)
    pairs = [] if w is None else [(dev, w[:, :n, :n])]
    if metrics:
        met = scratch.met[slot]
        _launch(_colsum_kernel, _grid(heads, n), BLOCK)(
            dev, scratch.length, np.int64(heads), np.int64(0), scratch.colsum
        )
        _launch(_reduce_kernel, _grid1(heads))(
            scratch.row_ent if with_kl else scratch.base_ent, scratch.row_kl, scratch.colsum,
            scratch.length, np.int64(heads), *met,
        )  # fmt: skip
        pairs += list(zip(met, reduced, strict=True))
    if pairs:
        scratch.link.send(slot, pairs)


def check_finite(x):
    """:func:`qkvmean.engine.kernels.finite.scan_finite` on the device (it waits for the device)."""
    return scan_finite(xp.asarray(x).reshape(-1), xp)
