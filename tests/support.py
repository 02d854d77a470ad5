"""Shared strategies and error bounds for the engine tests.

The reference computes in float64 from the same inputs, so it is the exact answer to
within float64 rounding. The kernels round in the compute dtype; the bounds below say how
far that rounding can move each weight, so that a test tolerates exactly what floating
point allows and nothing more (a wrong mask, a wrong row or a missing normalisation is
off by orders of magnitude more).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
from hypothesis import example
from hypothesis import strategies as st

from qkvmean import config


@dataclass
class Case:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    lengths: np.ndarray
    causal: bool
    scale: float | None
    row_block: int

    @property
    def kw(self):
        return dict(lengths=self.lengths, causal=self.causal, scale=self.scale)


def _values(rng, shape, kind, magnitude, dtype):
    if kind == "integers":  # ties and exactly equal logits
        x = rng.integers(-3, 4, size=shape) * magnitude
    else:
        x = rng.normal(size=shape) * magnitude
    return x.astype(dtype)


LAYOUTS = ("c", "strided", "fortran", "reversed")


def _layout(x, layout):
    """The same values as ``x`` in another memory layout (a view where possible)."""
    if layout == "strided":  # every other element of a wider array
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "reversed":  # negative strides on the sequence axis
        return x[..., ::-1, :].copy()[..., ::-1, :]
    return x


# The edge shapes that random draws would rarely combine on purpose; ``cases`` draws one
# in about one example of twenty, and ``edge_examples`` makes each an explicit @example row.
EDGES = ("empty batch", "no tokens", "all padding", "one token", "no value dim")
_EDGE_OR_NOT = (None,) * (19 * len(EDGES)) + EDGES  # None first: failures shrink to it


@st.composite
def cases(
    draw,
    dtypes=(np.float16, np.float32, np.float64),
    min_heads=1,
    max_seq=9,
    head_axis=False,
    edges=True,
):
    """Random attention inputs: shapes, group axes, lengths, masks, magnitudes, layouts.

    Every axis is non-empty and at least one input has two valid tokens or more (the
    softmax is over several keys); the others have any length from 0 to ``seq``. With
    ``edges``, about one draw in twenty is instead one of ``EDGES`` (``head_axis`` inputs
    keep a batch); ``edge_examples`` gives each as an explicit row.
    """
    edge = draw(st.sampled_from(_EDGE_OR_NOT)) if edges else None
    if edge == "empty batch" and head_axis:
        edge = "all padding"
    batch = 0 if edge == "empty batch" else draw(st.integers(1, 3))
    group = draw(st.lists(st.integers(1, 3), min_size=1 if head_axis else 0, max_size=2))
    if head_axis:
        group[-1] = max(group[-1], min_heads)
    if edge == "no tokens":
        seq = 0
    else:
        seq = draw(st.integers(1 if edge in ("all padding", "one token") else 2, max_seq))
    dim = draw(st.integers(1, 8))
    dim_v = 0 if edge == "no value dim" else draw(st.integers(1, 5))
    most = {"no tokens": 0, "all padding": 0, "one token": 1}.get(edge, seq)
    lengths = draw(st.lists(st.integers(0, most), min_size=batch, max_size=batch))
    if batch and edge in (None, "no value dim"):  # one input with two valid tokens or more
        lengths[draw(st.integers(0, batch - 1))] = draw(st.integers(2, seq))
    elif batch and edge == "one token":
        lengths[draw(st.integers(0, batch - 1))] = 1
    lengths = np.array(lengths, dtype=np.int64)
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(["normal", "integers"]))
    # logits span 1e-4 .. 1e4 (with the default scale, |logit| ~ magnitude**2)
    magnitude = 10.0 ** draw(st.floats(-2, 2))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 4.0)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layout = draw(st.sampled_from(LAYOUTS))
    shape = (batch, *group, seq)
    q = _layout(_values(rng, (*shape, dim), kind, magnitude, dtype), layout)
    k = _layout(_values(rng, (*shape, dim), kind, magnitude, dtype), layout)
    v = _layout(_values(rng, (*shape, dim_v), "normal", 1.0, dtype), layout)
    return Case(q, k, v, lengths, draw(st.booleans()), scale, draw(st.sampled_from([0, 1, 3, 32])))


def edge_cases(dtypes=(np.float16, np.float32, np.float64), min_heads=1, head_axis=False, **_):
    """One fixed case per edge of ``EDGES`` (and per dtype), shaped as ``cases(...)`` with
    the same arguments would shape it: name -> Case."""
    heads = max(2, min_heads)
    group = (heads,) if head_axis else (2,)
    rng = np.random.default_rng(7)
    out = {}
    for dtype in dtypes:
        rows = {  # batch, seq, dim_v, lengths, causal
            "empty batch": (0, 4, 3, [], False),
            "no tokens": (2, 0, 3, [0, 0], False),
            "all padding": (2, 3, 3, [0, 0], True),
            "one token": (3, 3, 2, [1, 0, 1], False),
            "no value dim": (2, 4, 0, [4, 2], True),
        }
        for name, (batch, seq, dim_v, lengths, causal) in rows.items():
            if head_axis and batch == 0:
                continue
            shape = (batch, *group, seq)
            q, k = (rng.normal(size=(2, *shape, 3)) * 2).astype(dtype)
            v = rng.normal(size=(*shape, dim_v)).astype(dtype)
            lengths = np.array(lengths, np.int64)
            out[f"{name}, {np.dtype(dtype).name}"] = Case(q, k, v, lengths, causal, None, 0)
    return out


def edge_examples(*extra, **strategy_kwargs):
    """An ``@example(case, *extra)`` row per case of ``edge_cases(**strategy_kwargs)``: the
    edges run on every run, whatever the draws."""

    def apply(test):
        for case in edge_cases(**strategy_kwargs).values():
            test = example(case, *extra)(test)
        return test

    return apply


@contextlib.contextmanager
def patched(**values):
    """Temporarily set attributes of :mod:`qkvmean.config`."""
    old = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(config, name, value)


def unit_roundoff(dtype):
    return float(np.finfo(np.dtype(dtype)).eps) / 2


def weight_tolerance(w_ref, q, k, scale, dtype):
    """Elementwise bound on |computed - exact| weights for float64 ``q``, ``k``.

    Each logit ``scale * q_i . k_j`` summed in ``dtype`` is off by at most
    ``(dim + 2) u scale sum_d |q_id k_jd|``; with every logit of a row off by at most
    ``delta``, each weight moves by a factor within ``exp(+-2 delta)``. A few more units
    of roundoff cover exp, the subtraction of the row max and the normalisation.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    u = unit_roundoff(dtype)
    dim = q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(dim)
    logit_err = (dim + 2) * u * scale * (np.abs(q) @ np.swapaxes(np.abs(k), -1, -2))
    delta = logit_err.max(axis=-1, keepdims=True, initial=0.0)
    return w_ref * np.expm1(2 * delta) + 16 * u


