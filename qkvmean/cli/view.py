"""``qkvmean view``: the interactive HTML page of a store's maps."""

from __future__ import annotations

import argparse

from .options import comma_separated


def add_parser(sub):
    p = sub.add_parser(
        "view",
        help="write an interactive HTML page of a store's maps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write one self-contained HTML page (inline script and style; no network, no
server) that shows the figure's grid of a store and lets the reader choose
the inputs shown, the layer, the head or the mean over heads, the columns
(Query, Key, Value, the baseline) and a difference mode (condition minus
baseline, symmetric scale). Hovering a cell shows its query token, key token
and weight. Open it in any current browser (it needs DecompressionStream:
Chrome 80, Firefox 113, Safari 16.4 or later).

The page embeds the valid n x n maps of every condition, layer and head of
the chosen inputs (default: the first 12, or fewer where more would not fit),
quantised to --bits bits (default 12: steps of 1/4095, a weight shown within
0.00013 of the store's) and deflated. 12 inputs x 6 layers x 12 heads x 4
conditions at 64 tokens stay under 20 MB. Stores written with --no-maps hold
no maps and are refused.

A sweep store (qkvmean run --sweep heads|layers) gets the heatmaps of render
--sweep instead: per tensor a layer x head grid (--sweep layers: tensor x
layer), a selector of the metric (the store's effects on the output, and the
attention metrics of the substituted head), and the condition label and value
of a cell on hover (click to keep it); --inputs picks the inputs averaged
(default: every input with a token). It needs no maps.""",
        epilog="""\
examples:
  qkvmean view run1.h5 -o run1.html
  qkvmean view minilm.h5 -o minilm.html --inputs 0,4,7 --overwrite""",
    )
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument(
        "-o", "--out", metavar="PAGE.html", required=True, help="the page to write (.html)"
    )
    p.add_argument(
        "--inputs",
        type=comma_separated(int),
        default=None,
        metavar="I[,I...]",
        help="inputs to embed, counting from 0 (default: the first 12, or fewer); the "
        "page opens showing the first 3 of them (a sweep store: the inputs averaged, "
        "default every input with a token)",
    )
    p.add_argument(
        "--bits",
        type=int,
        default=12,
        metavar="N",
        help="precision of the embedded weights, 8..16 bits (default: 12)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing page")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_view)


def cmd_view(args) -> int:
    from ..render import view
    from ..store import open_store

    out = view.check_output(args.out, args.overwrite, inputs=[args.store])
    with open_store(args.store) as store:
        page = view.build_page(store, args.inputs, bits=args.bits)
        if page.kind == "sweep":
            shape = f"the --sweep {store.sweep} heatmaps of {len(store.conditions) - 1} conditions"
        else:
            layers = store.map_layer_ids
            kept = (
                f"{store.n_layers} layers"
                if layers == store.layer_ids
                else f"maps of layers {','.join(map(str, layers))}"
            )
            shape = f"{kept} x {store.n_heads} heads, {', '.join(store.conditions)}"
    view.save_page(page.html, out, overwrite=args.overwrite)
    if not args.quiet and page.kind == "sweep":
        n = len(page.inputs)
        print(
            f"wrote {out} ({page.bytes / 1e6:.1f} MB): {shape} by {', '.join(page.metrics)}; "
            f"mean over {n} of {page.total_inputs} inputs"
        )
    elif not args.quiet:
        chosen = view.input_spans(page.inputs)
        more = ""
        if page.limited:
            more = "; more would make the page too large (--inputs picks others)"
        elif len(page.inputs) < page.total_inputs:
            more = "; --inputs picks others"
        print(
            f"wrote {out} ({page.bytes / 1e6:.1f} MB): {len(page.inputs)} of "
            f"{page.total_inputs} inputs embedded ({chosen}{more}), {shape}; weights to "
            f"{page.bits} bits (within {view.max_error(page.bits):.2g})"
        )
    return 0
