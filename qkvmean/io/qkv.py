"""Raw Q/K/V handed over by another tool as HDF5 (SPEC section 5).

``FILE.h5[:/group]`` holds datasets ``q``, ``k``, ``v`` of shape
``(batch, layer, head, seq, dim)`` or ``(batch, head, seq, dim)`` (``v`` may have its own
``dim``), an optional ``lengths`` ``(batch,)`` and an optional ``causal`` attribute on the
group (or the file's root). Everything is checked when the file is opened, except the
values themselves, which are checked batch by batch as they are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

import h5py
import numpy as np

from ..engine.kernels.finite import scan_finite
from ..files import InputError, ReadFailed, hdf5_reason, open_hdf5, parse_causal, put_in_place

_FLOATS = ("float16", "float32", "float64")


class _DirectReader:
    """Reads a dataset that HDF5 stores as plain bytes — contiguous, or in unfiltered
    chunks that each hold whole inputs — with ``preadv`` into the destination array.

    HDF5 (through h5py) holds the GIL and a global lock while it reads, which stalls the
    threads that compress and write the store; a plain read holds neither. Anything
    else (filters, chunks split inside an input, another byte order, a user block,
    external or virtual storage, unwritten chunks) is read by HDF5: :meth:`plan` returns
    None for it.
    """

    def __init__(self, fd, dset, row, spans):
        self.fd = fd
        self.dtype = dset.dtype
        self.shape = dset.shape
        self.row = row  # bytes per input
        self.spans = spans  # [(first input, inputs, file offset), ...] in input order
        self.firsts = np.array([s[0] for s in spans], dtype=np.int64)

    @classmethod
    def plan(cls, fd, f: h5py.File, dset: h5py.Dataset):
        if not hasattr(os, "preadv") or f.driver != "sec2" or f.userblock_size:
            return None
        if dset.is_virtual or not dset.dtype.isnative:
            return None
        # the type on disk, not the one h5py converts to (bfloat16 reads as float32)
        if not dset.id.get_type().equal(h5py.h5t.py_create(dset.dtype)):
            return None
        # the dataset's own file, not one an external link leads to
        here, there = os.fstat(fd), os.fstat(dset.file.id.get_vfd_handle())
        if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
            return None
        dcpl = dset.id.get_create_plist()
        if dcpl.get_external_count() or dcpl.get_nfilters():
            return None
        layout = dcpl.get_layout()
        n = dset.shape[0]
        row = int(np.prod(dset.shape[1:], dtype=np.int64)) * dset.dtype.itemsize
        if layout == h5py.h5d.CONTIGUOUS:
            offset = dset.id.get_offset()
            if offset is None or dset.id.get_storage_size() != n * row:
                return None
            return cls(fd, dset, row, [(0, n, offset)])
        if layout != h5py.h5d.CHUNKED or dset.chunks[1:] != dset.shape[1:]:
            return None
        per = dset.chunks[0]
        spans = []

        def chunk(info):
            if info.filter_mask == 0 and info.size == per * row:
                first = info.chunk_offset[0]
                spans.append((first, min(per, n - first), info.byte_offset))

        dset.id.chunk_iter(chunk)
        spans.sort()
        if [s[0] for s in spans] != list(range(0, n, per)):
            return None  # a chunk never written (HDF5 gives its fill value) or unusual
        return cls(fd, dset, row, spans)

    def read(self, start, stop, where):
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        span = int(np.searchsorted(self.firsts, start, side="right")) - 1
        i = start
        while i < stop:
            first, count, offset = self.spans[span]
            hi = min(stop, first + count)
            lo_byte, hi_byte = (i - start) * self.row, (hi - start) * self.row
            position = offset + (i - first) * self.row
            while lo_byte < hi_byte:
                try:
                    got = os.preadv(self.fd, [view[lo_byte:hi_byte]], position)
                except OSError as exc:
                    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                    raise ReadFailed(f"reading {where} failed: {reason}") from exc
                if got <= 0:
                    raise InputError(f"{where}: the file ends early (truncated?)")
                lo_byte += got
                position += got
            i = hi
            span += 1
        return out


def _kind(obj) -> str:
    if isinstance(obj, h5py.Group):
        return "a group"
    if isinstance(obj, h5py.Datatype):
        return "a named datatype"
    return "a dataset" if isinstance(obj, h5py.Dataset) else f"a {type(obj).__name__}"


def _files(dset: h5py.Dataset, where: str) -> list:
    """The files ``dset``'s values come from: its own (the target of an external link),
    and for a virtual dataset each source file, which must exist (HDF5 would read a
    missing one as the fill value)."""
    own = Path(dset.file.filename)
    files = [own]
    if dset.is_virtual:
        for source in dset.virtual_sources():
            if source.file_name == ".":
                continue
            name = Path(source.file_name)
            found = [p for p in (own.parent / name, name) if p.exists()]
            if not found:
                raise InputError(
                    f"{where}: is a virtual dataset whose source file {source.file_name} "
                    "does not exist (HDF5 would read its part as the fill value)"
                )
            files.append(found[0])
    return files


def _check_written(dset: h5py.Dataset, where: str):
    """Every value of ``dset`` was written: HDF5 reads chunks that never were as the fill
    value (zeros), which would be computed as if they were inputs."""
    if dset.size == 0 or dset.is_virtual:
        return
    status = dset.id.get_space_status()
    if status == h5py.h5d.SPACE_STATUS_ALLOCATED:
        return
    fill = dset.fillvalue
    if status == h5py.h5d.SPACE_STATUS_NOT_ALLOCATED:
        raise InputError(
            f"{where}: was never written (HDF5 would read every value as the fill value "
            f"{fill}); write the data, or leave the dataset out"
        )
    per = np.ceil(np.divide(dset.shape, dset.chunks)).astype(np.int64)
    total = int(np.prod(per, dtype=np.float64))
    written = dset.id.get_num_chunks()
    raise InputError(
        f"{where}: only {written} of its {total} chunks were ever written (HDF5 would read "
        f"the others as the fill value {fill}); write every input, or shrink the dataset to "
        "the inputs written (h5py: dataset.resize)"
    )


#: No model's head dimension is larger (Gemma's 256 is the largest in use).
MAX_HEAD_DIM = 256
HOW_TO_NAME = (
    "label every axis of q, k and v as it is stored, e.g. with h5py: f['q'].dims[3].label = "
    "'seq' (the names: batch, layer, head, seq, dim); see docs/store.md, The Q/K/V input format"
)
#: Names other tools give the axes, and the one each means.
AXIS_ALIASES = {
    "batch": "batch", "input": "batch", "inputs": "batch", "sample": "batch",
    "example": "batch", "layer": "layer", "layers": "layer", "head": "head",
    "heads": "head", "kv_head": "head", "kv_heads": "head", "seq": "seq",
    "position": "seq", "pos": "seq", "token": "seq", "tokens": "seq", "sequence": "seq",
    "dim": "dim", "dim_v": "dim", "head_dim": "dim", "d_head": "dim", "d_k": "dim",
    "d_v": "dim",
}  # fmt: skip
#: Names that say the heads were not split off the model dimension.
UNSPLIT = ("hidden", "d_model", "embed", "embedding", "model", "channel", "channels")


def _text(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return value if isinstance(value, str) else None


def _flag(value) -> bool:
    """An attribute that should be a bool, read leniently (a missing one is False)."""
    text = _text(value)
    if text is not None:
        return text.strip().lower() in ("true", "yes", "1", "on")
    try:
        return bool(np.asarray(value).reshape(-1)[0]) if np.size(value) == 1 else False
    except (TypeError, ValueError):
        return False


def _axis_names(dset) -> list:
    """Each axis's name: its label, else the NAME of the dimension scale attached to it
    (else the scale dataset's own name: netCDF writers give scales a placeholder NAME)."""
    names = []
    for dim in dset.dims:
        label = dim.label
        if not label and len(dim):
            label = _text(dim.keys()[0]) or ""  # the scale's NAME
            if not label or label.startswith("This is a netCDF dimension"):
                label = dim[0].name.rsplit("/", 1)[-1]
        names.append(label or None)
    return names


def _order(dset, where):
    """The permutation that puts ``dset``'s named axes in the canonical order, or None for
    a dataset whose axes have no names."""
    names = _axis_names(dset)
    if not any(names):
        return None
    if not all(names):
        missing = [i for i, n in enumerate(names) if not n]
        raise InputError(
            f"{where}: names some axes but not axis {missing[0]} (names {names}); name every "
            f"axis ({HOW_TO_NAME})"
        )
    lowered = [n.lower() for n in names]
    split = [n for n in lowered if n in UNSPLIT]
    if split:
        raise InputError(
            f"{where}: has an axis {split[0]!r} of {dset.shape[lowered.index(split[0])]}: the "
            "heads are not split off the model dimension; reshape it into (head, dim) "
            "(x.reshape(..., n_heads, head_dim)) and name the axes head and dim"
        )
    unknown = [n for n in lowered if n not in AXIS_ALIASES]
    if unknown:
        raise InputError(
            f"{where}: unknown axis name {unknown[0]!r}; the axes are named "
            f"{', '.join(AXES)} (layer optional)"
        )
    canonical = [AXIS_ALIASES[n] for n in lowered]
    want = [a for a in AXES if a in canonical]
    once = sorted(canonical) == sorted(want)
    if not once or want not in (list(AXES), [a for a in AXES if a != "layer"]):
        raise InputError(
            f"{where}: its axes are named {names}; they must be batch, layer (optional), "
            "head, seq and dim, each once"
        )
    return tuple(canonical.index(a) for a in want)


def _canonical_shape(shape, perm):
    return tuple(shape) if perm is None else tuple(shape[i] for i in perm)


def split_spec(spec: str):
    """``"path.h5:/group"`` → ``(Path("path.h5"), "/group")``; the group defaults to ``/``.

    A file whose own name contains ``:`` is taken whole when it exists.
    """
    spec = str(spec)
    path, sep, group = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        return Path(path), "/" + group.lstrip("/")
    return Path(spec), "/"


class QKVInput:
    """An opened, checked raw Q/K/V input. Read it with :meth:`read` batch by batch."""

    def __init__(self, spec: str):
        self.spec = str(spec)
        self.path, self.group_name = split_spec(spec)
        self._f = open_hdf5(self.path)
        self._fd = None
        self._direct = {}
        self._plan_lock = threading.Lock()
        try:
            self._check()
        except Exception:
            self._f.close()
            raise

    def where(self, name=None):
        loc = f"{self.path}:{self.group_name}"
        if name:
            loc += ("" if loc.endswith("/") else "/") + name
        return loc

    def _member(self, group, name, where):
        """``group[name]``, None when there is no such link; an :class:`InputError` for a
        link that leads nowhere (a soft link to a missing path, an external link to a
        missing file)."""
        if name == "/":
            return group["/"]
        try:
            link = group.get(name, getlink=True)
        except (KeyError, RuntimeError, ValueError):  # no such name (or no such parent)
            return None
        if link is None:
            return None
        try:
            return group[name]
        except (KeyError, OSError, RuntimeError) as exc:
            reason = hdf5_reason(str(exc))
            if isinstance(link, h5py.SoftLink):
                why = f"is a soft link to {link.path}, which does not exist in the file"
            elif isinstance(link, h5py.ExternalLink):
                target = Path(link.filename)
                if not target.is_absolute():
                    target = self.path.parent / target
                missing = "" if target.exists() else f" ({target}: no such file)"
                why = (
                    f"is an external link to {link.filename}:{link.path}, which cannot be "
                    f"opened{missing or f' ({reason})'}"
                )
            else:
                why = f"cannot be opened ({reason})"
            raise InputError(f"{where}: {why}") from None

    def _check(self):
        group = self._member(self._f, self.group_name, f"{self.path}:{self.group_name}")
        if group is None:
            groups = []
            self._f.visit_links(lambda name: groups.append(name) if len(groups) < 11 else 1)
            groups = [f"/{g}" for g in groups if isinstance(self._f.get(g), h5py.Group)]
            listed = f" (it has {', '.join(groups[:10])}{', ...' if len(groups) > 10 else ''})"
            listed = listed if groups else " (it has no groups)"
            raise InputError(f"{self.path}: no group {self.group_name!r} in the file{listed}")
        if not isinstance(group, h5py.Group):
            raise InputError(f"{self.where()}: is {_kind(group)}, not a group")
        self.group = group
        dsets = {}
        for name in ("q", "k", "v"):
            d = self._member(group, name, self.where(name))
            if d is None:
                raise InputError(
                    f"{self.where()}: missing dataset {name!r} (need q, k and v of shape "
                    "(batch, [layer,] head, seq, dim))"
                )
            if not isinstance(d, h5py.Dataset):
                raise InputError(f"{self.where(name)}: is {_kind(d)}, not a dataset")
            if d.dtype.kind != "f" or d.dtype.name not in _FLOATS:
                raise InputError(
                    f"{self.where(name)}: dtype {d.dtype} is not float16, float32 or float64"
                )
            if d.ndim not in (4, 5):
                raise InputError(
                    f"{self.where(name)}: shape {d.shape} must be (batch, layer, head, seq, "
                    "dim) or (batch, head, seq, dim)"
                )
            dsets[name] = d
        formatted = self._check_format(group)
        perms = {name: _order(d, self.where(name)) for name, d in dsets.items()}
        named = [n for n in dsets if perms[n] is not None]
        if named and len(named) < 3:
            unnamed = [n for n in dsets if n not in named]
            raise InputError(
                f"{self.where(unnamed[0])}: has no axis names, though {named[0]} has; name the "
                f"axes of q, k and v alike ({HOW_TO_NAME})"
            )
        if formatted and not named:
            raise InputError(
                f"{self.where('q')}: the group says format {FORMAT!r}, whose axes are named, but "
                f"q, k and v have no axis names; name them ({HOW_TO_NAME})"
            )
        self.named = bool(named)
        self.shapes = {n: _canonical_shape(d.shape, perms[n]) for n, d in dsets.items()}
        # None: the axes are stored in the canonical order (read as they are, fast path)
        self.perm = {n: None if p == tuple(range(len(p or ()))) else p for n, p in perms.items()}
        q, k, v = (self.shapes[n] for n in ("q", "k", "v"))
        if k[:-3] != q[:-3] or k[-2:] != q[-2:] or q[-3] % max(k[-3], 1):
            raise InputError(
                f"{self.where('k')}: shape {k} does not match q's {q}; q and k must have the "
                "same shape, but for fewer key heads that divide q's (grouped-query attention)"
            )
        if len(v) != len(q) or v[:-3] != q[:-3] or v[-3] != k[-3] or v[-2] != q[-2]:
            raise InputError(
                f"{self.where('v')}: shape {v} does not match k's {k} (only the last axis "
                "may differ)"
            )
        if q[-1] == 0:
            raise InputError(f"{self.where('q')}: head dim is 0")
        if q[-2] == 0:
            raise InputError(f"{self.where('q')}: sequence length is 0; nothing to attend to")
        if q[0] == 0:
            raise InputError(f"{self.where('q')}: holds no inputs (batch axis is 0)")
        if q[-3] == 0 or k[-3] == 0:
            raise InputError(f"{self.where('q')}: has no heads (head axis is 0)")
        if len(q) == 5 and q[1] == 0:
            raise InputError(f"{self.where('q')}: has no layers (layer axis is 0)")
        self.files = [self.path]
        for name, d in dsets.items():
            _check_written(d, self.where(name))
            self.files += _files(d, self.where(name))
        self.q, self.k, self.v = dsets["q"], dsets["k"], dsets["v"]
        self.rank = len(q)
        self.n_inputs = q[0]
        self.n_layers = q[1] if self.rank == 5 else 1
        self.layer_ids = self._layer_numbers(perms["q"])
        self.n_heads, self.seq, self.dim = q[-3:]
        self.dim_v = v[-1]
        self.warnings = []
        if not self.named:
            self._check_unambiguous()
        self.lengths = self._read_lengths(group)
        rotary = _flag(group.attrs.get("rotary"))
        if _text(group.attrs.get("captured_at")) == "projection" and rotary:
            self.warnings.append(
                f"warning: {self.where()}: these Q and K were captured at the projection, "
                "before the model's rotary embedding or q/k norm, so their maps are not the "
                "model's; capture with --at attention for those"
            )
        causal = group.attrs.get("causal", self._f.attrs.get("causal"))
        self.causal_attr = None if causal is None else parse_causal(causal, self.where())

    def _layer_numbers(self, perm) -> list:
        """The model's layer numbers: the values of the dimension scale on q's layer axis
        where there is one (distinct non-negative integers, one per layer), else 0, 1, ..."""
        default = list(range(self.n_layers))
        if perm is None or self.rank != 5:
            return default
        dim = self.q.dims[perm[1]]
        if not len(dim):
            return default
        try:
            values = np.asarray(dim[0][...])
        except (OSError, RuntimeError, KeyError, TypeError):
            return default
        if values.dtype.kind not in "iu" or values.shape != (self.n_layers,):
            return default
        if np.any(values < 0) or len(set(values.tolist())) != self.n_layers:
            return default
        return [int(x) for x in values]

    def _check_format(self, group) -> bool:
        """Does the group say it is the exchange format? It must then be a version we read.
        (A ``format`` attribute with another value is some other tool's, and not ours.)"""
        fmt = _text(group.attrs.get("format"))
        if fmt is None or fmt.strip().lower() != FORMAT:
            return False
        version = group.attrs.get("format_version")
        if isinstance(version, np.ndarray) and version.size == 1:
            version = version.reshape(()).item()
        if isinstance(version, np.generic):
            version = version.item()
        if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
            raise InputError(
                f"{self.where()}: is format {fmt!r} version {version!r}; this qkvmean reads "
                f"{FORMAT!r} version {FORMAT_VERSION} (docs/store.md); use a qkvmean that "
                "reads that version, or write the file again in version 1"
            )
        return True

    def _check_unambiguous(self):
        """A file whose axes have no names is read in the documented order only where its
        shape cannot mean another: the seq axis (-2) strictly the longest of the axes
        between batch and dim, and a last axis no model's head dimension exceeds."""
        shape = self.shapes["q"]
        axes = ("layer", "head") if self.rank == 5 else ("head",)
        middle = dict(zip(axes, shape[1:-2], strict=True))
        rival = [a for a, size in middle.items() if size >= self.seq]
        order = f"(batch, {', '.join(axes)}, seq, dim)"
        if rival:
            raise InputError(
                f"{self.where('q')}: shape {shape} with no axis names is ambiguous: the {rival[0]} "
                f"axis ({middle[rival[0]]}) is not shorter than the seq axis (-2, {self.seq}), "
                f"so the order may not be {order}; name the axes ({HOW_TO_NAME})"
            )
        if self.dim > MAX_HEAD_DIM:
            raise InputError(
                f"{self.where('q')}: shape {shape} with no axis names has a last axis of "
                f"{self.dim}, larger than any model's head dimension (<= {MAX_HEAD_DIM}): are "
                "the heads not split? reshape the last axis into (head, dim), or name the axes "
                f"({HOW_TO_NAME})"
            )
        # what the shape cannot tell: seq shorter than the heads, in another order; unsplit
        # heads of a small width. Said once, in one line, for every file without names.
        names = ("batch", *axes, "seq", "dim")
        sizes = ", ".join(f"{a} {n}" for a, n in zip(names, shape, strict=True))
        self.warnings.append(
            f"warning: {self.where('q')}: no axis names, so read in the order {order} as "
            f"{sizes}; if that is not its order, name the axes ({HOW_TO_NAME})"
        )

    def _read_lengths(self, group):
        d = self._member(group, "lengths", self.where("lengths"))
        if d is None:
            self.warnings.append(
                f"warning: {self.where()}: no lengths dataset, so every one of the {self.seq} "
                "positions of every input counts as a token; write lengths (batch,) if the "
                "inputs are padded"
            )
            return np.full(self.n_inputs, self.seq, dtype=np.int64)
        if not isinstance(d, h5py.Dataset) or d.dtype.kind not in "iu":
            what = "" if isinstance(d, h5py.Dataset) else f" (it is {_kind(d)})"
            raise InputError(f"{self.where('lengths')}: must be an integer dataset{what}")
        if d.shape != (self.n_inputs,):
            raise InputError(
                f"{self.where('lengths')}: shape {d.shape}, expected ({self.n_inputs},) "
                "(one count per input)"
            )
        _check_written(d, self.where("lengths"))
        self.files += _files(d, self.where("lengths"))
        raw = d[...]  # checked before the conversion: a uint64 above 2**63 would wrap
        bad = np.flatnonzero((raw < 0) | (raw > self.seq))
        if bad.size:
            i = int(bad[0])
            hint = ""
            if not self.named:
                hint = (
                    "; if q's axes are not in the order (batch, [layer,] head, seq, dim), name "
                    f"them ({HOW_TO_NAME})"
                )
            raise InputError(
                f"{self.where('lengths')}: input {i} has length {int(raw[i])}, outside "
                f"0..{self.seq} (the sequence length, axis -2){hint}"
            )
        lengths = raw.astype(np.int64)
        return lengths

    def chunk_inputs(self) -> int:
        """Inputs per chunk of the q dataset along the batch axis (1 if contiguous)."""
        chunks = self.q.chunks
        if not chunks:
            return 1
        perm = self.perm["q"]
        return chunks[0 if perm is None else perm[0]]

    def identity(self) -> dict:
        """What a resumed run must find unchanged: shapes, dtypes, lengths, causal and a
        SHA-256 of the first and last inputs' values."""
        digest = hashlib.sha256()
        digest.update(self.lengths.tobytes())
        for name in ("q", "k", "v"):
            for index in sorted({0, self.n_inputs - 1}):
                value = self._hdf5_read(name, index, index + 1)[0]  # damage named as such
                digest.update(np.ascontiguousarray(value).tobytes())
        return {
            "shapes": {n: list(self.shapes[n]) for n in ("q", "k", "v")},
            "dtypes": {n: getattr(self, n).dtype.name for n in ("q", "k", "v")},
            "causal_attr": self.causal_attr,
            "sha256": digest.hexdigest(),
        }

    def read(self, start: int, stop: int):
        """Inputs ``start:stop`` as ``(q, k, v)``, each ``(n, layer, head, seq, dim)``.

        Values are checked here: a NaN or infinity names the input it is in.
        """
        out = []
        for name in ("q", "k", "v"):
            direct = self._direct_reader(name) if self.perm[name] is None else None
            if direct is not None:
                x = direct.read(start, stop, self.where(name))
            else:
                x = self._hdf5_read(name, start, stop)
            if self.rank == 4:
                x = x[:, None]
            # float16 is computed in float32 anyway (and Numba has no float16 arithmetic)
            x = np.ascontiguousarray(x, dtype=np.float32 if x.dtype == np.float16 else x.dtype)
            bad, _ = scan_finite(x.reshape(-1))
            if bad >= 0:
                index = np.unravel_index(bad, x.shape)
                b = start + int(index[0])
                pos = tuple(int(i) for i in index[1:])
                if self.rank == 4:
                    pos = pos[1:]
                raise InputError(
                    f"{self.where(name)}: input {b} contains {x.reshape(-1)[bad]} at "
                    f"{pos}; all values must be finite"
                )
            out.append(x)
        return tuple(out)

    def _hdf5_read(self, name, start, stop):
        """``name[start:stop]`` through HDF5: a system error is a :class:`ReadFailed`
        (resumable), anything HDF5 itself cannot decode a damaged input."""
        perm = self.perm[name]
        try:
            if perm is None:
                return getattr(self, name)[start:stop]
            index = [slice(None)] * len(perm)
            index[perm[0]] = slice(start, stop)
            return np.transpose(getattr(self, name)[tuple(index)], perm)
        except (OSError, RuntimeError) as exc:
            where = f"{self.where(name)}: inputs {start}..{stop - 1}"
            if isinstance(exc, OSError) and exc.errno:
                raise ReadFailed(
                    f"reading {where} failed: {os.strerror(exc.errno).lower()}"
                ) from exc
            raise InputError(
                f"{where} cannot be read ({hdf5_reason(str(exc))}); the file is damaged"
            ) from None

    def _direct_reader(self, name):
        """The :class:`_DirectReader` of dataset ``name``, planned on first use (None
        where HDF5 must read)."""
        with self._plan_lock:
            if name not in self._direct:
                try:
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY)
                    plan = _DirectReader.plan(self._fd, self._f, getattr(self, name))
                except (OSError, RuntimeError, AttributeError):  # e.g. no chunk_iter in h5py
                    plan = None
                self._direct[name] = plan
            return self._direct[name]

    def close(self):
        self._f.close()
        self._direct.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- writing