def output_tolerance(w_ref, w_tol, v, dtype):
    """Bound on |computed - exact| outputs given the weight bound ``w_tol``."""
    v = np.abs(np.asarray(v, dtype=np.float64))
    seq = v.shape[-2]
    u = unit_roundoff(dtype)
    return w_tol @ v + (seq + 2) * u * (np.asarray(w_ref, np.float64) @ v) + 16 * u


def mean_tolerance(x, dtype):
    """Bound on |computed - exact| of a mean substitution of ``x`` rounded to ``dtype``.

    Both sides sum in float64 (in different orders: at most ``seq + 2`` float64 roundoffs
    of ``max |x|`` apart), then round the mean once to the result dtype."""
    x = np.abs(np.asarray(x, np.float64))
    seq = x.shape[-2] if x.ndim >= 2 else 1
    big = x.max(initial=0.0)
    return (2 * unit_roundoff(dtype) + (seq + 2) * unit_roundoff(np.float64)) * big


def allowed(lengths, seq, ndim, causal):
    """Boolean mask of the allowed (query, key) pairs of weights with ``ndim`` axes (a
    batch first), broadcastable to their shape."""
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    masks = [(i < n) & (j < n) & ((j <= i) | (not causal)) for n in lengths]
    masks = np.array(masks, dtype=bool).reshape((len(lengths), seq, seq))
    return masks.reshape((len(lengths),) + (1,) * (ndim - 3) + (seq, seq))


