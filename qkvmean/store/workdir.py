"""The work directory of a run (``STORE.h5.partial/``): the whole crash-safe protocol.

A run keeps everything it has not finished in one directory beside its store, and this
module is the only one that knows its names and rules:

- ``lock``: an exclusive ``flock`` held by the run for as long as it lives (made first
  when the directory is created, removed last when it is deleted), so a live run is never
  mistaken for an interrupted one;
- ``manifest.json``: the run's configuration and its batches, written before any work;
- ``store-<pid>-<n>.h5``: the store being built (one per attempt; a resumed run copies
  the journaled batches of older attempts into its own);
- ``batch-START-STOP.npz``: the journal, one entry per finished batch, renamed into place
  atomically (its metrics and the CRC-32 of each of its chunks);
- ``means.npz``: the first pass's running totals (``--over dataset``).

A directory is created aside and renamed into place, deleted by renaming it aside first,
and anything else found in it makes it foreign: neither used nor deleted.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np

from ..files import InputError, load_json
from .codec import crc32

#: The names in a work directory.
LOCK = "lock"
MANIFEST = "manifest.json"
MEANS_STATE = "means.npz"
_STORE_FILE = re.compile(r"store-\d+-\d+\.h5")
#: The most a name beside ``STORE.h5`` adds to it (``.partial.<pid>.done``, pid < 2**22).
LONGEST_SUFFIX = len(".partial.4194304.done")


def fsync_path(path: Path, directory: bool = False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Version of the journal entries (``batch-START-STOP.npz``) in a partial directory.
JOURNAL_VERSION = 2
_ENTRY = re.compile(r"batch-(\d+)-(\d+)\.npz")


def entry_checksum(fields: dict) -> int:
    """CRC-32 of a journal entry's fields (names, dtypes, shapes and bytes), so that an
    entry whose metrics or chunk table changed after it was written is never trusted."""
    crc = 0
    for name in sorted(fields):
        value = np.ascontiguousarray(fields[name])
        head = f"{name}:{value.dtype.str}:{value.shape};".encode()
        crc = crc32(value.tobytes(), crc32(head, crc))
    return crc


def entry_name(start: int, stop: int) -> str:
    return f"batch-{start:010d}-{stop:010d}.npz"


def journal(directory: Path) -> dict:
    """``{(start, stop): path}`` of the journal entries in a partial directory."""
    done = {}
    for path in directory.glob("batch-*-*.npz"):
        match = _ENTRY.fullmatch(path.name)
        if match:
            done[(int(match[1]), int(match[2]))] = path
    return done


def partial_dir(out: Path) -> Path:
    """Where the run that writes ``out`` keeps its work until the store is complete."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def read_manifest(work: Path) -> dict:
    """The manifest of a partial directory, checked, or an :class:`InputError`: a
    configuration (an object, with its conditions), a start time, and batches that cover
    the inputs from 0 in order, each non-empty."""
    try:
        manifest = load_json((work / MANIFEST).read_bytes())
        batches = [tuple(int(x) for x in b) for b in manifest["batches"]]
        config = manifest["config"]
        if not isinstance(config, dict) or not isinstance(manifest["created_utc"], str):
            raise ValueError
        if not isinstance(config.get("conditions"), list):
            raise ValueError
        ends = [0] + [b for _, b in batches]
        if any(len(b) != 2 for b in batches) or any(
            a != ends[i] or b <= a for i, (a, b) in enumerate(batches)
        ):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(
            f"{work}: no readable manifest.json, so not an interrupted qkvmean run that can "
            "be continued; move it away, or pass --overwrite to start over"
        ) from None
    manifest["batches"] = batches
    return manifest


def progress(work: Path, manifest: dict) -> tuple:
    """``(inputs done, inputs in all)`` of an interrupted run."""
    batches = set(manifest["batches"])
    total = max((b for _, b in batches), default=0)
    return sum(b - a for a, b in journal(work) if (a, b) in batches), total


def run_is_live(work: Path) -> bool:
    """Does a running qkvmean process hold the lock of the partial directory ``work``?
    (Every run holds an exclusive ``flock`` on ``work/lock`` until it ends; a shared
    lock taken here for an instant fails while it does.)"""
    try:
        fd = os.open(work / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing releases the shared lock, if it was taken)
    return False


