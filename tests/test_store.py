"""``qkvmean run --qkv``: the store's contents, schema, readers, and the reader API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zlib

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import assert_within, skip_or_fail, weight_tolerance

import qkvmean
from qkvmean.cli import main
from qkvmean.engine import reference as ref
from qkvmean.store.schema import FORMAT_VERSION


def make_qkv(
    path,
    *,
    n=6,
    layers=2,
    heads=3,
    seq=9,
    dim=5,
    dim_v=4,
    group="/",
    causal=None,
    lengths=True,
    dtype=np.float32,
    seed=0,
    chunks=None,
):
    """An input file as another tool would write it."""
    rng = np.random.default_rng(seed)
    shape = (n, layers, heads, seq) if layers else (n, heads, seq)
    data = {
        "q": rng.normal(size=(*shape, dim)) * 1.5,
        "k": rng.normal(size=(*shape, dim)) * 1.5,
        "v": rng.normal(size=(*shape, dim_v)),
    }
    lens = rng.integers(1, seq + 1, size=n) if lengths else np.full(n, seq)
    if lengths:
        lens[0] = seq
    with h5py.File(path, "a") as f:
        g = f.require_group(group)
        for name, x in data.items():
            g.create_dataset(name, data=x.astype(dtype), chunks=chunks and (chunks, *x.shape[1:]))
        if lengths:
            g.create_dataset("lengths", data=lens.astype(np.int32))
        if causal is not None:
            g.attrs["causal"] = causal
    return {k: v.astype(dtype) for k, v in data.items()}, lens


def run_cli(*args):
    return main(["run", *map(str, args)])


@pytest.fixture(scope="module")
def rank5_store(tmp_path_factory):
    """A padded, causal (by attribute), grouped rank-5 input and its store."""
    tmp = tmp_path_factory.mktemp("rank5")
    data, lengths = make_qkv(tmp / "in.h5", group="/capture/run1", causal=True)
    out = tmp / "store.h5"
    assert (
        run_cli(
            "--qkv", f"{tmp / 'in.h5'}:/capture/run1", "--out", out, "--batch-size", 4, "--quiet"
        )
        == 0
    )
    return out, data, lengths


def _expected_maps(data, lengths, causal, over="tokens", heads=None, targets="qkv"):
    kw = dict(lengths=lengths, causal=causal)
    out = {"baseline": ref.attention_weights(data["q"], data["k"], **kw)}
    for t in targets:
        out[f"mean_{t}"] = ref.ablate(
            data["q"], data["k"], data["v"], target=t, over=over, heads=heads, **kw
        )[0]
    return out


def _check_maps(
    store_path, data, lengths, causal, over="tokens", heads=None, targets="qkv", rank=5
):
    expected = _expected_maps(data, lengths, causal, over, heads, targets)
    with h5py.File(store_path) as f:
        for name, want in expected.items():
            got = f["attention"][name][...]
            if rank == 4:
                got = got[:, 0]
            t = name[-1] if name != "baseline" else None
            q2, k2 = data["q"], data["k"]
            if t in ("q", "k"):
                q2, k2, _ = ref.substitute(
                    data["q"],
                    data["k"],
                    data["v"],
                    target=t,
                    over=over,
                    heads=heads,
                    lengths=lengths,
                )
            assert_within(got, want, weight_tolerance(want, q2, k2, None, np.float32), name)
            assert np.abs(got - want).max() < 3e-5  # the acceptance bar
        return f


def test_maps_match_reference_for_every_condition(rank5_store):
    out, data, lengths = rank5_store
    _check_maps(out, data, lengths, causal=True)


def test_metrics_match_values_computed_from_the_maps(rank5_store):
    out, _, lengths = rank5_store
    with h5py.File(out) as f:
        names = [s.decode() for s in f["metrics/condition"][...]]
        assert names == ["baseline", "mean_q", "mean_k", "mean_v"]
        base = f["attention/baseline"][...]
        for i, name in enumerate(names):
            expected = ref.metrics_from_maps(f["attention"][name][...], base, lengths)
            for metric in ("entropy", "kl_from_baseline", "top_key_mass"):
                got = f["metrics"][metric][i]
                assert got.dtype == np.float32
                np.testing.assert_allclose(got, expected[metric], rtol=2e-6, atol=1e-6)
            idx = f["metrics/top_key_index"][i]
            assert idx.dtype == np.int32
            col = f["attention"][name][...].astype(np.float64).mean(axis=-2)  # (b,l,h,key)
            col = col * f["seq"].shape[0] / lengths[:, None, None, None]  # mean over valid rows
            chosen = np.take_along_axis(col, idx[..., None].astype(np.int64), axis=-1)[..., 0]
            np.testing.assert_allclose(chosen, col.max(axis=-1), rtol=1e-6)


def test_schema_paths_dtypes_shapes_and_attributes(rank5_store):
    out, data, lengths = rank5_store
    n, layers, heads, seq, _ = data["q"].shape
    with h5py.File(out) as f:
        a = f.attrs
        assert a["format"] == "qkvmean-store"
        assert a["format_version"] == FORMAT_VERSION
        assert a["qkvmean_version"] == qkvmean.__version__
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["created_utc"])
        assert a["source"] == "qkv"
        assert bool(a["causal"]) is True
        assert a["over"] == "tokens"
        assert list(a["ablate_layers"]) == [0, 1]
        assert list(a["ablate_heads"]) == [0, 1, 2]
        config = json.loads(a["config"])
        assert config["targets"] == ["q", "k", "v"] and config["causal"] is True
        assert f["input/lengths"].dtype == np.int32
        np.testing.assert_array_equal(f["input/lengths"][...], lengths)
        for cond in ("baseline", "mean_q", "mean_k", "mean_v"):
            d = f["attention"][cond]
            assert d.dtype == np.float32 and d.shape == (n, layers, heads, seq, seq)
            assert d.compression == "gzip" and d.shuffle
            assert d.chunks[:2] == (1, 1) and d.chunks[3:] == (seq, seq)
            dims = [dim.label or next(iter(dim.keys())) for dim in d.dims]
            assert dims == ["batch", "map_layer", "head", "query", "key"]
        np.testing.assert_array_equal(f["map_layer"][...], f["layer"][...])  # maps at every layer
        # the condition table, on the condition scale: raw Q/K/V substitutes every layer
        table = {k: [x.decode() for x in f["conditions"][k][...]] for k in f["conditions"]}
        assert table == {
            "target": ["", "q", "k", "v"],
            "layers": ["[]"] + ["[0, 1]"] * 3,
            "heads": ["[]"] + ["all"] * 3,
            "substitution": [""] + ["tokens"] * 3,
        }
        assert "effects" not in f  # raw Q/K/V: no model output
        for metric in ("entropy", "kl_from_baseline", "top_key_mass", "top_key_index"):
            assert f["metrics"][metric].shape == (4, n, layers, heads)
            assert [next(iter(dim.keys())) for dim in f["metrics"][metric].dims] == [
                "condition",
                "batch",
                "layer",
                "head",
            ]
        assert "text" not in f["input"] and "tokens" not in f["input"]


def test_xarray_reads_named_dimensions(rank5_store):
    import xarray as xr  # with h5netcdf: both are in the test extra

    out, data, _ = rank5_store
    with xr.open_dataset(out, engine="h5netcdf", group="attention") as ds:
        assert ds["mean_k"].dims == ("batch", "map_layer", "head", "query", "key")
        np.testing.assert_array_equal(ds["mean_k"].values, h5py.File(out)["attention/mean_k"][...])
    with xr.open_dataset(out, engine="h5netcdf", group="metrics") as ds:
        assert ds["entropy"].dims == ("condition", "batch", "layer", "head")
        assert list(ds["condition"].values) == ["baseline", "mean_q", "mean_k", "mean_v"]
        # causal mean-K rows are uniform over i + 1 keys; input 0 is unpadded
        uniform = np.log(np.arange(1, data["q"].shape[3] + 1)).mean()
        assert float(ds["entropy"].sel(condition="mean_k")[0, 0, 0]) == pytest.approx(
            uniform, rel=1e-6
        )


def test_compressed_chunks_are_plain_deflate_plus_shuffle(rank5_store):
    """Decode one stored chunk by hand: zlib, then undo HDF5's byte shuffle."""
    out, _, _ = rank5_store
    with h5py.File(out) as f:
        d = f["attention/baseline"]
        mask, raw = d.id.read_direct_chunk((1, 0, 0, 0, 0))
        assert mask == 0
        plain = np.frombuffer(zlib.decompress(raw), np.uint8)
        values = plain.reshape(4, -1).T.copy().view("<f4").reshape(d.chunks)
        np.testing.assert_array_equal(values, d[1:2, 0:1, : d.chunks[2]])


