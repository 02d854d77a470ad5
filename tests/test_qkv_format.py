"""The Q/K/V exchange format: named axes read in any order, unnamed files read only when
their shape cannot mean another, the writer, and the CLI's one-line refusals."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkvmean
from qkvmean.cli import main
from qkvmean.io import InputError
from qkvmean.io.qkv import AXES, QKVInput, QKVWriter, write_qkv


def _data(seed=0, n=3, layers=2, heads=4, kv=4, seq=7, dim=5, dim_v=3):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, layers, heads, seq, dim)).astype(np.float32)
    k = rng.normal(size=(n, layers, kv, seq, dim)).astype(np.float32)
    v = rng.normal(size=(n, layers, kv, seq, dim_v)).astype(np.float32)
    lengths = rng.integers(1, seq + 1, size=n)
    return q, k, v, lengths


def _write(path, arrays, names=None, *, scales=False, lengths=None):
    """A file as another tool writes it: ``names`` per axis as labels (or as scales)."""
    with h5py.File(path, "w") as f:
        for key, x in arrays.items():
            d = f.create_dataset(key, data=x)
            for i, name in enumerate(names or ()):
                if scales:
                    scale = f"{key}_{name}"  # any dataset name the tool likes
                    f.create_dataset(scale, data=np.arange(x.shape[i]))
                    f[scale].make_scale(name)
                    d.dims[i].attach_scale(f[scale])
                    d.dims[i].label = ""
                else:
                    d.dims[i].label = name
        if lengths is not None:
            f["lengths"] = lengths
    return path


@pytest.mark.parametrize(("kv", "dim_v"), [(4, 5), (2, 3)])
def test_the_writer_round_trips_through_the_reader(tmp_path, kv, dim_v):
    q, k, v, lengths = _data(kv=kv, dim_v=dim_v)
    path = write_qkv(tmp_path / "x.h5", q, k, v, lengths=lengths, causal=True)
    inp = QKVInput(str(path))
    got = inp.read(0, 3)
    for a, b in zip(got, (q, k, v), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(inp.lengths, lengths)
    assert inp.causal_attr is True and inp.warnings == [] and inp.named
    with h5py.File(path) as f:
        assert f.attrs["format"] == "qkvmean-qkv" and f.attrs["format_version"] == 1
        assert [f["k"].dims[i].label for i in range(5)][2] == ("kv_head" if kv < 4 else "head")
    inp.close()


@settings(max_examples=20, deadline=None)
@given(st.permutations(range(5)), st.booleans())
def test_named_axes_in_any_order_are_read_in_the_canonical_one(tmp_path_factory, perm, scales):
    q, k, v, lengths = _data(seed=sum(perm))
    names = [AXES[i] for i in perm]
    path = tmp_path_factory.mktemp("perm") / "p.h5"
    arrays = {n: np.transpose(x, perm) for n, x in zip("qkv", (q, k, v), strict=True)}
    _write(path, arrays, names, scales=scales, lengths=lengths)
    with QKVInput(str(path)) as inp:
        for a, b in zip(inp.read(1, 3), (q, k, v), strict=True):
            np.testing.assert_array_equal(a, b[1:3])
        assert (inp.n_layers, inp.n_heads, inp.seq, inp.dim) == q.shape[1:]


def test_a_netcdf_file_from_xarray_is_read(tmp_path):
    import xarray as xr

    q, k, v, lengths = _data()
    order = ("batch", "seq", "layer", "head", "dim")  # as another tool chose
    perm = [AXES.index(a) for a in order]
    ds = xr.Dataset(
        {
            "q": (order, np.transpose(q, perm)),
            "k": (order, np.transpose(k, perm)),
            "v": (("batch", "seq", "layer", "head", "dim_v"), np.transpose(v, perm)),
            "lengths": (("batch",), lengths),
        }
    )
    ds.to_netcdf(tmp_path / "x.nc", engine="h5netcdf")
    with QKVInput(str(tmp_path / "x.nc")) as inp:
        for a, b in zip(inp.read(0, 3), (q, k, v), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("shape", "names", "message"),
    [
        ((3, 2, 10, 4, 8), None, r"the head axis \(10\) is not shorter than the seq axis"),
        ((3, 2, 10, 384), None, "are the heads not split?"),
        ((3, 2, 10, 384), ("batch", "layer", "seq", "hidden"), "the heads are not split"),
        ((3, 2, 4, 10, 8), ("batch", "layer", "head", "time", "dim"), "unknown axis name 'time'"),
        ((3, 2, 4, 10, 8), ("batch", "layer", "head", "seq", ""), "names some axes but not"),
        ((3, 2, 4, 10, 8), ("batch", "layer", "head", "seq", "seq"), "each once"),
    ],
)
def test_layouts_that_cannot_be_read_are_refused(tmp_path, shape, names, message):
    x = np.zeros(shape, np.float32)
    path = _write(tmp_path / "x.h5", dict.fromkeys("qkv", x), names)
    with pytest.raises(InputError, match=message) as caught:
        QKVInput(str(path))
    assert "\n" not in str(caught.value)


def test_unnamed_files_in_the_documented_order_still_work_with_a_warning_without_lengths(
    tmp_path,
):
    q, k, v, lengths = _data()
    with QKVInput(str(_write(tmp_path / "a.h5", {"q": q, "k": k, "v": v}, lengths=lengths))) as i:
        assert not i.named and i.warnings == []
    with QKVInput(str(_write(tmp_path / "b.h5", {"q": q, "k": k, "v": v}))) as inp:
        assert len(inp.warnings) == 1 and "no lengths dataset, so every one of the 7" in (
            inp.warnings[0]
        )


def test_an_unknown_format_version_and_wrong_lengths_are_refused(tmp_path):
    q, k, v, lengths = _data()
    path = write_qkv(tmp_path / "x.h5", q, k, v, lengths=lengths)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 7
    with pytest.raises(InputError, match="version 7; this qkvmean reads 'qkvmean-qkv' version 1"):
        QKVInput(str(path))
    wrong = _write(tmp_path / "w.h5", {"q": q, "k": k, "v": v}, lengths=lengths + 20)
    with pytest.raises(InputError, match=r"axis -2\); if q's axes are not in the order"):
        QKVInput(str(wrong))


def test_the_writer_never_clobbers_and_an_abort_leaves_nothing(tmp_path):
    q, k, v, lengths = _data()
    path = tmp_path / "x.h5"
    path.write_bytes(b"keep")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        write_qkv(path, q, k, v)
    kw = dict(n_inputs=3, n_layers=2, n_heads=4, n_kv_heads=4, seq=7, dim=5, dim_v=3,
              lengths=lengths)  # fmt: skip
    with pytest.raises(RuntimeError):
        with QKVWriter(tmp_path / "y.h5", **kw) as w:
            w.write(0, q, k, v)
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]
    assert path.read_bytes() == b"keep"


def test_the_cli_reads_a_reordered_file_as_the_canonical_one(tmp_path, capsys):
    q, k, v, lengths = _data(seq=9)
    canonical = write_qkv(tmp_path / "c.h5", q, k, v, lengths=lengths)
    order = (0, 3, 1, 2, 4)  # (batch, seq, layer, head, dim)
    arrays = {n: np.transpose(x, order) for n, x in zip("qkv", (q, k, v), strict=True)}
    named = _write(tmp_path / "n.h5", arrays, [AXES[i] for i in order], lengths=lengths)
    unnamed = _write(tmp_path / "u.h5", arrays, None, lengths=lengths)
    for src in (canonical, named):
        assert main(["run", "--qkv", str(src), "--out", str(src.with_suffix(".s.h5")), "-q"]) == 0
    with qkvmean.open_store(tmp_path / "c.s.h5") as a, qkvmean.open_store(tmp_path / "n.s.h5") as b:
        for cond in a.conditions:
            np.testing.assert_array_equal(a.maps(cond), b.maps(cond))
    capsys.readouterr()
    assert main(["run", "--qkv", str(unnamed), "--out", str(tmp_path / "u.s.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ambiguous" in err[0] and "label = n" in err[0]
    assert not (tmp_path / "u.s.h5").exists()
