"""``qkvmean capture``: a model's Q, K and V of every layer, in the exchange format."""

from __future__ import annotations

import sys

from .common import UsageError, make_source, resolve_device
from .options import add_device, positive_int


def add_parser(sub):
    p = sub.add_parser(
        "capture",
        help="write a model's Q, K and V of every layer to an HDF5 file (the --qkv format)",
        description="Run the model's baseline pass on the texts and write Q, K and V of every "
        "layer (keys and values per KV head) in the Q/K/V exchange format of docs/store.md, "
        "with lengths, tokens and texts, for other tools or for qkvmean run --qkv.",
    )
    p.add_argument(
        "--model",
        metavar="MODEL",
        default=None,
        help="a Hugging Face-format directory, 'minilm' or 'synthetic' (default: minilm if "
        "installed, else synthetic)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        default=None,
        help="texts: one per line, or JSON Lines with a 'text' field (default: the built-in "
        "sentences)",
    )
    p.add_argument("--out", "-o", metavar="QKV.h5", required=True, help="the file to write")
    p.add_argument(
        "--at",
        choices=["projection", "attention"],
        default="projection",
        help="projection: the projection output, where qkvmean substitutes (before any q/k "
        "norm and rotary embedding); attention: after them, what the dot products see, so "
        "that run --qkv on the file gives the model's maps for rotary models too (default: "
        "projection)",
    )
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, metavar="N",
        help="cut longer inputs to N tokens (default: the model's positions)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=positive_int, default=None, metavar="N",
        help="inputs per batch (default: about 64 MB of Q/K/V)",
    )  # fmt: skip
    add_device(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=cmd_capture, qkv=None, ablate_layers=None)


def cmd_capture(args) -> int:
    from ..run import capture, local
    from ..run.options import Options

    if not args.out:
        raise UsageError("--out is empty; give a file name for the Q/K/V file")
    device = resolve_device(args)
    source = make_source(args, Options())
    bar = local.progress_bar(source.n_inputs, 0, not args.quiet and sys.stderr.isatty(), "capture")
    try:
        path, n, seconds = capture.capture(
            source, args.out, at=args.at, batch_size=args.batch_size, device=device,
            overwrite=args.overwrite, progress=None if bar is None else bar.update,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        w = source.model.weights
        print(
            f"wrote {path} ({n} inputs, {w.n_layers} layers, {w.n_heads} heads, Q/K/V at the "
            f"{args.at}) in {seconds:.1f} s; use it with: qkvmean run --qkv {path}"
        )
    return 0