def test_h5dump_reads_a_compressed_map(rank5_store):
    h5dump = shutil.which("h5dump")
    if h5dump is None:
        skip_or_fail(
            "H5DUMP", "h5dump (HDF5's stock tools) is not installed: apt-get install hdf5-tools"
        )
    out, _, _ = rank5_store
    proc = subprocess.run(
        [
            h5dump,
            "-y",
            "-w",
            "0",
            "-m",
            "%.9g",
            "-d",
            "/attention/mean_q",
            "-s",
            "2,1,0,0,0",
            "-c",
            "1,1,1,9,9",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    body = proc.stdout.split("DATA {", 1)[1].split("}", 1)[0]
    got = np.array([float(x) for x in body.replace(",", " ").split()]).reshape(9, 9)
    want = h5py.File(out)["attention/mean_q"][2, 1, 0]
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=0)


def test_rank4_input_ungrouped_not_causal(tmp_path):
    data, lengths = make_qkv(tmp_path / "in.h5", layers=0, heads=2, seq=7)
    out = tmp_path / "s.h5"
    assert run_cli("--qkv", tmp_path / "in.h5", "--out", out, "--quiet") == 0
    with h5py.File(out) as f:
        assert f["attention/baseline"].shape == (6, 1, 2, 7, 7)
        assert bool(f.attrs["causal"]) is False
    _check_maps(out, data, lengths, causal=False, rank=4)


def test_options_heads_over_targets_causal_scale_dtype(tmp_path):
    data, lengths = make_qkv(tmp_path / "in.h5", causal=False, dtype=np.float64)
    out = tmp_path / "s.h5"
    assert (
        run_cli(
            "--qkv",
            tmp_path / "in.h5",
            "--out",
            out,
            "--targets",
            "k,q",
            "--heads",
            "0,2",
            "--over",
            "causal",
            "--causal",
            "--dtype",
            "float16",
            "--compression",
            "lzf",
            "--quiet",
        )
        == 0
    )
    expected = _expected_maps(data, lengths, True, "causal", [0, 2], "kq")
    with h5py.File(out) as f:
        # conditions come in the canonical order whatever order --targets names them in
        assert [s.decode() for s in f["metrics/condition"][...]] == ["baseline", "mean_q", "mean_k"]
        assert list(f.attrs["ablate_heads"]) == [0, 2] and f.attrs["over"] == "causal"
        for name, want in expected.items():
            d = f["attention"][name]
            assert d.dtype == np.float16 and d.compression == "lzf"
            # float16 storage: half an ulp of float16 (2^-11 relative) plus float32 error
            np.testing.assert_allclose(d[...], want, rtol=2**-11, atol=1e-4)
    out2 = tmp_path / "scaled.h5"
    assert (
        run_cli(
            "--qkv",
            tmp_path / "in.h5",
            "--out",
            out2,
            "--scale",
            "0.1",
            "--compression",
            "none",
            "--quiet",
        )
        == 0
    )
    with h5py.File(out2) as f:
        want = ref.attention_weights(data["q"], data["k"], lengths=lengths, scale=0.1)
        np.testing.assert_allclose(f["attention/baseline"][...], want, atol=2e-6)
        assert f["attention/baseline"].compression is None


def test_no_maps_stores_metrics_only(tmp_path, rank5_store):
    _, _data, _lengths = rank5_store
    make_qkv(tmp_path / "in.h5", group="/capture/run1", causal=True)
    out = tmp_path / "m.h5"
    assert (
        run_cli(
            "--qkv", f"{tmp_path / 'in.h5'}:/capture/run1", "--out", out, "--no-maps", "--quiet"
        )
        == 0
    )
    with h5py.File(out) as f, h5py.File(rank5_store[0]) as full:
        assert "attention" not in f
        for metric in ("entropy", "kl_from_baseline", "top_key_mass", "top_key_index"):
            np.testing.assert_array_equal(f["metrics"][metric][...], full["metrics"][metric][...])
    with qkvmean.open_store(out) as store:
        assert not store.has_maps
        with pytest.raises(ValueError, match="--no-maps: it holds metrics only"):
            store.map("baseline", 0)


def test_open_store_reader_api(rank5_store):
    out, _data, lengths = rank5_store
    with qkvmean.open_store(out) as store:
        assert store.conditions == ["baseline", "mean_q", "mean_k", "mean_v"]
        assert (store.n_inputs, store.n_layers, store.n_heads, store.seq) == (6, 2, 3, 9)
        np.testing.assert_array_equal(store.lengths, lengths)
        assert store.config["source"] == "qkv" and store.source == "qkv"
        assert store.texts is None and store.tokens(0) is None
        raw = h5py.File(out)["attention/mean_k"]
        b = int(np.argmin(lengths))
        n = lengths[b]
        m = store.map("mean_k", b, layer=1, head=2)
        np.testing.assert_array_equal(m, raw[b, 1, 2, :n, :n])
        m = store.map("mean_k", b, layer=-1, head="mean")
        np.testing.assert_allclose(m, raw[b, 1, :, :n, :n].mean(axis=0), rtol=1e-6)
        assert store.map("baseline", 1, trim=False).shape == (9, 9)
        assert store.maps("baseline", slice(0, 2), 0).shape == (2, 3, 9, 9)
        assert store.metric("entropy").shape == (4, 6, 2, 3)
        with pytest.raises(ValueError, match=r"has no condition 'mean_x' \(it has baseline"):
            store.map("mean_x", 0)
        with pytest.raises(ValueError, match="has 6 inputs"):
            store.map("baseline", 6)
        with pytest.raises(ValueError, match="has 2 layers"):
            store.map("baseline", 0, layer=2)
        with pytest.raises(ValueError, match="has 3 heads"):
            store.map("baseline", 0, head=3)


def test_reader_refuses_unknown_version_and_non_stores(tmp_path, rank5_store):
    copy = tmp_path / "future.h5"
    shutil.copy(rank5_store[0], copy)
    with h5py.File(copy, "a") as f:
        f.attrs["format_version"] = np.int32(3)
    with pytest.raises(ValueError, match=r"format_version 3 is not one this qkvmean .* reads"):
        qkvmean.open_store(copy)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="not a qkvmean store"):
        qkvmean.open_store(other)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        qkvmean.open_store(tmp_path / "text.h5")
    with pytest.raises(ValueError, match="no such file"):
        qkvmean.open_store(tmp_path / "missing.h5")
    assert main(["inspect", str(copy)]) == 2


