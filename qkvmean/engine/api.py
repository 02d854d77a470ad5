"""Public engine API: validation, flattening, fast-path selection and backend dispatch.

Everything a kernel could trip over is checked here, in Python, before any kernel runs:
a Numba kernel that reads out of bounds corrupts memory instead of raising.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np

from .. import config
from ..resources import check_memory, format_bytes
from .backends import AUTO, BACKENDS, load
from .condition import Condition
from .kernels.finite import scan_finite
from .names import CONDITIONS, DEVICES, METRICS, OVER, TARGETS
from .plan import Plan, means_from_sums, position_counts
from .substitution import Substitution, resample_partners, resampled

__all__ = ["BACKENDS", "CONDITIONS", "DEVICES", "METRICS", "OVER", "TARGETS", "backend"]


# ----------------------------------------------------------------------------- checks


def choose_device(device) -> tuple:
    """``(backend name, what it is)`` for ``device``: ``"auto"`` is the first backend of
    :data:`~qkvmean.engine.backends.AUTO` that runs here and does not ask to be passed
    over (CUDA on a GPU, never Numba's simulator), else the last (the CPU), and says why."""
    if device == "auto":
        reasons = []
        for name in AUTO[:-1]:
            ops, why = load(name)
            if ops is None:
                reasons.append(f"no usable {name.upper()} device: {why}")
            elif ops.skip_auto:
                reasons.append(ops.skip_auto)
            else:
                return name, ops.describe()
        return AUTO[-1], "; ".join(reasons)
    ops = backend(device)
    return ops.name, ops.describe()


def backend(device):
    """The backend registered for ``device`` (``"auto"``: see :func:`choose_device`), or a
    one-line ValueError naming the choices, or saying why it cannot run here."""
    if device == "auto":
        device = choose_device(device)[0]
    try:
        known = device in BACKENDS
    except TypeError:  # not hashable
        known = False
    if not known:
        choices = sorted(set(BACKENDS) | set(DEVICES))
        raise ValueError(f"device must be one of {choices}, got {device!r}")
    ops, why = load(device)
    if ops is None:
        raise ValueError(f"device {device!r} cannot run here: {why}; use 'cpu' or 'auto'")
    return ops


def _float_array(x, name):
    """``x`` as an ndarray of a supported float dtype, or a TypeError saying how to fix it."""
    if x is None:
        raise TypeError(f"{name} is required: pass an array of floats, not None")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of floats: {exc}") from None
    # any byte order (h5py hands over big-endian datasets as they are stored)
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64, got {arr.dtype}; "
            f"convert it with {name}.astype(np.float32)"
        )
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (..., seq, dim), got shape {arr.shape}"
        )
    return arr


def _compute_dtype(*arrays):
    """float64 if any input is float64, else float32 (float16 is computed in float32)."""
    if any(a.dtype == np.float64 for a in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive real number, got {scale!r}")
    try:
        scale = float(scale)
    except OverflowError:  # an int beyond float range
        scale = math.inf
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return scale


def _check_lengths(lengths, batch, seq, batched):
    """``(batch,)`` int64 valid-token counts in ``[0, seq]``."""
    if lengths is None:
        return np.full(batch, seq, dtype=np.int64)
    arr = np.asarray(lengths)
    if arr.size == 0 and arr.dtype.kind == "f":  # [] for an empty batch
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if not batched and arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape != (batch,):
        raise ValueError(
            f"lengths must have shape ({batch},), one count per input, got shape {arr.shape}"
        )
    bad = np.flatnonzero((arr < 0) | (arr > seq))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"lengths[{i}] = {int(arr[i])} is outside [0, {seq}]: each length must be "
            f"between 0 and the sequence length {seq}"
        )
    return arr.astype(np.int64)


