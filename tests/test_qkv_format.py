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
from qkvmean.files import InputError
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
        # what the shape cannot rule out is said in one line: the order it assumed
        (order,) = i.warnings
        assert (
            not i.named
            and "a.h5:/q: no axis names, so read in the order (batch, layer, "
            f"head, seq, dim) as batch {q.shape[0]}, layer {q.shape[1]}, head {q.shape[2]}, "
            f"seq {q.shape[3]}, dim {q.shape[4]}; if that is not its order, name the axes"
            in order
        )
    with QKVInput(str(_write(tmp_path / "b.h5", {"q": q, "k": k, "v": v}))) as inp:
        assert len(inp.warnings) == 2
        assert "no lengths dataset, so every one of the 7 positions" in inp.warnings[1]
    # named files say nothing
    named = tmp_path / "c.h5"
    write_qkv(named, q, k, v, lengths=lengths)
    with QKVInput(str(named)) as inp:
        assert inp.named and inp.warnings == []


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
    assert len(err) == 1 and "ambiguous" in err[0] and "f['q'].dims[3].label = 'seq'" in err[0]
    assert not (tmp_path / "u.s.h5").exists()


def test_four_dimensional_arrays_round_trip_and_named_4d_files_are_reordered(tmp_path):
    q, k, v, lengths = _data(layers=1)
    q4, k4, v4 = q[:, 0], k[:, 0], v[:, 0]  # (batch, head, seq, dim)
    with QKVInput(str(write_qkv(tmp_path / "w.h5", q4, k4, v4, lengths=lengths))) as inp:
        for a, b in zip(inp.read(0, 3), (q, k, v), strict=True):
            np.testing.assert_array_equal(a, b)
    order = (0, 2, 1, 3)  # (batch, seq, head, dim), no layer axis
    arrays = {n: np.transpose(x, order) for n, x in zip("qkv", (q4, k4, v4), strict=True)}
    names = [("batch", "head", "seq", "dim")[i] for i in order]
    with QKVInput(str(_write(tmp_path / "n.h5", arrays, names, lengths=lengths))) as inp:
        assert inp.rank == 4 and inp.n_layers == 1 and inp.named
        for a, b in zip(inp.read(0, 3), (q, k, v), strict=True):
            np.testing.assert_array_equal(a, b)


def test_files_in_the_canonical_order_keep_the_fast_path_and_reordered_ones_do_not(tmp_path):
    q, k, v, lengths = _data()
    with QKVInput(str(write_qkv(tmp_path / "w.h5", q, k, v, lengths=lengths))) as inp:
        assert inp.named and inp.perm == dict.fromkeys("qkv")
        assert all(inp._direct_reader(n) is not None for n in "qkv")
        assert inp.chunk_inputs() == 1
    order = (0, 3, 1, 2, 4)
    arrays = {n: np.transpose(x, order) for n, x in zip("qkv", (q, k, v), strict=True)}
    path = _write(tmp_path / "n.h5", arrays, [AXES[i] for i in order], lengths=lengths)
    with QKVInput(str(path)) as inp:
        assert inp.perm["q"] == (0, 2, 3, 1, 4)
        for a, b in zip(inp.read(2, 3), (q, k, v), strict=True):
            np.testing.assert_array_equal(a, b[2:3])


