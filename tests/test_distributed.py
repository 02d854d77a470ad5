"""``qkvmean run --scheduler/--workers``: batches on a Dask cluster of processes, one store
(identical to a local run's, dataset for dataset), nothing lost when a worker or the
driver dies, one line when the scheduler cannot be reached."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import distributed  # the dask extra, in the test extra
import h5py
import numpy as np
import pytest
from support import killed_at, stopped_at, store_datasets
from test_store import make_qkv

from qkvmean.cli import main
from qkvmean.run import cluster as qd
from qkvmean.run import sources


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of two worker processes (one thread each), shared by the tests
    (the environment its nannies change is given back)."""
    import logging

    environ = dict(os.environ)
    local = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    )  # fmt: skip
    client = distributed.Client(local)
    yield local, client
    client.close()
    local.close()
    os.environ.clear()
    os.environ.update(environ)


def assert_identical(a, b):
    """Every dataset of the two stores identical (names, shapes, dtypes, values)."""
    da, db = store_datasets(a), store_datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name].dtype == db[name].dtype, name
        np.testing.assert_array_equal(da[name], db[name], err_msg=name)


def _texts(path, n=6):
    words = "mean keys and values change what each head attends to in a model".split()
    path.write_text("\n".join(" ".join(words[i % 5 :] + words[: i % 5]) for i in range(n)))
    return path


def test_qkv_and_model_stores_are_those_of_a_local_run(tmp_path, cluster, monkeypatch):
    local, _ = cluster
    addr = local.scheduler_address
    make_qkv(tmp_path / "in.h5", n=7, layers=2, heads=3, seq=8)
    qkv = ["run", "--qkv", str(tmp_path / "in.h5"), "--batch-size", "2", "--quiet"]
    assert main([*qkv, "-o", str(tmp_path / "local.h5")]) == 0
    assert main([*qkv, "-o", str(tmp_path / "dist.h5"), "--scheduler", addr]) == 0
    assert_identical(tmp_path / "local.h5", tmp_path / "dist.h5")
    # metrics only; a filter only HDF5 applies (the maps themselves come back)
    for extra in (["--no-maps"], ["--compression", "lzf", "--dtype", "float16"]):
        name = extra[-1]
        assert main([*qkv, *extra, "-o", str(tmp_path / f"l{name}.h5")]) == 0
        assert main([*qkv, *extra, "-o", str(tmp_path / f"d{name}.h5"), "--scheduler", addr]) == 0
        assert_identical(tmp_path / f"l{name}.h5", tmp_path / f"d{name}.h5")
    # the workers do not see the file: the driver reads each batch and sends it
    monkeypatch.setattr(qd.Cluster, "see", lambda self, paths: False)
    assert main([*qkv, "-o", str(tmp_path / "sent.h5"), "--scheduler", addr]) == 0
    assert_identical(tmp_path / "local.h5", tmp_path / "sent.h5")
    monkeypatch.undo()

    text = _texts(tmp_path / "t.txt")
    model = ["run", "--model", "synthetic", "--text", str(text), "--over", "causal", "--quiet"]
    model += ["--batch-size", "2", "--ablate-layers", "1"]
    assert main([*model, "-o", str(tmp_path / "mlocal.h5")]) == 0
    assert main([*model, "-o", str(tmp_path / "mdist.h5"), "--scheduler", addr]) == 0
    assert_identical(tmp_path / "mlocal.h5", tmp_path / "mdist.h5")
    with h5py.File(tmp_path / "mdist.h5") as f:
        import json

        made = json.loads(f.attrs["config"])["cluster"]
    assert made["workers"] == 2 and made["scheduler"] == addr


def test_a_sweep_on_a_cluster_is_the_local_store(tmp_path, cluster):
    """--sweep heads with maps at one layer and the effects: the workers compute the
    batches, the store is the local run's bit for bit."""
    addr = cluster[0].scheduler_address
    text = _texts(tmp_path / "t.txt", n=4)
    argv = ["run", "--model", "synthetic", "--text", str(text), "--sweep", "heads",
            "--targets", "q,v", "--maps-layers", "3", "--batch-size", "2", "--quiet"]  # fmt: skip
    assert main([*argv, "-o", str(tmp_path / "local.h5")]) == 0
    assert main([*argv, "-o", str(tmp_path / "dist.h5"), "--scheduler", addr]) == 0
    assert_identical(tmp_path / "local.h5", tmp_path / "dist.h5")
    with h5py.File(tmp_path / "dist.h5") as f:
        assert f["effects/kl_next_token"].shape == (33, 4) and len(f["attention"]) == 33


