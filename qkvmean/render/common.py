"""What the figure, the metrics figure and the HTML page share: the columns' names and
colours, token labels, input numbers, titles and text wrapping."""

from __future__ import annotations

import math

from ..engine.names import BASELINE, TENSOR_LABELS, condition_name
from ..files import InputError
from ..store import Store

TENSORS = {condition_name(t): label for t, label in TENSOR_LABELS.items()}
COLORBAR_LABEL = "Attention Weight"
DIFF_LABEL = "Attention Weight − Baseline"
CMAP = "coolwarm"


def italic(word: str) -> str:
    """``word`` in italics (matplotlib mathtext)."""
    return rf"$\it{{{word}}}$"


def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet back to bytes (the inverse of its bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTES = _byte_decoder()
#: Shown for a token's leading space, so that word starts stay visible.
SPACE = "▁"


def pretty_tokens(tokens) -> list:
    """Token strings as text: byte-level BPE (GPT-2's ``Ġ``, ``Ã©``…) decoded to UTF-8."""
    tokens = list(tokens)
    if not any(("Ġ" in t or "Ċ" in t) for t in tokens) or not all(
        c in _BYTES for t in tokens for c in t
    ):
        return tokens
    out = []
    for t in tokens:
        text = bytes(_BYTES[c] for c in t).decode("utf-8", errors="replace")
        if text.startswith(" "):
            text = SPACE + text[1:]
        out.append(text.replace("\n", "\\n") or SPACE)
    return out


def substitution_of(store: Store) -> str:
    """The spelling of the store's substitution (``tokens``, ``window:8``, ``zero``...):
    its condition table's (every condition of a run has the same), else ``over``."""
    for row in store.condition_table[1:]:
        if row.get("substitution"):
            return str(row["substitution"])
    return str(store.attrs.get("over", "tokens"))


def verb(spec: str) -> str:
    """How a panel title says what a substitution does to a tensor: ``Taking the Mean
    of`` (the means), ``Zeroing``, ``Resampling``."""
    kind = str(spec).partition(":")[0]
    return {"zero": "Zeroing", "resample": "Resampling"}.get(kind, "Taking the Mean of")


def target_of(store: Store, condition: str) -> str | None:
    """The target (q, k or v) a condition of ``store`` substitutes, from its condition
    table (None for the baseline)."""
    for row in store.condition_table:
        if row["label"] == condition:
            return row["target"] or None
    raise InputError(
        f"{store.path.name} has no condition {condition!r} (it has {', '.join(store.conditions)})"
    )


def condition_title(store: Store, condition: str) -> str:
    r"""``Taking the Mean of $\it{Query}$`` (``Zeroing``, ``Resampling`` for those kinds);
    ``Baseline`` for the baseline."""
    target = target_of(store, condition)
    if target is None:
        return "Baseline"
    return f"{verb(substitution_of(store))} {italic(TENSOR_LABELS[target])}"


def sweep_refusal(store: Store, what: str) -> InputError:
    """What drawing ``what`` (the figure, the KL heatmaps) says of a ``--sweep`` store."""
    return InputError(
        f"{store.path.name} was written with --sweep {store.sweep} ({len(store.conditions) - 1} "
        f"conditions): it has no {what} of one condition per tensor; draw it with "
        "render --sweep METRIC"
    )


def tensor_columns(store: Store, baseline: bool, diff: bool, what: str = "figure") -> list:
    """The conditions drawn as columns: one per substituted tensor (Query, Key, Value
    order, by the condition table), after the baseline with ``baseline``; one-line
    InputErrors for a ``--sweep`` store, a store without any, and ``baseline`` with
    ``diff``."""
    if store.sweep:
        raise sweep_refusal(store, what)
    by_target = {row["target"]: row["label"] for row in store.condition_table[1:]}
    present = [by_target[t] for t in TENSOR_LABELS if t in by_target]
    if not present:
        raise InputError(
            f"{store.path.name} holds no condition of {', '.join(TENSORS)} (it has "
            f"{', '.join(store.conditions)}); nothing to draw"
        )
    if diff and baseline:
        raise InputError(
            "--baseline and --diff do not combine (the baseline's difference from itself is zero)"
        )
    return ([BASELINE] if baseline else []) + present


def given_inputs(store: Store, inputs) -> list:
    """``inputs`` (input numbers from 0, negative counting from the end) as the store's
    indices, in the order given; a TypeError or a one-line InputError otherwise."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError(f"inputs must be a sequence of ints, got {inputs!r}")
    try:
        inputs = list(inputs)
    except TypeError:
        raise TypeError(f"inputs must be a sequence of ints, got {inputs!r}") from None
    if not inputs:
        raise InputError("--inputs is empty; give input numbers (counting from 0)")
    return [store.input_index(i) for i in inputs]  # type and range, in the store's words


def nice_ceiling(x: float) -> float:
    """A round upper limit for a symmetric scale (0.05 → 0.05, 0.37 → 0.4)."""
    if x <= 0:
        return 1e-3
    step = 10 ** math.floor(math.log10(x))
    return math.ceil(x / step - 1e-9) * step


def wrap(text: str, width: float, fontsize: float) -> list:
    """``text`` in lines that fit ``width`` inches at ``fontsize`` points (by the mean width
    of a character of matplotlib's sans-serif font, about 0.55 em)."""
    import textwrap

    return textwrap.wrap(text, max(20, int(width * 72 / (0.55 * fontsize)) - 4)) or [""]


def check_title(title: str) -> str:
    """A title matplotlib can draw: its ``$...$`` parts must be valid mathtext."""
    from matplotlib import cbook
    from matplotlib.mathtext import MathTextParser

    if not isinstance(title, str):
        raise TypeError(f"title must be a string, got {title!r}")
    try:
        title.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line
        raise InputError(
            f"--title {title.encode('utf-8', 'backslashreplace').decode()!r} is not valid "
            "UTF-8 text; write it in UTF-8"
        ) from None
    if cbook.is_math_text(title):
        try:
            MathTextParser("path").parse(title, dpi=72)
        except (ValueError, RecursionError) as exc:
            reason = str(exc).strip().splitlines()[-1].split("Exception: ", 1)[-1]
            reason = reason if len(reason) <= 90 else reason[:87] + "..."
            if isinstance(exc, RecursionError):
                reason = "nested too deeply"
            raise InputError(
                f"--title {title!r} is not valid mathtext ({reason}); fix the $...$ part, "
                "or write \\$ for a dollar sign"
            ) from None
    return title
