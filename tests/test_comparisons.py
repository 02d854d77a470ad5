"""One table: every public function against its numpy reference, on every backend.

As numbagg's ``COMPARISONS`` (``test/conftest.py``, driving ``test/test_property.py``):
:data:`COMPARISONS` maps each public function of qkvmean to its reference in
:mod:`qkvmean.engine.reference`, the arguments it takes, the extra arguments to draw and
how to compare the results. Hypothesis draws the inputs (``support.cases``) and, about one
draw in ten, breaks one argument. Then both sides must raise the same exception type (the
reference through :func:`contract`, the README's checks written out naively, since the
reference does not validate), with a one-line message naming the argument; otherwise both
must agree within the rounding bounds of ``support.py``, and masked weights must be
exactly 0. The ``device`` fixture runs every row on each backend: the CPU, and CUDA
(Numba's simulator unless ``NUMBA_ENABLE_CUDASIM=0``), which is slow, so it draws a third
of the examples. The edges (``support.edge_cases``) and every kind of bad argument of
:data:`BAD` are explicit tests on both.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    Case,
    assert_metrics,
    assert_weights,
    assert_within,
    cases,
    edge_cases,
    mean_tolerance,
    output_tolerance,
    patched,
    row_delta,
)

import qkvmean
from qkvmean.engine import reference as ref
from qkvmean.engine.backends import BACKENDS

OVER = ("tokens", "causal", "dataset")
#: Every kind of substitution (qkvmean.engine.substitution), with its parameters drawn.
_SUBSTITUTIONS = st.one_of(
    st.sampled_from((*OVER, "zero")),
    st.integers(1, 12).map(lambda w: f"window:{w}"),
    st.integers(0, 3).map(lambda seed: f"resample:{seed}"),
)
FLOATS = (np.float16, np.float32, np.float64)


def _heads(case):
    n = case.q.shape[-3]
    return st.one_of(st.none(), st.lists(st.integers(-n, n - 1), max_size=3))


# ----------------------------------------------------------------------------- checks


def _check_weights(got, want, args, case):
    assert_weights(got, want, args["q"], args["k"], case)


def _check_attention(got, want, args, case):
    (w, o), (w_ref, o_ref) = got, want
    tol = assert_weights(w, w_ref, args["q"], args["k"], case)
    assert o.shape == args["v"].shape and o.dtype == o_ref.dtype
    assert_within(o, o_ref, output_tolerance(w_ref, tol, args["v"], o.dtype), "output")


def _check_mean(got, want, args, case):
    x = args["x"]
    assert got.shape == x.shape and got.dtype == want.dtype
    assert_within(got, want, mean_tolerance(x, got.dtype), f"mean over {args['over']}")
    for b, n in enumerate(case.lengths):  # padding is left as it was, bit for bit
        assert np.array_equal(got[b, ..., n:, :], x[b, ..., n:, :].astype(got.dtype))


def _substituted(args, target):
    return ref.substitute(
        args["q"], args["k"], args["v"], target=target, over=args["over"],
        heads=args["heads"], lengths=args["lengths"],
    )  # fmt: skip


def _check_ablate(got, want, args, case):
    (w, o), (w_ref, o_ref) = got, want
    q2, k2, v2 = _substituted(args, args["target"])  # the tensors the kernels saw
    tol = assert_weights(w, w_ref, q2, k2, case, f"mean-{args['target']} weights")
    assert o.shape == args["v"].shape and o.dtype == o_ref.dtype
    assert_within(o, o_ref, output_tolerance(w_ref, tol, v2, o.dtype), "output")


def _check_conditions(got, want, args, case):
    word = {"zero": "zero", "resample": "resample"}.get(args["over"].partition(":")[0], "mean")
    assert got.names == want.names == ["baseline"] + [f"{word}_{t}" for t in args["targets"]]
    deltas = {}
    for name in want.names:
        q2, k2 = args["q"], args["k"]
        if name[-2:] in ("_q", "_k"):
            q2, k2, _ = _substituted(args, name[-1])
        assert_weights(got.weights[name], want.weights[name], q2, k2, case, name)
        deltas[name] = row_delta(q2, k2, case.scale, got.weights[name].dtype)
    assert_metrics(got, want, deltas, case.lengths, got.weights["baseline"].dtype)
    for metric, value in got.metrics.items():
        assert value.shape == (len(got.names),) + case.q.shape[:-2], metric


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    reference: Callable
    arrays: tuple  # positional array arguments, by name
    keywords: tuple  # keyword arguments, by name
    cases: st.SearchStrategy
    params: Callable  # case -> strategy of a dict of further arguments
    edge_params: Callable  # case -> those arguments for the explicit edge tests
    check: Callable  # (public's result, reference's, arguments, case)


_ATTENTION = ("lengths", "causal", "scale")
_HEADED = dict(head_axis=True, min_heads=2)

COMPARISONS = {
    qkvmean.attention_weights: Row(
        ref.attention_weights, ("q", "k"), _ATTENTION, cases(), lambda c: st.just({}),
        lambda c: {}, _check_weights,
    ),
    qkvmean.attention: Row(
        ref.attention, ("q", "k", "v"), _ATTENTION, cases(), lambda c: st.just({}),
        lambda c: {}, _check_attention,
    ),
    qkvmean.mean_substitute: Row(
        ref.mean_substitute, ("x",), ("over", "lengths"), cases(),
        lambda c: st.fixed_dictionaries(
            {"x": st.sampled_from([c.q, c.v]), "over": _SUBSTITUTIONS}
        ),
        lambda c: {"x": c.v, "over": "causal"}, _check_mean,
    ),
    qkvmean.ablate: Row(
        ref.ablate, ("q", "k", "v"), ("target", "over", "heads", *_ATTENTION),
        cases(**_HEADED),
        lambda c: st.fixed_dictionaries(
            {"target": st.sampled_from("qkv"), "over": _SUBSTITUTIONS, "heads": _heads(c)}
        ),
        lambda c: {"target": "k", "over": "tokens", "heads": [-1]}, _check_ablate,
    ),
    qkvmean.conditions: Row(
        ref.conditions, ("q", "k", "v"), ("targets", "over", "heads", *_ATTENTION),
        cases(**_HEADED),
        lambda c: st.fixed_dictionaries(
            {"targets": st.sampled_from([["q", "k", "v"], ["k"], ["v", "q"], []]),
             "over": _SUBSTITUTIONS, "heads": _heads(c)}
        ),
        lambda c: {"targets": ["q", "k", "v"], "over": "dataset", "heads": None},
        _check_conditions,
    ),
}  # fmt: skip


def arguments(case, params):
    """Every argument a row may take, by name."""
    args = dict(q=case.q, k=case.k, v=case.v, lengths=case.lengths, causal=case.causal)
    args["scale"] = case.scale
    args.update(params)
    return args


def call(func, row, args, **extra):
    return func(
        *[args[name] for name in row.arrays],
        **{name: args[name] for name in row.keywords},
        **extra,
    )


# ----------------------------------------------------------------------------- bad input


def contract(row, args):
    """The README's checks on bad input, written out naively for the reference side:
    TypeError for a wrong type, ValueError for a wrong value."""
    arrays = [(name, np.asarray(args[name])) for name in row.arrays]
    first = arrays[0][1]
    for name, a in arrays:
        if a.dtype not in FLOATS:
            raise TypeError(f"{name} is not float")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} is not finite")
        if name == "k" and a.shape[-1] != first.shape[-1]:
            raise ValueError("k has another head_dim")
    lengths = np.asarray(args["lengths"])
    if lengths.size and lengths.dtype.kind not in "iu":
        raise TypeError("lengths are not integers")
    if lengths.shape != first.shape[:1]:
        raise ValueError("lengths: one per input")
    if np.any((lengths < 0) | (lengths > first.shape[-2])):
        raise ValueError("a length outside [0, seq]")
    if "causal" in row.keywords and not isinstance(args["causal"], (bool, np.bool_)):
        raise TypeError("causal is not a bool")
    scale = args["scale"]
    if "scale" in row.keywords and scale is not None and not (np.isfinite(scale) and scale > 0):
        raise ValueError("scale is not finite and > 0")
    n_heads = first.shape[-3] if first.ndim >= 3 else 1
    if "heads" in row.keywords and args["heads"] is not None:
        if any(not -n_heads <= h < n_heads for h in args["heads"]):
            raise ValueError("a head index out of range")
    if "target" in row.keywords and args["target"] not in ("q", "k", "v"):
        raise ValueError("target")
    if "targets" in row.keywords and not set(args["targets"]) <= {"q", "k", "v"}:
        raise ValueError("targets")
    if "over" in row.keywords:
        kind, _, param = args["over"].partition(":")
        if kind not in (*OVER, "zero", "window", "resample"):
            raise ValueError("over")
        if kind == "window" and not (param.isdigit() and int(param) >= 1):
            raise ValueError("window")
        if kind == "resample" and first.shape[0] < 2:
            raise ValueError("resample needs two inputs")


def _nan(a):
    a = a.copy()
    a.flat[a.size // 2] = np.nan
    return a


def _first(lengths, value):
    lengths = lengths.copy()
    lengths[0] = value
    return lengths


# name -> (applies to (row, args), the arguments broken, a word its message must hold)
BAD = {
    "a length beyond seq": (
        lambda r, a: len(a["lengths"]) > 0,
        lambda a: dict(a, lengths=_first(a["lengths"], a["q"].shape[-2] + 1)), "lengths",
    ),
    "a negative length": (
        lambda r, a: len(a["lengths"]) > 0,
        lambda a: dict(a, lengths=_first(a["lengths"], -1)), "lengths",
    ),
    "float lengths": (
        lambda r, a: len(a["lengths"]) > 0,
        lambda a: dict(a, lengths=a["lengths"] + 0.5),
        "lengths",
    ),
    "one length too many": (
        lambda r, a: True, lambda a: dict(a, lengths=np.append(a["lengths"], 0)), "lengths",
    ),
    "k of another head_dim": (
        lambda r, a: "k" in r.arrays,
        lambda a: dict(a, k=np.concatenate([a["k"], a["k"][..., :1]], axis=-1)), "k",
    ),
    "a nan": (
        lambda r, a: np.asarray(a[r.arrays[0]]).size > 0,
        lambda a: {**a, **{n: _nan(a[n]) for n in ("q", "x") if n in a}}, "nan",
    ),
    "integer values": (
        lambda r, a: True,
        lambda a: {**a, **{n: a[n].astype(np.int32) for n in ("q", "x") if n in a}}, "dtype",
    ),
    "scale 0": (lambda r, a: "scale" in r.keywords, lambda a: dict(a, scale=0.0), "scale"),
    "scale inf": (lambda r, a: "scale" in r.keywords, lambda a: dict(a, scale=np.inf), "scale"),
    "causal 'yes'": (
        lambda r, a: "causal" in r.keywords, lambda a: dict(a, causal="yes"), "causal",
    ),
    "a head out of range": (
        lambda r, a: "heads" in r.keywords,
        lambda a: dict(a, heads=[0, a["q"].shape[-3]]), "head",
    ),
    "target 'x'": (lambda r, a: "target" in r.keywords, lambda a: dict(a, target="x"), "target"),
    "targets ['w']": (
        lambda r, a: "targets" in r.keywords, lambda a: dict(a, targets=["w"]), "targets",
    ),
    "over 'heads'": (lambda r, a: "over" in r.keywords, lambda a: dict(a, over="heads"), "over"),
    "window:0": (lambda r, a: "over" in r.keywords, lambda a: dict(a, over="window:0"), "window"),
}  # fmt: skip
_BAD_OR_NOT = (None,) * (2 * len(BAD)) + tuple(BAD)  # None first: failures shrink to it


def outcome(f):
    try:
        return f(), None
    except Exception as exc:  # compared below: the same type on both sides
        return None, exc


def compare(func, device, case, args, bad=None):
    """Public against reference: the same exception type, or results within bounds."""
    row = COMPARISONS[func]
    with patched(ROW_BLOCK=case.row_block):
        got, got_exc = outcome(lambda: call(func, row, args, device=device))

    def reference():
        contract(row, args)
        return call(row.reference, row, args)

    want, want_exc = outcome(reference)
    if got_exc is not None or want_exc is not None:
        assert type(got_exc) is type(want_exc), (
            f"{func.__name__} on {device} raised {got_exc!r}, the reference {want_exc!r}"
        )
        message = str(got_exc)
        assert "\n" not in message, f"not one line: {message!r}"
        if bad is not None:
            assert BAD[bad][2] in message, f"{bad}: the message does not say so: {message!r}"
        return
    assert bad is None, f"{bad}: accepted by both sides"
    row.check(got, want, args, case)


# ----------------------------------------------------------------------------- the tests

try:
    _CUDA = importlib.util.find_spec("numba_cuda") is not None
except (ImportError, ValueError):
    _CUDA = False

# the simulator runs every GPU thread as a Python thread: a third of the examples
_SHARE = {"cpu": 1, "cuda": 3}
assert set(_SHARE) == set(BACKENDS), "a new backend: give it its share of the examples"


@pytest.fixture(params=sorted(BACKENDS))
def device(request):
    """Each registered backend (:data:`qkvmean.engine.backends.BACKENDS`); CUDA where
    numba-cuda is installed (the test extra), under the simulator without a GPU."""
    if request.param == "cuda" and not _CUDA:
        pytest.skip("numba-cuda is not installed (pip install -e '.[test]' has it)")
    return request.param


@pytest.mark.parametrize("func", COMPARISONS, ids=lambda f: f.__name__)
def test_public_function_matches_the_reference(func, device):
    row = COMPARISONS[func]
    examples = max(1, settings.default.max_examples // _SHARE[device])

    @settings(max_examples=examples)
    @given(case=row.cases, data=st.data())
    def check(case, data):
        args = arguments(case, data.draw(row.params(case), label="params"))
        bad = data.draw(st.sampled_from(_BAD_OR_NOT), label="bad")
        if bad is not None and BAD[bad][0](row, args):
            args = BAD[bad][1](args)
        else:
            bad = None
        compare(func, device, case, args, bad)

    # each row and device draws its own examples (derandomized by the test's digest)
    key = f"{func.__name__}-{device}".encode()
    check.hypothesis.inner_test._hypothesis_internal_add_digest = key
    check()


def _edges():
    for func in COMPARISONS:
        kwargs = _HEADED if func in (qkvmean.ablate, qkvmean.conditions) else {}
        for name, case in edge_cases(dtypes=(np.float32, np.float64), **kwargs).items():
            yield pytest.param(func, case, id=f"{func.__name__}-{name}")


@pytest.mark.parametrize(("func", "case"), list(_edges()))
def test_edges_match_the_reference(func, case, device):
    """Empty batches, inputs without tokens, all padding, one token, no value dim."""
    row = COMPARISONS[func]
    compare(func, device, case, arguments(case, row.edge_params(case)))


def _bad_inputs():
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(3, 2, 3, 5, 4)).astype(np.float32)
    case = Case(q, k, v, np.array([5, 2]), True, 0.5, 0)
    for func, row in COMPARISONS.items():
        args = arguments(case, row.edge_params(case))
        for bad, (applies, _, _) in BAD.items():
            if applies(row, args):
                yield pytest.param(func, case, bad, id=f"{func.__name__}-{bad}")


@pytest.mark.parametrize(("func", "case", "bad"), list(_bad_inputs()))
def test_bad_input_raises_as_the_reference_does(func, case, bad, device):
    """Every kind of bad argument each function takes, each on a fixed case: the same
    exception type as the reference's checks, one line naming the argument."""
    args = BAD[bad][1](arguments(case, COMPARISONS[func].edge_params(case)))
    compare(func, device, case, args, bad)