def _check_heads(heads, shape):
    """Boolean mask over the head axis (-3), or None for all heads."""
    if heads is None:
        return None
    if len(shape) < 4:
        raise ValueError(
            f"heads needs arrays with a head axis at -3 (ndim >= 4, e.g. (batch, head, seq, "
            f"dim)), got shape {shape}; pass heads=None to substitute everywhere"
        )
    n_heads = shape[-3]
    items = [heads] if isinstance(heads, (numbers.Integral, np.integer)) else heads
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"heads must be None, an int or a sequence of ints, got {heads!r}"
        ) from None
    mask = np.zeros(n_heads, dtype=np.bool_)
    for h in items:
        if isinstance(h, (bool, np.bool_)):
            raise TypeError(f"heads must contain ints, got {h!r}")
        try:
            h = operator.index(h)
        except TypeError:
            raise TypeError(f"heads must contain ints, got {h!r}") from None
        if not -n_heads <= h < n_heads:
            raise ValueError(
                f"head index {h} is out of range for {n_heads} heads (axis -3); "
                f"use 0..{n_heads - 1}"
            )
        mask[h] = True
    return mask


def _contiguous(arr, dtype, name, shape):
    """C-contiguous copy (or view) of ``arr`` in ``dtype``, with every value finite."""
    out = np.ascontiguousarray(arr, dtype=dtype)
    bad, biggest = scan_finite(out.reshape(-1), parallel=True)
    if bad >= 0:
        index = tuple(int(i) for i in np.unravel_index(bad, shape))
        value = out.reshape(-1)[bad]
        raise ValueError(f"{name} contains {value} at index {index}; all values must be finite")
    return out, float(biggest)


@dataclass
class _Prepared:
    """Validated inputs, flattened to ``(batch * group, seq, dim)``."""

    shape: tuple  # the caller's q shape
    batched: bool  # False when the caller passed a bare (seq, dim) array
    batch: int
    group: int
    lengths: np.ndarray
    q: np.ndarray | None
    k: np.ndarray | None
    v: np.ndarray | None
    scale: float
    causal: bool
    max_abs: dict  # largest |value| of each tensor, for the overflow guards
    nbytes: float  # what the results take, for the out-of-memory message

    def attention(self, backend, modes, v, with_output, **options):
        """The backend's attention kernel on these inputs; memory it could not get is a
        one-line ValueError."""
        try:
            return backend.attention(
                self.q, self.k, v, self.lengths, self.group, modes, self.causal, self.scale,
                config.ROW_BLOCK, with_output, **options,
            )  # fmt: skip
        except MemoryError:
            raise ValueError(
                f"out of memory: the results need {format_bytes(self.nbytes)}; pass fewer "
                "inputs at a time, or shorter sequences"
            ) from None

    def substitute(self, backend, name, select, window, means=None):
        """Substitute tensor ``name`` ("q", "k" or "v") for the selected groups by its
        running mean (``window`` as the kernel takes it); ``means`` ``(M, >= seq, dim)``
        (``M`` = 1, the group or batch * group): replace each position by those instead."""
        x = getattr(self, name)
        if means is not None:
            setattr(
                self, name, backend.mean_substitute(x, self.lengths, self.group, select, 0,
                                                    means=means),
            )  # fmt: skip
            return
        # Sums of values near the float64 limit overflow though their mean fits: sum
        # them scaled by an exact power of two instead.
        seq = max(x.shape[1], 1)
        shrink = 1.0
        if self.max_abs[name] * seq > float(np.finfo(np.float64).max) / 4:
            shrink = 2.0 ** -math.ceil(math.log2(seq))
        setattr(
            self, name, backend.mean_substitute(x, self.lengths, self.group, select, window, shrink)
        )

    def given(self, backend, name, substitution, means=None):
        """The given vectors of a given kind for tensor ``name``, ``(M, seq, dim)``: the
        dataset means (this batch's, or the caller's ``means``), zeros, or each input's
        partner's values (``resample``); None for a running mean."""
        kind = substitution.kind
        if kind == "dataset":
            return self.dataset_means(backend, name, means)
        x = getattr(self, name)
        if kind == "zero":
            return np.zeros((1,) + x.shape[1:], x.dtype)
        if kind == "resample" and means is not None:  # each input's values, given
            m = _float_array(means, f"resampled values of {name}")
            if m.shape != self.shape:
                raise ValueError(
                    f"resampled values of {name} have shape {m.shape}; they must be "
                    f"{name}'s shape {self.shape} (each input's partner's values)"
                )
            m, _ = _contiguous(m, x.dtype, f"resampled values of {name}", m.shape)
            return m.reshape(x.shape)
        if kind == "resample":
            partners = resample_partners(self.lengths, substitution.seed)
            per_input = x.reshape(self.batch, self.group, *x.shape[1:])
            return resampled(per_input, self.lengths, partners).reshape(x.shape)
        return None

    def dataset_means(self, backend, name, given=None):
        """``(group, seq, dim)`` per-position means of tensor ``name`` over the inputs of
        this batch (the data set), or the caller's ``given`` means, checked."""
        x = getattr(self, name)
        seq, dim = x.shape[1], x.shape[2]
        if given is None:
            sums = np.zeros((self.group, seq, dim))
            backend.position_sums(x, self.lengths, self.group, sums)
            return means_from_sums(sums, position_counts(self.lengths, seq), x.dtype)
        return _check_means(given, name, self, seq, dim, x.dtype)