def test_dataset_means_on_a_cluster_are_those_of_a_local_run(tmp_path, cluster, monkeypatch):
    """--over dataset: both passes run on the workers (the driver adds the first pass's
    sums up in batch order), the means travel with each task of the second; the store
    (its /means too) is a local run's, bit for bit."""
    addr = cluster[0].scheduler_address
    make_qkv(tmp_path / "in.h5", n=7, layers=2, heads=3, seq=8)
    text = _texts(tmp_path / "t.txt")
    for name, argv in (
        ("qkv", ["run", "--qkv", str(tmp_path / "in.h5")]),
        ("model", ["run", "--model", "synthetic", "--text", str(text), "--ablate-layers", "0,2"]),
    ):
        argv = [*argv, "--over", "dataset", "--batch-size", "3", "--quiet"]
        assert main([*argv, "-o", str(tmp_path / f"{name}-local.h5")]) == 0
        with monkeypatch.context() as m:  # the driver itself may not add anything up
            for cls in (sources.QKVSource, sources.ModelSource):
                m.setattr(cls, "position_sums", _not_on_the_driver)
            assert main([*argv, "-o", str(tmp_path / f"{name}-dist.h5"), "--scheduler", addr]) == 0
        assert_identical(tmp_path / f"{name}-local.h5", tmp_path / f"{name}-dist.h5")
        with h5py.File(tmp_path / f"{name}-dist.h5") as f:
            assert "means/q" in f and f["means/count"][0] == (7 if name == "qkv" else 6)


