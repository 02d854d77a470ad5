"""The qkvmean HDF5 store: schema (version 1), crash-safe writing, and the reader.

Schema: ``docs/store.md``. Writing is crash-safe by construction:

- a run writes each batch of inputs to its own *part file* in ``STORE.h5.partial/``
  (written under a temporary name, then renamed: a part either exists whole or not at
  all), next to a ``manifest.json`` with the run's configuration;
- as the parts are written, their compressed chunks also go, verbatim, into the store
  being assembled at ``STORE.h5.<pid>.tmp`` (:class:`Assembly`); when every input is in,
  it is fsynced and renamed onto ``STORE.h5`` atomically; only then is the partial
  directory removed. A resumed run rebuilds the assembly from the parts.

So the final path never holds a half-written store, a kill at any moment loses at most
the batches in flight, and a resumed run assembles exactly the bytes an uninterrupted run
would have.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from numba import njit, prange

from . import InputError

FORMAT = "qkvmean-store"
FORMAT_VERSION = 1
METRIC_NAMES = ("entropy", "kl_from_baseline", "top_key_mass")
CONDITION_ORDER = ("baseline", "mean_q", "mean_k", "mean_v")

#: Maps smaller than this are chunked a few heads together, so that small maps do not
#: each pay for a chunk index entry, an HDF5 call and a compression call (at 128 tokens,
#: float32, four maps to a chunk; from 256 tokens, one).
MIN_CHUNK_BYTES = 256 * 1024

_STR = h5py.string_dtype("utf-8")


# ------------------------------------------------------------------------ compression


def parse_compression(spec: str) -> dict:
    """``deflate[:level]`` (default, level 1, with shuffle), ``gzip[:level]``, ``lzf``, ``none``.

    Returns the h5py ``create_dataset`` keywords.
    """
    name, _, level = str(spec).strip().lower().partition(":")
    if name in ("deflate", "gzip"):
        try:
            level = int(level) if level else 1
        except ValueError:
            level = -1
        if not 0 <= level <= 9:
            raise InputError(f"compression level must be 0..9, got {spec!r} (e.g. deflate:4)")
        return {"compression": "gzip", "compression_opts": level, "shuffle": True}
    if name == "lzf" and not level:
        return {"compression": "lzf", "shuffle": True}
    if name == "none" and not level:
        return {}
    raise InputError(f"unknown compression {spec!r}; use deflate[:0-9], lzf or none")


def canonical_compression(spec: str) -> str:
    """One spelling per setting: ``deflate:L``, ``lzf`` or ``none``."""
    filters = parse_compression(spec)
    if filters.get("compression") == "gzip":
        return f"deflate:{filters['compression_opts']}"
    return filters.get("compression") or "none"


# ----------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Everything that fixes the datasets of a store (and of its parts)."""

    n_inputs: int
    n_layers: int
    n_heads: int
    seq: int
    conditions: list
    map_dtype: str = "float32"
    compression: str = "deflate"
    maps: bool = True
    layer_ids: list = field(default_factory=list)  # layer numbers for the layer scale

    def __post_init__(self):
        if not self.layer_ids:
            self.layer_ids = list(range(self.n_layers))

    def map_chunks(self):
        per_map = max(self.seq, 1) ** 2 * np.dtype(self.map_dtype).itemsize
        heads = min(self.n_heads, max(1, math.ceil(MIN_CHUNK_BYTES / per_map)))
        return (1, 1, max(heads, 1), max(self.seq, 1), max(self.seq, 1))

    def create_datasets(self, f: h5py.File, n_inputs: int):
        """The map and metric datasets for ``n_inputs`` inputs (a part or the store)."""
        filters = parse_compression(self.compression)
        if self.maps:
            group = f.require_group("attention")
            for cond in self.conditions:
                group.create_dataset(
                    cond,
                    shape=(n_inputs, self.n_layers, self.n_heads, self.seq, self.seq),
                    dtype=self.map_dtype,
                    chunks=self.map_chunks() if n_inputs else None,
                    **(filters if n_inputs else {}),
                )
        group = f.require_group("metrics")
        shape = (len(self.conditions), n_inputs, self.n_layers, self.n_heads)
        for name in METRIC_NAMES:
            group.create_dataset(name, shape=shape, dtype="float32")
        group.create_dataset("top_key_index", shape=shape, dtype="int32")


