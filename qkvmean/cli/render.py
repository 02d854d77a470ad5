"""``qkvmean render``: the figure of a store (or, with ``--metrics``, its KL heatmaps)."""

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
        "the layer and head where the columns differ most (--layer auto --head auto). The "
        "format follows the extension: .png, .pdf, .svg.",
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
    # (None: not given; --metrics refuses them, the figure takes auto)
    p.set_defaults(func=cmd_render, layer=None, head=None)


def cmd_render(args) -> int:
    from .. import render

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


def _render_metrics(args) -> int:
    """``render --metrics``: the KL heatmaps (qkvmean.render.metrics)."""
    from .. import render
    from ..render.metrics import draw_metrics

    given = {
        "--layer": args.layer is not None,
        "--head": args.head is not None,
        "--baseline": args.baseline,
        "--diff": args.diff,
        "--tokens": args.tokens,
    }
    for flag, used in given.items():
        if used:
            raise UsageError(
                f"{flag} does not apply with --metrics (it draws every layer and head, KL "
                "from the baseline); drop one of them"
            )
    out = render.check_output(args.out, args.overwrite, inputs=[args.store])
    if args.title is not None:
        render.check_title(args.title)
    fig = draw_metrics(args.store, inputs=args.inputs, title=args.title, caption=args.caption)
    render.save(fig, out, dpi=args.dpi, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {out}")
    return 0