def assert_weights(w, w_ref, q, k, case, what="weights"):
    """``w`` within ``weight_tolerance`` of ``w_ref`` (dtype and shape too), exactly zero
    outside the mask and in padded rows; returns the tolerance. ``q``, ``k``: the tensors
    the weights were computed from (the substituted ones, for a condition)."""
    assert w.dtype == w_ref.dtype, f"{what}: dtype {w.dtype} != {w_ref.dtype}"
    assert w.shape == case.q.shape[:-1] + (case.q.shape[-2],), f"{what}: shape {w.shape}"
    tol = weight_tolerance(w_ref, q, k, case.scale, w.dtype)
    assert_within(w, w_ref, tol, what)
    if w.ndim >= 3:  # masked entries and padded rows are exactly zero, not merely small
        mask = np.broadcast_to(allowed(case.lengths, w.shape[-1], w.ndim, case.causal), w.shape)
        assert np.all(w[~mask] == 0.0), f"{what}: a masked entry is not 0"
    return tol


def row_delta(q, k, scale, dtype):
    """Largest logit error per (input, group): the bound of ``weight_tolerance``."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    dim = q.shape[-1]
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    err = (dim + 2) * unit_roundoff(dtype) * scale * (np.abs(q) @ np.swapaxes(np.abs(k), -1, -2))
    return err.max(axis=(-1, -2), initial=0.0)


def assert_metrics(c, r, deltas, lengths, dtype):
    """The metrics of ``conditions`` result ``c`` against the exact ones of ``r``, within
    what the logits' rounding allows (``deltas``: :func:`row_delta` per condition).

    Each logit is off by at most ``delta``, so every log-weight by at most ``2 delta``:
    the entropy and the KL move by a few ``delta`` (times their size), plus float
    roundoff of the sums; the column means move by the weights' own tolerance, so the
    chosen top key's column mean is the largest within that.
    """
    u = unit_roundoff(dtype)
    seq = r.weights["baseline"].shape[-1]
    base_delta = deltas["baseline"]
    for index, name in enumerate(c.names):
        delta = deltas[name]
        for metric in ("entropy", "kl_from_baseline", "top_key_mass"):
            got = c.metrics[metric][index]
            want = r.metrics[metric][index]
            size = 1 + np.abs(want) + np.log(max(seq, 1))
            tol = (8 * (delta + base_delta) + 64 * (seq + 2) * u) * size
            if metric == "top_key_mass":
                tol = np.expm1(2 * delta) + 16 * (seq + 2) * u
            assert_within(got, want, tol, f"{name} {metric}")
        got = c.metrics["top_key_index"][index]
        assert np.array_equal(got < 0, r.metrics["top_key_index"][index] < 0), name
        for b, n in enumerate(lengths):
            if n == 0:
                continue
            col_mean = r.weights[name][b, ..., :n, :n].astype(np.float64).mean(axis=-2)
            chosen = np.take_along_axis(col_mean, got[b][..., None], axis=-1)[..., 0]
            tol = 2 * (np.expm1(2 * delta[b]) + 16 * (seq + 2) * u)
            assert_within(chosen, col_mean.max(axis=-1), tol, f"{name} top key column")


def assert_within(actual, expected, tol, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if expected.ndim == 0:  # a scalar stands for every element
        expected = np.full(actual.shape, expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    same = actual == expected  # also matches equal infinities
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(actual - expected))
    bad = ~(err <= tol)  # NaN anywhere is a failure
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: |{actual[idx]} - {expected[idx]}| = {err[idx]:.3g} > tolerance "
            f"{np.broadcast_to(tol, err.shape)[idx]:.3g} at {idx} ({bad.sum()} elements)"
        )


def store_datasets(path) -> dict:
    """Every dataset of an HDF5 store: name -> array."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        f.visititems(visit)
    return out


