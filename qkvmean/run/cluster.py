"""``qkvmean run`` on a Dask distributed cluster: one task per batch, one store.

The driver (the ``qkvmean run`` process) plans the batches, as a local run does, and
submits one task per batch to the cluster (``--scheduler tcp://HOST:PORT``, or
``--workers N``: a :class:`~distributed.LocalCluster` of N processes here). A task builds
the run's source on its worker once (the same input file, model directory and texts;
checked to be the same input by their identity), reads its batch itself where the
workers see the input file (else the driver reads it and sends it with the task),
computes it with the same kernels, and encodes its map chunks exactly as the store
writes them. The encoded chunks and the metrics come back to the driver, which writes
them into the store with the same journal as a local run: ``--resume`` and the crash
guarantees are the same. A worker that dies mid-batch has its batch run again elsewhere
(Dask reschedules it); a cluster that goes away stops the run with one line, resumable.

Dask is imported only here, and this module only for ``--scheduler``/``--workers``
(``pip install -e ".[dask]"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import CancelledError
from pathlib import Path

from .. import faults

#: The most batches in flight per worker thread (the driver writes as they come back).
IN_FLIGHT_PER_THREAD = 2
#: How long to wait for the scheduler, and then for a first worker (seconds).
CONNECT_TIMEOUT = 10
WORKER_TIMEOUT = 60
#: Our client is never made the process's default Dask scheduler: a program that calls
#: qkvmean keeps its own (and xarray's dask-backed writes never find ours after it closed).
_CLIENT = {"timeout": CONNECT_TIMEOUT, "set_as_default": False}


class ClusterError(Exception):
    """The cluster could not be reached, or went away; what is done can be resumed."""


def _dask():
    try:
        import distributed
    except ImportError:
        from ..files import InputError

        raise InputError(
            "--scheduler/--workers need Dask distributed: pip install 'qkvmean[dask]'"
        ) from None
    return distributed


class Cluster:
    """A connection to a Dask cluster: an existing scheduler, or a local cluster of
    ``workers`` processes started (and stopped) here."""

    def __init__(self, scheduler=None, workers=None, threads=None):
        import logging

        distributed = _dask()
        # Dask's nannies set OMP/MKL/OPENBLAS_NUM_THREADS=1 in this process's environment
        # for the workers they spawn; close() gives the caller its environment back
        self._environ = dict(os.environ)
        self.local = None
        self.address = scheduler
        try:
            if workers is not None:
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
                per = threads or max(1, cores // workers)
                self.local = distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=per, processes=True,
                    dashboard_address=":0", silence_logs=logging.ERROR,
                )  # fmt: skip
                self.client = distributed.Client(self.local, **_CLIENT)
                self.address = self.local.scheduler_address
            else:
                self.client = distributed.Client(scheduler, **_CLIENT)
            self.client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
            _quiet()
        except ValueError as exc:  # not an address: a usage error
            self.close()
            from ..files import InputError

            raise InputError(
                f"--scheduler {scheduler!r}: {_reason(exc)}; give the scheduler's address, "
                "tcp://HOST:PORT"
            ) from None
        except (OSError, TimeoutError) as exc:
            self.close()
            where = f"the Dask scheduler at {scheduler}" if scheduler else "a local cluster"
            raise ClusterError(f"cannot reach {where}: {_reason(exc)}") from None

    def workers(self) -> dict:
        """``{address: threads}`` of the workers connected now."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {addr: w.get("nthreads", 1) for addr, w in info.items()}

    def describe(self) -> dict:
        """How the store is made (recorded in its configuration)."""
        workers = self.workers()
        return {
            "kind": "local cluster" if self.local is not None else "cluster",
            "scheduler": self.address,
            "workers": len(workers),
            "threads": sum(workers.values()),
        }

    def see(self, paths) -> bool:
        """Do all workers see ``paths`` (files, with their size and modification time as
        the driver sees them)?"""
        want = {str(p): _stamp(p) for p in paths}
        try:
            seen = self.client.run(_stamps, list(want))
        except Exception as exc:
            raise ClusterError(f"the cluster went away: {_reason(exc)}") from None
        return bool(seen) and all(v == want for v in seen.values())

    def reads(self, source) -> bool:
        """Do the workers read ``source``'s batches themselves: raw Q/K/V in files they
        see as the driver does? (Else the driver reads and sends them; a model's token
        ids are always sent.)"""
        paths = [Path(p) for p in source.paths if Path(p).is_file()]
        return source.kind == "qkv" and self.see(paths)

    def close(self):
        for thing in ("client", "local"):
            obj = getattr(self, thing, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass


def _quiet():
    """Dask's client logs a traceback when it loses the scheduler; the run says so in
    one line instead (every error reaches it as an exception)."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _stamps(paths):
    return {p: _stamp(p) for p in paths}


def _reason(exc) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ----------------------------------------------------------------------------- workers

_built: dict = {}  # per worker process: recipe key -> the run's source
_building = threading.Lock()


def _use_worker_threads():
    """Compute with this worker's threads (not every core of the machine: other workers
    may share it)."""
    import numba

    from .. import config

    try:
        from distributed import get_worker

        worker = get_worker()
        threads = getattr(worker, "nthreads", None) or worker.state.nthreads
    except (ImportError, ValueError, AttributeError):
        return
    config.kernel_guard()
    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    config.THREADS = threads


def _source(recipe):
    """The run's source on this worker, built once per process (for both passes of an
    ``--over dataset`` run)."""
    from .sources import source_from_recipe

    with _building:
        found = _built.get(recipe["key"])
        if found is None:
            _use_worker_threads()
            found = source_from_recipe(recipe)
            _built.clear()  # one run at a time per worker
            _built[recipe["key"]] = found
    return found


def sum_batch(recipe, start, stop, targets, inputs=None):
    """The first pass of ``--over dataset`` for batch ``start:stop`` on this worker: the
    per-position sums of ``targets`` (:meth:`position_sums` of the source)."""
    source = _source(recipe)
    batch, _ = source.read(start, stop) if inputs is None else inputs
    sums = source.position_sums(batch, start, stop, targets, device=recipe["device"])
    faults.point("worker-sum")
    return sums


def compute_batch(recipe, start, stop, inputs=None):
    """Batch ``start:stop`` of the run ``recipe`` on this worker: ``{"chunks": encoded
    maps per condition (or the maps, or None without maps), "metrics", "digests",
    "seconds"}``."""
    from .. import config
    from ..store.codec import encode_batch
    from .sources import batch_results, qkv_conditions

    device, means = recipe["device"], recipe["means"]
    if inputs is not None and recipe["kind"] == "qkv":  # sent by the driver: no file here
        (q, k), digests = inputs
        lengths = recipe["lengths"][start:stop]
        c, seconds = qkv_conditions(
            (q, k), lengths, recipe["causal"], recipe["options"], device,
            f"inputs {start}..{stop - 1}", means,
        )  # fmt: skip
    else:  # the source built here: reads the batch, unless the driver sent it (token ids)
        source = _source(recipe)
        batch, digests = source.read(start, stop) if inputs is None else inputs
        c, seconds = source.compute(batch, start, stop, device=device, means=means)
    layout = recipe["layout"]
    maps, metrics = batch_results(c, layout, recipe["options"])
    chunks = maps
    if maps is not None:
        encoded = encode_batch(layout, maps, config.task_pool())
        if encoded is not None:
            chunks = {
                cond: [(off, d if isinstance(d, bytes) else d.result()) for off, d in parts]
                for cond, parts in encoded.items()
            }
    faults.point("worker-batch")
    return {"chunks": chunks, "metrics": metrics, "digests": digests, "seconds": seconds}


def recipe(source, layout, device, means) -> dict:
    """What the workers need (:meth:`QKVSource.recipe`, :meth:`ModelSource.recipe`), with
    the layout, where and with which means the batches compute, and a key that names the
    run (a worker builds its source once per key)."""
    from .options import run_config

    config = json.dumps(run_config(source, source.options, None), sort_keys=True, default=str)
    key = hashlib.sha256(config.encode()).hexdigest()[:16]
    return dict(source.recipe(), layout=layout, key=key, device=device, means=means)


# ----------------------------------------------------------------------------- driver


def _on_cluster(cluster: Cluster, source, recipe, batches, task, name, *args):
    """``task(recipe, start, stop, *args, inputs)`` for each ``(start, stop)`` of
    ``batches`` on the cluster, a bounded number in flight (retried by Dask where a worker
    dies); yields ``((start, stop), result)`` as each comes back, in any order. Raw Q/K/V
    are read on the workers where they see the file as it is here, else sent; a model is
    built on the workers (checked to be the same) and its token ids are sent."""
    distributed = _dask()
    client = cluster.client
    send = not cluster.reads(source)
    try:
        shared = client.scatter([recipe], broadcast=True)[0]
        width = max(2, IN_FLIGHT_PER_THREAD * sum(cluster.workers().values()))
        pending = list(batches)
        running = distributed.as_completed(loop=client.loop)
        futures = {}
        again = set()  # the batches submitted a second time

        def submit(batch):
            start, stop = batch
            inputs = source.read(start, stop) if send else None
            retry = "-again" if batch in again else ""
            future = client.submit(
                task, shared, start, stop, *args, inputs,
                key=f"qkvmean-{name}-{recipe['key']}-{start}-{stop}{retry}", retries=2,
                pure=False,
            )  # fmt: skip
            futures[future] = batch
            running.add(future)

        while pending and len(futures) < width:
            submit(pending.pop(0))
        for future in running:
            batch = futures.pop(future)
            try:
                result = future.result()
            except CancelledError:
                # the scheduler, still up, forgot the batch (a worker's death can race its
                # retry: "already forgotten"): submit it once more
                if batch in again or client.status != "running":
                    raise
                again.add(batch)
                submit(batch)
                continue
            if pending:
                submit(pending.pop(0))
            yield batch, result
    except Exception as exc:
        raise _cluster_error(exc) from None


def compute_batches(cluster: Cluster, source, recipe, todo, assembly, progress):
    """Every batch of ``todo`` on the cluster, written by ``assembly`` as it comes back.
    Returns ``(inputs computed, kernel seconds)``."""
    computed, seconds = 0, 0.0
    for (start, stop), result in _on_cluster(cluster, source, recipe, todo, compute_batch, "batch"):
        assembly.add_encoded(start, stop, result["chunks"], result["metrics"], result["digests"])
        computed += stop - start
        seconds += result["seconds"]
        progress(stop - start)
    return computed, seconds


def sum_batches(cluster: Cluster, source, recipe, batches, indices, targets):
    """The first pass on the cluster: yields ``(index, sums)`` for each of ``indices`` (into
    ``batches``) as it comes back, in any order (:func:`qkvmean.run.means.first_pass` adds
    them in batch order)."""
    index = {batches[i]: i for i in indices}
    todo = [batches[i] for i in indices]
    for batch, sums in _on_cluster(cluster, source, recipe, todo, sum_batch, "sums", targets):
        yield index[batch], sums


def _cluster_error(exc):
    """``exc`` as a :class:`ClusterError` where it says the cluster went away, else as
    it is (a read that failed here, on the driver, is not the cluster's)."""
    from ..files import ReadFailed

    if isinstance(exc, ReadFailed):
        return exc
    if isinstance(exc, (OSError, TimeoutError)) or type(exc).__name__ in (
        "KilledWorker", "CancelledError", "FutureCancelledError", "CommClosedError",
    ):  # fmt: skip
        return ClusterError(f"the cluster went away ({_lost(exc)})")
    return exc


def _lost(exc) -> str:
    """What happened to the cluster, in a few words."""
    text = _reason(exc)
    name = type(exc).__name__
    if "connection" in text.lower() or name in ("CommClosedError", "CancelledError"):
        return "the connection to the scheduler was lost"
    if type(exc).__name__ == "KilledWorker":
        return "workers died running the same batch three times"
    return text
