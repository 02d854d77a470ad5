"""The store under construction (:class:`Assembly`): written once, in HDF5's SWMR mode,
each batch journaled in the work directory, salvaged by a resumed run, and renamed into
place when every input is in."""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from .. import faults
from ..engine.names import METRICS
from ..files import ReadFailed
from .codec import crc32, encodable, encode_batch, parse_compression
from .schema import (
    CRC32,
    EFFECT_AXES,
    INPUT,
    INPUT_AXES,
    LENGTHS,
    LIBVER,
    MAP_AXES,
    METRIC_AXES,
    STR,
    TENSOR,
    TEXT,
    TOKEN_AXES,
    TOKENS,
    Layout,
    attach,
    basename,
    dimension_scales,
    effect_path,
    map_path,
    metric_path,
    write_means,
)
from .workdir import (
    JOURNAL_VERSION,
    entry_checksum,
    entry_name,
    fsync_path,
    is_store_file,
    new_store_path,
    store_files,
)


class Assembly:
    """The store under construction, written once, with a journal that survives a kill.

    The store is built at ``STORE.h5.partial/store-<pid>-<n>.h5``. Each batch's chunks are
    written straight into it (compressed here, on a thread pool, and handed to HDF5 as
    they are) and its metrics after them; the file is flushed, and then a *journal
    entry* ``batch-START-STOP.npz`` is renamed into place: the batch's metrics and the
    CRC-32 of every chunk. When every input is in, :meth:`finish` fsyncs the file and
    renames it onto ``STORE.h5``.

    The file is written in HDF5's SWMR mode (single writer, multiple readers), which
    orders HDF5's metadata writes so that the file on disk is readable at every moment,
    and so after a kill too. A resumed run starts a new file, and :meth:`salvage` copies
    each journaled batch into it from the old file, every chunk checked against its CRC;
    the batches whose entry or chunks are missing or damaged (an OS crash, say) are
    computed again. Old files are deleted only once no entry refers to them, so a kill
    during salvage loses nothing either. A run that is not interrupted writes each map
    once.
    """

    def __init__(self, work: Path, layout: Layout, attrs: dict, inputs: dict, means=None):
        self.work = work
        self.means = means  # over="dataset": a DatasetMeans, written at /means
        self.layout = layout
        self.filters = parse_compression(layout.compression)
        self.filled = []
        self.path = new_store_path(work)
        self.f = h5py.File(self.path, "w-", libver=LIBVER)
        self.fd = self.f.id.get_vfd_handle()
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkvmean-sync")
        self._syncing = None
        try:
            self._skeleton(attrs, inputs)
            self.f.swmr_mode = True  # every object exists: from now on only data is written
        except Exception:
            self.abort()
            raise

    def _skeleton(self, attrs, inputs):
        f, layout = self.f, self.layout
        for key, value in attrs.items():
            f.attrs[key] = value
        layout.create_datasets(f, layout.n_inputs)
        dimension_scales(f, layout)
        group = f.create_group(INPUT)
        lengths = group.create_dataset(
            basename(LENGTHS), data=np.asarray(inputs["lengths"], np.int32)
        )
        attach(lengths, f, INPUT_AXES)
        if layout.digests:
            names = group.create_dataset(basename(TENSOR), data=np.array(layout.digests, dtype=STR))
            names.make_scale(basename(TENSOR))
            crc = group.create_dataset(
                basename(CRC32), shape=(layout.n_inputs, len(layout.digests)), dtype="uint32"
            )
            attach(crc, f, INPUT_AXES)
            crc.dims[1].attach_scale(names)
        if "text" in inputs:
            text = group.create_dataset(basename(TEXT), data=np.array(inputs["text"], dtype=STR))
            attach(text, f, INPUT_AXES)
            tokens = np.array(inputs["tokens"], dtype=STR).reshape(layout.n_inputs, layout.seq)
            attach(group.create_dataset(basename(TOKENS), data=tokens), f, TOKEN_AXES)
        for name in METRICS:
            attach(f[metric_path(name)], f, METRIC_AXES)
        for name in layout.effects:
            attach(f[effect_path(name)], f, EFFECT_AXES)
        if self.means is not None:
            write_means(f, self.means)
        if layout.maps:
            for cond in layout.conditions:
                attach(f[map_path(cond)], f, MAP_AXES)

    # -- writing

    def add(self, start, stop, maps, metrics, pool=None, digests=None):
        """Write inputs ``start:stop`` and journal them.

        ``maps[condition]``: ``(n, map layer, head, seq, seq)`` (a condition whose map
        is another's array — mean-V of raw Q/K/V is the baseline — is encoded once);
        ``metrics[name]``: ``(condition, n, layer, head)`` for each metric, and
        ``(condition, n)`` for each of the layout's effects; ``digests``: ``(n, tensor)``
        CRC-32 of each input as read (for a layout with ``digests``). With a thread
        ``pool``, the chunks are encoded on its threads (ISA-L and zlib release the GIL).
        """
        encoded = encode_batch(self.layout, maps, pool) if self.layout.maps else None
        self.add_encoded(start, stop, maps if encoded is None else encoded, metrics, digests)

    def add_encoded(self, start, stop, chunks, metrics, digests=None):
        """:meth:`add` of a batch encoded already (by :func:`encode_batch`, here or on a
        cluster's worker): ``chunks[condition]`` is ``[(offset, bytes or a future), ...]``,
        or the maps themselves where HDF5 has to apply the filter."""
        rows = []
        if self.layout.maps and not encodable(self.filters):  # a filter only HDF5 applies
            for index, cond in enumerate(self.layout.conditions):
                dset = self.f[map_path(cond)]
                dset[start:stop] = chunks[cond]
                for where in self._chunk_coords(start, stop):
                    rows.append((index, *where, crc32(dset.id.read_direct_chunk(where)[1])))
        elif self.layout.maps:
            for index, cond in enumerate(self.layout.conditions):
                did = self.f[map_path(cond)].id
                for offset, data in chunks[cond]:
                    data = data if isinstance(data, bytes) else data.result()
                    where = (offset[0] + start, *offset[1:])
                    did.write_direct_chunk(where, data, 0)
                    rows.append((index, *where, crc32(data)))
        self._put(start, stop, rows, metrics, digests)

    def _chunk_coords(self, start, stop):
        per = self.layout.map_chunks()[2]
        return [
            (i, layer, head, 0, 0)
            for i in range(start, stop)
            for layer in range(len(self.layout.map_layers))
            for head in range(0, self.layout.n_heads, per)
        ]

    def _put(self, start, stop, rows, metrics, digests):
        """Metrics and effects into the store; flush; the journal entry (atomically);
        writeback."""
        for name in METRICS:
            self.f[metric_path(name)][:, start:stop] = metrics[name]
        for name in self.layout.effects:
            self.f[effect_path(name)][:, start:stop] = metrics[name]
        digests = self._digests(start, stop, digests)
        if self.layout.digests:
            self.f[CRC32][start:stop] = digests
        self.f.flush()  # the batch's chunk index entries reach the file before its entry
        final = self.work / entry_name(start, stop)
        tmp = final.with_name(final.name + ".tmp")
        fields = {
            "version": np.int64(JOURNAL_VERSION),
            "store_file": np.str_(self.path.name),
            "start": np.int64(start),
            "stop": np.int64(stop),
            "chunks": np.asarray(rows, dtype=np.int64).reshape(-1, 7),
            "inputs_crc32": digests,
            **{name: np.asarray(metrics[name]) for name in self.layout.results},
        }
        with open(tmp, "wb") as fh:
            np.savez(fh, checksum=np.uint32(entry_checksum(fields)), **fields)
        # No fsync: the rename is atomic against a killed process (the page cache keeps
        # what was written), and after an OS crash salvage checks every chunk's CRC.
        os.replace(tmp, final)
        faults.point("journaled")
        self.filled.append((start, stop))
        self._writeback()

    def _digests(self, start, stop, digests):
        shape = (stop - start, len(self.layout.digests))
        if digests is None:
            digests = np.zeros(shape, np.uint32)
        digests = np.asarray(digests, dtype=np.uint32)
        if digests.shape != shape:
            raise ValueError(
                f"digests of inputs {start}..{stop}: shape {digests.shape}, not {shape}"
            )
        return digests

    def _writeback(self):
        """Start writing what is done to disk now, on a thread of its own, so that the
        fsync in :meth:`finish` has little left to do (it ran for seconds at the end of a
        large run otherwise)."""
        if self._syncing is not None:
            if not self._syncing.done():
                return  # the previous one is still running: it will be followed by the next
            self._syncing.result()  # a failed writeback (EIO, ENOSPC) fails the run
        self._syncing = self._syncer.submit(os.fdatasync, self.fd)

    # -- resuming

    def salvage(self, entries: dict, verify=None) -> set:
        """Copy the journaled batches ``{(start, stop): entry path}`` of interrupted runs
        into this file and journal them anew; return the batches copied.

        An entry that is unreadable, fails its checksum, or whose chunks are missing or
        fail their CRC, is deleted (its batch is computed again). ``verify(start, stop,
        digests)`` checks that the inputs are still those the entry was computed from (the
        CRC-32 of each input as read then): it returns None if so, else what changed, and
        the batch is computed again (:attr:`changed` lists them). Then every older store
        file is deleted."""
        done = set()
        files = {}
        self.changed = []
        try:
            for (start, stop), path in sorted(entries.items()):
                batch = self._read_entry(path, start, stop, files)
                change = None
                if batch is not None and verify is not None:
                    change = verify(start, stop, batch[2])
                    if change is not None:
                        self.changed.append((start, stop, change))
                if batch is None or change is not None:
                    path.unlink(missing_ok=True)
                    continue
                chunks, metrics, digests = batch
                rows = []
                for index, where, mask, data in chunks:
                    dset = self.f[map_path(self.layout.conditions[index])]
                    dset.id.write_direct_chunk(where, data, mask)
                    rows.append((index, *where, crc32(data)))
                self._put(start, stop, rows, metrics, digests)
                done.add((start, stop))
        finally:
            for old in files.values():
                if old is not None:
                    old.close()
        for old in store_files(self.work):  # every entry now names self.path
            if old != self.path:
                old.unlink()
        return done

    def _expected(self, start, stop) -> list:
        if not self.layout.maps:
            return []
        coords = self._chunk_coords(start, stop)
        return [(i, *c) for i in range(len(self.layout.conditions)) for c in coords]

    def _open_old(self, name, files):
        """An earlier attempt's store file, opened for reading (None if it cannot be)."""
        if name not in files:
            files[name] = None
            if is_store_file(name) and name != self.path.name:
                path = self.work / name
                try:  # a killed SWMR writer leaves a file that SWMR readers can open
                    files[name] = h5py.File(path, "r", swmr=True)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno is not None:  # EMFILE, EACCES, EIO...: stop, delete nothing
                        reason = os.strerror(exc.errno).lower()
                        raise ReadFailed(f"reading {path} failed: {reason}") from exc
                    # else HDF5 cannot make sense of it: its batches are computed again
                except (RuntimeError, ValueError):
                    pass
        return files[name]

    def _read_entry(self, path, start, stop, files):
        """``(chunks, metrics, digests)`` of a journal entry, its checksum verified and each
        chunk read back and checked; None if anything is missing, inconsistent or
        damaged."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != JOURNAL_VERSION:
                    return None
                fields = {name: z[name] for name in z.files if name != "checksum"}
                if int(z["checksum"]) != entry_checksum(fields):
                    return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError):
            return None  # not an entry of ours: a foreign or damaged file
        except zipfile.BadZipFile:
            return None
        try:
            if (int(fields["start"]), int(fields["stop"])) != (start, stop):
                return None
            name = str(fields["store_file"])
            table = fields["chunks"]
            digests = fields["inputs_crc32"]
            metrics = {m: fields[m] for m in self.layout.results}
        except (KeyError, TypeError, ValueError):
            return None
        per_condition = (len(self.layout.conditions), stop - start)
        shape = (*per_condition, self.layout.n_layers, self.layout.n_heads)
        if any(metrics[m].shape != shape for m in METRICS):
            return None
        if any(metrics[e].shape != per_condition for e in self.layout.effects):
            return None
        if digests.shape != (stop - start, len(self.layout.digests)):
            return None
        expected = self._expected(start, stop)
        if table.shape != (len(expected), 7):
            return None
        if sorted(map(tuple, table[:, :6].tolist())) != sorted(expected):
            return None
        chunks = []
        for index, *where, crc in table.tolist():
            old = self._open_old(name, files)
            if old is None:
                return None
            try:
                dset = old[map_path(self.layout.conditions[index])]
                mask, data = dset.id.read_direct_chunk(tuple(where))
            except (OSError, RuntimeError, ValueError, KeyError):
                return None
            if crc32(data) != crc:
                return None
            chunks.append((index, tuple(where), mask, data))
        return chunks, metrics, digests

    # -- ending

    def finish(self, out: Path, overwrite: bool = False) -> Path:
        """Check that every input is in; fsync; move onto ``out`` (replacing a file there
        only when ``overwrite``)."""
        expected = 0
        for start, stop in sorted(self.filled):
            if start != expected:
                raise RuntimeError(f"{out}: inputs {expected}..{start} are missing")
            expected = stop
        if expected != self.layout.n_inputs:
            raise RuntimeError(f"{out}: inputs stop at {expected} of {self.layout.n_inputs}")
        self._syncer.shutdown(wait=True)
        if self._syncing is not None:
            self._syncing.result()
        self.f.close()
        fsync_path(self.path)
        if overwrite:
            os.replace(self.path, out)
        else:  # never onto a store that appeared meanwhile (another run, another program)
            try:
                os.link(self.path, out)  # FileExistsError if there is one
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if out.exists():
                    raise FileExistsError(out) from None
                os.replace(self.path, out)
            else:
                os.unlink(self.path)
        fsync_path(out.parent, directory=True)
        return out

    def abort(self):
        """Close the file after a failure; it stays, with its journal, for ``--resume``."""
        try:
            self._syncer.shutdown(wait=True)
        finally:
            try:
                self.f.close()
            except (OSError, RuntimeError):  # e.g. the disk is full: salvage copes
                pass