def test_a_read_that_fails_on_the_driver_is_not_the_cluster_going_away(
    tmp_path, cluster, monkeypatch, capsys
):
    from qkvmean.files import ReadFailed

    def broken(self, start, stop):
        raise ReadFailed(f"t.txt: inputs {start}..{stop - 1}: the disk said no")

    monkeypatch.setattr(sources.ModelSource, "read", broken)
    text = _texts(tmp_path / "t.txt")
    argv = ["run", "--model", "synthetic", "--text", str(text), "-o", str(tmp_path / "s.h5"),
            "--scheduler", cluster[0].scheduler_address, "-q"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the disk said no" in err and "went away" not in err, err
    assert "rerun with --resume" in err


def _not_on_the_driver(self, inputs, start, stop, targets, **kwargs):
    raise AssertionError(f"the driver summed inputs {start}..{stop - 1} itself")


def test_workers_starts_a_local_cluster(tmp_path, capsys):
    make_qkv(tmp_path / "in.h5", n=4, layers=1, heads=2, seq=6)
    qkv = ["run", "--qkv", str(tmp_path / "in.h5"), "--batch-size", "1"]
    assert main([*qkv, "-o", str(tmp_path / "a.h5"), "--quiet"]) == 0
    assert main([*qkv, "-o", str(tmp_path / "b.h5"), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "qkvmean run: local cluster: 2 workers" in captured.err
    assert "on the cluster" in captured.out
    assert_identical(tmp_path / "a.h5", tmp_path / "b.h5")


def test_unreachable_scheduler_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qd, "CONNECT_TIMEOUT", 2)
    make_qkv(tmp_path / "in.h5", n=2, layers=1, heads=2, seq=5)
    argv = ["run", "--qkv", str(tmp_path / "in.h5"), "-o", str(tmp_path / "o.h5")]
    assert main([*argv, "--scheduler", "tcp://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "qkvmean run: failed: cannot reach the Dask scheduler at tcp://127.0.0.1:1"
    ), err
    assert not (tmp_path / "o.h5").exists()
    assert main([*argv, "--scheduler", "foo"]) == 2  # not an address: a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qkvmean run: error: --scheduler 'foo': missing port number in address "
                   "'foo'; give the scheduler's address, tcp://HOST:PORT"], err  # fmt: skip


def _driver(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "qkvmean", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _long_model_run(tmp_path):
    text = _texts(tmp_path / "t.txt", n=40)
    return ["run", "--model", "synthetic", "--text", text, "--batch-size", "1", "--over",
            "causal", "--ablate-layers", "all", "--quiet"]  # fmt: skip


@contextlib.contextmanager
def fault_in_a_worker(client, point, count, marker):
    """``QKVMEAN_FAULT=point:count@marker`` in every worker of the running cluster: the
    first worker to reach ``point`` for the ``count``-th time SIGKILLs itself (once: it
    creates ``marker``); a worker the nanny restarts does not have the variable. Yields
    the workers' process ids before."""
    spec = f"{point}:{count}@{marker}"
    before = set(client.run(os.getpid).values())
    # lambdas, not os.environ.__setitem__: that bound method would be pickled with a copy
    # of the environment, and set the variable in the copy
    client.run(lambda: os.environ.__setitem__("QKVMEAN_FAULT", spec))
    try:
        yield before
    finally:
        client.run(lambda: os.environ.pop("QKVMEAN_FAULT", None))


def _one_worker_was_replaced(client, before, marker):
    assert marker.exists(), "no worker reached the fault point"
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it
    after = set(client.run(os.getpid).values())
    assert len(after - before) == 1 and len(before - after) == 1, (before, after)


def test_a_killed_worker_loses_nothing(tmp_path, cluster):
    """A worker process SIGKILLed as it has computed its 3rd batch, before returning it,
    while the run goes on: its batches run again elsewhere (the nanny starts a new
    worker), the store is identical to a local run's."""
    local, client = cluster
    make_qkv(tmp_path / "in.h5", n=120, layers=4, heads=8, seq=48, dim=16)
    args = ["run", "--qkv", tmp_path / "in.h5", "--batch-size", "1", "--quiet"]
    assert main([*map(str, args), "-o", str(tmp_path / "local.h5")]) == 0
    out = tmp_path / "dist.h5"
    marker = tmp_path / "fired"
    with fault_in_a_worker(client, "worker-batch", 3, marker) as before:
        proc = _driver(*args, "-o", out, "--scheduler", local.scheduler_address)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _one_worker_was_replaced(client, before, marker)
    assert_identical(tmp_path / "local.h5", out)


def test_a_worker_killed_in_the_first_pass_loses_nothing(tmp_path, cluster):
    """--over dataset: a worker SIGKILLed as it has summed its 2nd batch of the first pass
    (adding up the means), before returning it: its batches' sums are computed again, the
    store is a local run's, /means included."""
    local, client = cluster
    make_qkv(tmp_path / "in.h5", n=240, layers=4, heads=8, seq=48, dim=16)
    args = ["run", "--qkv", tmp_path / "in.h5", "--over", "dataset", "--batch-size", "1", "-q"]
    assert main([*map(str, args), "-o", str(tmp_path / "local.h5")]) == 0
    out = tmp_path / "dist.h5"
    marker = tmp_path / "fired"
    with fault_in_a_worker(client, "worker-sum", 2, marker) as before:
        proc = _driver(*args, "-o", out, "--scheduler", local.scheduler_address)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _one_worker_was_replaced(client, before, marker)
    assert_identical(tmp_path / "local.h5", out)


def test_a_killed_driver_resumes(tmp_path, cluster):
    """The driver SIGKILLed right after its 3rd journal entry: exactly 3 batches are kept,
    and --resume on the cluster finishes a local run's store."""
    local, _ = cluster
    args = _long_model_run(tmp_path)
    assert main([*map(str, args), "-o", str(tmp_path / "local.h5")]) == 0
    out = tmp_path / "dist.h5"
    cmd = [sys.executable, "-m", "qkvmean", *map(str, args), "-o", str(out)]
    killed_at([*cmd, "--scheduler", local.scheduler_address], "journaled:3")
    assert not out.exists()
    assert len(list((tmp_path / "dist.h5.partial").glob("batch-*.npz"))) == 3
    resumed = [*map(str, args), "-o", str(out), "--resume", "--scheduler", local.scheduler_address]
    assert main(resumed) == 0
    assert_identical(tmp_path / "local.h5", out)


def test_a_cluster_that_goes_away_is_one_line_exit_1_and_resumable(tmp_path):
    """A scheduler and a worker of their own (``dask scheduler``, ``dask worker``); the
    scheduler is killed mid-run: one line, exit 1; ``--resume`` here finishes the store,
    identical to a local run."""
    info = tmp_path / "scheduler.json"
    py = [sys.executable, "-m"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheduler = subprocess.Popen(
        [*py, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", ":0", "--scheduler-file", str(info)], **quiet,
    )  # fmt: skip
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        import json

        address = json.loads(info.read_text())["address"]
        worker = subprocess.Popen(
            [*py, "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--dashboard-address", ":0"], **quiet,
        )  # fmt: skip
        args = _long_model_run(tmp_path)
        out = tmp_path / "dist.h5"
        # the driver stops itself right after its 2nd journal entry; the scheduler goes
        # away meanwhile; the driver goes on and finds it gone
        cmd = [sys.executable, "-m", "qkvmean", *map(str, args), "-o", str(out)]
        proc = stopped_at([*cmd, "--scheduler", address], "journaled:2",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        scheduler.kill()
        scheduler.wait()
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        lines = err.strip().splitlines()
        assert lines[-1].startswith(
            "qkvmean run: failed: the cluster went away (the connection to the scheduler was "
            "lost); the finished batches are kept in dist.h5.partial/: rerun with --resume"
        ), err
        assert "Traceback" not in err and len(lines) <= 2  # the cluster's line, and this one
    finally:
        for p in (scheduler, worker):
            if p is not None:
                p.kill()
                p.wait()
    assert main([*map(str, args), "-o", str(out), "--resume"]) == 0
    assert main([*map(str, args), "-o", str(tmp_path / "local.h5")]) == 0
    assert_identical(tmp_path / "local.h5", out)


def test_a_local_run_does_not_import_dask(tmp_path):
    make_qkv(tmp_path / "in.h5", n=2, layers=1, heads=2, seq=5)
    code = (
        "import sys\nfrom qkvmean.cli import main\n"
        f"assert main(['run', '--qkv', {str(tmp_path / 'in.h5')!r}, '-o', "
        f"{str(tmp_path / 'o.h5')!r}, '--quiet']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_batch_the_scheduler_forgets_is_submitted_again(tmp_path, cluster, monkeypatch):
    """A batch cancelled by the scheduler while the cluster is up ("already forgotten":
    a worker's death can race Dask's retry) is submitted once more, not taken for a lost
    cluster: the store is identical to a local run's. A second cancellation of the same
    batch is the cluster's failure, exit 1 with its work kept."""
    local, _ = cluster
    make_qkv(tmp_path / "in.h5", n=6, layers=1, heads=2, seq=8, dim=4)
    args = ["run", "--qkv", str(tmp_path / "in.h5"), "--batch-size", "2", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "local.h5")]) == 0
    submit = distributed.Client.submit
    cancelled = []

    def cancelling(self, *a, key=None, limit=1, **kw):
        future = submit(self, *a, key=key, **kw)
        if "-2-4" in key and len(cancelled) < limit:  # the second batch
            cancelled.append(key)
            self.cancel(future)
        return future

    monkeypatch.setattr(distributed.Client, "submit", cancelling)
    scheduler = ["--scheduler", local.scheduler_address]
    assert main([*args, "-o", str(tmp_path / "dist.h5"), *scheduler]) == 0
    assert len(cancelled) == 1
    assert_identical(tmp_path / "local.h5", tmp_path / "dist.h5")
    monkeypatch.setattr(
        distributed.Client, "submit", lambda self, *a, **kw: cancelling(self, *a, limit=2, **kw)
    )
    cancelled.clear()
    assert main([*args, "-o", str(tmp_path / "twice.h5"), *scheduler]) == 1
    assert len(cancelled) == 2 and (tmp_path / "twice.h5.partial").is_dir()
