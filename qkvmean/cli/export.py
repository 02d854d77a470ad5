"""``qkvmean export``: a store's metrics as one CSV or Parquet table."""

from __future__ import annotations

import argparse
import sys

from .common import UsageError


def add_parser(sub):
    p = sub.add_parser(
        "export",
        help="write a store's metrics as a table (CSV or Parquet)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write the metrics of a store as one table: a row per condition, input, layer and
head, in that order, with the columns

  condition         baseline, mean_q, mean_k, mean_v, ... (the store's labels)
  input             the input's number, from 0
  length            its valid tokens
  layer             the store's layer number (/layer)
  head              the head, from 0
  entropy           mean over valid query rows of -sum a log a (nats)
  kl_from_baseline  mean over valid rows of KL(baseline || condition) (nats)
  top_key_mass      the largest column mean over valid rows
  top_key_index     the key column that has it (-1: an input without tokens)

then, in the table of a sweep store (qkvmean run --sweep heads|layers), what the
row's condition substitutes ("" and -1 for the baseline):

  target            q, k or v
  substituted_layer the layer number it substitutes at
  substituted_head  the head it substitutes (--sweep heads)

then the store's effects on the output, one value per condition and input (the
same on each of its layer and head rows), those the store has:

  hidden_change     relative L2 change of the final hidden state
  kl_next_token     mean KL(baseline || condition) of the next-token distribution
  ce_change         change in the mean next-token cross-entropy (nats)
  embedding_cosine  cosine of the mean-pooled embedding to the baseline's

The texts are not repeated in every row: they are in the store (/input/text; in
Python, store.texts or store.to_xarray()), to join on input.

The extension picks the format: .csv (UTF-8, a header line; each float32 value
written as the float64 repr, which reads back as that float32 exactly) or
.parquet (pandas and fastparquet: pip install 'qkvmean[parquet]'; float32 and
int32 columns, one row group per block of about a million rows). Written in
blocks of inputs into a temporary file beside FILE, renamed onto it when done.""",
        epilog="""\
examples:
  qkvmean export run1.h5 --metrics run1.csv
  qkvmean export run1.h5 --metrics run1.parquet --overwrite""",
    )
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument(
        "--metrics",
        metavar="FILE.csv|FILE.parquet",
        required=True,
        help="the table to write; its extension picks the format",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..store import open_store
    from ..store.export import check_output, export_metrics

    if not args.metrics:
        raise UsageError("--metrics is empty; give a file name ending in .csv or .parquet")
    out = check_output(args.metrics, args.overwrite, inputs=[args.store])
    with open_store(args.store) as store:
        total = len(store.conditions) * store.n_inputs * store.n_layers * store.n_heads
        bar = None
        if not args.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, unit=" rows", unit_scale=True, desc="export", leave=False)
        try:
            rows = export_metrics(
                store, out, overwrite=args.overwrite, progress=None if bar is None else bar.update
            )
        finally:
            if bar is not None:
                bar.close()
        shape = (
            f"{len(store.conditions)} conditions x {store.n_inputs} inputs x "
            f"{store.n_layers} layers x {store.n_heads} heads"
        )
    if not args.quiet:
        print(f"wrote {out}: {rows} rows ({shape})")
    return 0