def _check_means(given, name, p, seq, dim, dtype):
    """The caller's dataset means of tensor ``name``: ``(*group, positions, dim)`` with
    ``positions >= seq`` (a key or value mean may have the KV heads), finite."""
    group_shape = p.shape[1:-2] if p.batched else ()
    want = f"(*{name}.shape[1:-2], >= {seq}, {dim}) = {(*group_shape, seq, dim)}"
    m = _float_array(given, f"means of {name}")
    if m.ndim >= 3 and m.ndim == len(group_shape) + 2 and m.shape[-3] != group_shape[-1]:
        heads = group_shape[-1]
        if m.shape[-3] and heads % m.shape[-3] == 0 and m.shape[:-3] == group_shape[:-1]:
            m = np.repeat(m, heads // m.shape[-3], axis=-3)  # KV heads: one per query head
    if m.shape[:-2] != group_shape or m.ndim < 2 or m.shape[-1] != dim or m.shape[-2] < seq:
        raise ValueError(f"means of {name} have shape {m.shape}; they must be {want}")
    m, _ = _contiguous(m[..., :seq, :], dtype, f"means of {name}", m[..., :seq, :].shape)
    return m.reshape(p.group, seq, dim)


def _flat(arr, batched):
    batch = arr.shape[0] if batched else 1
    group = int(np.prod(arr.shape[1:-2], dtype=np.int64)) if batched else 1
    return arr.reshape(batch * group, arr.shape[-2], arr.shape[-1]), batch, group


def _expand_kv(x, name, q):
    """Grouped-query attention: ``x`` (k or v) with fewer heads on axis -3 than q, a
    divisor of q's, is repeated so that query head ``h`` reads KV head ``h // (H / G)``."""
    if x.ndim != q.ndim or x.ndim < 4 or x.shape[-3] == q.shape[-3]:
        return x
    heads, kv_heads = q.shape[-3], x.shape[-3]
    if kv_heads == 0 or heads % kv_heads or x.shape[:-3] != q.shape[:-3]:
        raise ValueError(
            f"{name} has {kv_heads} heads on axis -3 but q has {heads}: {name} must have q's "
            "heads, or (grouped-query attention) a number of heads that divides q's"
        )
    return np.repeat(x, heads // kv_heads, axis=-3)


def _check_like_q(x, name, q, *, share_dim):
    """``x`` (k or v) must match q's shape; v's last axis may differ."""
    if x.ndim != q.ndim:
        raise ValueError(f"{name} has {x.ndim} dimensions but q has {q.ndim}; they must match")
    if share_dim and x.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{name} has head_dim {x.shape[-1]} but q has {q.shape[-1]}: q and {name} must "
            "share their last dimension"
        )
    if x.shape[-2] != q.shape[-2]:
        raise ValueError(
            f"{name} has sequence length {x.shape[-2]} but q has {q.shape[-2]}: {name} must "
            "have the same seq axis (-2) as q"
            + ("" if share_dim else " (its last axis may differ)")
        )
    if x.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"{name} has shape {x.shape} but q has {q.shape}: batch and group axes must match"
        )


def _check_fits(q, v, dtype, n_maps, with_output) -> float:
    """Bytes of the results; a one-line ValueError, before anything is allocated (the
    inputs' copies included), when they cannot fit in memory."""
    item = dtype.itemsize
    seq = q.shape[-2]
    rows = float(np.prod(q.shape[:-1], dtype=np.float64))
    nbytes = rows * seq * item * n_maps
    if with_output:
        nbytes += rows * v.shape[-1] * item
    nbytes += sum(float(x.size) * item for x in (q, v) if x is not None)  # contiguous copies
    shape = q.shape[:-1] + (seq,)
    maps = "the attention weights" if n_maps == 1 else f"{n_maps} sets of attention weights"
    what = f"{maps} of shape {shape} ({dtype})" + (" and the output" if with_output else "")
    check_memory(nbytes, what, "pass fewer inputs at a time, or shorter sequences")
    return nbytes