def without_notes(err: str) -> str:
    """stderr without the run's ``warning:`` lines (a file with no lengths dataset says so
    before anything else), so that tests of one-line errors read the error alone."""
    return "".join(line for line in err.splitlines(True) if ": warning: " not in line)


def run_qkv_store(tmp, *run_args, out="q.h5", **shape):
    """A store of ``qkvmean run --qkv`` (plus ``run_args``) on the random Q/K/V that
    ``test_store.make_qkv(tmp / "in.h5", **shape)`` writes; its path."""
    from test_store import make_qkv

    from qkvmean.cli import main

    make_qkv(tmp / "in.h5", **shape)
    store = tmp / out
    assert main(["run", "--qkv", str(tmp / "in.h5"), "--out", str(store), *run_args, "-q"]) == 0
    return store


def killed_at(cmd, fault, timeout=600):
    """Run ``cmd`` with ``QKVMEAN_FAULT=fault`` (:mod:`qkvmean.faults`: ``NAME:N``, SIGKILL
    at the N-th time the process reaches point ``NAME``) and check that it died there,
    not earlier, later or otherwise; the completed process."""
    import signal
    import subprocess

    env = {**os.environ, "QKVMEAN_FAULT": fault}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, (
        f"QKVMEAN_FAULT={fault}: exit {proc.returncode}, not SIGKILL: {proc.stderr[-2000:]}"
    )
    return proc


def stopped_at(cmd, fault, timeout=600, **popen):
    """Start ``cmd`` with ``QKVMEAN_FAULT=fault:stop`` and return it once it has stopped
    itself there (SIGSTOP, :mod:`qkvmean.faults`): a live run, exactly at that point. The
    caller sends it SIGCONT (or SIGKILL)."""
    import signal
    import subprocess
    import threading

    env = {**os.environ, "QKVMEAN_FAULT": f"{fault}:stop"}
    proc = subprocess.Popen(cmd, env=env, **popen)
    timer = threading.Timer(timeout, proc.kill)  # never hang the suite
    timer.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
    finally:
        timer.cancel()
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP, (
        f"QKVMEAN_FAULT={fault}:stop: the process did not stop there (status {status})"
    )
    return proc


#: What ``.ci/run`` requires: ``QKVMEAN_REQUIRE_<NAME>=1`` turns the skip for its absence
#: into a failure.
REQUIRED = ("H5DUMP", "MINILM", "BROWSER")


def skip_or_fail(name, message):
    """Skip the test for want of ``name`` (one of :data:`REQUIRED`), or fail where
    ``QKVMEAN_REQUIRE_<name>`` says it must be there; ``message`` says what is missing
    and how to install it."""
    import pytest

    if name not in REQUIRED:
        raise ValueError(f"{name!r} is not one of {REQUIRED}")
    variable = f"QKVMEAN_REQUIRE_{name}"
    if os.environ.get(variable):
        pytest.fail(f"{message} (and {variable} says it must be there)")
    pytest.skip(message)


def texts_file(path, texts):
    """``texts`` written one per line to ``path`` (a ``--text`` file); the path."""
    path.write_text("\n".join(texts) + "\n")
    return path


def store_maps(store) -> dict:
    """Every condition's maps of an open store, as stored."""
    return {c: store.maps(c) for c in store.conditions}