def test_inspect_prints_a_summary(rank5_store, capsys):
    out, _, _ = rank5_store
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for field in (
        "source       qkv: ",
        "inputs       6 of 6 (complete); lengths 3..9",
        "shape        2 layers x 3 heads x 9 tokens",
        "conditions   baseline, mean_q, mean_k, mean_v",
        "mean over tokens, layers [0, 1], heads all; causal mask on",
        "maps         float32, deflate:1: ",
        "on disk",
    ):
        assert field in text, field
    assert main(["inspect", "--json", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs_done"] == info["inputs_total"] == 6 and info["complete"] is True
    assert info["compression_ratio"] > 1 and info["bytes_on_disk"] == out.stat().st_size
    assert info["config"]["targets"] == ["q", "k", "v"] and info["lengths"]["max"] == 9


def _patterned_chunk(data, dtype):
    """A chunk ``(heads, seq, seq)`` mixing what maps hold: random weights, zeros (masks,
    padding), one value everywhere (mean-K), rows all alike (mean-Q)."""
    heads = data.draw(st.integers(1, 3))
    seq = data.draw(st.integers(1, 80))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    out = np.empty((heads, seq, seq), dtype)
    for h in range(heads):
        kind = data.draw(st.sampled_from(["random", "zeros", "uniform", "rows", "causal"]))
        w = rng.random((seq, seq))
        if kind == "zeros":
            w[:] = 0
        elif kind == "uniform":
            w[:] = 1 / seq
        elif kind == "rows":
            w[:] = w[0]
        elif kind == "causal":
            w = np.tril(w)
        out[h] = w
    return out, seq


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(["float32", "float16"]), level=st.sampled_from([1, 4]))
def test_encoded_chunks_inflate_to_the_shuffled_bytes(data, dtype, level):
    """Every chunk we encode is a zlib stream any inflater reads back to HDF5's shuffle
    of the chunk, whichever segments were deflated and whichever stored."""
    from qkvmean.store import codec

    chunk, seq = _patterned_chunk(data, dtype)
    filters = {"compression": "gzip", "compression_opts": level, "shuffle": True}
    encoded = codec._encode_chunk(chunk.reshape(-1), filters, seq)
    shuffled = chunk.reshape(-1).view(np.uint8).reshape(-1, chunk.itemsize).T.tobytes()
    assert zlib.decompress(encoded) == shuffled


def test_random_mantissa_bytes_are_stored_and_repetitive_ones_deflated():
    from qkvmean.store import codec

    filters = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    rng = np.random.default_rng(0)
    weights = rng.random((4, 128, 128)).astype(np.float32).reshape(-1)
    raw = np.ascontiguousarray(weights).view(np.uint8).reshape(-1, 4)
    planes = np.empty((4, raw.shape[0]), np.uint8)
    worth = np.empty((4, -(-raw.shape[0] // codec.SEGMENT)), np.bool_)
    codec._shuffle_survey(raw, planes, worth, codec.SEGMENT, codec.SAMPLE, 128)
    assert not worth[:3].any() and worth[3].all()  # three mantissa planes, one exponent
    encoded = codec._encode_chunk(weights, filters, 128)
    assert len(encoded) < 0.9 * weights.nbytes
    uniform = np.full(4 * 128 * 128, 1 / 128, np.float32)
    assert len(codec._encode_chunk(uniform, filters, 128)) < 0.01 * uniform.nbytes
    rows = np.tile(rng.random(128).astype(np.float32), 4 * 128)  # mean-Q: rows alike
    assert len(codec._encode_chunk(rows, filters, 128)) < 0.2 * rows.nbytes