def _prepare(
    q, k=None, v=None, *, lengths, causal, scale, need_v, need_k=True, q_name="q", n_maps=1
):
    q = _float_array(q, q_name)
    if need_k:
        k = _expand_kv(_float_array(k, "k"), "k", q)
        _check_like_q(k, "k", q, share_dim=True)
        if q.shape[-1] == 0:
            raise ValueError("q and k have head_dim 0; attention needs head_dim >= 1")
    if need_v:
        v = _expand_kv(_float_array(v, "v"), "v", q)
        _check_like_q(v, "v", q, share_dim=False)
    causal = _check_bool(causal, "causal")
    scale = _check_scale(scale, q.shape[-1]) if k is not None else 1.0
    batched = q.ndim > 2
    batch = q.shape[0] if batched else 1
    lengths = _check_lengths(lengths, batch, q.shape[-2], batched)

    dtype = _compute_dtype(*(a for a in (q, k, v) if a is not None))
    nbytes = _check_fits(q, v, dtype, n_maps if need_k else 0, need_v and need_k)
    qc, q_max = _contiguous(q, dtype, q_name, q.shape)
    kc = vc = None
    k_max = v_max = 0.0
    if k is not None:
        kc, k_max = _contiguous(k, dtype, "k", k.shape)
        # Every logit is bounded by dim * max|q| * max|k| * max(scale, 1); keep that
        # finite so no score overflows to inf (and no weight becomes NaN).
        limit = float(np.finfo(dtype).max) / 4
        wider = "" if dtype == np.float64 else " or pass float64"
        if scale > limit:
            raise ValueError(
                f"scale = {scale:.3g} is too large for {dtype}; use a smaller one{wider}"
            )
        bound = q.shape[-1] * q_max * k_max * max(scale, 1.0)
        if bound > limit:
            raise ValueError(
                f"q and k are too large for {dtype}: max|q| = {q_max:.3g}, max|k| = "
                f"{k_max:.3g}, so dot products can overflow; rescale them{wider}"
            )
    if need_v:
        vc, v_max = _contiguous(v, dtype, "v", v.shape)

    (qf, b, g) = _flat(qc, batched)
    return _Prepared(
        shape=q.shape,
        batched=batched,
        batch=b,
        group=g,
        lengths=lengths,
        q=qf,
        k=_flat(kc, batched)[0] if kc is not None else None,
        v=_flat(vc, batched)[0] if vc is not None else None,
        scale=scale,
        causal=causal,
        max_abs={"q": q_max, "k": k_max, "v": v_max},
        nbytes=nbytes,
    )


# ----------------------------------------------------------------------------- API


def _run_attention(p, ops, modes, with_output):
    if modes is None:
        modes = np.zeros(p.group, dtype=np.int8)
    w, o, _ = p.attention(ops, modes, p.v, with_output)
    weights = w.reshape(p.shape[:-1] + (p.shape[-2],))
    if not with_output:
        return weights
    return weights, o.reshape(p.shape[:-1] + (p.v.shape[-1],))


def attention_weights(q, k, *, lengths=None, causal=False, scale=None, device="cpu"):
    """Masked softmax attention weights.

    Parameters
    ----------
    q, k : array_like, shape ``(batch, *group, seq, dim)``
        Queries and keys (``group`` is any number of axes, e.g. layer and head). A bare
        ``(seq, dim)`` pair is one unbatched input.
    lengths : array_like of int, shape ``(batch,)``, optional
        Valid tokens per input; positions at or after it are padding. Default: all valid.
    causal : bool
        Allow key ``j`` for query ``i`` only when ``j <= i``.
    scale : float, optional
        Logit scale, default ``1 / sqrt(dim)``.
    device : {"cpu", "cuda", "auto"}
        Where to compute: ``"cpu"`` (Numba, all cores), ``"cuda"`` (numba-cuda and CuPy,
        ``pip install 'qkvmean[cuda]'``; a ValueError says why when it cannot run) or
        ``"auto"`` (CUDA when a GPU is usable, else the CPU). Results agree to float32
        rounding.

    Returns
    -------
    ndarray, shape ``q.shape[:-1] + (seq,)``
        ``A[..., i, j]``; masked entries and rows of padded queries are exactly 0.
        float64 for float64 input, else float32.

    Examples
    --------
    >>> import numpy as np, qkvmean
    >>> q = np.ones((1, 3, 4), np.float32)
    >>> qkvmean.attention_weights(q, q, causal=True)[0]
    array([[1.        , 0.        , 0.        ],
           [0.5       , 0.5       , 0.        ],
           [0.33333334, 0.33333334, 0.33333334]], dtype=float32)
    """
    ops = backend(device)
    p = _prepare(q, k, lengths=lengths, causal=causal, scale=scale, need_v=False)
    return _run_attention(p, ops, None, with_output=False)


