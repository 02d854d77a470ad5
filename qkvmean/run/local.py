"""A run on this machine: inputs → engine → store, batch by batch, resumable after a kill.

:func:`run` checks everything it can before any work (the output, the sizes, the
device), opens the work directory (:mod:`qkvmean.store.workdir`: a new one, or the
interrupted run's to continue), takes the dataset means where the run needs them
(:mod:`.means`), and then computes the batches — here, overlapping reading, computing and
writing, or on a Dask cluster (:mod:`.cluster`) — into the store being assembled
(:class:`qkvmean.store.writer.Assembly`), which is renamed into place when complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import engine
from .._version import __version__
from ..config import task_pool
from ..engine import condition
from ..engine.names import BASELINE, OVER
from ..files import (
    InputError,
    ReadFailed,
    check_new_file,
    lexists,
)
from ..resources import check_memory, disk_free, environment, format_bytes
from ..store import schema, workdir
from ..store.reader import open_store
from ..store.writer import Assembly
from . import means as means_mod
from .batching import aligned, auto_batch_size, batches
from .options import Options, RunFailed, differences, reason, run_config
from .sources import Source, batch_results


@dataclass
class Summary:
    path: Path
    n_inputs: int
    computed: int  # inputs computed by this invocation (the rest came from the journal)
    seconds: float
    kernel_seconds: float
    map_bytes: int  # uncompressed bytes of the maps computed by this invocation
    file_bytes: int
    already_complete: bool = False
    maps: bool = True

    def line(self):
        if self.already_complete:
            return f"{self.path}: already complete ({self.n_inputs} inputs); nothing to do"
        seconds = max(self.seconds, 1e-9)
        earlier = self.n_inputs - self.computed
        inputs = f"{self.n_inputs} inputs" + (
            f", {earlier} of them from the interrupted run" if earlier else ""
        )
        rate = f"{self.computed / seconds:.1f} inputs/s"
        if self.maps:
            rate += f", {self.map_bytes / 1e6 / seconds:.1f} MB/s of maps"
        return (
            f"wrote {self.path} ({inputs}, {self.file_bytes / 1e6:.1f} MB) in "
            f"{self.seconds:.1f} s: {rate}"
        )


def _check_output(out: Path, inputs=(), overwrite=False):
    """Refuse, before any work, an output that is an input, that cannot be written, or
    that is a link leading nowhere (the run would compute everything, then find it); an
    existing store is the run's to judge (``--resume``), not refused here."""
    if not out.name:
        raise InputError(
            f"--out {str(out)!r} names no file (it is empty, or a directory); give a file "
            "name for the store"
        )
    work = workdir.partial_dir(out).resolve()
    for path in inputs:
        if work in Path(path).resolve().parents:
            raise InputError(
                f"{path}: lies in {workdir.partial_dir(out)}/, where the run writing {out} "
                "keeps its work (and deletes it when done); move the input, or choose another "
                "--out"
            )
    check_new_file(out, overwrite, inputs, flag="--out", noun="store", existing_ok=True)
    longest = _name_max(out.parent) - workdir.LONGEST_SUFFIX
    if len(os.fsencode(out.name)) > longest:
        raise InputError(
            f"--out: the file name is too long ({len(os.fsencode(out.name))} bytes; with the "
            f"names of its work files beside it, this file system allows {longest})"
        )


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory if str(directory) else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def progress_bar(total, initial, show, desc="starting (the first run compiles kernels)"):
    if not show:
        return None
    from tqdm import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    # a terminal that reports no size (a bare pty) would get no bar at all from tqdm
    sized = size.columns > 0 and size.lines > 0
    return tqdm(
        desc=desc,
        total=total,
        initial=initial,
        unit="input",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=sized,
        ncols=None if sized else 80,
        nrows=None if sized else 24,
    )


