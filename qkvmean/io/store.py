"""The qkvmean HDF5 store: schema (version 1), crash-safe writing, and the reader.

Schema: ``docs/store.md``. Writing is crash-safe by construction (:class:`Assembly`):

- a run builds the store inside ``STORE.h5.partial/`` (next to a ``manifest.json`` with
  the run's configuration), writing each map once, and after each batch renames a small
  journal entry into place that says where that batch's chunks lie in the file and what
  their CRC-32 is;
- when every input is in, the file is fsynced and renamed onto ``STORE.h5`` atomically;
  only then is the partial directory removed. A resumed run starts a new file, copies the
  journaled batches into it (checked against their CRCs) and computes the rest.

So the final path never holds a half-written store, a kill at any moment loses at most
the batches in flight, and a resumed run writes exactly the chunks an uninterrupted run
would have.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from numba import njit

from .. import faults
from ..engine import jit
from ..engine.names import BASELINE, CONDITIONS, METRICS
from ..resources import format_bytes
from . import (
    InputError,
    ReadFailed,
    hdf5_reason,
    lexists,
    load_json,
    open_hdf5,
    parse_causal,
)

FORMAT = "qkvmean-store"
FORMAT_VERSION = 1
METRIC_NAMES = METRICS[:3]  # the float metrics; top_key_index is stored apart
CONDITION_ORDER = CONDITIONS

#: The largest chunk HDF5 can store (its chunk sizes are 32-bit).
MAX_CHUNK_BYTES = 2**32 - 1

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
    """Everything that fixes the datasets of a store."""

    n_inputs: int
    n_layers: int
    n_heads: int
    seq: int
    conditions: list
    map_dtype: str = "float32"
    compression: str = "deflate"
    maps: bool = True
    layer_ids: list = field(default_factory=list)  # layer numbers for the layer scale
    digests: tuple = ()  # tensors with a CRC-32 per input in /input/crc32 (raw Q/K/V)

    def __post_init__(self):
        if not self.layer_ids:
            self.layer_ids = list(range(self.n_layers))

    def map_chunk_bytes(self) -> int:
        return int(np.prod(self.map_chunks(), dtype=np.int64)) * np.dtype(self.map_dtype).itemsize

    def fixed_bytes(self) -> int:
        """Bytes of the store that do not depend on how well the maps compress: the
        metrics, lengths, digests and dimension scales (a lower bound of its size)."""
        metrics = 4 * len(self.conditions) * self.n_inputs * self.n_layers * self.n_heads * 4
        per_input = 4 + 4 + 4 * len(self.digests)  # lengths, batch scale, CRCs
        return metrics + self.n_inputs * per_input

    def check(self):
        """Refuse, before anything is created, a store HDF5 could not hold."""
        if self.maps and self.map_chunk_bytes() > MAX_CHUNK_BYTES:
            item = np.dtype(self.map_dtype).itemsize
            longest = math.isqrt(MAX_CHUNK_BYTES // item)
            raise InputError(
                f"the maps of {self.seq} tokens cannot be stored: one map takes "
                f"{format_bytes(self.seq**2 * item)}, and an HDF5 chunk holds at most 4 GiB "
                f"(at most {longest} tokens in {self.map_dtype}); pass --no-maps to store the "
                "metrics only, or cut the sequences"
            )

    def map_chunks(self):
        per_map = max(self.seq, 1) ** 2 * np.dtype(self.map_dtype).itemsize
        heads = min(self.n_heads, max(1, math.ceil(MIN_CHUNK_BYTES / per_map)))
        return (1, 1, max(heads, 1), max(self.seq, 1), max(self.seq, 1))

    def create_datasets(self, f: h5py.File, n_inputs: int):
        """The map and metric datasets for ``n_inputs`` inputs."""
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
        group.create_dataset(METRICS[3], shape=shape, dtype="int32")  # top_key_index


# ------------------------------------------------------------------ writing (crash-safe)


def fsync_path(path: Path, directory: bool = False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


try:  # ISA-L's deflate: the same zlib stream, about 4x faster than zlib at level 1
    from isal import isal_zlib as _fast_zlib

    _FAST_LEVELS = range(0, 4)  # ISA-L has levels 0..3; zlib covers the rest
except ImportError:  # pragma: no cover - isal is a dependency where wheels exist
    _fast_zlib, _FAST_LEVELS = zlib, range(0, 10)
_crc32 = _fast_zlib.crc32


def crc32(data, value: int = 0) -> int:
    """CRC-32 (zlib's), with ISA-L where it is installed."""
    return _crc32(data, value)


#: Bytes per segment of a shuffled byte plane that is either deflated or stored as it is
#: (see :func:`_deflate_planes`), and bytes of each segment that decide which.
SEGMENT = 16384
SAMPLE = 1024


@njit(**jit.CODEC)
def _shuffle_survey(raw, out, worth, segment, sample, period):
    """HDF5's shuffle of one chunk, and which of its segments are worth deflating.

    ``raw`` ``(elements, itemsize)``; ``out[b, e] = raw[e, b]`` (all first bytes, then
    all second bytes, ...). ``worth[b, s]``: does the start (``sample`` bytes) of
    segment ``s`` of plane ``b`` repeat itself (a sixteenth of its bytes equal to the
    byte before or to the byte ``period`` before, one row of the map earlier: zeros,
    masked runs, rows that are all alike) or use few byte values (a Huffman code would
    shorten it)? The low
    mantissa bytes of attention weights do neither: deflate would spend most of its time
    on them and save nothing.
    """
    n_elems, size = raw.shape
    if size == 4:  # float32, unrolled: one pass that reads each element once
        o0, o1, o2, o3 = out[0], out[1], out[2], out[3]
        for e in range(n_elems):
            o0[e], o1[e], o2[e], o3[e] = raw[e, 0], raw[e, 1], raw[e, 2], raw[e, 3]
    elif size == 2:  # float16
        o0, o1 = out[0], out[1]
        for e in range(n_elems):
            o0[e], o1[e] = raw[e, 0], raw[e, 1]
    else:
        for b in range(size):
            for e in range(n_elems):
                out[b, e] = raw[e, b]
    hist = np.zeros(256, np.int64)
    for b in range(size):
        for s in range(worth.shape[1]):
            lo = s * segment
            hi = min(lo + sample, n_elems)
            hist[:] = 0
            repeats = 0
            for e in range(lo, hi):
                x = out[b, e]
                hist[x] += 1
                if e > 0 and (x == out[b, e - 1] or (e >= period and x == out[b, e - period])):
                    repeats += 1
            n = hi - lo
            # sum(p²) > 1/128: fewer than 128 equally likely values, 7 bits per byte or less
            # (random bytes give 1/256, plus 1/n of sampling noise)
            squares = 0
            for v in range(256):
                squares += hist[v] * hist[v]
            worth[b, s] = 16 * repeats > n or 128 * squares > n * n


def _deflate_planes(planes, worth, level) -> bytes:
    """A zlib stream of the shuffled chunk ``planes`` ``(itemsize, elements)``: the
    segments ``worth`` deflating are deflated (each run of them by a compressor of its
    own, ended by a full flush, so that no match reaches back across stored bytes), the
    others stored as they are. Any inflater (HDF5's deflate filter, h5dump, zlib) reads
    it like any other stream."""
    size, n_elems = planes.shape
    flat = planes.reshape(-1)
    runs = []  # (start, stop, deflate?) over the flat bytes, neighbours merged
    for b in range(size):
        for s in range(worth.shape[1]):
            start, stop = b * n_elems + s * SEGMENT, b * n_elems + min((s + 1) * SEGMENT, n_elems)
            if runs and runs[-1][1] == start and runs[-1][2] == worth[b, s]:
                runs[-1][1] = stop
            else:
                runs.append([start, stop, bool(worth[b, s])])
    lib = _fast_zlib if level in _FAST_LEVELS else zlib
    out = [b"\x78\x01"]  # zlib header: deflate, 32 KiB window
    for start, stop, deflate in runs:
        if deflate:
            c = lib.compressobj(level, lib.DEFLATED, -15)
            out += [c.compress(flat[start:stop]), c.flush(lib.Z_FULL_FLUSH)]
            continue
        for lo in range(start, stop, 65535):  # stored blocks: BFINAL 0, BTYPE 00, LEN, NLEN
            n = min(65535, stop - lo)
            out += [struct.pack("<BHH", 0, n, n ^ 0xFFFF), flat[lo : lo + n]]
    out += [b"\x01\x00\x00\xff\xff", struct.pack(">I", _fast_zlib.adler32(flat))]
    return b"".join(out)


def _encode_chunk(raw, filters, period) -> bytes:
    """One chunk's bytes as HDF5 stores them (shuffled and deflated, or as they are)."""
    if filters.get("compression") != "gzip":
        return raw.tobytes()
    size = raw.dtype.itemsize
    raw = raw.view(np.uint8).reshape(-1, size)
    planes = np.empty((size, raw.shape[0]), dtype=np.uint8)
    worth = np.empty((size, -(-raw.shape[0] // SEGMENT)), dtype=np.bool_)
    _shuffle_survey(raw, planes, worth, SEGMENT, SAMPLE, period)
    return _deflate_planes(planes, worth, filters["compression_opts"])


def _encode_maps(arr, chunks, filters, pool=None):
    """Every chunk of a ``(n, layer, head, seq, seq)`` batch, encoded on ``pool``.

    The chunks ``(1, 1, h, seq, seq)`` are contiguous in the array (after padding the head
    axis to a multiple of ``h`` with zeros, as HDF5 pads edge chunks). Returns
    ``[(chunk offset, bytes or a future of them), ...]`` (futures with a ``pool``).
    """
    n, layers, heads, seq, _ = arr.shape
    per = chunks[2]
    groups = -(-heads // per)
    if groups * per != heads:
        padded = np.zeros((n, layers, groups * per, seq, seq), dtype=arr.dtype)
        padded[:, :, :heads] = arr
        arr = padded
    blocks = np.ascontiguousarray(arr).reshape(n * layers * groups, per * seq * seq)
    if pool is None:
        data = [_encode_chunk(row, filters, seq) for row in blocks]
    else:
        data = [pool.submit(_encode_chunk, row, filters, seq) for row in blocks]
    offsets = [
        (c // (layers * groups), (c // groups) % layers, (c % groups) * per, 0, 0)
        for c in range(len(data))
    ]
    return list(zip(offsets, data, strict=True))


def encode_batch(layout, maps, pool=None):
    """A batch's maps as the store's chunks: ``{condition: [(offset in the batch, bytes
    or a future of them), ...]}`` (every map's chunks are queued for encoding first, so
    that the pool keeps encoding while the first are written; a condition whose map is
    another's array is encoded once), or None where HDF5 must apply the filter itself
    (then the maps themselves are written)."""
    if not _encodable(parse_compression(layout.compression)):
        return None
    filters = parse_compression(layout.compression)
    chunks = layout.map_chunks()
    encoded = {}
    for cond in layout.conditions:
        same = next((c for c in encoded if maps[c] is maps[cond]), None)
        encoded[cond] = encoded[same] if same else _encode_maps(maps[cond], chunks, filters, pool)
    return encoded


def _encodable(filters) -> bool:
    """Filters whose output we produce ourselves (in parallel, outside HDF5's lock)."""
    return filters.get("compression") in (None, "gzip")


#: Version of the journal entries (``batch-START-STOP.npz``) in a partial directory.
JOURNAL_VERSION = 2
_ENTRY = re.compile(r"batch-(\d+)-(\d+)\.npz")


def entry_checksum(fields: dict) -> int:
    """CRC-32 of a journal entry's fields (names, dtypes, shapes and bytes), so that an
    entry whose metrics or chunk table changed after it was written is never trusted."""
    crc = 0
    for name in sorted(fields):
        value = np.ascontiguousarray(fields[name])
        head = f"{name}:{value.dtype.str}:{value.shape};".encode()
        crc = _crc32(value.tobytes(), _crc32(head, crc))
    return crc


def entry_name(start: int, stop: int) -> str:
    return f"batch-{start:010d}-{stop:010d}.npz"


def journal(directory: Path) -> dict:
    """``{(start, stop): path}`` of the journal entries in a partial directory."""
    done = {}
    for path in directory.glob("batch-*-*.npz"):
        match = _ENTRY.fullmatch(path.name)
        if match:
            done[(int(match[1]), int(match[2]))] = path
    return done


def partial_dir(out: Path) -> Path:
    """Where the run that writes ``out`` keeps its work until the store is complete."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def read_manifest(work: Path) -> dict:
    """The manifest of a partial directory, checked, or an :class:`InputError`: a
    configuration (an object, with its conditions), a start time, and batches that cover
    the inputs from 0 in order, each non-empty."""
    try:
        manifest = load_json((work / "manifest.json").read_bytes())
        batches = [tuple(int(x) for x in b) for b in manifest["batches"]]
        config = manifest["config"]
        if not isinstance(config, dict) or not isinstance(manifest["created_utc"], str):
            raise ValueError
        if not isinstance(config.get("conditions"), list):
            raise ValueError
        ends = [0] + [b for _, b in batches]
        if any(len(b) != 2 for b in batches) or any(
            a != ends[i] or b <= a for i, (a, b) in enumerate(batches)
        ):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(
            f"{work}: no readable manifest.json, so not an interrupted qkvmean run that can "
            "be continued; move it away, or pass --overwrite to start over"
        ) from None
    manifest["batches"] = batches
    return manifest


def progress(work: Path, manifest: dict) -> tuple:
    """``(inputs done, inputs in all)`` of an interrupted run."""
    batches = set(manifest["batches"])
    total = max((b for _, b in batches), default=0)
    return sum(b - a for a, b in journal(work) if (a, b) in batches), total


def run_is_live(work: Path) -> bool:
    """Does a running qkvmean process hold the lock of the partial directory ``work``?
    (Every run holds an exclusive ``flock`` on ``work/lock`` until it ends; a shared
    lock taken here for an instant fails while it does.)"""
    import fcntl

    try:
        fd = os.open(work / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing releases the shared lock, if it was taken)
    return False


def interrupted_message(out: Path) -> str:
    """What to say of a store that is not written yet (it has a partial directory): a
    run is writing it now, or the run that wrote it was interrupted."""
    work = partial_dir(out)
    try:
        done, total = progress(work, read_manifest(work))
        count = f"{done} of {total} inputs done"
    except InputError:
        count = ""
    if run_is_live(work):
        return (
            f"not written yet: a qkvmean run is writing it right now ({count or 'starting'}; "
            f"its work is in {work.name}/); wait for it to finish"
        )
    count = f" with {count}" if count else ""
    return (
        f"not written yet: the run that writes it was interrupted{count} (its work is in "
        f"{work.name}/); finish it with the same qkvmean run command plus --resume"
    )


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


#: HDF5 file-format bounds of the store: the 1.10 format, which SWMR writing needs and
#: every HDF5 since 1.10 (2016) reads. (``latest`` would be HDF5 2.0's format, which
#: older tools cannot open.)
LIBVER = ("v110", "v110")


#: The means' own axes (their layers are the substituted ones, positions those of the
#: data set): dimension scales in /means, the head axis is the store's.
MEANS_GROUP = "means"


def write_means(f: h5py.File, means):
    """``/means/<target>`` ``(layer, head, position, dim)`` and ``/means/count``
    ``(position,)`` of a :class:`~qkvmean.engine.plan.DatasetMeans`, with their scales
    (``/means/layer``: the model's layer numbers; ``position``; ``dim``, ``dim_v``)."""
    group = f.create_group(MEANS_GROUP)
    for key, value in means_attrs(means).items():
        group.attrs[key] = value
    positions = int(means.counts.shape[0])
    layer = group.create_dataset("layer", data=np.asarray(means.layers, dtype=np.int32))
    layer.make_scale("layer")
    position = group.create_dataset("position", data=np.arange(positions, dtype=np.int32))
    position.make_scale("position")
    count = group.create_dataset("count", data=np.asarray(means.counts, dtype=np.int64))
    count.dims[0].attach_scale(position)
    dims = {}
    for target in sorted(means.values, key="qkv".index):
        values = np.asarray(means.values[target])
        name = "dim" if target != "v" or values.shape[-1] == _dim_of(means) else "dim_v"
        if name not in dims:
            axis = np.arange(values.shape[-1], dtype=np.int32)
            dims[name] = group.create_dataset(name, data=axis)
            dims[name].make_scale(name)
        dset = group.create_dataset(target, data=values)
        for axis, scale in enumerate((layer, f["head"], position, dims[name])):
            dset.dims[axis].attach_scale(scale)


def _dim_of(means) -> int:
    first = next(t for t in "qkv" if t in means.values)
    return np.asarray(means.values[first]).shape[-1]


def means_attrs(means) -> dict:
    return {str(k): v for k, v in means.attrs.items()}


class Assembly:
    """The store under construction, written once, with a journal that survives a kill.

    The store is built at ``STORE.h5.partial/store-<pid>-<n>.h5``. Each batch's chunks are
    written straight into it (compressed here, on a thread pool, and handed to HDF5 as
    they are) and its metrics after them; the file is flushed, and then a *journal
    entry* ``batch-START-STOP.npz`` is renamed into place: the batch's metrics and the
    CRC-32 of every chunk. When every input is in, :meth:`finish` fsyncs the file and
    renames it onto ``STORE.h5``.

    The file is written in HDF5's SWMR mode (single writer, multiple readers), which
    orders HDF5's metadata writes so that the file on disk is readable at every moment,
    and so after a kill too. A resumed run starts a new file, and :meth:`salvage` copies
    each journaled batch into it from the old file, every chunk checked against its CRC;
    the batches whose entry or chunks are missing or damaged (an OS crash, say) are
    computed again. Old files are deleted only once no entry refers to them, so a kill
    during salvage loses nothing either. A run that is not interrupted writes each map
    once.
    """

    def __init__(self, work: Path, layout: Layout, attrs: dict, inputs: dict, means=None):
        self.work = work
        self.means = means  # over="dataset": a DatasetMeans, written at /means
        self.layout = layout
        self.filters = parse_compression(layout.compression)
        self.filled = []
        n = 0
        while (work / f"store-{os.getpid()}-{n}.h5").exists():
            n += 1
        self.path = work / f"store-{os.getpid()}-{n}.h5"
        self.f = h5py.File(self.path, "w-", libver=LIBVER)
        self.fd = self.f.id.get_vfd_handle()
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkvmean-sync")
        self._syncing = None
        try:
            self._skeleton(attrs, inputs)
            self.f.swmr_mode = True  # every object exists: from now on only data is written
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
        if layout.digests:
            names = group.create_dataset("tensor", data=np.array(layout.digests, dtype=_STR))
            names.make_scale("tensor")
            crc = group.create_dataset(
                "crc32", shape=(layout.n_inputs, len(layout.digests)), dtype="uint32"
            )
            _attach(crc, f, ["batch"])
            crc.dims[1].attach_scale(names)
        if "text" in inputs:
            text = group.create_dataset("text", data=np.array(inputs["text"], dtype=_STR))
            _attach(text, f, ["batch"])
            tokens = np.array(inputs["tokens"], dtype=_STR).reshape(layout.n_inputs, layout.seq)
            _attach(group.create_dataset("tokens", data=tokens), f, ["batch", "seq"])
        for name in METRICS:
            _attach(f["metrics"][name], f, ["condition", "batch", "layer", "head"])
        if self.means is not None:
            write_means(f, self.means)
        if layout.maps:
            for cond in layout.conditions:
                _attach(f["attention"][cond], f, ["batch", "layer", "head", "query", "key"])

    # -- writing

    def add(self, start, stop, maps, metrics, pool=None, digests=None):
        """Write inputs ``start:stop`` and journal them.

        ``maps[condition]``: ``(n, layer, head, seq, seq)`` (a condition whose map is
        another's array — mean-V of raw Q/K/V is the baseline — is encoded once);
        ``metrics[name]``: ``(condition, n, layer, head)``; ``digests``: ``(n, tensor)``
        CRC-32 of each input as read (for a layout with ``digests``). With a thread
        ``pool``, the chunks are encoded on its threads (ISA-L and zlib release the GIL).
        """
        encoded = encode_batch(self.layout, maps, pool) if self.layout.maps else None
        self.add_encoded(start, stop, maps if encoded is None else encoded, metrics, digests)

    def add_encoded(self, start, stop, chunks, metrics, digests=None):
        """:meth:`add` of a batch encoded already (by :func:`encode_batch`, here or on a
        cluster's worker): ``chunks[condition]`` is ``[(offset, bytes or a future), ...]``,
        or the maps themselves where HDF5 has to apply the filter."""
        rows = []
        if self.layout.maps and not _encodable(self.filters):  # a filter only HDF5 applies
            for index, cond in enumerate(self.layout.conditions):
                dset = self.f["attention"][cond]
                dset[start:stop] = chunks[cond]
                for where in self._chunk_coords(start, stop):
                    rows.append((index, *where, _crc32(dset.id.read_direct_chunk(where)[1])))
        elif self.layout.maps:
            for index, cond in enumerate(self.layout.conditions):
                did = self.f["attention"][cond].id
                for offset, data in chunks[cond]:
                    data = data if isinstance(data, bytes) else data.result()
                    where = (offset[0] + start, *offset[1:])
                    did.write_direct_chunk(where, data, 0)
                    rows.append((index, *where, _crc32(data)))
        self._put(start, stop, rows, metrics, digests)

    def _chunk_coords(self, start, stop):
        per = self.layout.map_chunks()[2]
        return [
            (i, layer, head, 0, 0)
            for i in range(start, stop)
            for layer in range(self.layout.n_layers)
            for head in range(0, self.layout.n_heads, per)
        ]

    def _put(self, start, stop, rows, metrics, digests):
        """Metrics into the store; flush; the journal entry (atomically); writeback."""
        for name in METRICS:
            self.f["metrics"][name][:, start:stop] = metrics[name]
        digests = self._digests(start, stop, digests)
        if self.layout.digests:
            self.f["input/crc32"][start:stop] = digests
        self.f.flush()  # the batch's chunk index entries reach the file before its entry
        final = self.work / entry_name(start, stop)
        tmp = final.with_name(final.name + ".tmp")
        fields = {
            "version": np.int64(JOURNAL_VERSION),
            "store_file": np.str_(self.path.name),
            "start": np.int64(start),
            "stop": np.int64(stop),
            "chunks": np.asarray(rows, dtype=np.int64).reshape(-1, 7),
            "inputs_crc32": digests,
            **{name: np.asarray(metrics[name]) for name in METRICS},
        }
        with open(tmp, "wb") as fh:
            np.savez(fh, checksum=np.uint32(entry_checksum(fields)), **fields)
        # No fsync: the rename is atomic against a killed process (the page cache keeps
        # what was written), and after an OS crash salvage checks every chunk's CRC.
        os.replace(tmp, final)
        faults.point("journaled")
        self.filled.append((start, stop))
        self._writeback()

    def _digests(self, start, stop, digests):
        shape = (stop - start, len(self.layout.digests))
        if digests is None:
            digests = np.zeros(shape, np.uint32)
        digests = np.asarray(digests, dtype=np.uint32)
        if digests.shape != shape:
            raise ValueError(
                f"digests of inputs {start}..{stop}: shape {digests.shape}, not {shape}"
            )
        return digests

    def _writeback(self):
        """Start writing what is done to disk now, on a thread of its own, so that the
        fsync in :meth:`finish` has little left to do (it ran for seconds at the end of a
        large run otherwise)."""
        if self._syncing is not None:
            if not self._syncing.done():
                return  # the previous one is still running: it will be followed by the next
            self._syncing.result()  # a failed writeback (EIO, ENOSPC) fails the run
        self._syncing = self._syncer.submit(os.fdatasync, self.fd)

    # -- resuming

    def salvage(self, entries: dict, verify=None) -> set:
        """Copy the journaled batches ``{(start, stop): entry path}`` of interrupted runs
        into this file and journal them anew; return the batches copied.

        An entry that is unreadable, fails its checksum, or whose chunks are missing or
        fail their CRC, is deleted (its batch is computed again). ``verify(start, stop,
        digests)`` checks that the inputs are still those the entry was computed from (the
        CRC-32 of each input as read then): it returns None if so, else what changed, and
        the batch is computed again (:attr:`changed` lists them). Then every older store
        file is deleted."""
        done = set()
        files = {}
        self.changed = []
        try:
            for (start, stop), path in sorted(entries.items()):
                batch = self._read_entry(path, start, stop, files)
                change = None
                if batch is not None and verify is not None:
                    change = verify(start, stop, batch[2])
                    if change is not None:
                        self.changed.append((start, stop, change))
                if batch is None or change is not None:
                    path.unlink(missing_ok=True)
                    continue
                chunks, metrics, digests = batch
                rows = []
                for index, where, mask, data in chunks:
                    dset = self.f["attention"][self.layout.conditions[index]]
                    dset.id.write_direct_chunk(where, data, mask)
                    rows.append((index, *where, _crc32(data)))
                self._put(start, stop, rows, metrics, digests)
                done.add((start, stop))
        finally:
            for old in files.values():
                if old is not None:
                    old.close()
        for old in self.work.glob("store-*.h5"):  # every entry now names self.path
            if old != self.path:
                old.unlink()
        return done

    def _expected(self, start, stop) -> list:
        if not self.layout.maps:
            return []
        coords = self._chunk_coords(start, stop)
        return [(i, *c) for i in range(len(self.layout.conditions)) for c in coords]

    def _open_old(self, name, files):
        """An earlier attempt's store file, opened for reading (None if it cannot be)."""
        if name not in files:
            files[name] = None
            if Path(name).name == name and name.startswith("store-") and name != self.path.name:
                path = self.work / name
                try:  # a killed SWMR writer leaves a file that SWMR readers can open
                    files[name] = h5py.File(path, "r", swmr=True)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno is not None:  # EMFILE, EACCES, EIO...: stop, delete nothing
                        reason = os.strerror(exc.errno).lower()
                        raise ReadFailed(f"reading {path} failed: {reason}") from exc
                    # else HDF5 cannot make sense of it: its batches are computed again
                except (RuntimeError, ValueError):
                    pass
        return files[name]

    def _read_entry(self, path, start, stop, files):
        """``(chunks, metrics, digests)`` of a journal entry, its checksum verified and each
        chunk read back and checked; None if anything is missing, inconsistent or
        damaged."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != JOURNAL_VERSION:
                    return None
                fields = {name: z[name] for name in z.files if name != "checksum"}
                if int(z["checksum"]) != entry_checksum(fields):
                    return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError):
            return None  # not an entry of ours: a foreign or damaged file
        except zipfile.BadZipFile:
            return None
        try:
            if (int(fields["start"]), int(fields["stop"])) != (start, stop):
                return None
            name = str(fields["store_file"])
            table = fields["chunks"]
            digests = fields["inputs_crc32"]
            metrics = {m: fields[m] for m in METRICS}
        except (KeyError, TypeError, ValueError):
            return None
        shape = (len(self.layout.conditions), stop - start, self.layout.n_layers)
        shape += (self.layout.n_heads,)
        if any(v.shape != shape for v in metrics.values()):
            return None
        if digests.shape != (stop - start, len(self.layout.digests)):
            return None
        expected = self._expected(start, stop)
        if table.shape != (len(expected), 7):
            return None
        if sorted(map(tuple, table[:, :6].tolist())) != sorted(expected):
            return None
        chunks = []
        for index, *where, crc in table.tolist():
            old = self._open_old(name, files)
            if old is None:
                return None
            try:
                dset = old["attention"][self.layout.conditions[index]]
                mask, data = dset.id.read_direct_chunk(tuple(where))
            except (OSError, RuntimeError, ValueError, KeyError):
                return None
            if _crc32(data) != crc:
                return None
            chunks.append((index, tuple(where), mask, data))
        return chunks, metrics, digests

    # -- ending

    def finish(self, out: Path, overwrite: bool = False) -> Path:
        """Check that every input is in; fsync; move onto ``out`` (replacing a file there
        only when ``overwrite``)."""
        expected = 0
        for start, stop in sorted(self.filled):
            if start != expected:
                raise RuntimeError(f"{out}: inputs {expected}..{start} are missing")
            expected = stop
        if expected != self.layout.n_inputs:
            raise RuntimeError(f"{out}: inputs stop at {expected} of {self.layout.n_inputs}")
        self._syncer.shutdown(wait=True)
        if self._syncing is not None:
            self._syncing.result()
        self.f.close()
        fsync_path(self.path)
        if overwrite:
            os.replace(self.path, out)
        else:  # never onto a store that appeared meanwhile (another run, another program)
            try:
                os.link(self.path, out)  # FileExistsError if there is one
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if out.exists():
                    raise FileExistsError(out) from None
                os.replace(self.path, out)
            else:
                os.unlink(self.path)
        fsync_path(out.parent, directory=True)
        return out

    def abort(self):
        """Close the file after a failure; it stays, with its journal, for ``--resume``."""
        try:
            self._syncer.shutdown(wait=True)
        finally:
            try:
                self.f.close()
            except (OSError, RuntimeError):  # e.g. the disk is full: salvage copes
                pass


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
        if not lexists(self.path) and lexists(partial_dir(self.path)):
            raise InputError(f"{self.path}: {interrupted_message(self.path)}")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a store")
        self._f = open_hdf5(self.path, "an HDF5 file (a qkvmean store is HDF5)")
        try:
            self._validate()
        except InputError:
            self._f.close()
            raise
        except (KeyError, RuntimeError, OSError, ValueError) as exc:
            self._f.close()
            raise self._unreadable(exc) from None
        except BaseException:
            self._f.close()
            raise

    def _unreadable(self, exc) -> Exception:
        """What HDF5 failing to read the store's own structure means: damage (a bad
        checksum, an address past the end), unless the system said why."""
        if isinstance(exc, OSError) and exc.errno:
            return exc
        from . import hdf5_reason

        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return self._damaged(f"HDF5 cannot read its structure ({hdf5_reason(str(text))})")

    def _text(self, values, where) -> list:
        """Strings of a UTF-8 string dataset; text that is not UTF-8 is damage."""
        try:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
        except UnicodeDecodeError:
            raise self._damaged(f"{where} holds text that is not UTF-8") from None

    def _damaged(self, what: str) -> InputError:
        return InputError(
            f"{self.path}: {what}; the store is damaged or was not written by qkvmean"
        )

    def _dataset(self, name, *, kind, ndim, shape=None):
        """The dataset at ``name``, checked: exists, is a dataset, has the dtype ``kind``
        (numpy kind letters), ``ndim`` axes and, where given, ``shape``."""
        try:
            obj = self._f.get(name)
        except (KeyError, OSError, RuntimeError, ValueError):  # e.g. a link to nowhere
            obj = None
        if obj is None:
            raise self._damaged(f"no /{name}")
        if not isinstance(obj, h5py.Dataset):
            raise self._damaged(f"/{name} is a group, not a dataset")
        if obj.dtype.kind not in kind or obj.ndim != ndim:
            raise self._damaged(f"/{name} has dtype {obj.dtype} and shape {obj.shape}")
        if shape is not None and obj.shape != tuple(shape):
            raise self._damaged(f"/{name} has shape {obj.shape}, expected {tuple(shape)}")
        return obj

    def _validate(self):
        """Everything the reader, ``inspect`` and ``render`` rely on, checked once."""
        f = self._f
        self._check_format()
        self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
        try:
            self.causal = parse_causal(self.attrs.get("causal", False), str(self.path))
        except InputError:
            raise self._damaged(
                f"its causal attribute {self.attrs.get('causal')!r} is not a boolean"
            ) from None
        try:
            self.config = load_json(self.attrs.get("config", "{}"))
        except (TypeError, ValueError):
            raise self._damaged("its config attribute is not JSON") from None
        if not isinstance(self.config, dict):
            raise self._damaged("its config attribute is not a JSON object")
        if not isinstance(f.get("metrics"), h5py.Group):
            raise self._damaged("no /metrics group")
        names = self._dataset("metrics/condition", kind="OSU", ndim=1)[...]
        self.conditions = self._text(names, "/metrics/condition")
        unknown = [c for c in self.conditions if c not in CONDITION_ORDER]
        if unknown:
            raise self._damaged(
                f"unknown condition {unknown[0]!r} in /metrics/condition (qkvmean knows "
                f"{', '.join(CONDITION_ORDER)})"
            )
        if self.conditions != sorted(set(self.conditions), key=CONDITION_ORDER.index) or (
            self.conditions[:1] != [BASELINE]
        ):
            raise self._damaged(
                f"/metrics/condition lists {', '.join(self.conditions)}: baseline first, each "
                f"condition once, in the order {', '.join(CONDITIONS)}"
            )
        entropy = self._dataset("metrics/entropy", kind="f", ndim=4)
        shape = entropy.shape
        if shape[0] != len(self.conditions):
            raise self._damaged(
                f"/metrics/entropy has {shape[0]} conditions, /metrics/condition names "
                f"{len(self.conditions)}"
            )
        for name in METRIC_NAMES[1:]:
            self._dataset(f"metrics/{name}", kind="f", ndim=4, shape=shape)
        self._dataset("metrics/top_key_index", kind="iu", ndim=4, shape=shape)
        self.n_inputs, self.n_layers, self.n_heads = shape[1:]
        self.seq = self._dataset("seq", kind="iu", ndim=1).shape[0]
        layer = self._dataset("layer", kind="iu", ndim=1, shape=(self.n_layers,))
        self.layer_ids = [int(x) for x in layer[...]]
        for name, size in (("batch", self.n_inputs), ("head", self.n_heads)):
            self._dataset(name, kind="iu", ndim=1, shape=(size,))
        for name in ("query", "key"):
            self._dataset(name, kind="iu", ndim=1, shape=(self.seq,))
        lengths = self._dataset("input/lengths", kind="iu", ndim=1, shape=(self.n_inputs,))
        raw = lengths[...]  # checked before the conversion: a uint64 above 2**63 would wrap
        bad = np.flatnonzero((raw < 0) | (raw > self.seq))
        self.lengths = raw.astype(np.int64)
        if bad.size:
            i = int(bad[0])
            raise self._damaged(
                f"/input/lengths gives input {i} length {int(raw[i])}, outside 0..{self.seq}"
            )
        if "input/text" in f:
            self._dataset("input/text", kind="OSU", ndim=1, shape=(self.n_inputs,))
        if "input/tokens" in f:
            self._dataset("input/tokens", kind="OSU", ndim=2, shape=(self.n_inputs, self.seq))
        self._check_means()
        self.has_maps = "attention" in f
        if not self.has_maps and self.config.get("maps", True):
            raise self._damaged("no /attention, though its config says the maps were stored")
        if self.has_maps:
            if not isinstance(f["attention"], h5py.Group):
                raise self._damaged("/attention is a dataset, not a group of maps")
            extra = sorted(set(f["attention"]) - set(self.conditions))
            if extra:
                raise self._damaged(
                    f"/attention/{extra[0]} is not one of the conditions in /metrics/condition"
                )
            full = (self.n_inputs, self.n_layers, self.n_heads, self.seq, self.seq)
            for cond in self.conditions:
                self._dataset(f"attention/{cond}", kind="f", ndim=5, shape=full)

    def _check_means(self):
        """``/means`` (stores of ``--over dataset`` runs): the datasets the reader needs,
        with consistent shapes."""
        self.has_means = MEANS_GROUP in self._f
        if not self.has_means:
            return
        if not isinstance(self._f[MEANS_GROUP], h5py.Group):
            raise self._damaged("/means is a dataset, not a group")
        count = self._dataset("means/count", kind="iu", ndim=1)
        layers = self._dataset("means/layer", kind="iu", ndim=1)
        self.mean_targets = [t for t in "qkv" if t in self._f[MEANS_GROUP]]
        if not self.mean_targets:
            raise self._damaged("/means holds no q, k or v")
        for target in self.mean_targets:
            d = self._dataset(f"means/{target}", kind="f", ndim=4)
            if d.shape[:3] != (layers.shape[0], self.n_heads, count.shape[0]):
                raise self._damaged(
                    f"/means/{target} has shape {d.shape}; its first axes must be (layer "
                    f"{layers.shape[0]}, head {self.n_heads}, position {count.shape[0]})"
                )

    def dataset_means(self):
        """The means an ``--over dataset`` run substituted
        (:class:`~qkvmean.engine.plan.DatasetMeans`: ``values[target]`` ``(layer, head,
        position, dim)``, ``counts``, ``layers``), or None for other stores."""
        if not self.has_means:
            return None
        from ..engine.plan import DatasetMeans

        g = self._f[MEANS_GROUP]
        try:
            counts = g["count"][...].astype(np.int64)
            layers = tuple(int(x) for x in g["layer"][...])
            values = {t: g[t][...] for t in self.mean_targets}
        except (OSError, RuntimeError, KeyError) as exc:
            raise self._unreadable(exc) from None
        if np.any(counts < 0) or any(not np.isfinite(v).all() for v in values.values()):
            raise self._damaged("/means holds negative counts, NaN or infinity")
        return DatasetMeans(layers, values, counts, {k: _plain(v) for k, v in g.attrs.items()})

    def _check_format(self):
        try:
            fmt = _plain(self._f.attrs.get("format"))
        except (OSError, TypeError, ValueError):  # an attribute h5py cannot read
            fmt = None
        if not isinstance(fmt, str) or fmt != FORMAT:
            raise InputError(f"{self.path}: not a qkvmean store (no format = {FORMAT!r} attribute)")
        version = _plain(self._f.attrs.get("format_version"))
        if isinstance(version, list) and len(version) == 1:
            version = version[0]
        if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
            raise self._damaged(f"its format_version {version!r} is not an integer")
        if int(version) != FORMAT_VERSION:
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

    def _repr_html_(self) -> str:
        """A summary table for Jupyter (``qkvmean.render.view.View(store)`` shows the maps)."""
        from html import escape

        cfg = self.config
        model = cfg.get("model") or cfg.get("input")
        lengths = (
            f"{int(self.lengths.min())}..{int(self.lengths.max())} tokens"
            if self.n_inputs
            else "none"
        )
        maps = (
            f"yes ({cfg.get('map_dtype', 'float32')}, {cfg.get('compression', 'deflate')})"
            if self.has_maps
            else "no (--no-maps: metrics only)"
        )
        source = "a --model run"
        if self.source != "model":
            source = f"raw Q/K/V ({self.source}" + (
                f": {cfg.get('input')})" if cfg.get("input") else ")"
            )
        rows = [
            ("file", str(self.path)),
            ("source", source),
            ("conditions", ", ".join(self.conditions)),
            ("inputs", f"{self.n_inputs} ({lengths}; seq {self.seq})"),
            ("layers", f"{self.n_layers} ({', '.join(str(x) for x in self.layer_ids)})"),
            ("heads", str(self.n_heads)),
            ("model", str(model) if self.source == "model" and model else "none (raw Q/K/V)"),
            ("maps", maps),
        ]
        body = "".join(
            f'<tr><th style="text-align: left">{escape(k)}</th><td style="text-align: '
            f'left">{escape(v)}</td></tr>'
            for k, v in rows
        )
        return (
            f'<table class="qkvmean-store"><caption style="text-align: left">qkvmean store '
            f"<code>{escape(self.path.name)}</code></caption>{body}</table>"
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
        return self._text(self._f["input/text"][...], "/input/text")

    @property
    def has_tokens(self) -> bool:
        return "input/tokens" in self._f

    def tokens(self, index: int):
        """Token strings of one input (its valid positions), or None without tokens."""
        index = self.input_index(index)
        if not self.has_tokens:
            return None
        row = self._f["input/tokens"][index, : self.lengths[index]]
        return self._text(row, f"/input/tokens of input {index}")

    def input_digests(self):
        """``/input/crc32``: the CRC-32 of each input's q, k and v as read (raw Q/K/V
        runs), ``(batch, tensor)``; None where the store has none."""
        d = self._f.get("input/crc32")
        if not isinstance(d, h5py.Dataset) or d.shape[:1] != (self.n_inputs,):
            return None
        return d[...]

    # -- maps
    def input_index(self, index) -> int:
        """A valid input index (negative counts from the end), or an InputError."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"input index must be an int, got {index!r}")
        return self._in_range(index, self.n_inputs, "input")

    def layer_index(self, layer) -> int:
        """A valid layer index (negative counts from the last), or an InputError."""
        return self._in_range(layer, self.n_layers, "layer")

    def head_index(self, head) -> int:
        """A valid head index (negative counts from the last), or an InputError."""
        if isinstance(head, (bool, np.bool_)) or not isinstance(head, (int, np.integer)):
            raise TypeError(f"head must be an int or 'mean', got {head!r}")
        return self._in_range(head, self.n_heads, "head")

    def _in_range(self, value, count, noun) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{noun} index must be an int, got {value!r}")
        if not -count <= value < count:
            raise InputError(
                f"{self.path.name} has {count} {noun}s (0..{count - 1}); there is no {noun} {value}"
            )
        return int(value) % count

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
        ``n × n`` region of the input. A map that cannot be read (a damaged chunk) or that
        holds values no attention weight can have (NaN, below 0, above 1) is an
        :class:`~qkvmean.io.InputError` naming the input, condition and layer.
        """
        condition = self._condition(condition)
        dset = self._f["attention"][condition]
        b = self.input_index(index)
        layer = self.layer_index(layer)
        if isinstance(head, str):
            if head != "mean":
                raise InputError(f"head must be an index or 'mean', got {head!r}")
            heads = slice(None)
        else:
            heads = self.head_index(head)
        m = self._checked(dset, condition, b, layer, heads)
        m = m.astype(np.float64).mean(axis=0) if heads == slice(None) else m
        m = m.astype(np.float32)
        if trim:
            n = self.lengths[b]
            m = m[:n, :n]
        return m

    def layer_maps(self, condition, index, layer):
        """Every head's map of one input at one layer, ``(head, n, n)`` (the valid
        region), checked as :meth:`map` checks one."""
        condition = self._condition(condition)
        b, layer = self.input_index(index), self.layer_index(layer)
        n = self.lengths[b]
        dset = self._f["attention"][condition]
        return self._checked(dset, condition, b, layer, slice(None))[:, :n, :n]

    def _checked(self, dset, condition, b, layer, heads):
        where = f"input {b}, condition {condition}, layer {self.layer_ids[layer]}"
        m = self._read(dset, (b, layer, heads), where)
        _check_weights(m, self.path, where)
        return m

    def _read(self, dset, index, where):
        try:
            return dset[index]
        except IndexError as exc:
            raise InputError(f"{self.path.name}: {where}: {exc}") from None
        except (OSError, RuntimeError) as exc:
            raise InputError(
                f"{self.path}: cannot read the maps of {where} ({hdf5_reason(str(exc))}); "
                "the store is damaged"
            ) from None

    def maps(self, condition, inputs=slice(None), layer=slice(None), head=slice(None)):
        """A slice of ``/attention/<condition>``, as stored (numpy indexing)."""
        condition = self._condition(condition)
        where = f"inputs {inputs}, condition {condition}, layers {layer}"
        return self._read(self._f["attention"][condition], (inputs, layer, head), where)

    def metric(self, name):
        """``/metrics/<name>``: ``(condition, input, layer, head)``."""
        if name not in METRICS:
            raise InputError(
                f"unknown metric {name!r}; the store has "
                f"{', '.join((*METRIC_NAMES, 'top_key_index'))}"
            )
        return self._f["metrics"][name][...]

    def metric_block(self, name, condition, start=0, stop=None):
        """``/metrics/<name>[condition, start:stop]``: one condition's metric for a run of
        inputs, ``(input, layer, head)``, read without the rest (for stores too large to
        read whole)."""
        if name not in METRICS:
            self.metric(name)  # raises, with the names the store has
        if condition not in self.conditions:
            raise InputError(
                f"{self.path.name} has no condition {condition!r} "
                f"(it has {', '.join(self.conditions)})"
            )
        where = f"inputs {start}..{stop}, condition {condition}"
        dset = self._f["metrics"][name]
        try:
            return dset[self.conditions.index(condition), start:stop]
        except (OSError, RuntimeError) as exc:
            raise InputError(
                f"{self.path}: cannot read /metrics/{name} of {where} "
                f"({hdf5_reason(str(exc))}); the store is damaged"
            ) from None

    def to_xarray(self):
        """The whole store as an :class:`xarray.Dataset` with named dimensions, backed by
        the file: nothing large is read until it is used. Needs xarray and h5netcdf
        (``pip install 'qkvmean[xarray]'``).

        Variables: the metrics ``(condition, batch, layer, head)``, the maps as
        ``attention_<condition>`` ``(batch, layer, head, query, key)`` (absent in
        ``--no-maps`` stores), ``lengths``, ``text``/``tokens`` (model runs), and in
        ``--over dataset`` stores ``means_<target>`` ``(means_layer, head, position,
        dim)`` with ``means_count``. The root attributes are its ``attrs``.

        The Dataset opens the file itself: it keeps working after this Store is closed,
        as long as the file stays where it is. Close it with ``ds.close()`` (or ``with
        store.to_xarray() as ds:``).
        """
        from .export import xarray_dataset

        return xarray_dataset(self)

    # -- sizes
    def storage(self):
        """``(bytes on disk, bytes of the maps uncompressed, bytes of the maps stored)``."""
        raw = stored = 0
        if self.has_maps:
            for cond in self.conditions:
                d = self._f["attention"][cond]
                raw += d.size * d.dtype.itemsize
                try:
                    stored += d.id.get_storage_size()
                except (KeyError, RuntimeError, OSError) as exc:  # a damaged chunk index
                    raise self._unreadable(exc) from None
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
            "causal": self.causal,
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
            "means": self._means_summary(),
            "config": cfg,
        }

    def _means_summary(self):
        """What ``inspect`` says of ``/means`` (None for stores without)."""
        if not self.has_means:
            return None
        g = self._f[MEANS_GROUP]
        counts = g["count"][...]
        return {
            "targets": self.mean_targets,
            "layers": [int(x) for x in g["layer"][...]],
            "positions": int((counts > 0).sum()),
            "inputs_at_first_position": int(counts[0]) if counts.size else 0,
            "taken_from": _plain(g.attrs.get("taken_from")),
        }


def _check_weights(m: np.ndarray, path, where: str):
    """Attention weights lie in [0, 1]; anything else is damage, not something to draw."""
    if m.size and not (np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 + 1e-3):
        bad = "NaN or infinity" if not np.isfinite(m).all() else "values outside 0..1"
        raise InputError(f"{path}: the maps of {where} hold {bad}; the store is damaged")


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