def attention(q, k, v, *, lengths=None, causal=False, scale=None, device="cpu"):
    """Masked softmax attention: ``(weights, output)`` with ``output = weights @ v``.

    Same conventions as :func:`attention_weights`; ``v`` has shape
    ``(batch, *group, seq, dim_v)`` (``dim_v`` may differ from ``dim``). Outputs of padded
    query rows are 0.

    Examples
    --------
    >>> import numpy as np, qkvmean
    >>> q = np.zeros((1, 2, 4)); v = np.array([[[1.0], [3.0]]])
    >>> qkvmean.attention(q, q, v)[1][0, :, 0]
    array([2., 2.])
    """
    ops = backend(device)
    p = _prepare(q, k, v, lengths=lengths, causal=causal, scale=scale, need_v=True)
    return _run_attention(p, ops, None, with_output=True)


def mean_substitute(x, *, over="tokens", lengths=None, device="cpu", means=None):
    """Replace every valid position of ``x`` by its mean.

    Parameters
    ----------
    x : array_like, shape ``(batch, *group, seq, dim)``
    over : str or Substitution
        What replaces position ``i`` (see :mod:`qkvmean.engine.substitution`):
        ``tokens``: the mean over the valid tokens of the same input and group;
        ``causal``: the prefix mean over tokens ``t <= i``;
        ``window:W``: the mean over the last ``W`` tokens ``max(0, i - W + 1) .. i``;
        ``dataset``: the batch axis is the data set: position ``i`` of every input is
        replaced by the mean of position ``i`` over the inputs that have a valid token
        there (padding never enters a mean);
        ``zero``: zeros;
        ``resample`` (``resample:SEED``): position ``i`` of another input of the batch,
        drawn with the seed (default 0) by
        :func:`~qkvmean.engine.substitution.resample_partners`.
    lengths : array_like of int, shape ``(batch,)``, optional
        Valid tokens per input; padded positions are returned unchanged.
    means : array_like, shape ``(*group, positions, dim)``, optional
        With ``over="dataset"``: the per-position means to use (those of a reference
        set, ``positions >= seq``) instead of this batch's own.

    Examples
    --------
    >>> import numpy as np, qkvmean
    >>> x = np.array([[[1.0], [3.0], [8.0]]])
    >>> qkvmean.mean_substitute(x, lengths=[2])[0, :, 0]
    array([2., 2., 8.])
    >>> qkvmean.mean_substitute(x, over="causal")[0, :, 0]
    array([1., 2., 4.])
    >>> qkvmean.mean_substitute(x, over="window:2")[0, :, 0]
    array([1. , 2. , 5.5])
    >>> two = np.array([[[1.0], [3.0]], [[5.0], [0.0]]])  # input 1 has one valid token
    >>> qkvmean.mean_substitute(two, over="dataset", lengths=[2, 1])[:, :, 0]
    array([[3., 3.],
           [3., 0.]])
    """
    ops = backend(device)
    over = _check_over(over, means)
    p = _prepare(
        x, lengths=lengths, causal=False, scale=None, need_v=False, need_k=False, q_name="x"
    )
    select = np.ones(p.group, dtype=np.bool_)
    given = p.given(ops, "q", over, means)
    p.substitute(ops, "q", select, over.window_length(p.q.shape[1]), given)
    return p.q.reshape(p.shape)