def test_grouped_query_files_keep_their_kv_heads_and_give_the_expanded_files_maps(tmp_path):
    q, k, v, lengths = _data(heads=4, kv=2)
    gqa = write_qkv(tmp_path / "g.h5", q, k, v, lengths=lengths, causal=True)
    with QKVInput(str(gqa)) as inp:
        got = inp.read(0, 3)
        assert inp.n_heads == 4 and got[1].shape[2] == 2 and got[2].shape[2] == 2
        assert inp.identity()["shapes"]["k"] == [3, 2, 2, 7, 5]
    full = write_qkv(
        tmp_path / "f.h5", q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2),
        lengths=lengths, causal=True,
    )  # fmt: skip
    for src in (gqa, full):
        assert main(["run", "--qkv", str(src), "--out", str(src.with_suffix(".s.h5")), "-q"]) == 0
    with qkvmean.open_store(tmp_path / "g.s.h5") as a, qkvmean.open_store(tmp_path / "f.s.h5") as b:
        assert a.conditions == b.conditions
        for cond in a.conditions:
            np.testing.assert_allclose(a.maps(cond), b.maps(cond), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("attrs", "warned"),
    [
        ({"captured_at": "projection", "rotary": True}, True),
        ({"captured_at": "projection", "rotary": "true"}, True),
        ({"captured_at": "projection", "rotary": False}, False),
        ({"captured_at": "attention", "rotary": True}, False),
    ],
)
def test_a_capture_before_the_rotary_embedding_warns(tmp_path, attrs, warned):
    q, k, v, lengths = _data()
    with QKVInput(str(write_qkv(tmp_path / "x.h5", q, k, v, lengths=lengths, attrs=attrs))) as i:
        assert len(i.warnings) == warned
        assert not warned or "before the model's rotary embedding" in i.warnings[0]
        assert all("\n" not in w and w.startswith("warning: ") for w in i.warnings)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 2, 6, 6, 8), r"the head axis \(6\) is not shorter than the seq axis \(-2, 6\)"),
        ((3, 6, 2, 4, 8), r"the layer axis \(6\) is not shorter than the seq axis \(-2, 4\)"),
        ((3, 10, 4, 8), r"shape \(3, 10, 4, 8\) with no axis names is ambiguous: the head"),
        ((3, 2, 4, 10, 257), "last axis of 257, larger than any model's head dimension"),
    ],
)
def test_unnamed_shapes_that_could_mean_another_order_are_refused(tmp_path, shape, message):
    x = np.zeros(shape, np.float32)
    path = _write(tmp_path / "x.h5", dict.fromkeys("qkv", x))
    with pytest.raises(InputError, match=message) as caught:
        QKVInput(str(path))
    assert "\n" not in str(caught.value) and "label every axis of q, k and v" in str(caught.value)


def test_unnamed_files_at_the_edge_of_the_rule_are_read(tmp_path):
    x = np.ones((2, 2, 4, 5, 256), np.float32)  # seq just longer than heads, dim 256
    with QKVInput(str(_write(tmp_path / "x.h5", dict.fromkeys("qkv", x)))) as inp:
        assert (inp.n_heads, inp.seq, inp.dim) == (4, 5, 256) and not inp.named


def test_a_file_that_says_it_is_the_format_must_name_its_axes_and_others_formats_are_ignored(
    tmp_path,
):
    q, k, v, lengths = _data()
    path = _write(tmp_path / "x.h5", {"q": q, "k": k, "v": v}, lengths=lengths)
    with h5py.File(path, "r+") as f:
        f.attrs.update(format="qkvmean-qkv", format_version=1)
    with pytest.raises(InputError, match="says format 'qkvmean-qkv', whose axes are named, but"):
        QKVInput(str(path))
    with h5py.File(path, "r+") as f:
        f.attrs["format"] = "some-other-tool"
    with QKVInput(str(path)) as inp:
        assert not inp.named


def test_groups_tokens_and_texts_are_written_and_read(tmp_path):
    q, k, v, lengths = _data()
    tokens = [["[CLS]", "a"], ["b"] * 7, []]
    path = write_qkv(tmp_path / "x.h5", q, k, v, lengths=lengths, group="/cap/run1",
                     tokens=tokens, text=["a", "b b", ""], attrs={"model": "m"})  # fmt: skip
    with h5py.File(path) as f:
        g = f["cap/run1"]
        assert g.attrs["format"] == "qkvmean-qkv" and g.attrs["model"] == "m"
        assert g["tokens"].shape == (3, 7) and g["tokens"].asstr()[0, 2] == ""
        assert list(g["text"].asstr()[...]) == ["a", "b b", ""]
        assert [g["tokens"].dims[i].label for i in range(2)] == ["batch", "seq"]
        assert "q" not in f
    with QKVInput(f"{path}:/cap/run1") as inp:
        np.testing.assert_array_equal(inp.read(0, 3)[0], q)
    with pytest.raises(InputError, match=r"no group '/other' in the file \(it has /cap"):
        QKVInput(f"{path}:/other")


