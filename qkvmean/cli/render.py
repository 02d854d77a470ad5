"""``qkvmean render``: the figure of a store (or, with ``--metrics``, its KL heatmaps; with
``--sweep METRIC``, a sweep store's layer x head heatmaps of METRIC)."""

from __future__ import annotations

from .common import UsageError
from .options import add_figure_options


def add_parser(sub):
    p = sub.add_parser(
        "render",
        help="draw the Query/Key/Value mean figure from a store",
        description="Draw 'The Mean Operation For Query, Key and Value' from a store: one "
        "row per input, one column per substituted tensor (Query, Key, Value, those "
        "present), a shared colour bar, and a caption line saying what is shown. By default "
        "the layer and head where the columns differ most (--layer auto --head auto). With "
        "--metrics, the KL heatmaps of a plain run; with --sweep METRIC, the heatmaps of a "
        "sweep store (qkvmean run --sweep heads|layers). The format follows the extension: "
        ".png, .pdf, .svg.",
    )
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument(
        "-o",
        "--out",
        metavar="FILE",
        required=True,
        help="the figure to write (.png, .pdf or .svg)",
    )
    add_figure_options(p)
    p.add_argument(
        "--metrics",
        action="store_true",
        help="draw the metrics figure instead: per substituted tensor a layer x head "
        "heatmap of KL(baseline || condition), the mean over the inputs (--inputs picks "
        "them; default: every input with a token); also for --no-maps stores. --layer, "
        "--head, --baseline, --diff and --tokens do not apply",
    )
    p.add_argument(
        "--sweep",
        metavar="METRIC",
        default=None,
        help="draw a sweep store (qkvmean run --sweep heads|layers) by METRIC: per "
        "substituted tensor a layer x head heatmap (--sweep layers: one tensor x layer "
        "heatmap), each cell the mean over the inputs of METRIC for the condition that "
        "substitutes that head (layer) alone. METRIC: an effect on the output the store has "
        "(hidden_change, kl_next_token, ce_change, embedding_cosine) or an attention metric "
        "of the substituted head at its layer (entropy, kl_from_baseline, top_key_mass). "
        "--inputs picks the inputs averaged; --layer, --head, --baseline, --diff, --tokens "
        "and --metrics do not apply",
    )
    # (None: not given; --metrics and --sweep refuse them, the figure takes auto)
    p.set_defaults(func=cmd_render, layer=None, head=None)


def cmd_render(args) -> int:
    from .. import render

    if args.sweep is not None:
        return _render_sweep(args)
    if args.metrics:
        return _render_metrics(args)
    out = render.check_output(args.out, args.overwrite, inputs=[args.store])
    if args.title is not None:
        render.check_title(args.title)
    from ..render.choice import layer_by_number
    from ..store import open_store

    with open_store(args.store) as store:
        fig = render.draw(
            store,
            inputs=args.inputs,
            layer="auto" if args.layer is None else layer_by_number(store, args.layer),
            head="auto" if args.head is None else args.head,
            baseline=args.baseline,
            diff=args.diff,
            tokens=args.tokens,
            title=args.title,
            caption=args.caption,
        )
    render.save(fig, out, dpi=args.dpi, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _refuse_map_options(args, mode: str, why: str):
    """One line, exit 2, for an option of the maps' figure given to ``mode``."""
    given = {
        "--layer": args.layer is not None,
        "--head": args.head is not None,
        "--baseline": args.baseline,
        "--diff": args.diff,
        "--tokens": args.tokens,
    }
    for flag, used in given.items():
        if used:
            raise UsageError(f"{flag} does not apply with {mode} ({why}); drop one of them")


def _render_sweep(args) -> int:
    """``render --sweep METRIC``: a sweep store's heatmaps (qkvmean.render.sweep)."""
    from .. import render
    from ..render.sweep import draw_sweep

    if not args.sweep.strip():
        raise UsageError("--sweep is empty; give a metric, e.g. --sweep kl_next_token")
    if args.metrics:
        raise UsageError(
            "--metrics and --sweep do not combine (--metrics draws a plain run's KL heatmaps, "
            "--sweep a sweep's); drop one of them"
        )
    _refuse_map_options(args, "--sweep", "it draws one number per condition, no maps")
    out = render.check_output(args.out, args.overwrite, inputs=[args.store])
    if args.title is not None:
        render.check_title(args.title)
    fig = draw_sweep(
        args.store, args.sweep.strip(), inputs=args.inputs, title=args.title, caption=args.caption
    )
    render.save(fig, out, dpi=args.dpi, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _render_metrics(args) -> int:
    """``render --metrics``: the KL heatmaps (qkvmean.render.metrics)."""
    from .. import render
    from ..render.metrics import draw_metrics

    _refuse_map_options(args, "--metrics", "it draws every layer and head, KL from the baseline")
    out = render.check_output(args.out, args.overwrite, inputs=[args.store])
    if args.title is not None:
        render.check_title(args.title)
    fig = draw_metrics(args.store, inputs=args.inputs, title=args.title, caption=args.caption)
    render.save(fig, out, dpi=args.dpi, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {out}")
    return 0
