"""The options several commands take: the argparse types of their values (lists,
numbers, 'a number or a word') and the option groups (``--device``, ``--text``, the
drawing options of ``render`` and ``figure``...)."""

from __future__ import annotations

import argparse

from ..engine.names import DEVICES


def comma_separated(kind):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if kind is int:
            try:
                return [int(t) for t in items]
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated integers, got {text!r}"
                ) from None
        return items

    return parse


def parse_heads(text):
    return None if text.strip().lower() == "all" else comma_separated(int)(text)


def parse_layers(text):
    return "all" if text.strip().lower() == "all" else comma_separated(int)(text)


def parse_maps_layers(text):
    """``--maps-layers``: layer numbers, ``all``, or ``none`` (an empty list)."""
    if text.strip().lower() == "none":
        return []
    layers = parse_layers(text)
    if not layers:
        raise argparse.ArgumentTypeError("--maps-layers is empty; give layers, 'all' or 'none'")
    return layers


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def number_or(noun, *words):
    """An argparse type: an integer, or one of ``words`` (any case)."""

    def parse(text):
        if text.strip().lower() in words:
            return text.strip().lower()
        try:
            return int(text)
        except ValueError:
            choices = " or ".join(repr(w) for w in words)
            raise argparse.ArgumentTypeError(
                f"expected a {noun} number, {choices}, got {text!r}"
            ) from None

    return parse


parse_head = number_or("head", "auto", "mean")


parse_layer = number_or("layer", "auto", "last")


def parse_dpi(text):
    value = positive_int(text)
    if not 10 <= value <= 1200:
        raise argparse.ArgumentTypeError(f"expected a resolution from 10 to 1200, got {text!r}")
    return value


def add_device(p):
    p.add_argument(
        "--device",
        choices=list(DEVICES),
        default="cpu",
        help="where to compute: cpu (all cores), cuda (a GPU: pip install "
        "'qkvmean[cuda]'), or auto (cuda when a GPU is usable, else cpu; says which). "
        "The store is the same either way (default: cpu)",
    )


def add_text(p, what):
    p.add_argument(
        "--text",
        metavar="FILE",
        default=None,
        help=f"{what}: one per line, or JSON Lines with a 'text' field (.jsonl)",
    )


def add_ablate_layers(p, what):
    p.add_argument(
        "--ablate-layers",
        type=parse_layers,
        default=None,
        metavar="L[,L...]|all",
        help=f"{what} where the substitution happens (default: 0)",
    )


def add_over(p, default):
    p.add_argument(
        "--over",
        default=None,
        metavar="KIND",
        help="what replaces Q, K or V: tokens (the mean over the valid tokens of the same "
        "input), causal (the prefix mean over t <= i), window:W (the mean over the last W "
        "tokens, causal), dataset (each position's mean over every input of the run, two "
        "passes, or of --mean-from's), zero, or resample[:SEED] (the same position of "
        f"another input of the run, drawn with SEED, default 0) {default}",
    )


def add_heads(p):
    p.add_argument(
        "--heads",
        type=parse_heads,
        default=None,
        help="heads to substitute, comma-separated, or 'all' (default: all)",
    )


def add_figure_options(p):
    """What to draw: the options ``render`` and ``figure`` share."""
    p.add_argument(
        "--inputs",
        type=comma_separated(int),
        default=None,
        metavar="I[,I...]",
        help="inputs to draw, counting from 0, negative from the end (write --inputs=-1,0: "
        "a value may not start with '-' after a space) (default: the first 3)",
    )
    p.add_argument(
        "--layer",
        type=parse_layer,
        default="auto",
        metavar="auto|last|N",
        help="layer to draw: its number, as the store's /layer holds it (negative counts "
        "from the last); auto: with --head auto, where the columns differ most, at or after "
        "the first substituted layer (default: auto)",
    )
    p.add_argument(
        "--head",
        type=parse_head,
        default="auto",
        metavar="auto|mean|N",
        help="head to draw, 'mean' for the mean over heads, or auto: the head (or mean) "
        "where the columns differ most (default: auto)",
    )
    p.add_argument("--baseline", action="store_true", help="add a baseline column")
    p.add_argument(
        "--diff",
        action="store_true",
        help="draw condition minus baseline on a symmetric diverging scale",
    )
    p.add_argument(
        "--tokens",
        action="store_true",
        help="label the axes with the tokens (stores of --model runs)",
    )
    p.add_argument("--title", default=None, help="replace the overall title")
    p.add_argument(
        "--no-caption",
        dest="caption",
        action="store_false",
        help="no caption line (model, substitution, layer and head shown) under the title",
    )
    p.add_argument(
        "--dpi", type=parse_dpi, default=150, help="PNG resolution, 10..1200 (default: 150)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
