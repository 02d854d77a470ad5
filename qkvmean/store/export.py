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
import json
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
#: The table's columns, in order: the row's keys, then the metrics (every store's; then
#: :func:`columns` adds a sweep's condition fields and the store's effects).
KEYS = ("condition", "input", "length", "layer", "head")
COLUMNS = (*KEYS, *METRICS)
#: The condition fields of a sweep store's table: the tensor, the layer and (``--sweep
#: heads``) the head that each condition substitutes; "" and -1 for the baseline.
SWEEP_COLUMNS = {"heads": ("target", "substituted_layer", "substituted_head"),
                 "layers": ("target", "substituted_layer")}  # fmt: skip


def columns(store) -> tuple:
    """The columns of ``store``'s table: :data:`COLUMNS`, then (a sweep store) its
    condition fields :data:`SWEEP_COLUMNS`, then its effects (one value per condition
    and input, repeated on each layer and head)."""
    return (*COLUMNS, *SWEEP_COLUMNS.get(store.sweep, ()), *store.effects)


def _condition_fields(store) -> dict:
    """``{column: per-condition values}`` of a sweep store's condition fields."""
    names = SWEEP_COLUMNS.get(store.sweep, ())
    if not names:
        return {}
    table = store.condition_table
    out = {
        "target": [row["target"] or "" for row in table],
        "substituted_layer": np.asarray(
            [row["layers"][0] if len(row["layers"]) == 1 else -1 for row in table], np.int32
        ),
    }
    if "substituted_head" in names:
        out["substituted_head"] = np.asarray(
            [row["heads"][0] if isinstance(row["heads"], list) and len(row["heads"]) == 1
             else -1 for row in table], np.int32,
        )  # fmt: skip
    return out


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
            if "layer" in maps.dims:  # version 1: the maps' layer axis is /layer itself
                maps = maps.rename_dims({"layer": "map_layer"})
            maps = maps.assign_coords(map_layer=("map_layer", list(store.map_layer_ids)))
            pieces.append(maps.rename({c: f"attention_{c}" for c in store.conditions}))
        if store.effects:  # (small, and on a scale in another group: read here)
            pieces.append(
                xr.Dataset(
                    {
                        f"effect_{name}": (("condition", "batch"), store.effect(name))
                        for name in store.effects
                    },
                    coords={"condition": list(store.conditions)},
                )
            )
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
        ds = ds.assign_coords(condition_coords(store))
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


def condition_coords(store) -> dict:
    """The condition table as coordinates on the ``condition`` dimension:
    ``condition_target`` (q, k, v; "" for the baseline), ``condition_layers`` and
    ``condition_heads`` (as the table stores them: JSON lists of layer numbers and heads,
    ``all`` for every head) and ``condition_substitution`` (``tokens``, ``window:8``...)."""
    table = store.condition_table

    def spelled(value):
        return value if isinstance(value, str) else json.dumps(list(value))

    return {
        "condition_target": ("condition", [row["target"] or "" for row in table]),
        "condition_layers": ("condition", [spelled(row["layers"]) for row in table]),
        "condition_heads": ("condition", [spelled(row["heads"]) for row in table]),
        "condition_substitution": ("condition", [row["substitution"] or "" for row in table]),
    }


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
    fields = _condition_fields(store)
    effects = {name: store.effect(name) for name in store.effects}
    for c, condition in enumerate(store.conditions):
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
            for name, values in fields.items():
                block[name] = values[c] if name == "target" else np.full(rows, values[c], np.int32)
            for name, values in effects.items():
                block[name] = np.repeat(values[c, start:stop], per_input)
            yield block


def _csv_column(value, part: slice) -> list:
    """One column of a block's rows ``part`` as Python objects: a string repeated (the
    condition, its target), ints, or float32 widened to float64, whose repr reads back
    as the float32 exactly."""
    if isinstance(value, str):
        return [value] * (part.stop - part.start)
    values = value[part]
    if values.dtype.kind == "f":
        values = values.astype(np.float64)
    return values.tolist()


def _write_csv(blocks, tmp: Path, names, progress):
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for block in blocks:
            n = len(block["input"])
            for lo in range(0, n, CSV_ROWS):  # (Python objects for CSV_ROWS rows at a time)
                part = slice(lo, min(lo + CSV_ROWS, n))
                columns = [_csv_column(block[name], part) for name in names]
                writer.writerows(zip(*columns, strict=True))
            if progress is not None:
                progress(n)


def _write_parquet(blocks, tmp: Path, conditions, names, progress):
    pd, fastparquet = _require(("pandas", "fastparquet"), "parquet", "writing .parquet")
    targets = ["", "q", "k", "v"]

    def frame(block, n):
        data = {"condition": pd.Categorical([block["condition"]] * n, categories=conditions)}
        for k in names[1:]:
            value = block[k]
            data[k] = pd.Categorical([value] * n, categories=targets) if k == "target" else value
        return pd.DataFrame(data)

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
        floats = (*METRICS[:3], *names[len(COLUMNS) :])
        empty = {k: np.zeros(0, np.float32 if k in floats else np.int32) for k in names}
        empty["condition"] = conditions[0]
        if "target" in empty:
            empty["target"] = ""
            for k in ("substituted_layer", "substituted_head"):
                if k in empty:
                    empty[k] = np.zeros(0, np.int32)
        fastparquet.write(str(tmp), frame(empty, 0), compression="SNAPPY", write_index=False)


def export_metrics(store, path, *, overwrite=False, progress=None, block_rows=BLOCK_ROWS) -> int:
    """Write the metrics of ``store`` (an open Store) as a table at ``path``, ``.csv`` or
    ``.parquet`` by its extension; returns the number of rows.

    Columns (:func:`columns`): :data:`COLUMNS`, ``condition``, ``input`` (from 0),
    ``length`` (its valid tokens), ``layer`` (the store's layer number, ``/layer``),
    ``head``, then ``entropy``, ``kl_from_baseline``, ``top_key_mass`` (float32; in CSV
    the float64 ``repr`` of each, which reads back as that float32 exactly) and
    ``top_key_index``; in a sweep store's table then ``target``, ``substituted_layer``
    (and ``substituted_head``, ``--sweep heads``), what the row's condition substitutes;
    then the store's effects (float32, one value per condition and input, the same on
    each of its layer and head rows). One row per condition, input, layer and head, in
    that order. The file appears whole or not at
    all (a temporary file beside it, renamed at the end); an existing file is replaced
    only with ``overwrite``. ``progress(rows)`` is called after each block.
    """
    path = check_output(path, overwrite, inputs=[store.path])
    sweep_temporaries(path)  # those of exports killed before they finished
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    blocks = metric_blocks(store, block_rows)
    try:
        names = columns(store)
        if path.suffix.lower() == ".csv":
            _write_csv(blocks, tmp, names, progress)
        else:
            _write_parquet(blocks, tmp, store.conditions, names, progress)
        put_in_place(tmp, path, overwrite, flag="--metrics", noun="table")
    finally:
        tmp.unlink(missing_ok=True)
    return len(store.conditions) * store.n_inputs * store.n_layers * store.n_heads
