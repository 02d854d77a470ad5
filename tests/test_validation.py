"""Bad input is refused in the Python wrappers with a message that says what to fix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import qkvmean

R = np.random.default_rng(0)
Q = R.normal(size=(2, 3, 5, 4)).astype(np.float32)  # (batch, head, seq, dim)
V = R.normal(size=(2, 3, 5, 6)).astype(np.float32)


def _with(value, index, array=Q):
    x = array.copy()
    x[index] = value
    return x


# (id, function name, args, kwargs, exception, regex the message must match)
BAD = [
    (
        "k-seq",
        "attention_weights",
        (Q, Q[:, :, :4]),
        {},
        ValueError,
        r"k has sequence length 4 but q has 5",
    ),
    (
        "k-dim",
        "attention_weights",
        (Q, Q[..., :3]),
        {},
        ValueError,
        r"k has head_dim 3 but q has 4",
    ),
    (
        "k-batch",
        "attention_weights",
        (Q, Q[:1]),
        {},
        ValueError,
        r"batch and group axes must match",
    ),
    ("k-ndim", "attention_weights", (Q, Q[0]), {}, ValueError, r"k has 3 dimensions but q has 4"),
    (
        "v-seq",
        "attention",
        (Q, Q, V[:, :, :4]),
        {},
        ValueError,
        r"v has sequence length 4 but q has 5",
    ),
    (
        "v-heads",
        "attention",
        (Q, Q, V[:, :2]),
        {},
        ValueError,
        r"v has 2 heads on axis -3 but q has 3: v must have q's heads, or \(grouped-query "
        r"attention\) a number of heads that divides q's",
    ),
    ("v-batch", "attention", (Q, Q, V[:1]), {}, ValueError, r"v has shape .* batch and group"),
    (
        "q-1d",
        "attention_weights",
        (Q[0, 0, 0], Q[0, 0, 0]),
        {},
        ValueError,
        r"q must have at least 2 dimensions",
    ),
    (
        "q-0d",
        "mean_substitute",
        (np.float32(1.0),),
        {},
        ValueError,
        r"x must have at least 2 dimensions",
    ),
    (
        "q-int",
        "attention_weights",
        (Q.astype(np.int32), Q),
        {},
        TypeError,
        r"q must have dtype float16, float32 or float64, got int32; convert it with q.astype",
    ),
    ("k-bool", "attention_weights", (Q, Q > 0), {}, TypeError, r"k must have dtype .* got bool"),
    ("v-complex", "attention", (Q, Q, V + 1j), {}, TypeError, r"v must have dtype .* got complex"),
    (
        "x-str",
        "mean_substitute",
        (np.array([["a", "b"]]),),
        {},
        TypeError,
        r"x must have dtype .* got <U1",
    ),
    (
        "q-object",
        "attention_weights",
        (np.array([[1, None]], dtype=object), Q),
        {},
        TypeError,
        r"q must have dtype .* got object",
    ),
    (
        "q-ragged",
        "attention_weights",
        ([[1.0, 2.0], [3.0]], Q),
        {},
        TypeError,
        r"q must be an array of floats",
    ),
    (
        "q-nan",
        "attention_weights",
        (_with(np.nan, (1, 2, 3, 0)), Q),
        {},
        ValueError,
        r"q contains nan at index \(1, 2, 3, 0\); all values must be finite",
    ),
    (
        "k-inf",
        "attention_weights",
        (Q, _with(np.inf, (0, 0, 4, 3))),
        {},
        ValueError,
        r"k contains inf at index \(0, 0, 4, 3\)",
    ),
    (
        "v-neginf",
        "attention",
        (Q, Q, _with(-np.inf, (1, 0, 0, 5), V)),
        {},
        ValueError,
        r"v contains -inf at index \(1, 0, 0, 5\)",
    ),
    (
        "nan-in-padding",
        "attention_weights",
        (_with(np.nan, (0, 0, 4, 0)), Q),
        {"lengths": [2, 2]},
        ValueError,
        r"q contains nan at index \(0, 0, 4, 0\)",
    ),
    (
        "x-nan",
        "mean_substitute",
        (_with(np.nan, (0, 1, 1, 1)),),
        {},
        ValueError,
        r"x contains nan at index \(0, 1, 1, 1\)",
    ),
    (
        "lengths-count",
        "attention_weights",
        (Q, Q),
        {"lengths": [5]},
        ValueError,
        r"lengths must have shape \(2,\), one count per input, got shape \(1,\)",
    ),
    (
        "lengths-2d",
        "attention_weights",
        (Q, Q),
        {"lengths": [[5, 5]]},
        ValueError,
        r"lengths must have shape \(2,\)",
    ),
    (
        "lengths-negative",
        "attention_weights",
        (Q, Q),
        {"lengths": [5, -1]},
        ValueError,
        r"lengths\[1\] = -1 is outside \[0, 5\]",
    ),
    (
        "lengths-too-long",
        "attention",
        (Q, Q, V),
        {"lengths": [6, 5]},
        ValueError,
        r"lengths\[0\] = 6 is outside \[0, 5\]",
    ),
    (
        "lengths-float",
        "attention_weights",
        (Q, Q),
        {"lengths": [5.0, 2.0]},
        TypeError,
        r"lengths must be integers, got dtype float64",
    ),
    (
        "scale-nan",
        "attention_weights",
        (Q, Q),
        {"scale": float("nan")},
        ValueError,
        r"scale must be finite and > 0, got nan",
    ),
    (
        "scale-inf",
        "attention_weights",
        (Q, Q),
        {"scale": float("inf")},
        ValueError,
        r"scale must be finite and > 0",
    ),
    (
        "scale-zero",
        "attention",
        (Q, Q, V),
        {"scale": 0.0},
        ValueError,
        r"scale must be finite and > 0, got 0.0",
    ),
    (
        "scale-negative",
        "attention_weights",
        (Q, Q),
        {"scale": -1},
        ValueError,
        r"scale must be finite and > 0, got -1.0",
    ),
    (
        "scale-str",
        "attention_weights",
        (Q, Q),
        {"scale": "0.5"},
        TypeError,
        r"scale must be a positive real number, got '0.5'",
    ),
    (
        "scale-bool",
        "attention_weights",
        (Q, Q),
        {"scale": True},
        TypeError,
        r"scale must be a positive real number",
    ),
    (
        "causal-str",
        "attention_weights",
        (Q, Q),
        {"causal": "yes"},
        TypeError,
        r"causal must be True or False, got 'yes'",
    ),
    (
        "over",
        "mean_substitute",
        (Q,),
        {"over": "heads"},
        ValueError,
        r"over: unknown substitution 'heads'; use tokens, causal, dataset, window:W, zero or",
    ),
    (
        "over-ablate",
        "ablate",
        (Q, Q, V),
        {"target": "q", "over": None},
        TypeError,
        r"over must be a string such as 'tokens' or 'window:8', got None",
    ),
    (
        "target",
        "ablate",
        (Q, Q, V),
        {"target": "Q"},
        ValueError,
        r"target must be one of 'q', 'k', 'v'; got 'Q'",
    ),
    (
        "head-range",
        "ablate",
        (Q, Q, V),
        {"target": "k", "heads": [0, 3]},
        ValueError,
        r"head index 3 is out of range for 3 heads \(axis -3\); use 0..2",
    ),
    (
        "head-negative-range",
        "ablate",
        (Q, Q, V),
        {"target": "k", "heads": -4},
        ValueError,
        r"head index -4 is out of range",
    ),
    (
        "head-float",
        "ablate",
        (Q, Q, V),
        {"target": "k", "heads": [1.0]},
        TypeError,
        r"heads must contain ints, got 1.0",
    ),
    (
        "head-bool",
        "ablate",
        (Q, Q, V),
        {"target": "k", "heads": [True]},
        TypeError,
        r"heads must contain ints",
    ),
    (
        "head-no-axis",
        "ablate",
        (Q[0], Q[0], V[0]),
        {"target": "k", "heads": [0]},
        ValueError,
        r"heads needs arrays with a head axis at -3 \(ndim >= 4",
    ),
    (
        "device",
        "attention_weights",
        (Q, Q),
        {"device": "gpu"},
        ValueError,
        r"device must be one of \['auto', 'cpu', 'cuda'\], got 'gpu'",
    ),
    (
        "overflow",
        "attention_weights",
        (Q * 1e19, Q * 1e19),
        {},
        ValueError,
        r"q and k are too large for float32: .* rescale them or pass float64",
    ),
    (
        "k-none",
        "attention_weights",
        (Q, None),
        {},
        TypeError,
        r"k is required: pass an array of floats, not None",
    ),
    ("v-none", "attention", (Q, Q, None), {}, TypeError, r"v is required"),
    ("v-none-mean-v", "ablate", (Q, Q, None), {"target": "v"}, ValueError, r"target='v' needs v"),
    (
        "scale-huge-int",
        "attention_weights",
        (Q, Q),
        {"scale": 10**400},
        ValueError,
        r"scale must be finite and > 0, got inf",
    ),
    (
        "scale-beyond-float32",
        "attention_weights",
        (Q, Q),
        {"scale": 1e39},
        ValueError,
        r"scale = 1e\+39 is too large for float32; use a smaller one or pass float64",
    ),
    ("dim-zero", "attention_weights", (Q[..., :0], Q[..., :0]), {}, ValueError, r"head_dim 0"),
]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "exc", "match"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_input_is_refused(fn, args, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        getattr(qkvmean, fn)(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_input_in_a_fresh_process_raises_without_crashing():
    """Each case runs in one new interpreter: every call must raise, none may crash."""
    script = f"""
import json, sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
import test_validation as t
import qkvmean
result = {{}}
for name, fn, args, kwargs, exc, match in t.BAD:
    try:
        getattr(qkvmean, fn)(*args, **kwargs)
        result[name] = "no error"
    except (ValueError, TypeError) as e:
        result[name] = type(e).__name__
print(json.dumps(result))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {case[0]: case[4].__name__ for case in BAD}
