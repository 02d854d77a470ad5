"""A store's contents for other tools: an :mod:`xarray` Dataset, and the metrics as a table.

- :func:`xarray_dataset` (``Store.to_xarray()``): every group of the store merged into one
  Dataset with named dimensions, read lazily from the file (xarray's own backend arrays,
  through h5netcdf).
- :func:`export_metrics` (``qkvmean export STORE --metrics FILE``): one row per condition,
  input, layer and head, as CSV (the standard library's writer) or Parquet (pandas and
  fastparquet), written in blocks of inputs, so that a store of any size streams through
  a bounded amount of memory, into a temporary file renamed into place at the end.

Neither changes the store; both need optional extras (``qkvmean[xarray]``,
``qkvmean[parquet]``), imported only when used.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..engine.names import METRICS
from ..files import (
    InputError,
    check_new_file,
    put_in_place,
    sweep_temporaries,
)

#: Table formats, by extension.
FORMATS = (".csv", ".parquet")
#: The table's columns, in order: the row's keys, then the metrics.
KEYS = ("condition", "input", "length", "layer", "head")
COLUMNS = (*KEYS, *METRICS)
#: About this many rows per block (one read of each metric, one Parquet row group).
BLOCK_ROWS = 1 << 20
#: Rows turned into Python objects at once for the CSV writer (about 20 MB of them).
CSV_ROWS = 1 << 16


class MissingExtra(InputError, ImportError):
    """An optional dependency is not installed; the message names the extra that has it."""


def _require(modules, extra: str, what: str) -> list:
    """The modules named ``modules``, imported, or a :class:`MissingExtra`."""
    import importlib

    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError:
            raise MissingExtra(
                f"{what} needs {' and '.join(modules)} ({name} is not installed): "
                f"pip install 'qkvmean[{extra}]'"
            ) from None
    return loaded


# ------------------------------------------------------------------------------ xarray


def xarray_dataset(store):
    """``store`` (an open :class:`~qkvmean.store.Store`) as a lazy
    :class:`xarray.Dataset`: see :meth:`qkvmean.store.Store.to_xarray`."""
    xr, _ = _require(("xarray", "h5netcdf"), "xarray", "Store.to_xarray()")
    path = store.path
    opened = []

    def group(name):
        try:
            ds = xr.open_dataset(path, engine="h5netcdf", group=name)
        except OSError as exc:  # moved or deleted since the store was opened
            raise InputError(f"{path}: cannot open it for xarray ({exc})") from None
        opened.append(ds)
        return ds

    try:
        root = group(None)  # the dimension scales: batch, layer, head, query, key, seq
        pieces = [root, group("metrics")]
        inputs = group("input")
        pieces.append(inputs[[v for v in ("lengths", "text", "tokens") if v in inputs]])
        if store.has_maps:
            # one variable per condition: xr.concat into a condition axis would read them all
            maps = group("attention")
            pieces.append(maps.rename({c: f"attention_{c}" for c in store.conditions}))
        if store.has_means:
            means = group("means")
            names = {t: f"means_{t}" for t in store.mean_targets}
            renamed = means[[*names, "count"]].rename(
                {**names, "count": "means_count", "layer": "means_layer"}
            )
            for name in renamed.data_vars:
                renamed[name].attrs.update(means.attrs)  # taken_from, taken_at
            pieces.append(renamed)
        ds = xr.merge(pieces, join="exact", compat="no_conflicts", combine_attrs="drop")
    except BaseException:
        for part in opened:
            part.close()
        raise
    ds.attrs.update(store.attrs)

    def close():
        for part in opened:
            part.close()

    ds.set_close(close)
    return ds


# ------------------------------------------------------------------------------- tables


def check_output(path, overwrite=False, inputs=(), flag="--metrics") -> Path:
    """The table file ``path``, or an :class:`InputError` before any work: an unknown
    extension, an output that is one of ``inputs`` (the store), a directory, a device,
    an existing file without ``overwrite``; for Parquet, pandas or fastparquet missing."""
    path = Path(path)
    if not str(path) or str(path) == ".":
        raise InputError(f"{flag} is empty; give a file name ending in .csv or .parquet")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"{flag} {path}: unknown format {path.suffix or '(no extension)'!r}; "
            "use .csv or .parquet"
        )
    check_new_file(path, overwrite, inputs, flag=flag, noun="table")
    if suffix == ".parquet":
        _require(("pandas", "fastparquet"), "parquet", "writing .parquet")
    return path


def metric_blocks(store, block_rows=BLOCK_ROWS):
    """The table's rows in blocks of whole inputs (about ``block_rows`` rows each): dicts
    of column name → array (``condition``: one name for the whole block), in the store's
    order: condition, then input, layer, head. Metrics keep their dtypes (float32, int32)."""
    per_input = store.n_layers * store.n_heads
    step = max(1, block_rows // max(per_input, 1))
    layer = np.tile(np.repeat(np.asarray(store.layer_ids, np.int32), store.n_heads), step)
    head = np.tile(np.arange(store.n_heads, dtype=np.int32), store.n_layers * step)
    lengths = store.lengths.astype(np.int32)
    for condition in store.conditions:
        for start in range(0, store.n_inputs, step):
            stop = min(start + step, store.n_inputs)
            rows = (stop - start) * per_input
            block = {
                "condition": condition,
                "input": np.repeat(np.arange(start, stop, dtype=np.int32), per_input),
                "length": np.repeat(lengths[start:stop], per_input),
                "layer": layer[:rows],
                "head": head[:rows],
            }
            for name in METRICS:
                block[name] = store.metric_block(name, condition, start, stop).reshape(-1)
            yield block


def _write_csv(blocks, tmp: Path, progress):
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for block in blocks:
            n = len(block["input"])
            for lo in range(0, n, CSV_ROWS):  # (Python objects for CSV_ROWS rows at a time)
                part = slice(lo, min(lo + CSV_ROWS, n))
                columns = [
                    [block["condition"]] * (part.stop - lo),
                    *(block[k][part].tolist() for k in KEYS[1:]),
                    # float32 widened to float64: its repr reads back as the float32 exactly
                    *(block[m][part].astype(np.float64).tolist() for m in METRICS[:3]),
                    block[METRICS[3]][part].tolist(),
                ]
                writer.writerows(zip(*columns, strict=True))
            if progress is not None:
                progress(n)


def _write_parquet(blocks, tmp: Path, conditions, progress):
    pd, fastparquet = _require(("pandas", "fastparquet"), "parquet", "writing .parquet")

    def frame(block, n):
        return pd.DataFrame(
            {
                "condition": pd.Categorical([block["condition"]] * n, categories=conditions),
                **{k: block[k] for k in COLUMNS[1:]},
            }
        )

    first = True
    for block in blocks:
        n = len(block["input"])
        fastparquet.write(
            str(tmp), frame(block, n), append=not first, compression="SNAPPY", write_index=False
        )
        first = False
        if progress is not None:
            progress(n)
    if first:  # a store without inputs: the columns, no rows
        empty = {k: np.zeros(0, np.float32 if k in METRICS[:3] else np.int32) for k in COLUMNS}
        empty["condition"] = conditions[0]
        fastparquet.write(str(tmp), frame(empty, 0), compression="SNAPPY", write_index=False)


def export_metrics(store, path, *, overwrite=False, progress=None, block_rows=BLOCK_ROWS) -> int:
    """Write the metrics of ``store`` (an open Store) as a table at ``path``, ``.csv`` or
    ``.parquet`` by its extension; returns the number of rows.

    Columns :data:`COLUMNS`: ``condition``, ``input`` (from 0), ``length`` (its valid
    tokens), ``layer`` (the store's layer number, ``/layer``), ``head``, then ``entropy``,
    ``kl_from_baseline``, ``top_key_mass`` (float32; in CSV the float64 ``repr`` of each,
    which reads back as that float32 exactly) and ``top_key_index``; one row per
    condition, input, layer and head, in that order. The file appears whole or not at
    all (a temporary file beside it, renamed at the end); an existing file is replaced
    only with ``overwrite``. ``progress(rows)`` is called after each block.
    """
    path = check_output(path, overwrite, inputs=[store.path])
    sweep_temporaries(path)  # those of exports killed before they finished
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    blocks = metric_blocks(store, block_rows)
    try:
        if path.suffix.lower() == ".csv":
            _write_csv(blocks, tmp, progress)
        else:
            _write_parquet(blocks, tmp, store.conditions, progress)
        put_in_place(tmp, path, overwrite, flag="--metrics", noun="table")
    finally:
        tmp.unlink(missing_ok=True)
    return len(store.conditions) * store.n_inputs * store.n_layers * store.n_heads
