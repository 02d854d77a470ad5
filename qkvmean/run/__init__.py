"""A run: inputs through the engine into a store, batch by batch, resumable after a kill.

:mod:`.options` (what is computed), :mod:`.sources` (where the inputs come from and how a
batch is computed), :mod:`.batching`, :mod:`.local` (:func:`~qkvmean.run.local.run`, on
this machine), :mod:`.cluster` (on a Dask cluster), :mod:`.means` (the dataset mean),
:mod:`.capture` (Q/K/V of a model into the exchange format).
"""