#: The exchange format's name and version (the group's ``format``/``format_version``).
FORMAT = "qkvmean-qkv"
FORMAT_VERSION = 1
#: The axis names of a dataset, in the order qkvmean reads.
AXES = ("batch", "layer", "head", "seq", "dim")

_STR = h5py.string_dtype("utf-8")


#: Attributes the writer sets itself (``attrs`` may not).
_RESERVED = ("format", "format_version", "causal")
#: HDF5's largest chunk is 4 GiB; an input larger than this is chunked a layer at a time.
_MAX_CHUNK = 2**32 - 1


def _count(value, what, least=1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} must be an integer, got {value!r}")
    if value < least:
        raise InputError(f"{what} must be at least {least}, got {value}")
    return int(value)


def _chunks(shape, itemsize):
    """One input per chunk (what the reader's fast path reads), split further only where
    one input is larger than an HDF5 chunk may be."""
    chunk = [1, *shape[1:]]
    for axis in range(1, len(shape) - 1):
        if int(np.prod(chunk, dtype=np.int64)) * itemsize <= _MAX_CHUNK:
            break
        chunk[axis] = 1
    return tuple(chunk)


class QKVWriter:
    """Writes Q/K/V in the exchange format (docs/store.md), batch by batch.

    The file is built at ``.NAME.<pid>.partial`` beside ``path`` and put in place by
    :meth:`finish`, so a kill never leaves a half-written file under the final name; an
    existing ``path`` is refused unless ``overwrite``. Datasets ``q`` ``(batch, layer,
    head, seq, dim)``, ``k`` and ``v`` ``(batch, layer, kv_head, seq, dim_v)`` (float32,
    one input per chunk, uncompressed) carry dimension scales and labels; ``lengths``, and
    optionally ``tokens`` ``(batch, seq)`` and ``text`` ``(batch,)``. Every input must be
    written (:meth:`write`) before :meth:`finish`. As a context manager it finishes on a
    clean exit and aborts on an exception.
    """

    def __init__(self, path, *, n_inputs, n_layers, n_heads, n_kv_heads=None, seq, dim,
                 dim_v=None, lengths, causal=None, tokens=None, text=None, attrs=None,
                 group="/", overwrite=False, layer_ids=None):  # fmt: skip
        from ..files import check_new_file

        self.path = Path(path)
        n = _count(n_inputs, "n_inputs")
        n_layers = _count(n_layers, "n_layers")
        n_heads = _count(n_heads, "n_heads")
        n_kv_heads = n_heads if n_kv_heads is None else _count(n_kv_heads, "n_kv_heads")
        seq, dim = _count(seq, "seq"), _count(dim, "dim")
        dim_v = dim if dim_v is None else _count(dim_v, "dim_v")
        if n_heads % n_kv_heads:
            raise InputError(
                f"{n_kv_heads} KV heads do not divide {n_heads} query heads (grouped-query "
                "attention needs a divisor)"
            )
        self.lengths = self._lengths(lengths, n, seq)
        tokens = None if tokens is None else self._tokens(tokens, n, seq)
        if text is not None:
            text = [str(t) for t in text]
            if len(text) != n:
                raise InputError(f"text must hold one string per input ({n}), got {len(text)}")
        attrs = dict(attrs or {})
        clash = [key for key in attrs if key in _RESERVED]
        if clash:
            raise InputError(f"attrs may not set {clash[0]!r}: the writer sets it (causal=...)")
        layer_ids = list(range(n_layers)) if layer_ids is None else list(layer_ids)
        if len(layer_ids) != n_layers:
            raise InputError(f"layer_ids must hold {n_layers} layer numbers, got {len(layer_ids)}")
        self.group_name = "/" + str(group).strip("/")
        check_new_file(self.path, overwrite, flag="--out", noun="Q/K/V file")
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.overwrite = overwrite
        self.n_inputs, self.seq = n, seq
        self.shapes = {
            "q": (n_layers, n_heads, dim),
            "k": (n_layers, n_kv_heads, dim),
            "v": (n_layers, n_kv_heads, dim_v),
        }
        self.written = np.zeros(n, dtype=bool)
        self.done = None  # the final path once finished; False once aborted
        self.f = h5py.File(self.tmp, "w")
        try:
            g = self.f.require_group(self.group_name)
            self._skeleton(g, n, layer_ids, n_heads, n_kv_heads, seq, dim, dim_v, causal,
                           tokens, text, attrs)  # fmt: skip
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _lengths(lengths, n, seq):
        lengths = np.asarray(lengths)
        if lengths.shape != (n,) or (lengths.size and lengths.dtype.kind not in "iu"):
            raise InputError(
                f"lengths must be {n} integer counts (one per input), got shape {lengths.shape} "
                f"dtype {lengths.dtype}"
            )
        bad = np.flatnonzero((lengths < 0) | (lengths > seq))
        if bad.size:
            i = int(bad[0])
            raise InputError(f"lengths: input {i} has length {lengths[i]}, outside 0..{seq}")
        return lengths.astype(np.int32)

    @staticmethod
    def _tokens(tokens, n, seq):
        """``(n, seq)`` strings: each input's tokens, padded with "" to ``seq``."""
        rows = [[str(t) for t in row] for row in tokens]
        if len(rows) != n or any(len(row) > seq for row in rows):
            long = [len(r) for r in rows if len(r) > seq]
            why = f"{len(rows)} inputs" if len(rows) != n else f"an input of {long[0]} tokens"
            raise InputError(f"tokens must be {n} inputs of at most {seq} tokens, got {why}")
        return np.array([row + [""] * (seq - len(row)) for row in rows], dtype=_STR)

    def _skeleton(self, g, n, layer_ids, heads, kv_heads, seq, dim, dim_v, causal, tokens,
                  text, attrs):  # fmt: skip
        g.attrs["format"] = FORMAT
        g.attrs["format_version"] = np.int32(FORMAT_VERSION)
        if causal is not None:
            g.attrs["causal"] = bool(causal)
        for key, value in attrs.items():
            g.attrs[key] = value
        scales = {
            "batch": np.arange(n), "layer": np.asarray(layer_ids), "head": np.arange(heads),
            "seq": np.arange(seq), "dim": np.arange(dim),
        }  # fmt: skip
        if kv_heads != heads:
            scales["kv_head"] = np.arange(kv_heads)
        if dim_v != dim:
            scales["dim_v"] = np.arange(dim_v)
        for name, values in scales.items():
            g.create_dataset(name, data=values.astype(np.int32)).make_scale(name)
        kv = "kv_head" if kv_heads != heads else "head"
        axes = {
            "q": ("batch", "layer", "head", "seq", "dim"),
            "k": ("batch", "layer", kv, "seq", "dim"),
            "v": ("batch", "layer", kv, "seq", "dim_v" if dim_v != dim else "dim"),
        }
        for name, names in axes.items():
            shape = tuple(len(scales[a]) for a in names)
            d = g.create_dataset(name, shape=shape, dtype="float32", chunks=_chunks(shape, 4))
            _name_axes(d, g, names)
        _name_axes(g.create_dataset("lengths", data=self.lengths), g, ("batch",))
        if tokens is not None:
            _name_axes(g.create_dataset("tokens", data=tokens), g, ("batch", "seq"))
        if text is not None:
            _name_axes(g.create_dataset("text", data=np.array(text, dtype=_STR)), g, ("batch",))

    def write(self, start, q, k, v):
        """Inputs ``start:start + len(q)``: ``q`` ``(n, layer, head, seq_b, dim)``, ``k``
        and ``v`` with the KV heads (``v`` its ``dim_v``), ``seq_b <= seq`` (zero-padded to
        the file's ``seq``). Any float dtype (written as float32); values must be finite."""
        if self.done is not None:
            raise InputError(f"{self.path}: the writer is already finished or aborted")
        start = _count(start, "start", least=0)
        q, k, v = (np.asarray(x) for x in (q, k, v))
        m = q.shape[0] if q.ndim else 0
        arrays = {}
        for name, x in (("q", q), ("k", k), ("v", v)):
            layers, heads, dim = self.shapes[name]
            fits = x.ndim == 5 and x.shape[:3] == (m, layers, heads) and x.shape[4] == dim
            if not fits or x.shape[3] > self.seq or (name != "q" and x.shape[3] != q.shape[3]):
                want = f"({m}, {layers}, {heads}, {q.shape[3] if q.ndim == 5 else 'seq'}, {dim})"
                raise InputError(
                    f"write: {name} has shape {x.shape}, expected {want} (seq at most {self.seq})"
                )
            if x.dtype.kind not in "fiu":
                raise InputError(f"write: {name} has dtype {x.dtype}, not a float")
            x = np.asarray(x, dtype=np.float32)
            bad = np.flatnonzero(~np.isfinite(x.reshape(-1)))
            if bad.size:
                where = np.unravel_index(int(bad[0]), x.shape)
                raise InputError(
                    f"write: {name} of input {start + int(where[0])} holds "
                    f"{x.reshape(-1)[bad[0]]} at {tuple(int(i) for i in where[1:])}; all "
                    "values must be finite"
                )
            if x.shape[3] < self.seq:
                x = np.pad(x, [(0, 0)] * 3 + [(0, self.seq - x.shape[3]), (0, 0)])
            arrays[name] = x
        if start + m > self.n_inputs:
            raise InputError(
                f"write: inputs {start}..{start + m - 1} are beyond the file's "
                f"{self.n_inputs} inputs"
            )
        g = self.f[self.group_name]
        for name, x in arrays.items():
            g[name][start : start + m] = x
        self.written[start : start + m] = True

    def finish(self) -> Path:
        """Close, fsync and put the file in place under its final name; returns it."""
        if self.done:
            return self.done
        if self.done is False:
            raise InputError(f"{self.path}: the writer was aborted; nothing to finish")
        missing = np.flatnonzero(~self.written)
        if missing.size:
            more = f" and {missing.size - 1} more" if missing.size > 1 else ""
            raise InputError(
                f"{self.path}: input {int(missing[0])}{more} never written; write every input "
                "before finish(), or abort()"
            )
        self.f.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            put_in_place(self.tmp, self.path, self.overwrite, flag="--out", noun="file")
        except BaseException:
            self.abort()
            raise
        self.done = self.path
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.path

    def abort(self):
        """Close and delete the unfinished file (nothing is left at ``path``)."""
        if self.done:
            return
        self.done = False
        with contextlib.suppress(OSError, RuntimeError, ValueError, AttributeError):
            self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if kind is not None:
            self.abort()
        elif self.done is None:
            try:
                self.finish()
            except BaseException:  # an input never written: nothing is left
                self.abort()
                raise