# ------------------------------------------------------------------------ part files


def fsync_path(path: Path, directory: bool = False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_name(start: int, stop: int) -> str:
    return f"part-{start:010d}-{stop:010d}.h5"


try:  # ISA-L's deflate: the same zlib stream, about 4x faster than zlib at level 1
    from isal.isal_zlib import compress as _deflate

    _DEFLATE_LEVELS = range(0, 4)  # ISA-L has levels 0..3; zlib covers the rest
except ImportError:  # pragma: no cover - isal is a dependency where wheels exist
    _deflate, _DEFLATE_LEVELS = zlib.compress, range(0, 10)


def _compress(raw: bytes, level: int) -> bytes:
    if level in _DEFLATE_LEVELS:
        return _deflate(raw, level)
    return zlib.compress(raw, level)


@njit(parallel=True, cache=True, nogil=True)
def _shuffle_kernel(blocks, out):
    """HDF5's shuffle filter on every row of ``blocks`` ``(chunks, elements, itemsize)``:
    ``out[c, b, e] = blocks[c, e, b]`` (all first bytes, then all second bytes, ...)."""
    n_chunks, n_elems, size = blocks.shape
    for c in prange(n_chunks):
        for b in range(size):
            for e in range(n_elems):
                out[c, b, e] = blocks[c, e, b]


def _encode_maps(arr, chunks, filters, pool):
    """Every chunk of a ``(n, layer, head, seq, seq)`` batch, shuffled and deflated.

    The chunks ``(1, 1, h, seq, seq)`` are contiguous in the array (after padding the head
    axis to a multiple of ``h`` with zeros, as HDF5 pads edge chunks), so the shuffle runs
    once over the whole batch in parallel and the compression of each chunk on ``pool``.
    Returns ``[(chunk offset, bytes), ...]``.
    """
    n, layers, heads, seq, _ = arr.shape
    per = chunks[2]
    groups = -(-heads // per)
    if groups * per != heads:
        padded = np.zeros((n, layers, groups * per, seq, seq), dtype=arr.dtype)
        padded[:, :, :heads] = arr
        arr = padded
    blocks = np.ascontiguousarray(arr).reshape(n * layers * groups, per * seq * seq)
    if filters.get("shuffle") and blocks.dtype.itemsize > 1:
        raw = blocks.view(np.uint8).reshape(blocks.shape[0], blocks.shape[1], -1)
        shuffled = np.empty((raw.shape[0], raw.shape[2], raw.shape[1]), dtype=np.uint8)
        _shuffle_kernel(raw, shuffled)
        blocks = shuffled.reshape(blocks.shape[0], -1)
    else:
        blocks = blocks.view(np.uint8).reshape(blocks.shape[0], -1)
    if filters.get("compression") == "gzip":
        level = filters["compression_opts"]
        data = list(pool.map(lambda row: _compress(row, level), blocks))
    else:
        data = [row.tobytes() for row in blocks]
    offsets = [
        (c // (layers * groups), (c // groups) % layers, (c % groups) * per, 0, 0)
        for c in range(len(data))
    ]
    return list(zip(offsets, data, strict=True))


def _encodable(filters) -> bool:
    """Filters whose output we produce ourselves (in parallel, outside HDF5's lock)."""
    return filters.get("compression") in (None, "gzip")


def write_part(directory: Path, layout: Layout, start: int, stop: int, maps, metrics, pool=None):
    """Write inputs ``start:stop`` as one part file, atomically (a temporary name, renamed).

    ``maps[condition]``: ``(n, layer, head, seq, seq)``; ``metrics[name]``:
    ``(condition, n, layer, head)``. With a thread ``pool``, deflate and shuffle run on
    its threads (zlib releases the GIL) and the chunks are written as they are. Returns
    the part's path and, when they were encoded here, its chunks
    (``{condition: [(offset, bytes), ...]}``), else None.
    """
    final = directory / part_name(start, stop)
    tmp = final.with_suffix(".h5.tmp")
    filters = parse_compression(layout.compression)
    encoded = {}
    with h5py.File(tmp, "w") as f:
        f.attrs["start"] = start
        f.attrs["stop"] = stop
        layout.create_datasets(f, stop - start)
        if layout.maps:
            for cond in layout.conditions:
                dset = f["attention"][cond]
                if pool is None or not _encodable(filters) or dset.chunks is None:
                    dset[...] = maps[cond]
                    continue
                # a map that is another condition's (mean-V of raw Q/K/V is the baseline,
                # the same array) is encoded once
                same = [c for c in encoded if maps[c] is maps[cond]]
                if same:
                    encoded[cond] = encoded[same[0]]
                else:
                    encoded[cond] = _encode_maps(maps[cond], dset.chunks, filters, pool)
                for offset, chunk in encoded[cond]:
                    dset.id.write_direct_chunk(offset, chunk, 0)
        for name in (*METRIC_NAMES, "top_key_index"):
            f["metrics"][name][...] = metrics[name]
    # No fsync here: the rename is atomic against a killed process (the page cache keeps
    # what was written); against an OS crash, --resume checks every part it reuses
    # (part_is_whole) and the store itself is fsynced before its own rename.
    os.replace(tmp, final)
    return final, (encoded if len(encoded) == len(layout.conditions) else None)


def part_is_whole(path: Path, layout: Layout, start: int, stop: int) -> bool:
    """Does the part open, cover ``start:stop`` and hold every dataset at its shape?"""
    try:
        with h5py.File(path, "r") as f:
            if (int(f.attrs["start"]), int(f.attrs["stop"])) != (start, stop):
                return False
            shape = (len(layout.conditions), stop - start, layout.n_layers, layout.n_heads)
            if any(f["metrics"][m].shape != shape for m in (*METRIC_NAMES, "top_key_index")):
                return False
            if layout.maps:
                maps = (stop - start, layout.n_layers, layout.n_heads, layout.seq, layout.seq)
                return all(f["attention"][c].shape == maps for c in layout.conditions)
            return True
    except (OSError, KeyError, ValueError, RuntimeError):
        return False


def completed_parts(directory: Path) -> dict:
    """``{(start, stop): path}`` of the part files that were renamed into place."""
    done = {}
    for path in directory.glob("part-*-*.h5"):
        try:
            _, start, stop = path.stem.split("-")
            done[(int(start), int(stop))] = path
        except ValueError:
            continue
    return done


def _copy_chunks(src: h5py.Dataset, dst: h5py.Dataset, offset: int):
    """Copy every stored chunk of ``src`` into ``dst`` at ``offset`` inputs, compressed."""
    sid, did = src.id, dst.id
    for i in range(sid.get_num_chunks()):
        info = sid.get_chunk_info(i)
        mask, data = sid.read_direct_chunk(info.chunk_offset)
        did.write_direct_chunk((info.chunk_offset[0] + offset, *info.chunk_offset[1:]), data, mask)


def _dimension_scales(f: h5py.File, layout: Layout):
    scales = {
        "batch": np.arange(layout.n_inputs, dtype=np.int32),
        "layer": np.asarray(layout.layer_ids, dtype=np.int32),
        "head": np.arange(layout.n_heads, dtype=np.int32),
        "query": np.arange(layout.seq, dtype=np.int32),
        "key": np.arange(layout.seq, dtype=np.int32),
        "seq": np.arange(layout.seq, dtype=np.int32),
    }
    for name, values in scales.items():
        f.create_dataset(name, data=values).make_scale(name)
    cond = f["metrics"].create_dataset("condition", data=np.array(layout.conditions, dtype=_STR))
    cond.make_scale("condition")


def _attach(dset: h5py.Dataset, f: h5py.File, names):
    for axis, name in enumerate(names):
        scale = f["metrics/condition"] if name == "condition" else f[name]
        dset.dims[axis].attach_scale(scale)


class Assembly:
    """The final store, filled part by part as the parts are written.

    It lives at ``STORE.h5.<pid>.tmp`` until :meth:`finish` checks that every input is in
    and renames it onto ``STORE.h5``; a kill leaves only the temporary file, which the next
    ``--resume`` deletes and rebuilds from the parts (the parts, not this file, are what a
    kill cannot damage). Filling it while the next batches compute keeps the assembly off
    the end of the run.
    """

    def __init__(self, out: Path, layout: Layout, attrs: dict, inputs: dict):
        self.out = out
        self.layout = layout
        self.tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        self.filled = []
        self.f = h5py.File(self.tmp, "w")
        self.fd = self.f.id.get_vfd_handle()
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkvmean-sync")
        self._syncing = None
        try:
            self._skeleton(attrs, inputs)
        except Exception:
            self.abort()
            raise

    def _skeleton(self, attrs, inputs):
        f, layout = self.f, self.layout
        for key, value in attrs.items():
            f.attrs[key] = value
        layout.create_datasets(f, layout.n_inputs)
        _dimension_scales(f, layout)
        group = f.create_group("input")
        lengths = group.create_dataset("lengths", data=np.asarray(inputs["lengths"], np.int32))
        _attach(lengths, f, ["batch"])
        if "text" in inputs:
            text = group.create_dataset("text", data=np.array(inputs["text"], dtype=_STR))
            _attach(text, f, ["batch"])
            tokens = np.array(inputs["tokens"], dtype=_STR).reshape(layout.n_inputs, layout.seq)
            _attach(group.create_dataset("tokens", data=tokens), f, ["batch", "seq"])
        for name in (*METRIC_NAMES, "top_key_index"):
            _attach(f["metrics"][name], f, ["condition", "batch", "layer", "head"])
        if layout.maps:
            for cond in layout.conditions:
                _attach(f["attention"][cond], f, ["batch", "layer", "head", "query", "key"])

    def add(self, start, stop, part: Path, encoded=None, metrics=None):
        """Put inputs ``start:stop`` in: the chunks ``write_part`` encoded, or the part's."""
        f = self.f
        if encoded is not None and metrics is not None:
            for cond, chunks in encoded.items():
                did = f["attention"][cond].id
                for offset, data in chunks:
                    did.write_direct_chunk((offset[0] + start, *offset[1:]), data, 0)
            for name in (*METRIC_NAMES, "top_key_index"):
                f["metrics"][name][:, start:stop] = metrics[name]
        else:
            with h5py.File(part, "r") as src:
                if self.layout.maps:
                    for cond in self.layout.conditions:
                        _copy_chunks(src["attention"][cond], f["attention"][cond], start)
                for name in (*METRIC_NAMES, "top_key_index"):
                    f["metrics"][name][:, start:stop] = src["metrics"][name][...]
        self.filled.append((start, stop))
        self._writeback()

    def _writeback(self):
        """Start writing what is done to disk now, on a thread of its own, so that the
        fsync in :meth:`finish` has little left to do (it ran for seconds at the end of a
        large run otherwise)."""
        if self._syncing is not None and not self._syncing.done():
            return  # the previous one is still running: it will be followed by the next
        self._syncing = self._syncer.submit(os.fdatasync, self.fd)

    def finish(self) -> Path:
        """Check that every input is in; fsync; rename onto the store's path."""
        expected = 0
        for start, stop in sorted(self.filled):
            if start != expected:
                raise RuntimeError(f"{self.out}: inputs {expected}..{start} are missing")
            expected = stop
        if expected != self.layout.n_inputs:
            raise RuntimeError(f"{self.out}: inputs stop at {expected} of {self.layout.n_inputs}")
        self._syncer.shutdown(wait=True)
        self.f.close()
        fsync_path(self.tmp)
        os.replace(self.tmp, self.out)
        fsync_path(self.out.parent, directory=True)
        return self.out

    def abort(self):
        """Close and delete the temporary file (the parts stay)."""
        try:
            self._syncer.shutdown(wait=True)
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reader


class Store:
    """A qkvmean store opened for reading. Use :func:`open_store`.

    Attributes
    ----------
    path : Path
    attrs : dict
        The root attributes.
    config : dict
        The run configuration (the ``config`` attribute, parsed).
    conditions : list of str
        ``baseline``, ``mean_q``, … in the order of the metrics' first axis.
    n_inputs, n_layers, n_heads, seq : int
    lengths : ndarray of int
        Valid tokens per input.
    has_maps : bool
        False for a store written with ``--no-maps`` (metrics only).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a store")
        if not h5py.is_hdf5(self.path):
            raise InputError(f"{self.path}: not an HDF5 file (a qkvmean store is HDF5)")
        self._f = h5py.File(self.path, "r")
        try:
            self._check_format()
            self.attrs = {k: _plain(v) for k, v in self._f.attrs.items()}
            self.config = json.loads(self.attrs.get("config", "{}"))
            self.conditions = [
                s.decode() if isinstance(s, bytes) else str(s)
                for s in self._f["metrics/condition"][...]
            ]
            self.lengths = self._f["input/lengths"][...].astype(np.int64)
            shape = self._f["metrics/entropy"].shape
            self.n_inputs, self.n_layers, self.n_heads = shape[1:]
            self.seq = len(self._f["seq"])
            self.layer_ids = [int(x) for x in self._f["layer"][...]]
            self.has_maps = "attention" in self._f
        except Exception:
            self._f.close()
            raise

    def _check_format(self):
        fmt = self._f.attrs.get("format")
        if fmt != FORMAT:
            raise InputError(f"{self.path}: not a qkvmean store (no format = {FORMAT!r} attribute)")
        version = int(self._f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            from .._version import __version__

            raise InputError(
                f"{self.path}: store format_version {version} is not one this qkvmean "
                f"({__version__}) reads (version {FORMAT_VERSION}); use a matching qkvmean"
            )

    # -- context manager
    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (
            f"<qkvmean Store {self.path.name}: {self.n_inputs} inputs, {self.n_layers} "
            f"layers, {self.n_heads} heads, seq {self.seq}, {', '.join(self.conditions)}>"
        )

    # -- inputs
    @property
    def source(self) -> str:
        return str(self.attrs.get("source", ""))

    @property
    def texts(self):
        """The input texts (model stores), else None."""
        if "input/text" not in self._f:
            return None
        return [s.decode() if isinstance(s, bytes) else s for s in self._f["input/text"][...]]

    @property
    def has_tokens(self) -> bool:
        return "input/tokens" in self._f

    def tokens(self, index: int):
        """Token strings of one input (its valid positions), or None without tokens."""
        index = self.input_index(index)
        if not self.has_tokens:
            return None
        row = self._f["input/tokens"][index, : self.lengths[index]]
        return [s.decode() if isinstance(s, bytes) else s for s in row]

    # -- maps
    def input_index(self, index) -> int:
        """A valid input index (negative counts from the end), or an InputError."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"input index must be an int, got {index!r}")
        if not -self.n_inputs <= index < self.n_inputs:
            raise InputError(
                f"{self.path.name} has {self.n_inputs} inputs (0..{self.n_inputs - 1}); "
                f"there is no input {index}"
            )
        return int(index) % self.n_inputs

    def layer_index(self, layer) -> int:
        """A valid layer index (negative counts from the last), or an InputError."""
        if not -self.n_layers <= layer < self.n_layers:
            raise InputError(
                f"{self.path.name} has {self.n_layers} layers (0..{self.n_layers - 1}); "
                f"there is no layer {layer}"
            )
        return int(layer) % self.n_layers

    def _condition(self, condition) -> str:
        if condition not in self.conditions:
            raise InputError(
                f"{self.path.name} has no condition {condition!r} "
                f"(it has {', '.join(self.conditions)})"
            )
        if not self.has_maps:
            raise InputError(f"{self.path.name} was written with --no-maps: it holds metrics only")
        return condition

    def map(self, condition, index, layer=-1, head="mean", trim=True):
        """One attention map ``(query, key)``.

        ``head``: an index, or ``"mean"`` for the mean over heads. ``trim``: only the valid
        ``n × n`` region of the input.
        """
        condition = self._condition(condition)
        dset = self._f["attention"][condition]
        b = self.input_index(index)
        layer = self.layer_index(layer)
        if isinstance(head, str):
            if head != "mean":
                raise InputError(f"head must be an index or 'mean', got {head!r}")
            m = dset[b, layer].astype(np.float64).mean(axis=0).astype(np.float32)
        else:
            if isinstance(head, (bool, np.bool_)) or not isinstance(head, (int, np.integer)):
                raise TypeError(f"head must be an int or 'mean', got {head!r}")
            if not -self.n_heads <= head < self.n_heads:
                raise InputError(
                    f"{self.path.name} has {self.n_heads} heads (0..{self.n_heads - 1}); "
                    f"there is no head {head}"
                )
            m = dset[b, layer, int(head) % self.n_heads].astype(np.float32)
        if trim:
            n = self.lengths[b]
            m = m[:n, :n]
        return m

    def maps(self, condition, inputs=slice(None), layer=slice(None), head=slice(None)):
        """A slice of ``/attention/<condition>``, as stored (numpy indexing)."""
        condition = self._condition(condition)
        return self._f["attention"][condition][inputs, layer, head]

    def metric(self, name):
        """``/metrics/<name>``: ``(condition, input, layer, head)``."""
        if name not in (*METRIC_NAMES, "top_key_index"):
            raise InputError(
                f"unknown metric {name!r}; the store has "
                f"{', '.join((*METRIC_NAMES, 'top_key_index'))}"
            )
        return self._f["metrics"][name][...]

    # -- sizes
    def storage(self):
        """``(bytes on disk, bytes of the maps uncompressed, bytes of the maps stored)``."""
        raw = stored = 0
        if self.has_maps:
            for cond in self.conditions:
                d = self._f["attention"][cond]
                raw += d.size * d.dtype.itemsize
                stored += d.id.get_storage_size()
        return self.path.stat().st_size, raw, stored

    def summary(self) -> dict:
        """What ``qkvmean inspect`` shows, as plain JSON-ready values."""
        on_disk, raw, stored = self.storage()
        cfg = self.config
        return {
            "store": str(self.path),
            "complete": True,
            "format_version": FORMAT_VERSION,
            "qkvmean_version": self.attrs.get("qkvmean_version"),
            "created_utc": self.attrs.get("created_utc"),
            "source": self.source,
            "input": cfg.get("input") or cfg.get("model"),
            "texts": cfg.get("texts"),
            "inputs_done": self.n_inputs,
            "inputs_total": self.n_inputs,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "seq": self.seq,
            "lengths": {
                "min": int(self.lengths.min()) if self.n_inputs else 0,
                "mean": float(self.lengths.mean()) if self.n_inputs else 0.0,
                "max": int(self.lengths.max()) if self.n_inputs else 0,
            },
            "conditions": self.conditions,
            "over": self.attrs.get("over"),
            "causal": bool(self.attrs.get("causal")),
            "ablate_layers": self.attrs.get("ablate_layers"),
            "ablate_heads": self.attrs.get("ablate_heads"),
            "scale": cfg.get("scale"),
            "maps": self.has_maps,
            "map_dtype": cfg.get("map_dtype") if self.has_maps else None,
            "compression": cfg.get("compression") if self.has_maps else None,
            "bytes_on_disk": on_disk,
            "map_bytes_uncompressed": raw,
            "map_bytes_stored": stored,
            "compression_ratio": raw / stored if stored else None,
            "config": cfg,
        }


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_store(path) -> Store:
    """Open a qkvmean store for reading.

    Refuses files that are not stores, and stores of a ``format_version`` this version of
    qkvmean does not know, with a :class:`~qkvmean.io.InputError` (a ``ValueError``).

    Examples
    --------
    >>> import qkvmean
    >>> with qkvmean.open_store("run.h5") as store:  # doctest: +SKIP
    ...     m = store.map("mean_k", 0, layer=-1, head="mean")
    """
    return Store(path)