def test_the_writer_refuses_bad_writes_in_one_line_and_leaves_nothing(tmp_path):
    q, k, v, lengths = _data()
    kw = dict(n_inputs=3, n_layers=2, n_heads=4, n_kv_heads=4, seq=7, dim=5, dim_v=3,
              lengths=lengths)  # fmt: skip
    bad_q = q.copy()
    bad_q[1, 0, 2, 3, 4] = np.nan
    cases = [
        ((0, q[:, :, :2], k, v), r"write: q has shape \(3, 2, 2, 7, 5\), expected \(3, 2, 4, 7"),
        ((0, q, k[..., :6, :], v), r"write: k has shape \(3, 2, 4, 6, 5\), expected"),
        ((2, q, k, v), r"write: inputs 2\.\.4 are beyond the file's 3 inputs"),
        ((0, bad_q, k, v), r"write: q of input 1 holds nan at \(0, 2, 3, 4\)"),
    ]
    for args, message in cases:
        w = QKVWriter(tmp_path / "x.h5", **kw)
        with pytest.raises(InputError, match=message) as caught:
            w.write(*args)
        assert "\n" not in str(caught.value)
        w.abort()
    with pytest.raises(InputError, match=r"input 2 never written"):
        with QKVWriter(tmp_path / "x.h5", **kw) as w:
            w.write(0, q[:2], k[:2], v[:2])
    with pytest.raises(InputError, match="3 KV heads do not divide 4 query heads"):
        QKVWriter(tmp_path / "x.h5", **{**kw, "n_kv_heads": 3})
    with pytest.raises(InputError, match=r"lengths: input 0 has length 8, outside 0\.\.7"):
        QKVWriter(tmp_path / "x.h5", **{**kw, "lengths": [8, 1, 1]})
    assert list(tmp_path.iterdir()) == []


def test_seq_shorter_batches_are_zero_padded_and_overwrite_replaces(tmp_path):
    q, k, v, lengths = _data()
    path = tmp_path / "x.h5"
    path.write_bytes(b"old")
    kw = dict(n_inputs=3, n_layers=2, n_heads=4, n_kv_heads=4, seq=9, dim=5, dim_v=3,
              lengths=lengths, overwrite=True)  # fmt: skip
    with QKVWriter(path, **kw) as w:
        w.write(0, q[:1], k[:1], v[:1])
        w.write(1, q[1:], k[1:], v[1:])
    with QKVInput(str(path)) as inp:
        got = inp.read(0, 3)
        assert inp.seq == 9
        for a, b in zip(got, (q, k, v), strict=True):
            np.testing.assert_array_equal(a[..., :7, :], b)
            assert not a[..., 7:, :].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_a_killed_writer_leaves_nothing_under_the_final_name(tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "x.h5"
    script = (
        "import os, signal, numpy as np\n"
        "from qkvmean.io.qkv import QKVWriter\n"
        f"w = QKVWriter({str(path)!r}, n_inputs=2, n_layers=1, n_heads=2, seq=4, dim=3,\n"
        "              lengths=[4, 4])\n"
        "w.write(0, *[np.ones((2, 1, 2, 4, 3))] * 3)\n"
        "w.f.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not path.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".x.h5.") and left[0].endswith(".partial")


def test_the_docs_pytorch_example_writes_a_file_that_is_read_as_named(tmp_path, monkeypatch):
    """The h5py half of docs/store.md's hooks example, as written, with numpy arrays in place
    of the tensors the hooks took (the test suite has no torch)."""
    import re
    import types
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "store.md").read_text()
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", doc, flags=re.S) if "hook" in b]
    writing = block[block.index('with h5py.File("qkv.h5", "w")') :]

    class Tensor(np.ndarray):
        def numpy(self):
            return np.asarray(self)

    q, k, v, lengths = _data(n=2, layers=3)
    taken = {t: [x[:, i] for i in range(3)] for t, x in zip("qkv", (q, k, v), strict=True)}
    mask = (np.arange(7) < lengths[:, None]).astype(np.int64).view(Tensor)
    torch = types.SimpleNamespace(stack=lambda xs, dim: np.stack(xs, dim).view(Tensor))
    monkeypatch.chdir(tmp_path)
    exec(writing, {"h5py": h5py, "torch": torch, "taken": taken, "batch": {"attention_mask": mask}})
    with QKVInput("qkv.h5") as inp:
        assert inp.named and inp.warnings == [] and inp.causal_attr is False
        np.testing.assert_array_equal(inp.lengths, lengths)
        for a, b in zip(inp.read(0, 2), (q, k, v), strict=True):
            np.testing.assert_array_equal(a, b)