def interrupted_message(out: Path) -> str:
    """What to say of a store that is not written yet (it has a partial directory): a
    run is writing it now, or the run that wrote it was interrupted."""
    work = partial_dir(out)
    try:
        done, total = progress(work, read_manifest(work))
        count = f"{done} of {total} inputs done"
    except InputError:
        count = ""
    if run_is_live(work):
        return (
            f"not written yet: a qkvmean run is writing it right now ({count or 'starting'}; "
            f"its work is in {work.name}/); wait for it to finish"
        )
    count = f" with {count}" if count else ""
    return (
        f"not written yet: the run that writes it was interrupted{count} (its work is in "
        f"{work.name}/); finish it with the same qkvmean run command plus --resume"
    )


def take_lock(work: Path) -> int:
    """Hold an exclusive lock on ``work`` for this process (released when it exits)."""
    fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InputError(
            f"{work}: another qkvmean run is writing this store right now; wait for it"
        ) from None
    return fd


def atomic_json(path: Path, data):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    fsync_path(tmp)
    os.replace(tmp, path)


#: What a run puts in its partial directory; a directory that holds anything else is
#: not ours, and is neither used nor deleted.
_OURS = re.compile(
    "|".join(
        [re.escape(LOCK), re.escape(MANIFEST), re.escape(MANIFEST[: -len(".json")] + ".tmp")]
        + [_STORE_FILE.pattern, _ENTRY.pattern + r"(\.tmp)?", re.escape(MEANS_STATE) + r"(\.tmp)?"]
    )
)


def foreign(directory: Path) -> str | None:
    """None when ``directory`` is a partial directory of ours, else what says it is not.

    Ours holds a ``lock`` (every run creates it first and a deletion removes it last) and
    nothing but the names a run writes; an empty directory (a kill before the lock was
    made) is ours too.
    """
    if directory.is_symlink() or not directory.is_dir():
        return "it is not a directory" if not directory.is_symlink() else "it is a link"
    entries = list(directory.iterdir())
    for path in entries:
        if not _OURS.fullmatch(path.name) or (path.is_dir() and not path.is_symlink()):
            return f"it holds {path.name}, which no qkvmean run writes"
    if entries and not any(path.name == LOCK for path in entries):
        return "it has no lock file, which every qkvmean run makes first"
    return None


def discard(work: Path):
    """Remove a partial directory: renamed aside first (atomically), so that a kill while
    it is being deleted never leaves a half-deleted one under the name a resume reads;
    its lock goes last, so that what a kill leaves is still recognisably ours."""
    trash = work.with_name(f"{work.name}.{os.getpid()}.done")
    try:
        os.rename(work, trash)
    except OSError:
        trash = work
    try:
        for path in sorted(trash.iterdir(), key=lambda p: p.name == LOCK):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        trash.rmdir()
    except OSError:
        shutil.rmtree(trash, ignore_errors=True)


def sweep(work: Path, inputs=()):
    """Remove what a kill left beside ``work``: a partial directory being created
    (``.<pid>.new``) or being deleted (``.<pid>.done``), if it is ours, not in use, and
    holds none of ``inputs``."""
    pattern = re.compile(re.escape(work.name) + r"\.\d+\.(new|done)")
    held = [Path(p).resolve() for p in inputs]
    for aside in work.parent.glob(f"{glob.escape(work.name)}.*"):
        if not pattern.fullmatch(aside.name) or foreign(aside):
            continue
        if any(aside.resolve() in p.parents for p in held):
            continue
        try:
            os.close(take_lock(aside))
        except (InputError, OSError):
            continue
        shutil.rmtree(aside, ignore_errors=True)


def drop_broken(work: Path):
    """Remove a partial directory of ours whose manifest is gone or unreadable, beside a
    store that exists: what is left of a run that finished (a kill while an older qkvmean
    deleted it, or damage) — with no manifest, none of its batches could be used."""
    if foreign(work):
        return
    fd = take_lock(work)
    try:
        try:
            read_manifest(work)
        except InputError:
            discard(work)
    finally:
        os.close(fd)