def _check_over(over, means) -> Substitution:
    """``over`` as a :class:`Substitution`; ``means`` only with ``dataset``."""
    try:
        over = Substitution.parse(over)
    except TypeError:
        raise TypeError(
            f"over must be a string such as 'tokens' or 'window:8', got {over!r}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"over: {exc}") from None
    if means is not None and over.kind != "dataset":
        raise ValueError(f"means apply to over='dataset' only, not over={over.spec!r}")
    return over


def _group_select(p, head_mask):
    """Per flattened group: is its head selected for substitution?"""
    if head_mask is None or p.group == 0:
        return np.ones(p.group, dtype=np.bool_)
    # The head axis is the last group axis, so flattened group g has head g % n_heads.
    return np.tile(head_mask, p.group // head_mask.size)


def _substitute(p, ops, target, over, select, means=None):
    """Substitute ``target`` of prepared inputs in place, as the plan says; return the
    per-group modes. ``means``: the given vectors of a given kind (:meth:`_Prepared.given`)."""
    plan = Plan(substitution=over)
    step = plan.step(target, causal=p.causal)
    modes = np.zeros(p.group, dtype=np.int8)
    modes[select] = step.mode
    x = getattr(p, target)
    if step.substitute and x is not None:
        p.substitute(ops, target, select, plan.window(x.shape[1]), means)
    return modes


def ablate(
    q,
    k,
    v,
    *,
    target,
    over="tokens",
    heads=None,
    lengths=None,
    causal=False,
    scale=None,
    device="cpu",
    means=None,
):
    """Attention after mean substitution of ``target`` in the selected heads.

    Parameters
    ----------
    q, k, v : array_like
        As for :func:`attention`. ``v`` may be None: then only the weights are computed
        (and ``output`` is None).
    target : {"q", "k", "v"}
        The tensor replaced by its mean (see :func:`mean_substitute`).
    over : str or Substitution
        ``tokens``, ``causal``, ``window:W``, ``dataset``, ``zero`` or ``resample[:SEED]``
        (see :func:`mean_substitute`).
    means : array_like, optional
        ``over="dataset"``: the means of ``target`` to use, ``(*group, positions, dim)``
        (e.g. of a reference set), instead of the batch's own.
    heads : int or sequence of int, optional
        Indices on axis -3 (the head axis; needs ndim >= 4). Default: every head.
    lengths, causal, scale, device
        As for :func:`attention`.

    Returns
    -------
    weights, output : ndarray
        As for :func:`attention`.

    Examples
    --------
    >>> import numpy as np, qkvmean
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.normal(size=(3, 1, 2, 4, 8))
    >>> w, _ = qkvmean.ablate(q, k, v, target="k", lengths=[3])
    >>> w[0, 0, 0]
    array([0.33333333, 0.33333333, 0.33333333, 0.        ])
    """
    ops = backend(device)
    target = _check_choice(target, "target", TARGETS)
    over = _check_over(over, means)
    if v is None and target == "v":
        raise ValueError("target='v' needs v (mean-V changes only the output A @ v)")
    with_output = v is not None
    p = _prepare(q, k, v, lengths=lengths, causal=causal, scale=scale, need_v=with_output)
    select = _group_select(p, _check_heads(heads, p.shape))
    given = p.given(ops, target, over, means)
    modes = _substitute(p, ops, target, over, select, given)
    if not with_output:
        return _run_attention(p, ops, modes, with_output=False), None
    return _run_attention(p, ops, modes, with_output=True)


@dataclass
class Conditions:
    """Attention maps of the baseline and each substitution, with their metrics.

    ``weights[name]`` has shape ``q.shape[:-1] + (seq,)``; ``metrics[metric]`` has shape
    ``(len(names),) + q.shape[:-2]`` (one value per condition, input and group).
    """

    names: list
    weights: dict
    metrics: dict
    hidden: dict | None = None  # the model path's final hidden states, when asked for
    effects: dict | None = None  # the model path's effects on the output, when asked for


def conditions(
    q,
    k,
    v=None,
    *,
    targets=TARGETS,
    over="tokens",
    heads=None,
    lengths=None,
    causal=False,
    scale=None,
    device="cpu",
    maps=True,
    means=None,
):
    """Baseline and mean-substituted attention weights, with per-head metrics.

    Each map is computed once; its metrics in the same kernel pass, while the rows are
    in cache: ``entropy`` (mean over valid query rows of ``-sum a log a``, nats),
    ``kl_from_baseline`` (mean over valid rows of ``KL(baseline || condition)``),
    ``top_key_mass`` (the largest mean weight of one key column over the valid rows) and
    ``top_key_index`` (that column). Inputs with no valid token get 0, 0, 0 and -1.
    Metrics are computed in the compute precision (float32 or float64) from the weights
    as returned.

    Parameters
    ----------
    q, k, v : array_like
        As for :func:`attention`; ``v`` is only validated (the weights never see it),
        and may be None.
    targets : sequence of {"q", "k", "v"}
        Substitutions to run after the baseline, in this order.
    over, heads, lengths, causal, scale, device
        As for :func:`ablate`.
    maps : bool
        False: return the metrics only (``weights`` is empty); on a GPU the maps then
        never leave it.
    means : dict, optional
        ``over="dataset"``: ``{target: (*group, positions, dim)}`` means to use instead of
        the batch's own (see :func:`ablate`); a target it leaves out uses the batch's.
        ``over="resample"``: ``{target: q.shape}`` the values each input takes (those of
        its partner in a larger set, as a run draws them), instead of drawing partners
        in the batch.

    Returns
    -------
    Conditions
        ``names`` (``"baseline"``, then ``"mean_<target>"``; ``"zero_<target>"``,
        ``"resample_<target>"`` for those kinds), ``weights``, ``metrics``.

    Examples
    --------
    >>> import numpy as np, qkvmean
    >>> q, k = np.random.default_rng(0).normal(size=(2, 1, 4, 6, 8))
    >>> c = qkvmean.conditions(q, k, targets=["k"], lengths=[4])
    >>> c.names, c.metrics["entropy"].shape
    (['baseline', 'mean_k'], (2, 1, 4))
    >>> round(float(c.metrics["entropy"][1, 0, 0]), 6) == round(float(np.log(4)), 6)
    True
    """
    ops = backend(device)
    maps = _check_bool(maps, "maps")
    over = _check_over(over, None)
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be a sequence of 'q', 'k', 'v', got {targets!r}")
    targets = [_check_choice(t, "targets", TARGETS) for t in targets]
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets has a duplicate: {targets!r}")
    if means is not None and over.kind not in ("dataset", "resample"):
        raise ValueError(
            f"means apply to over='dataset' or 'resample' only, not over={over.spec!r}"
        )
    if means is not None and not (isinstance(means, dict) and set(means) <= set(TARGETS)):
        raise TypeError(f"means must be a dict {{target: array}} over q, k, v, got {means!r:.60}")
    n_maps = 1 + sum(not Plan.weights_unchanged(t) for t in targets)
    p = _prepare(
        q, k, v, lengths=lengths, causal=causal, scale=scale, need_v=v is not None, n_maps=n_maps
    )
    select = _group_select(p, _check_heads(heads, p.shape))
    if over.kind == "resample" and means is None:
        resample_partners(p.lengths, over.seed)  # refuses a batch of one, whatever the targets
    original = (p.q, p.k, p.v)
    lead = p.shape[:-2]
    names, weights, per_pair = [], {}, []

    def run(name, modes, base):
        w, _, rows = p.attention(ops, modes, None, False, metrics=True, base=base, maps=maps)
        names.append(name)
        if maps:
            weights[name] = w.reshape(lead + (p.shape[-2], p.shape[-2]))
        per_pair.append(ops.reduce_metrics(rows, p.lengths, p.group))
        return w, rows

    base = run(CONDITIONS[0], np.zeros(p.group, dtype=np.int8), None)  # (weights, rows)
    for target in targets:
        name = Condition(target, substitution=over).label
        if Plan.weights_unchanged(target):
            # v never reaches the weights: mean-V maps and metrics are the baseline's
            names.append(name)
            if maps:
                weights[name] = weights[CONDITIONS[0]]
            per_pair.append(per_pair[0][:1] + (np.zeros_like(per_pair[0][1]),) + per_pair[0][2:])
            continue
        p.q, p.k, p.v = original
        given = p.given(ops, target, over, (means or {}).get(target))
        run(name, _substitute(p, ops, target, over, select, given), base)
    metrics = {
        name: np.stack([m[i] for m in per_pair]).reshape((len(names),) + lead)
        for i, name in enumerate(METRICS)
    }
    return Conditions(names=names, weights=weights, metrics=metrics)
