"""``qkvmean run``: refusing bad input cleanly, never clobbering, and resuming after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from support import killed_at, stopped_at, without_notes
from test_store import make_qkv

from qkvmean.cli import main
from qkvmean.io.qkv import QKVInput
from qkvmean.run import batching
from qkvmean.store import workdir


def qkvmean_cmd(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "qkvmean", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


@pytest.fixture()
def good_input(tmp_path):
    make_qkv(tmp_path / "in.h5", group="/g")
    return f"{tmp_path / 'in.h5'}:/g"


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value
    return path


def _bad_inputs(tmp):
    """(id, argv, regex the one-line message must match)."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(4, 2, 5, 3)).astype(np.float32)
    nan_q = q.copy()
    nan_q[2, 1, 3, 0] = np.nan
    inf_v = q.copy()
    inf_v[3, 0, 0, 2] = np.inf
    (tmp / "notes.txt").write_text("not hdf5")
    cases = {
        "missing-file": (tmp / "nope.h5", r"nope.h5: no such file"),
        "not-hdf5": (tmp / "notes.txt", r"notes.txt: not an HDF5 file"),
        "missing-v": (_write(tmp / "nov.h5", q=q, k=q), r"missing dataset 'v'"),
        "shape-mismatch": (
            _write(tmp / "shape.h5", q=q, k=q[:, :, :4], v=q),
            r"/k: shape \(4, 2, 4, 3\) does not match q's \(4, 2, 5, 3\)",
        ),
        "v-mismatch": (
            _write(tmp / "vshape.h5", q=q, k=q, v=q[:, :1]),
            r"/v: shape \(4, 1, 5, 3\) does not match k's",
        ),
        "rank": (
            _write(tmp / "rank.h5", q=q[0], k=q[0], v=q[0]),
            r"/q: shape \(2, 5, 3\) must be \(batch, layer, head, seq, dim\)",
        ),
        "non-float": (
            _write(tmp / "int.h5", q=q.astype(np.int32), k=q, v=q),
            r"/q: dtype int32 is not float16, float32 or float64",
        ),
        "nan": (
            _write(tmp / "nan.h5", q=nan_q, k=q, v=q),
            r"/q: input 2 contains nan at \(1, 3, 0\); all values must be finite",
        ),
        "inf-v": (
            _write(tmp / "inf.h5", q=q, k=q, v=inf_v),
            r"/v: input 3 contains inf at \(0, 0, 2\)",
        ),
        "lengths-range": (
            _write(tmp / "len.h5", q=q, k=q, v=q, lengths=[5, 6, 1, 1]),
            r"/lengths: input 1 has length 6, outside 0..5",
        ),
        "lengths-count": (
            _write(tmp / "lenc.h5", q=q, k=q, v=q, lengths=[5, 5]),
            r"/lengths: shape \(2,\), expected \(4,\)",
        ),
        "lengths-float": (
            _write(tmp / "lenf.h5", q=q, k=q, v=q, lengths=[5.0] * 4),
            r"/lengths: must be an integer dataset",
        ),
        "unknown-group": (
            f"{_write(tmp / 'grp.h5', q=q, k=q, v=q)}:/nothere",
            r"grp.h5: no group '/nothere' in the file",
        ),
    }
    return [
        (name, ["run", "--qkv", str(spec), "--out", str(tmp / "out.h5")], rx)
        for name, (spec, rx) in cases.items()
    ]


def test_bad_input_files_exit_2_with_one_line_and_leave_nothing(tmp_path, capsys):
    for name, argv, rx in _bad_inputs(tmp_path):
        assert main(argv) == 2, name
        err = without_notes(capsys.readouterr().err)
        assert err.count("\n") == 1 and err.startswith("qkvmean run: error: "), (name, err)
        assert __import__("re").search(rx, err), (name, err)
        assert not (tmp_path / "out.h5").exists(), name
        assert not (tmp_path / "out.h5.partial").exists(), name