def _name_axes(dset, group, names):
    for axis, name in enumerate(names):
        dset.dims[axis].attach_scale(group[name])
        dset.dims[axis].label = name


def write_qkv(path, q, k, v, *, lengths=None, causal=None, group="/", tokens=None, text=None,
              attrs=None, overwrite=False) -> Path:  # fmt: skip
    """Write ``q``, ``k``, ``v`` in the exchange format; returns the path.

    ``q`` is ``(batch, layer, head, seq, dim)`` or ``(batch, head, seq, dim)`` (written
    with a layer axis of 1); ``k`` and ``v`` alike, with fewer heads where they are KV
    heads, ``v`` with its own last axis. ``lengths`` defaults to every position.
    """
    q, k, v = (np.asarray(x) for x in (q, k, v))
    if q.ndim not in (4, 5) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise InputError(
            f"q, k and v must be (batch, [layer,] head, seq, dim) arrays alike, got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    if q.ndim == 4:
        q, k, v = q[:, None], k[:, None], v[:, None]
    n, layers, heads, seq, dim = q.shape
    lengths = np.full(n, seq) if lengths is None else lengths
    with QKVWriter(path, n_inputs=n, n_layers=layers, n_heads=heads, n_kv_heads=k.shape[2],
                   seq=seq, dim=dim, dim_v=v.shape[-1], lengths=lengths, causal=causal,
                   tokens=tokens, text=text, attrs=attrs, group=group,
                   overwrite=overwrite) as w:  # fmt: skip
        w.write(0, q, k, v)
    return w.finish()
