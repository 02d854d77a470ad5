"""``qkvmean figure``, the main job: run a model (the built-in demo by default), keep the
store beside the image and draw the figure from it."""

from __future__ import annotations

import argparse
import sys

from ..engine.names import OVER
from .common import UsageError, make_source, resolve_device
from .options import (
    add_ablate_layers,
    add_device,
    add_figure_options,
    add_heads,
    add_over,
    add_text,
)


def add_parser(sub):
    p = sub.add_parser(
        "figure",
        help="the main job: run the built-in demo and draw the figure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Run a model on texts (default: the built-in demo, all-MiniLM-L6-v2 if installed,
else the synthetic model, on three built-in sentences, substitution at layer 0),
keep the store next to the image (FIGURE.h5) and draw the figure from it.

By default the figure shows the layer and head where the Query, Key and Value
columns differ most (--layer auto --head auto), and a caption line under the
title says which: after a mean over the tokens of K or of V at layer L, every
later layer's maps are the same for both, so the default is usually layer L.""",
        epilog="""\
examples:
  qkvmean figure
  qkvmean figure -o fig.pdf --text texts.txt --ablate-layers 2 --diff --tokens
  qkvmean figure --model ./Llama-3.2-1B --over causal --layer last --head mean""",
    )
    p.add_argument(
        "-o",
        "--out",
        metavar="FILE",
        default="figure.png",
        help="the figure to write (.png, .pdf or .svg; default: figure.png)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="model directory, 'minilm' or 'synthetic' (default: minilm if "
        "installed, else synthetic)",
    )
    add_text(p, "texts (default: the built-in sentences)")
    add_ablate_layers(p, "layers")
    add_over(p, "(default: causal for a causal model, else tokens)")
    add_heads(p)
    add_device(p)
    add_figure_options(p)
    p.set_defaults(func=cmd_figure, qkv=None, max_tokens=None)


def cmd_figure(args) -> int:
    from .. import render
    from ..files import InputError, lexists, refuse_inputs
    from ..io.models import minilm_available
    from ..run import local
    from ..run.options import Options
    from ..store.workdir import partial_dir

    image = render.check_output(args.out, args.overwrite)
    store = image.with_suffix(".h5")
    if lexists(store) and not args.overwrite:
        raise UsageError(f"{store}: exists (the figure's store); pass --overwrite to replace it")
    if lexists(partial_dir(store)) and not args.overwrite:
        raise UsageError(
            f"{partial_dir(store)}: an interrupted qkvmean figure left this; run the same "
            "command with --overwrite to start again"
        )
    if args.title is not None:
        render.check_title(args.title)
    if args.baseline and args.diff:
        raise UsageError(
            "--baseline and --diff do not combine (the baseline's difference from itself is zero)"
        )
    if args.model is not None and not args.model.strip():
        raise UsageError("--model is empty; give a model directory, 'minilm' or 'synthetic'")
    device = resolve_device(args)
    options = Options(over=args.over or OVER[0], heads=args.heads)
    model = args.model or ("minilm" if minilm_available() else "synthetic")
    source = make_source(argparse.Namespace(**{**vars(args), "model": model}), options, False)
    try:
        refuse_inputs(image, source.paths, flag="--out")
        # check what the drawing will ask for before anything is computed or written
        n_layers, n_heads = source.n_layers, source.n_heads
        if isinstance(args.layer, int) and not -n_layers <= args.layer < n_layers:
            raise UsageError(
                f"--layer {args.layer}: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        if isinstance(args.head, int) and not -n_heads <= args.head < n_heads:
            raise UsageError(
                f"--head {args.head}: the model has {n_heads} heads (0..{n_heads - 1})"
            )
        if args.inputs is not None:
            bad = [i for i in args.inputs if not -source.n_inputs <= i < source.n_inputs]
            if not args.inputs or bad:
                raise UsageError(
                    f"--inputs: there are {source.n_inputs} texts (0..{source.n_inputs - 1})"
                    + (f"; there is no input {bad[0]}" if bad else "")
                )
        if args.over is None:  # a causal model gets the causal prefix mean by default
            options.over = "causal" if source.causal else "tokens"
        summary = local.run(
            source,
            store,
            options,
            overwrite=args.overwrite,
            show_progress=False if args.quiet else None,
            notes=lambda line: print(f"qkvmean figure: {line}", file=sys.stderr),
            device=device,
        )
    finally:
        source.close()
    try:
        fig = render.draw(
            summary.path,
            inputs=args.inputs,
            layer=args.layer,
            head=args.head,
            baseline=args.baseline,
            diff=args.diff,
            tokens=args.tokens,
            title=args.title,
            caption=args.caption,
        )
        render.save(fig, image, dpi=args.dpi, overwrite=args.overwrite)
    except InputError as exc:  # the run is done: say how to draw it without running again
        raise InputError(
            f"{exc}; the store {store} is kept: draw it with qkvmean render {store} -o {image}"
        ) from None
    if not args.quiet:
        name = {"minilm": "all-MiniLM-L6-v2 (minilm)", "synthetic": "the synthetic model"}
        texts = args.text or f"{source.n_inputs} built-in sentences"
        where = source.ablate_layers
        print(
            f"model:  {name.get(model, model)}; {texts}; mean over {options.over} at "
            f"layer{'s' if len(where) > 1 else ''} {','.join(map(str, where))}"
        )
        print(f"store:  {store}")
        shown = fig.qkvmean["choice"]
        head = "mean of the heads" if shown.head == "mean" else f"head {shown.head}"
        print(f"figure: {image} (layer {fig.qkvmean['layer_id']}, {head})")
    return 0