def _layout(source, options: Options) -> schema.Layout:
    return schema.Layout(
        n_inputs=source.n_inputs,
        n_layers=source.n_layers,
        n_heads=source.n_heads,
        seq=source.seq,
        conditions=[BASELINE] + [c.label for c in source.conditions],
        map_dtype=options.map_dtype,
        compression=options.compression,
        maps=bool(source.map_layers),
        layer_ids=source.layer_ids,
        digests=source.digests,
        map_layers=list(source.map_layers),
        effects=tuple(source.effects),
        table=condition.table(source.conditions),
    )


def _check_sizes(source, layout: schema.Layout, out: Path, batch_size):
    """Refuse, before anything is created, a run that cannot fit: a map HDF5 cannot
    store, a batch larger than memory, or a store whose fixed part exceeds the disk."""
    layout.check()
    per_input = source.bytes_per_input() * len(layout.conditions)
    # one batch computing, one being written, one being read: about three in memory
    batch = min(batch_size or 1, source.n_inputs)
    try:
        check_memory(
            3 * batch * per_input,
            f"one batch ({batch} input{'s' if batch > 1 else ''} of {source.seq} tokens, "
            f"{source.n_layers} layers x {source.n_heads} heads, {len(layout.conditions)} "
            "conditions)",
            "pass a smaller --batch-size" if batch > 1 else "cut the sequences",
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    free, need = disk_free(out.parent if str(out.parent) else "."), layout.fixed_bytes()
    if need > free:
        raise InputError(
            f"{out}: the store needs at least {format_bytes(need)} for its metrics alone, "
            f"and {out.parent} has {format_bytes(free)} free"
        )


def _new_work(work: Path, config, source, batch_size, overwrite):
    """Plan the batches and create the work directory with its manifest (atomically)."""
    size = batch_size or auto_batch_size(source, len(config["conditions"]))
    align = 1 if batch_size else source.align()  # an explicit --batch-size is honoured
    planned = batches(source.n_inputs, aligned(size, align))
    manifest = {
        "config": {**config, "batch_size": aligned(size, align), "environment": environment()},
        "batches": planned,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "qkvmean_version": __version__,
        "replaces": bool(overwrite),  # started with --overwrite: it replaces STORE.h5
    }
    try:
        lock = workdir.create(work, manifest)
    except OSError as exc:
        raise RunFailed(f"{work}: cannot start the run: {reason(exc)}") from None
    manifest["batches"] = [tuple(b) for b in manifest["batches"]]
    return manifest, lock


def _finished_by(out: Path, manifest: dict) -> bool:
    """Is ``out`` the store the interrupted run of ``manifest`` finished (killed after the
    final rename, before its partial directory was removed)?"""
    try:
        with open_store(out) as existing:
            return existing.attrs.get("created_utc") == manifest.get(
                "created_utc"
            ) and not differences(existing.config, manifest["config"])
    except (InputError, OSError):
        return False


def _open_work(work: Path, out: Path, config, source, batch_size, resume, overwrite):
    """Lock (and create or reopen) the partial directory: ``(manifest, created, lock)``,
    or ``(None, False, None)`` when ``out`` is the finished store of the run that left
    the partial directory (which is then removed).

    The lock is taken before anything in the directory is judged or removed, so a run
    that is still going is never mistaken for an interrupted one, nor deleted; and a
    directory that is not a partial directory of ours is neither used nor deleted.
    """
    if lexists(work):
        alien = workdir.foreign(work)
        if alien:
            raise InputError(
                f"{work}: is where this run would keep its work, but {alien}; move it "
                "away, or choose another --out"
            )
        lock = workdir.take_lock(work)
        try:
            if not resume:
                if not overwrite:
                    raise InputError(
                        f"{work}: an interrupted run left this; add --resume to continue it "
                        "or --overwrite to start over"
                    )
                workdir.discard(work)
            else:
                manifest = workdir.read_manifest(work)
                if lexists(out) and _finished_by(out, manifest):
                    workdir.discard(work)
                    os.close(lock)
                    return None, False, None
                differs = differences(manifest["config"], config)
                covered = manifest["batches"][-1][1] if manifest["batches"] else 0
                if not differs and covered != source.n_inputs:
                    differs = f"batches of {covered} inputs (the input has {source.n_inputs})"
                if differs:
                    raise InputError(
                        f"{work}: was started with {differs}; rerun with the same "
                        "options and input, or pass --overwrite (without --resume) to start over"
                    )
                if lexists(out) and not overwrite:
                    started = "with --overwrite, " if manifest.get("replaces") else ""
                    raise InputError(
                        f"{out}: exists, and the interrupted run in {work.name}/ (started "
                        f"{started}to write {out.name}) would replace it; continue it with "
                        "--resume --overwrite"
                    )
                workdir.remove_stale(work)
                return manifest, False, lock
        except BaseException:
            os.close(lock)
            raise
        os.close(lock)
    manifest, lock = _new_work(work, config, source, batch_size, overwrite)
    return manifest, True, lock


def _verify_complete(source, out: Path, batches):
    """An existing store made from this input: every input must still read as it did
    (the store's CRC-32 of each input), else say which changed."""
    if not source.digests:
        return
    with open_store(out) as existing:
        recorded = existing.input_digests()
    if recorded is None:  # made before the store recorded them
        return
    for start, stop in batches:
        change = source.changed(start, stop, recorded[start:stop])
        if change:
            raise InputError(
                f"{out}: exists, but the input changed since it was made ({change}); pass "
                "--overwrite to compute it again"
            )


def _root_attrs(source, options, config, created_utc) -> dict:
    heads = options.heads if options.heads is not None else range(source.n_heads)
    return {
        "format": schema.FORMAT,
        "format_version": np.int32(schema.FORMAT_VERSION),
        "qkvmean_version": __version__,
        "created_utc": created_utc,
        "source": source.kind,
        "causal": bool(source.causal),
        "over": options.over,
        "ablate_layers": np.asarray(source.ablate_layers, dtype=np.int32),
        "ablate_heads": np.asarray(heads, dtype=np.int32),
        "config": json.dumps(config, sort_keys=True),
    }


def _already_complete(out: Path, source) -> Summary:
    return Summary(out, source.n_inputs, 0, 0.0, 0.0, 0, out.stat().st_size, True)


@dataclass
class _Job:
    """One invocation of :func:`run`, once everything about it is checked."""

    source: Source
    out: Path
    options: Options
    layout: schema.Layout
    work: Path
    device: str
    cluster: object  # a qkvmean.run.cluster.Cluster, or None
    show_progress: bool
    notes: Callable
    overwrite: bool


def run(
    source,
    out,
    options: Options,
    *,
    batch_size=None,
    resume=False,
    overwrite=False,
    show_progress=None,
    notes=None,
    device="cpu",
    cluster=None,
) -> Summary:
    """Compute every input of ``source`` and write the store ``out``.

    ``cluster``: a :class:`qkvmean.run.cluster.Cluster` to compute the batches on (the
    store is written here, the same as a local run's; how it was made is recorded in the
    configuration's ``cluster``). ``device``: ``"cpu"`` or ``"cuda"`` (see
    :func:`qkvmean.engine.api.choose_device`);
    the store is the same either way (maps within float32 rounding), so it is not part of
    the run's configuration and a run may be resumed on the other device.

    ``show_progress``: None shows a progress bar only when stderr is a terminal.
    ``notes``: called with each line the run has to say on the way (the source's warnings,
    batches of an interrupted run whose inputs changed since, and are computed again).
    """
    out = Path(out)
    try:
        engine.api.backend(device)
    except ValueError as exc:  # unknown, or CUDA that cannot run here
        raise InputError(str(exc)) from None
    _check_output(out, source.paths, overwrite)
    config = run_config(source, options, batch_size)
    config["cluster"] = cluster.describe() if cluster is not None else "local"
    means = None
    if options.mean_from is not None:  # a reference run's: checked, and part of the run
        means, config["means_sha256"] = means_mod.from_reference(options.mean_from, source, options)
    layout = _layout(source, options)
    _check_sizes(source, layout, out, batch_size)
    notes = notes or (lambda line: None)
    for line in source.notes():  # once the run is known to go ahead
        notes(line)
    job = _Job(
        source, out, options, layout, workdir.partial_dir(out), device, cluster,
        sys.stderr.isatty() if show_progress is None else show_progress, notes, overwrite,
    )  # fmt: skip
    if _complete(job, config, resume):
        return _already_complete(out, source)
    manifest, created, lock = _open_work(
        job.work, out, config, source, batch_size, resume, overwrite
    )
    if manifest is None:
        return _already_complete(out, source)
    try:
        summary = _build(job, manifest, created, means)
    finally:
        os.close(lock)
    return summary


def _complete(job: _Job, config, resume) -> bool:
    """Is ``job.out`` this run's finished store already (``--resume`` of a run that
    finished)? Sweeps what a kill left beside the work directory first; refuses an
    existing store that is not to be replaced or resumed."""
    source, out, work = job.source, job.out, job.work
    workdir.sweep(work, source.paths)
    if resume and lexists(out) and lexists(work):
        workdir.drop_broken(work)
    if not lexists(out) or job.overwrite or lexists(work):
        return False
    if not resume:
        raise InputError(f"{out}: exists; pass --overwrite to replace it")
    with open_store(out) as existing:
        differs = differences(existing.config, config)
    if differs:
        raise InputError(f"{out}: exists, made with {differs}; pass --overwrite to replace it")
    size = auto_batch_size(source, 1 + len(source.conditions))
    _verify_complete(source, out, batches(source.n_inputs, size, source.align()))
    return True


def _build(job: _Job, manifest, created, means) -> Summary:
    """The store of ``job`` from its work directory: the first pass where the run takes
    its own means, the journaled batches salvaged, the rest computed; renamed into place.
    Failures become one line (:class:`InputError`, :class:`RunFailed`), resumable."""
    source, options, work = job.source, job.options, job.work
    entries = workdir.journal(work)
    for key in entries.keys() - set(manifest["batches"]):  # not this manifest's
        entries.pop(key).unlink()
    t_start = time.perf_counter()
    bar = assembly = None
    try:
        if options.over == OVER[2] and options.mean_from is None:
            means = _first_pass(job, manifest)  # the means of this run's own inputs
        attrs = _root_attrs(source, options, manifest["config"], manifest["created_utc"])
        assembly = Assembly(work, job.layout, attrs, source.inputs_record(), means)
        done = assembly.salvage(entries, source.changed if source.digests else None)
        for start, stop, change in assembly.changed:
            job.notes(
                f"warning: inputs {start}..{stop - 1} changed since the interrupted run "
                f"read them ({change}); computing them again"
            )
        todo = [b for b in manifest["batches"] if b not in done]
        bar = progress_bar(source.n_inputs, sum(b - a for a, b in done), job.show_progress)
        compute = _compute_batches if job.cluster is None else _compute_on_cluster
        computed, kernel_seconds, map_bytes = compute(job, means, todo, bar, assembly)
        try:
            assembly.finish(job.out, job.overwrite)
        except FileExistsError:
            raise RunFailed(
                f"{job.out} appeared while this run was writing (another run?) and was left "
                f"as it is; this run's store is {assembly.path}"
            ) from None
        assembly = None
    except InputError:
        if created:  # the input is bad: there is nothing worth resuming
            workdir.discard(work)
        raise
    except ReadFailed as exc:
        raise RunFailed(
            f"{exc}; the finished batches are kept in {work.name}/: fix the cause and "
            "rerun with --resume"
        ) from exc
    except (OSError, RuntimeError) as exc:  # h5py reports a failed flush as RuntimeError
        raise RunFailed(
            f"writing {job.out} failed: {reason(exc)}; the finished batches are kept in "
            f"{work.name}/: fix the cause and rerun with --resume"
        ) from exc
    finally:
        if bar is not None:
            bar.close()
        if assembly is not None:
            assembly.abort()
    workdir.discard(work)
    seconds = time.perf_counter() - t_start
    return Summary(
        job.out, source.n_inputs, computed, seconds, kernel_seconds, map_bytes,
        job.out.stat().st_size, maps=options.maps,
    )  # fmt: skip


def _compute_batches(job: _Job, means, todo, bar, assembly):
    """Compute the batches ``todo`` here: three stages that overlap.

    A reader thread fetches (and checks) batch ``i + 1`` while batch ``i`` computes; a
    writer thread compresses batch ``i - 1`` on the process's pool of compute threads
    (:func:`qkvmean.config.task_pool`: ISA-L and zlib release the GIL; the model path's
    tasks queue on the same pool, so the cores are never oversubscribed) and writes it
    into the store's ``assembly``. At most three batches are in
    memory. Returns ``(inputs computed, kernel seconds, bytes of maps)``.
    """
    source = job.source
    kernel_seconds = 0.0
    map_bytes = computed = 0
    compress = task_pool()  # the model path's pool: never more busy threads than cores
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkvmean-reader") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkvmean-writer") as writer,
    ):
        pending = None
        fetched = reader.submit(source.read, *todo[0]) if todo else None
        for index, (start, stop) in enumerate(todo):
            inputs, digests = fetched.result()
            if index + 1 < len(todo):
                fetched = reader.submit(source.read, *todo[index + 1])
            c, seconds = source.compute(inputs, start, stop, device=job.device, means=means)
            kernel_seconds += seconds
            maps, metrics = batch_results(c, job.layout, job.options)
            map_bytes += sum(w.nbytes for w in c.weights.values())
            if pending is not None:
                pending.result()  # at most one batch waits to be written
            pending = writer.submit(assembly.add, start, stop, maps, metrics, compress, digests)
            computed += stop - start
            if bar is not None:
                bar.set_description_str("", refresh=False)
                bar.update(stop - start)
        if pending is not None:
            pending.result()
    return computed, kernel_seconds, map_bytes