def remove_stale(work: Path):
    """Half-renamed journal entries and manifests a kill left (the caller holds the lock;
    store files inside ``work`` are not stale: resume copies from them)."""
    for path in work.glob("*.tmp"):
        path.unlink(missing_ok=True)


def create(work: Path, manifest: dict) -> int:
    """Create the work directory ``work`` holding ``manifest``, atomically (built aside,
    locked, then renamed into place): the lock's descriptor. An :class:`InputError` when
    another run created it first; an ``OSError`` when it cannot be made."""
    staging = work.with_name(f"{work.name}.{os.getpid()}.new")
    fd = None
    try:
        staging.mkdir()
        fd = take_lock(staging)
        atomic_json(staging / MANIFEST, manifest)
        os.rename(staging, work)
    except OSError:
        if fd is not None:
            os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        if work.exists():  # another run created it first
            raise InputError(
                f"{work}: another qkvmean run is writing this store right now"
            ) from None
        raise
    return fd


def new_store_path(work: Path) -> Path:
    """A name for this attempt's store file in ``work``, not taken yet."""
    n = 0
    while (work / f"store-{os.getpid()}-{n}.h5").exists():
        n += 1
    return work / f"store-{os.getpid()}-{n}.h5"


def is_store_file(name: str) -> bool:
    """Is ``name`` (a bare name) a store file of some attempt?"""
    return Path(name).name == name and bool(_STORE_FILE.fullmatch(name))


def store_files(work: Path) -> list:
    """The store files of every attempt in ``work``."""
    return [p for p in work.glob("store-*.h5") if _STORE_FILE.fullmatch(p.name)]


# --------------------------------------------------------- the first pass's running totals

#: Version of ``means.npz``.
MEANS_STATE_VERSION = 1


def load_means_state(work: Path, batches, targets):
    """``(batches summed, totals)`` of the first pass's state in ``work``, ``(0, None)``
    when there is none or it is not this run's (another manifest, damage)."""
    path = work / MEANS_STATE
    try:
        with np.load(path, allow_pickle=False) as z:
            fields = {name: z[name] for name in z.files if name != "checksum"}
            if int(z["checksum"]) != entry_checksum(fields):
                return 0, None
    except FileNotFoundError:
        return 0, None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return 0, None  # damaged (an OS crash mid-write): summed again
    try:
        same = (
            int(fields["version"]) == MEANS_STATE_VERSION
            and np.array_equal(fields["batches"], np.asarray(batches, dtype=np.int64))
            and [str(t) for t in fields["targets"]] == list(targets)
        )
        done = int(fields["done"])
        totals = {t: fields[f"sum_{t}"] for t in targets}
    except (KeyError, TypeError, ValueError):
        return 0, None
    if not same or not 0 < done <= len(batches):
        return 0, None
    return done, totals


def save_means_state(work: Path, batches, targets, done, totals):
    """Rename the first pass's totals after ``done`` batches into ``work`` (atomic against
    a kill, as the journal's entries)."""
    fields = {
        "version": np.int64(MEANS_STATE_VERSION),
        "batches": np.asarray(batches, dtype=np.int64).reshape(-1, 2),
        "targets": np.array(list(targets), dtype=np.str_),
        "done": np.int64(done),
        **{f"sum_{t}": totals[t] for t in targets},
    }
    path = work / MEANS_STATE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, checksum=np.uint32(entry_checksum(fields)), **fields)
    os.replace(tmp, path)


def describe(out: Path) -> dict:
    """Summary of an interrupted run (``STORE.h5.partial/``) for ``qkvmean inspect``."""
    work = partial_dir(out)
    manifest = read_manifest(work)
    done, total = progress(work, manifest)
    cfg = manifest["config"]
    return {
        "store": str(out),
        "complete": False,
        "running": run_is_live(work),
        "partial": str(work),
        "created_utc": manifest.get("created_utc"),
        "source": cfg.get("source"),
        "input": cfg.get("input") or cfg.get("model"),
        "inputs_done": done,
        "inputs_total": total,
        "conditions": cfg.get("conditions"),
        "bytes_on_disk": sum(p.stat().st_size for p in work.iterdir() if p.is_file()),
        "config": cfg,
    }
