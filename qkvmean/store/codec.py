"""The maps' chunks as HDF5 stores them: compression settings, CRC-32, and a shuffle +
deflate encoder that runs on a thread pool outside HDF5 (the bytes any inflater reads)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from numba import njit

from ..engine import jit
from ..files import InputError

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
    if not encodable(parse_compression(layout.compression)):
        return None
    filters = parse_compression(layout.compression)
    chunks = layout.map_chunks()
    encoded = {}
    for cond in layout.conditions:
        same = next((c for c in encoded if maps[c] is maps[cond]), None)
        encoded[cond] = encoded[same] if same else _encode_maps(maps[cond], chunks, filters, pool)
    return encoded


def encodable(filters) -> bool:
    """Filters whose output we produce ourselves (in parallel, outside HDF5's lock)."""
    return filters.get("compression") in (None, "gzip")
