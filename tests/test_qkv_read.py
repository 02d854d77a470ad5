"""Reading raw Q/K/V: plain reads where HDF5 stores plain bytes, HDF5 everywhere else,
the same values either way."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from support import without_notes

from qkvmean.io.qkv import QKVInput, _DirectReader

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


def test_data_never_written_is_refused_not_read_as_the_fill_value(tmp_path):
    """HDF5 reads chunks that were never written as the fill value: zeros (here 0.5) that
    would be computed as if they were inputs. The direct reader would not plan them."""
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        for n in "qkv":
            d = f.create_dataset(n, shape=SHAPE, dtype="f4", chunks=(3, 2, 5, 4), fillvalue=0.5)
            d[0:3] = 1.0  # chunks 1.. are never written
    with pytest.raises(ValueError, match=r"/q: only 1 of its 4 chunks were ever written"):
        QKVInput(str(path))
    with h5py.File(path, "r") as f:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert _DirectReader.plan(fd, f, f["q"]) is None
        finally:
            os.close(fd)
    with h5py.File(path, "w") as f:  # contiguous, never written at all
        for n in "qkv":
            f.create_dataset(n, shape=SHAPE, dtype="f4")
    with pytest.raises(ValueError, match=r"/q: was never written"):
        QKVInput(str(path))


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


def _bfloat16():
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_fields(15, 7, 8, 0, 7)
    t.set_offset(0)
    t.set_precision(16)
    t.set_size(2)
    t.set_ebias(127)
    return t


def _float32_other_bias():  # four bytes like float32, another exponent bias
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_ebias(120)
    return t


@pytest.mark.parametrize("make_type", [_bfloat16, _float32_other_bias])
def test_a_float_type_h5py_converts_is_read_by_hdf5(tmp_path, make_type):
    """Float types h5py converts (bfloat16 reads as float32, a float with another
    exponent bias as float64): their bytes on disk are not the dtype's."""
    from h5py import h5d, h5s

    path = tmp_path / "in.h5"
    values = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    with h5py.File(path, "w") as f:
        for n in "qkv":
            h5d.create(f.id, n.encode(), make_type(), h5s.create_simple(SHAPE))
            f[n][...] = values
        f["after"] = np.ones(10_000)  # bytes a misread would run into
        want = f["q"][...]
    with QKVInput(str(path)) as inp:
        q, _, _ = inp.read(0, SHAPE[0])
        assert inp._direct["q"] is None
        np.testing.assert_array_equal(q[:, 0], want)


def test_datasets_behind_external_links_are_read_from_their_own_file(tmp_path):
    rng = np.random.default_rng(2)
    with h5py.File(tmp_path / "target.h5", "w") as f:
        for n in "qkv":
            f[n] = rng.normal(size=SHAPE).astype(np.float32)
    with h5py.File(tmp_path / "links.h5", "w") as f:
        f["pad"] = rng.normal(size=100_000).astype(np.float32)
        for n in "qkv":
            f[n] = h5py.ExternalLink("target.h5", "/" + n)
    with QKVInput(str(tmp_path / "links.h5")) as inp, h5py.File(tmp_path / "target.h5") as t:
        q, _, v = inp.read(0, SHAPE[0])
        assert inp._direct["q"] is None
        np.testing.assert_array_equal(q[:, 0], t["q"][...])
        np.testing.assert_array_equal(v[:, 0], t["v"][...])


@pytest.mark.parametrize(
    ("shape", "message"),
    [((3, 0, 4, 2), "has no heads"), ((3, 0, 2, 4, 2), "has no layers")],
)
def test_no_heads_or_no_layers_is_a_clear_error(tmp_path, shape, message):
    from qkvmean.files import InputError

    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        for n in "qkv":
            f[n] = np.zeros(shape, np.float32)
    with pytest.raises(InputError, match=message):
        QKVInput(str(path))


def test_an_io_error_while_reading_fails_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import os

    from qkvmean.cli import main
    from qkvmean.store import workdir

    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        for n in "qkv":
            f[n] = np.ones(SHAPE, np.float32)

    def broken(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", broken)
    out = tmp_path / "o.h5"
    assert main(["run", "--qkv", str(path), "--out", str(out), "--quiet"]) == 1
    err = without_notes(capsys.readouterr().err)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"reading {path}:/q failed: input/output error" in err and "--resume" in err
    assert not out.exists() and workdir.partial_dir(out).exists()