def _compute_on_cluster(job: _Job, means, todo, bar, assembly):
    """:func:`_compute_batches` on a Dask cluster (:mod:`qkvmean.run.cluster`)."""
    from . import cluster

    def progress(n):
        if bar is not None:
            bar.update(n)

    layout = job.layout
    recipe = cluster.recipe(job.source, layout, job.device, means)
    try:
        computed, seconds = cluster.compute_batches(
            job.cluster, job.source, recipe, todo, assembly, progress
        )
    except cluster.ClusterError as exc:
        raise RunFailed(
            f"{exc}; the finished batches are kept in {assembly.work.name}/: rerun with "
            "--resume (on a cluster or here)"
        ) from None
    per_input = (
        len(layout.map_layers) * layout.n_heads * layout.seq**2 * np.dtype("float32").itemsize
    )
    maps = computed * per_input * len(layout.conditions) if layout.maps else 0
    return computed, seconds, maps


def _first_pass(job: _Job, manifest):
    """:func:`qkvmean.run.means.first_pass`, with its own progress bar; on a cluster where
    its workers can do it (a model, or raw Q/K/V in a file they see), else here."""
    source, work = job.source, job.work
    bar = progress_bar(source.n_inputs, 0, job.show_progress, "dataset means (pass 1 of 2)")
    sums, lost = None, ()
    if job.cluster is not None:
        from . import cluster

        lost = cluster.ClusterError
        if source.kind == "model" or job.cluster.reads(source):
            recipe = cluster.recipe(source, job.layout, job.device, None)
            planned = [tuple(b) for b in manifest["batches"]]

            def sums(indices, targets):
                return cluster.sum_batches(job.cluster, source, recipe, planned, indices, targets)

    try:
        return means_mod.first_pass(
            source, job.options, manifest, work, None if bar is None else bar.update, sums,
            job.device,
        )  # fmt: skip
    except lost as exc:
        raise RunFailed(
            f"{exc}; the means added up so far are kept in {work.name}/: rerun with "
            "--resume (on a cluster or here)"
        ) from None
    finally:
        if bar is not None:
            bar.close()