BAD_OPTIONS = [
    (["--targets", "q,x"], r"--targets: unknown target 'x'"),
    (["--targets", "q,q"], r"--targets lists a target twice"),
    (["--heads", "0,7"], r"--heads: head 7 is out of range for 3 heads"),
    (["--heads", "a"], r"argument --heads: expected comma-separated integers"),
    (["--compression", "zstd"], r"unknown compression 'zstd'"),
    (["--compression", "deflate:12"], r"compression level must be 0..9"),
    (["--batch-size", "0"], r"argument --batch-size: expected a positive integer"),
    (["--scale", "-1"], r"argument --scale: expected a finite number > 0"),
    (["--dtype", "int8"], r"argument --dtype: invalid choice"),
    (["--over", "heads"], r"--over: unknown substitution 'heads'; use tokens, causal, "),
    (["--over", "window:0"], r"--over: window:0 averages no token"),
    (["--threads", "999"], r"--threads 999 exceeds"),
]


@pytest.mark.parametrize(("extra", "rx"), BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_options_exit_2(tmp_path, good_input, extra, rx):
    proc = qkvmean_cmd("run", "--qkv", good_input, "--out", tmp_path / "o.h5", *extra)
    assert proc.returncode == 2
    assert __import__("re").search(rx, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("o.h5*"))


def test_bad_output_locations_exit_2(tmp_path, good_input, capsys):
    assert main(["run", "--qkv", good_input, "--out", str(tmp_path / "no" / "o.h5")]) == 2
    assert "output directory" in capsys.readouterr().err
    assert main(["run", "--qkv", good_input, "--out", "/proc/o.h5"]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main(["run", "--qkv", good_input, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_existing_store_is_never_clobbered_without_overwrite(tmp_path, good_input, capsys):
    out = tmp_path / "o.h5"
    out.write_bytes(b"precious")
    assert main(["run", "--qkv", good_input, "--out", str(out), "--quiet"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["run", "--qkv", good_input, "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert h5py.is_hdf5(out)
    # --resume on a complete store with the same configuration: nothing to do
    assert main(["run", "--qkv", good_input, "--out", str(out), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    # ... and with another configuration: refused
    assert (
        main(["run", "--qkv", good_input, "--out", str(out), "--resume", "--over", "causal"]) == 2
    )
    assert "different configuration" in capsys.readouterr().err


def test_summary_line_and_quiet(tmp_path, good_input):
    proc = qkvmean_cmd("run", "--qkv", good_input, "--out", tmp_path / "a.h5")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "inputs/s" in lines[0] and "MB/s" in lines[0]
    assert without_notes(proc.stderr) == ""  # stderr is a pipe here: no progress bar
    proc = qkvmean_cmd("run", "--qkv", good_input, "--out", tmp_path / "b.h5", "--quiet")
    assert proc.returncode == 0 and proc.stdout == "" and without_notes(proc.stderr) == ""


def test_input_is_read_in_batches_never_whole(tmp_path, monkeypatch):
    make_qkv(tmp_path / "in.h5", n=40, chunks=4)
    reads = []
    original = QKVInput.read

    def spy(self, start, stop):
        reads.append(stop - start)
        return original(self, start, stop)

    def run(name, *extra):
        reads.clear()
        argv = ["run", "--qkv", str(tmp_path / "in.h5"), "--out", str(tmp_path / name)]
        assert main([*argv, "--quiet", *extra]) == 0
        return list(reads)

    monkeypatch.setattr(QKVInput, "read", spy)
    assert run("a.h5", "--batch-size", "10") == [10] * 4  # an explicit size is honoured
    # the automatic size is bounded by memory, and aligned to the input's chunks of 4
    per_input = 4 * 2 * 3 * 9 * (9 + 3 * 5) * 4  # conditions x maps and inputs, float32
    monkeypatch.setattr(batching, "BATCH_BYTES", 10 * per_input)
    assert run("b.h5") == [8] * 5
    monkeypatch.setattr(batching, "BATCH_BYTES", 1)
    assert run("c.h5") == [1] * 40


def _datasets(path):
    out = {}
    with h5py.File(path) as f:
        out["/"] = dict(f.attrs)
        f.visititems(
            lambda name, obj: out.__setitem__(
                name, (obj[...], dict(obj.attrs)) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def _assert_same_store(a, b):
    da, db = _datasets(a), _datasets(b)
    assert da.keys() == db.keys()
    for key in da:
        if key == "/":
            assert da[key].keys() == db[key].keys()
            for attr in da[key].keys() - {"created_utc"}:  # the two runs started apart
                assert np.array_equal(da[key][attr], db[key][attr]), attr
        elif da[key] is not None:
            assert np.array_equal(da[key][0], db[key][0]), key
            assert da[key][0].dtype == db[key][0].dtype, key


def test_sigkill_at_several_moments_then_resume_equals_uninterrupted_run(tmp_path):
    """Kill -9 right after the 1st, the 40th and the 60th journal entry (a resumed run
    journals the batches it salvages anew, so the counts are of the whole run); resume;
    compare."""
    src = tmp_path / "in.h5"
    make_qkv(src, n=3000, layers=1, heads=2, seq=12, dim=4, dim_v=3, causal=True, seed=3)
    args = ["run", "--qkv", src, "--batch-size", "40", "--quiet"]
    ref_out = tmp_path / "ref.h5"
    assert qkvmean_cmd(*args, "--out", ref_out).returncode == 0

    out = tmp_path / "out.h5"
    work = workdir.partial_dir(out)
    cmd = [sys.executable, "-m", "qkvmean", *map(str, args), "--out", str(out)]

    def journaled():
        return len(list(work.glob("batch-*.npz"))) if work.exists() else 0

    for i, entries in enumerate((1, 40, 60)):
        killed_at(cmd + (["--resume"] if i else []), f"journaled:{entries}")
        assert journaled() == entries and not out.exists()
        # an interrupted run is never mistaken for a store, nor silently restarted
        rerun = qkvmean_cmd(*args, "--out", out)
        assert rerun.returncode == 2 and "--resume" in rerun.stderr
    inspect = qkvmean_cmd("inspect", out)
    assert inspect.returncode == 0 and "of 3000 done; finish with" in inspect.stdout
    final = qkvmean_cmd(*[a for a in args if a != "--quiet"], "--out", out, "--resume")
    assert final.returncode == 0, final.stderr
    # every batch journaled before the kill is copied from the killed run's file
    assert "3000 inputs, 2400 of them from the interrupted run" in final.stdout
    assert out.exists() and not work.exists()
    assert not list(tmp_path.glob("*.tmp"))
    _assert_same_store(out, ref_out)


def test_progress_bar_on_a_terminal_only(tmp_path, good_input):
    """stderr a terminal: a progress bar with a rate; --quiet: no bar (only warnings)."""
    import pty

    for quiet in (False, True):
        master, slave = pty.openpty()
        extra = ["--quiet"] if quiet else []
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qkvmean",
                "run",
                "--qkv",
                good_input,
                "--out",
                str(tmp_path / f"t{quiet}.h5"),
                "--batch-size",
                "1",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=300)
        os.close(master)
        proc.stdout.close()
        shown = b"".join(chunks).decode(errors="replace")
        assert proc.returncode == 0
        if quiet:  # nothing but the warnings (here: the input file has no axis names)
            assert without_notes(shown.replace("\r\n", "\n")) == ""
        else:
            assert "input/s" in shown and "0/6" in shown


def _one_line_error(proc, code, rx):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = without_notes(proc.stderr)
    assert err.count("\n") == 1 and "Traceback" not in err, proc.stderr
    assert __import__("re").search(rx, proc.stderr), proc.stderr


def test_a_live_run_is_never_deleted_or_mistaken_for_an_interrupted_one(tmp_path):
    src = tmp_path / "in.h5"
    make_qkv(src, n=3000, layers=1, heads=4, seq=24, dim=8, seed=5)
    out = tmp_path / "o.h5"
    args = ["run", "--qkv", src, "--out", out, "--batch-size", "10", "--threads", "1", "-q"]
    cmd = [sys.executable, "-m", "qkvmean", *map(str, args)]
    # stopped by itself right after its first journal entry: mid-run, holding its lock
    live = stopped_at(cmd, "journaled:1", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      text=True)  # fmt: skip
    work = workdir.partial_dir(out)
    assert len(workdir.journal(work)) == 1
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            proc = qkvmean_cmd(*args, *extra)
            _one_line_error(proc, 2, r"another qkvmean run is writing this store right now")
    finally:
        live.send_signal(signal.SIGCONT)
        _, err = live.communicate(timeout=600)
    assert live.returncode == 0, err
    assert out.exists() and not work.exists()


def test_more_refusals_exit_2(tmp_path, good_input):
    path = good_input.split(":")[0]
    _one_line_error(
        qkvmean_cmd("run", "--qkv", good_input, "--out", path, "--overwrite"),
        2,
        r"is an input of this command; write the output elsewhere",
    )
    assert h5py.File(path)["g/q"].shape[0] == 6  # the input is intact
    _one_line_error(
        qkvmean_cmd("run", "--qkv", good_input, "--out", tmp_path / "a.h5", "--heads", ""),
        2,
        r"--heads is empty",
    )
    _one_line_error(
        qkvmean_cmd("run", "--qkv", good_input, "--out", tmp_path / "a.h5", "--heads", "1,1"),
        2,
        r"--heads lists head 1 twice",
    )
    _one_line_error(
        qkvmean_cmd(
            "run",
            "--qkv",
            good_input,
            "--out",
            tmp_path / "a.h5",
            "--no-maps",
            "--dtype",
            "float16",
        ),
        2,
        r"with --no-maps",
    )
    _one_line_error(qkvmean_cmd("run", "--qkv", good_input, "--out", ""), 2, r"--out is empty")
    _one_line_error(
        qkvmean_cmd("run", "--qkv", good_input, "--out", tmp_path / "a.h5", "--scale", "0"),
        2,
        r"argument --scale: expected a finite",
    )
    big = tmp_path / "big.h5"
    q = np.full((2, 2, 4, 3), 1e30, np.float32)
    _write(big, q=q, k=q, v=q)
    _one_line_error(
        qkvmean_cmd("run", "--qkv", big, "--out", tmp_path / "b.h5"),
        2,
        r"big.h5:/: inputs 0..1: q and k are too large for float32",
    )
    assert not list(tmp_path.glob("[ab].h5*"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("no", False),
        ("False", False),
        ("0", False),
        ("true", True),
        (np.int8(1), True),
        (np.bool_(False), False),
        ("maybe", None),
        (np.array([1, 0]), None),
        (2, None),
    ],
)
def test_causal_attribute_parsing(tmp_path, value, expected):
    src = tmp_path / "in.h5"
    make_qkv(src, causal=value)
    proc = qkvmean_cmd("run", "--qkv", src, "--out", tmp_path / "o.h5", "-q")
    if expected is None:
        _one_line_error(proc, 2, r"attribute causal = .* is not a boolean")
    else:
        assert proc.returncode == 0, proc.stderr
        assert bool(h5py.File(tmp_path / "o.h5").attrs["causal"]) is expected


def test_group_without_leading_slash_and_locked_input(tmp_path):
    src = tmp_path / "in.h5"
    make_qkv(src, group="/capture/run1")
    assert (
        qkvmean_cmd(
            "run", "--qkv", f"{src}:capture/run1", "--out", tmp_path / "o.h5", "-q"
        ).returncode
        == 0
    )
    with h5py.File(src, "a"):  # another program holds it open for writing
        proc = qkvmean_cmd("run", "--qkv", f"{src}:/capture/run1", "--out", tmp_path / "p.h5")
    _one_line_error(proc, 2, r"in.h5: cannot open: .*HDF5_USE_FILE_LOCKING=FALSE")


def test_resume_accepts_equivalent_spellings_and_names_what_differs(tmp_path):
    src = tmp_path / "in.h5"
    make_qkv(src, n=12, heads=4)
    out = tmp_path / "o.h5"
    base = ["run", "--qkv", src, "--out", out, "-q"]
    assert qkvmean_cmd(*base, "--targets", "v,q", "--compression", "deflate").returncode == 0
    same = qkvmean_cmd(
        *base, "--resume", "--targets", "q,v", "--compression", "gzip:1", "--heads", "0,1,2,3"
    )
    assert same.returncode == 0, same.stderr
    other = qkvmean_cmd(*base, "--resume", "--targets", "q,v", "--compression", "deflate:4")
    _one_line_error(other, 2, r"compression = 'deflate:1' \(now 'deflate:4'\)")


def test_disk_full_is_one_line_and_the_run_can_resume(tmp_path, good_input, monkeypatch, capsys):
    from qkvmean.store import writer

    original = writer.Assembly.add
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(writer.Assembly, "add", full)
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", good_input, "--out", str(out), "--batch-size", "2", "--quiet"]
    assert main(argv) == 1
    err = without_notes(capsys.readouterr().err)
    assert err.count("\n") == 1 and "no space left on device" in err and "--resume" in err
    assert not out.exists() and len(list(workdir.partial_dir(out).glob("batch-*"))) == 1
    monkeypatch.setattr(writer.Assembly, "add", original)
    assert main([*argv, "--resume"]) == 0 and out.exists()


def test_resume_salvages_checked_batches_and_recomputes_damaged_ones(tmp_path, monkeypatch):
    """A chunk whose bytes changed, unreadable or foreign journal entries and a missing one
    are computed again; whole batches are copied (not recomputed); old files are removed."""
    from qkvmean.store import workdir, writer

    src = tmp_path / "in.h5"
    make_qkv(src, n=12, layers=2, heads=3, seq=7, dim=4, causal=True, seed=9)
    base = ["run", "--qkv", str(src), "--batch-size", "2", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "ref.h5")]) == 0
    out = tmp_path / "o.h5"
    work = workdir.partial_dir(out)
    original = writer.Assembly.add
    added = []

    def add(self, start, stop, *args, **kwargs):
        added.append(start)
        if start == 10 and len(added) == 6:  # the first run fails at its last batch
            raise OSError(5, "Input/output error")
        return original(self, start, stop, *args, **kwargs)

    monkeypatch.setattr(writer.Assembly, "add", add)
    assert main([*base, "--out", str(out)]) == 1
    entries = workdir.journal(work)
    assert sorted(entries) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    with np.load(entries[(2, 4)]) as z:  # flip one byte of one chunk of batch 2..4
        index, *where, _ = z["chunks"][3].tolist()
        old = work / str(z["store_file"])
    with h5py.File(old, "r", swmr=True) as f:  # the killed run's file is readable
        dset = f["attention"][["baseline", "mean_q", "mean_k", "mean_v"][index]]
        address = dset.id.get_chunk_info_by_coord(tuple(where)).byte_offset
    with open(old, "r+b") as fh:
        fh.seek(address)
        byte = fh.read(1)
        fh.seek(address)
        fh.write(bytes([byte[0] ^ 0xFF]))
    entries[(4, 6)].write_bytes(b"not a journal entry")
    entries[(6, 8)].unlink()
    with open(entries[(8, 10)], "wb") as fh:  # an .npy, not an .npz: np.load gives an array
        np.save(fh, np.arange(3))
    added.clear()
    assert main([*base, "--out", str(out), "--resume"]) == 0
    assert sorted(added) == [2, 4, 6, 8, 10]  # 0..2 was salvaged, the rest computed
    assert not work.exists() and not old.exists()
    _assert_same_store(out, tmp_path / "ref.h5")


def test_resume_that_cannot_open_the_killed_runs_file_deletes_nothing(
    tmp_path, good_input, monkeypatch, capsys
):
    """Too many open files, say: the resume stops; a later one copies every batch."""
    import errno

    from qkvmean.store import workdir, writer

    out = tmp_path / "o.h5"
    work = workdir.partial_dir(out)
    argv = ["run", "--qkv", good_input, "--out", str(out), "--batch-size", "2"]
    original_add = writer.Assembly.add

    def add(self, start, *args, **kwargs):
        if start == 4:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return original_add(self, start, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer.Assembly, "add", add)
        assert main([*argv, "--quiet"]) == 1
    assert len(workdir.journal(work)) == 2
    original_file = h5py.File

    def file(name, mode="r", *args, **kwargs):
        if mode == "r" and os.path.basename(name).startswith("store-"):
            raise OSError(errno.EMFILE, "Unable to open file (errno = 24)")
        return original_file(name, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer.h5py, "File", file)
        assert main([*argv, "--quiet", "--resume"]) == 1
    err = without_notes(capsys.readouterr().err)
    assert err.count("\n") == 2 and "failed: too many open files" in err.splitlines()[1]
    assert len(workdir.journal(work)) == 2
    assert main([*argv, "--resume"]) == 0
    assert "6 inputs, 4 of them from the interrupted run" in capsys.readouterr().out


def test_a_store_that_appears_during_the_run_is_never_replaced(tmp_path, good_input, capsys):
    """Another program creates --out while this run computes: it is left as it is."""
    from qkvmean.store import writer

    out = tmp_path / "o.h5"
    original = writer.Assembly.finish

    def finish(self, *args, **kwargs):
        out.write_bytes(b"someone else's")
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer.Assembly, "finish", finish)
        assert main(["run", "--qkv", good_input, "--out", str(out), "--quiet"]) == 1
    err = without_notes(capsys.readouterr().err)
    assert err.count("\n") == 1 and "appeared while this run was writing" in err
    assert out.read_bytes() == b"someone else's"


def test_a_failed_background_writeback_fails_the_run(tmp_path, good_input, monkeypatch, capsys):
    import errno

    def fdatasync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", good_input, "--out", str(out), "--batch-size", "1", "--quiet"]
    assert main(argv) == 1
    err = without_notes(capsys.readouterr().err)
    assert err.count("\n") == 1 and "input/output error" in err and "--resume" in err
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mean_v_maps_of_raw_qkv_are_encoded_once(tmp_path, good_input, monkeypatch, dtype):
    """They are the baseline's (V does not enter the weights), in either map dtype."""
    from qkvmean.store import codec

    original = codec._encode_maps
    encoded = []

    def count(arr, *args, **kwargs):
        encoded.append(arr)
        return original(arr, *args, **kwargs)

    monkeypatch.setattr(codec, "_encode_maps", count)
    out = tmp_path / "o.h5"
    argv = ["run", "--qkv", good_input, "--out", str(out), "--dtype", dtype, "--quiet"]
    assert main(argv) == 0
    assert len(encoded) == 3 and all(a.dtype == dtype for a in encoded)  # one batch
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["attention/mean_v"][...], f["attention/baseline"][...])


def test_broken_pipe_is_quiet(tmp_path, good_input):
    out = tmp_path / "o.h5"
    assert qkvmean_cmd("run", "--qkv", good_input, "--out", out, "-q").returncode == 0
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f"{sys.executable} -m qkvmean inspect {out} | head -c 0; echo ${{PIPESTATUS[0]}}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "0" and proc.stderr == ""


def test_options_are_checked_however_they_are_made():
    """From Python too, not only from the command line: one line naming the option, and
    one spelling per meaning (what --resume compares)."""
    from qkvmean.files import InputError
    from qkvmean.run.options import Options

    for bad, says in (
        (dict(over="nope"), "--over: unknown substitution 'nope'"),
        (dict(targets=["q", "q"]), "--targets lists a target twice"),
        (dict(map_dtype="float64"), "--dtype must be float32 or float16"),
        (dict(scale=-1.0), "--scale must be finite and > 0"),
        (dict(mean_from="ref.h5"), "--mean-from takes the means of a reference run"),
    ):
        with pytest.raises(InputError, match=says):
            Options(**bad)
    o = Options(targets=["v", "q"], compression="gzip:3", heads=[3, 1])
    assert (o.targets, o.compression, o.heads) == (["q", "v"], "deflate:3", [1, 3])
