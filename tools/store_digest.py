"""A digest of a store's contents, for checking that a change leaves the bytes alone.

    python tools/store_digest.py STORE.h5 [...]

One line per object (group, dataset, attribute): its path and a SHA-256 of its stored
bytes (each chunk as written, filters applied, for chunked datasets; the raw values
otherwise). What differs between two runs of the same job by design is left out: the
time a run started (``created_utc``) and, inside ``config``, the machine (``environment``)
and where the inputs were (``input``, ``texts``).
Two stores with the same lines hold the same bytes wherever it matters; diff the outputs.
"""

from __future__ import annotations

import hashlib
import json
import sys

import h5py
import numpy as np

STAMPS = ("created_utc",)
#: the machine, and where the inputs were (the digests of two directories compare)
CONFIG_STAMPS = ("environment", "input", "texts")


def _attr(name, value):
    if name in STAMPS:
        return "(stamp)"
    if name == "config":
        config = json.loads(value)
        for key in CONFIG_STAMPS:
            config.pop(key, None)
        value = json.dumps(config, sort_keys=True)
    return hashlib.sha256(
        np.asarray(value).tobytes() if not isinstance(value, str) else value.encode()
    ).hexdigest()[:16]


def _dataset(d: h5py.Dataset) -> str:
    h = hashlib.sha256()
    if d.chunks is not None and d.id.get_num_chunks():
        for i in range(d.id.get_num_chunks()):
            info = d.id.get_chunk_info(i)
            h.update(repr(info.chunk_offset).encode())
            h.update(d.id.read_direct_chunk(info.chunk_offset)[1])
    elif d.shape and d.size and d.dtype.kind == "O":  # strings: their bytes, not pointers
        h.update(repr(d.asstr()[()].tolist()).encode())
    elif d.shape and d.size:
        h.update(np.ascontiguousarray(d[()]).tobytes())
    return f"{d.dtype} {d.shape} {d.chunks} {d.compression} {h.hexdigest()[:16]}"


def digest(path) -> list:
    lines = []
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            kind = _dataset(obj) if isinstance(obj, h5py.Dataset) else "group"
            lines.append(f"/{name}: {kind}")
            for key in sorted(obj.attrs):
                if key in ("DIMENSION_LIST", "REFERENCE_LIST"):
                    continue  # object references: addresses, not contents
                lines.append(f"/{name}@{key}: {_attr(key, obj.attrs[key])}")

        for key in sorted(f.attrs):
            lines.append(f"/@{key}: {_attr(key, f.attrs[key])}")
        f.visititems(visit)
    return lines


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print("\n".join(digest(p)))
