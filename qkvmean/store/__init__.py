"""The qkvmean HDF5 store: schema (version 1), crash-safe writing, and the reader.

:mod:`.schema` (the datasets), :mod:`.codec` (the chunks' encoding), :mod:`.workdir`
(the work directory's protocol), :mod:`.writer`, :mod:`.reader`, :mod:`.export`. The
schema in words: ``docs/store.md``. Writing is crash-safe by construction
(:class:`~qkvmean.store.writer.Assembly`):

- a run builds the store inside ``STORE.h5.partial/`` (next to a ``manifest.json`` with
  the run's configuration), writing each map once, and after each batch renames a small
  journal entry into place that says where that batch's chunks lie in the file and what
  their CRC-32 is;
- when every input is in, the file is fsynced and renamed onto ``STORE.h5`` atomically;
  only then is the partial directory removed. A resumed run starts a new file, copies the
  journaled batches into it (checked against their CRCs) and computes the rest.

So the final path never holds a half-written store, a kill at any moment loses at most
the batches in flight, and a resumed run writes exactly the chunks an uninterrupted run
would have.
"""

from __future__ import annotations

from .reader import Store, open_store

__all__ = ["Store", "open_store"]
