"""Reading raw Q/K/V: plain reads where HDF5 stores plain bytes, HDF5 everywhere else,
the same values either way."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from qkvmean.io.qkv import QKVInput

SHAPE = (11, 2, 5, 4)  # inputs, heads, tokens, dim (rank 4: the layer axis is added)

LAYOUTS = {
    # id: (create_dataset keywords, read directly?)
    "contiguous": ({}, True),
    "chunks of whole inputs, last one partial": ({"chunks": (3, 2, 5, 4)}, True),
    "one input per chunk": ({"chunks": (1, 2, 5, 4)}, True),
    "chunks split inside an input": ({"chunks": (2, 1, 5, 4)}, False),
    "deflate": ({"chunks": (3, 2, 5, 4), "compression": "gzip"}, False),
    "shuffle only": ({"chunks": (3, 2, 5, 4), "shuffle": True}, False),
    "big-endian": ({"dtype": ">f4"}, False),
    "float16": ({"dtype": "f2", "chunks": (4, 2, 5, 4)}, True),
    "float64": ({"dtype": "f8"}, True),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_reads_the_values_hdf5_reads(tmp_path, name):
    keywords, direct = LAYOUTS[name]
    rng = np.random.default_rng(len(name))
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        for n in "qkv":
            dtype = keywords.get("dtype", "f4")
            kw = {k: v for k, v in keywords.items() if k != "dtype"}
            f.create_dataset(n, data=rng.normal(size=SHAPE).astype(dtype), dtype=dtype, **kw)
    with QKVInput(str(path)) as inp, h5py.File(path, "r") as f:
        for start, stop in [(0, 11), (2, 9), (3, 6), (10, 11), (4, 4)]:
            got = inp.read(start, stop)
            for x, n in zip(got, "qkv", strict=True):
                want = f[n][start:stop]
                if name == "float16":  # computed in float32 (see QKVInput.read)
                    want = want.astype(np.float32)
                assert x.shape == (stop - start, 1, *SHAPE[1:])
                assert x.dtype == want.dtype
                np.testing.assert_array_equal(x[:, 0], want)
        assert (inp._direct["q"] is not None) == direct


def test_a_chunk_never_written_is_read_by_hdf5_with_its_fill_value(tmp_path):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        for n in "qkv":
            d = f.create_dataset(n, shape=SHAPE, dtype="f4", chunks=(3, 2, 5, 4), fillvalue=0.5)
            d[0:3] = 1.0  # chunks 1.. are never written
    with QKVInput(str(path)) as inp:
        q, _, _ = inp.read(0, 11)
        assert inp._direct["q"] is None
        assert (q[:3] == 1.0).all() and (q[3:] == 0.5).all()


def test_a_nan_is_named_by_input_on_the_direct_path(tmp_path):
    path = tmp_path / "in.h5"
    q = np.zeros(SHAPE, np.float32)
    q[7, 1, 2, 3] = np.nan
    with h5py.File(path, "w") as f:
        f["q"], f["k"], f["v"] = q, np.zeros_like(q), np.zeros_like(q)
    with QKVInput(str(path)) as inp:
        with pytest.raises(ValueError, match=r"/q: input 7 contains nan at \(1, 2, 3\)"):
            inp.read(4, 9)
        assert inp._direct["q"] is not None
