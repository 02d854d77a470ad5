"""``--device`` on the command line: a CUDA run (under the simulator here) writes the store
a CPU run writes; a machine without CUDA gets one line and exit 2, and ``auto`` runs on
the CPU and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from support import store_datasets
from test_store import make_qkv

from qkvmean.cli import main
from qkvmean.engine.backends import cuda as cuda_backend


def _same_store(a, b, atol=1e-4):
    """Two stores hold the same datasets (names, shapes, dtypes); maps and metrics agree
    within ``atol``, everything else exactly; the root attributes agree but for the times."""
    da, db = store_datasets(a), store_datasets(b)
    assert sorted(da) == sorted(db)
    for name, x in da.items():
        y = db[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=name)
        elif name.endswith("top_key_index"):
            assert np.mean(x == y) > 0.95, name  # ties may break either way
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        skip = {"created_utc", "finished_utc", "elapsed_seconds"}
        keys = set(fa.attrs) - skip
        assert keys == set(fb.attrs) - skip
        for key in keys:
            va, vb = fa.attrs[key], fb.attrs[key]
            if isinstance(va, np.ndarray):
                np.testing.assert_array_equal(va, vb, err_msg=key)
            else:
                assert va == vb, key


@pytest.mark.parametrize("extra", [[], ["--over", "causal", "--heads", "1", "--causal"]])
def test_run_qkv_on_cuda_writes_the_cpu_store(tmp_path, extra):
    make_qkv(tmp_path / "in.h5", n=3, layers=2, heads=2, seq=6, dim=4, dim_v=3)
    for device in ("cpu", "cuda"):
        argv = ["run", "--qkv", str(tmp_path / "in.h5"), "-o", str(tmp_path / f"{device}.h5")]
        assert main([*argv, "--quiet", "--device", device, *extra]) == 0
    _same_store(tmp_path / "cpu.h5", tmp_path / "cuda.h5")


def test_run_model_on_cuda_writes_the_cpu_store(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("mean keys\nthe quick fox\n")
    for device in ("cpu", "cuda"):
        argv = ["run", "--model", "synthetic", "--text", str(texts), "--over", "causal"]
        assert main([*argv, "-o", str(tmp_path / f"{device}.h5"), "--device", device]) == 0
    captured = capsys.readouterr()
    assert "device: cuda (" in captured.err
    assert "on cuda" in captured.out
    _same_store(tmp_path / "cpu.h5", tmp_path / "cuda.h5")
    # metrics only: no maps at all, the same metrics
    argv = ["run", "--model", "synthetic", "--text", str(texts), "--over", "causal", "--quiet"]
    assert main([*argv, "-o", str(tmp_path / "bare.h5"), "--device", "cuda", "--no-maps"]) == 0
    bare, full = store_datasets(tmp_path / "bare.h5"), store_datasets(tmp_path / "cuda.h5")
    assert any(name.startswith("attention/") for name in full)
    assert not any(name.startswith("attention/") for name in bare)
    for name, value in bare.items():
        if name.startswith("metrics"):
            np.testing.assert_array_equal(value, full[name], err_msg=name)


def _without_cuda(*args):
    """``qkvmean ARGS`` where CUDA cannot run: no simulator (and, here, no GPU)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    return subprocess.run(
        [sys.executable, "-m", "qkvmean", *map(str, args)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


@pytest.mark.skipif(
    not cuda_backend.SIMULATOR, reason="a GPU is present: --device cuda runs here"
)  # fmt: skip
def test_without_cuda_one_line_and_auto_runs_on_the_cpu(tmp_path):
    make_qkv(tmp_path / "in.h5", n=2, layers=1, heads=2, seq=5, dim=4, dim_v=3)
    run = ["run", "--qkv", tmp_path / "in.h5"]
    proc = _without_cuda(*run, "-o", tmp_path / "a.h5", "--device", "cuda")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("qkvmean run: error: --device cuda: device 'cuda' cannot run here")
    assert "use 'cpu' or 'auto'" in lines[0]
    assert not (tmp_path / "a.h5").exists()

    proc = _without_cuda(*run, "-o", tmp_path / "b.h5", "--device", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "qkvmean run: device: cpu (no usable CUDA device: " in proc.stderr
    assert " threads (" in proc.stdout  # the CPU's summary line
    assert main([*map(str, run), "-o", str(tmp_path / "c.h5"), "--quiet"]) == 0
    _same_store(tmp_path / "b.h5", tmp_path / "c.h5", atol=0)

    code = (
        "import numpy as np, qkvmean\n"
        "try:\n"
        "    qkvmean.attention_weights(np.ones((1, 2, 2)), np.ones((1, 2, 2)), device='cuda')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
        "x = np.ones((1, 2, 2))\n"
        "print(qkvmean.attention_weights(x, x, device='auto')[0, 0])\n"
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    out = proc.stdout.splitlines()
    assert proc.returncode == 0 and out[0].startswith("device 'cuda' cannot run here: "), proc
    assert out[1] == "[0.5 0.5]"


def test_figure_takes_the_device(tmp_path, capsys):
    out = tmp_path / "fig.png"
    assert main(["figure", "--model", "synthetic", "-o", str(out), "--device", "auto"]) == 0
    err = capsys.readouterr().err
    assert "device: cpu (" in err if cuda_backend.SIMULATOR else "device: cuda (" in err
    assert out.exists() and out.with_suffix(".h5").exists()


def test_a_sweep_on_cuda_writes_the_cpu_store(tmp_path):
    """The branching pass on the CUDA backend: chunks from the baseline's kept rows (a
    later chunk's baseline copy goes to no map), maps at one layer, the effects."""
    texts = tmp_path / "texts.txt"
    texts.write_text("mean keys\nthe quick fox\n")
    for device in ("cpu", "cuda"):  # two chunks: at layer 1, and at 3 from the kept rows
        argv = ["run", "--model", "synthetic", "--text", str(texts), "--sweep", "layers",
                "--targets", "k", "--ablate-layers", "1,3", "--maps-layers", "2",
                "--quiet"]  # fmt: skip
        assert main([*argv, "-o", str(tmp_path / f"{device}.h5"), "--device", device]) == 0
    _same_store(tmp_path / "cpu.h5", tmp_path / "cuda.h5")
    with h5py.File(tmp_path / "cuda.h5") as f:
        assert f["attention/mean_k@L1"].shape[1] == 1 and "effects/kl_next_token" in f
