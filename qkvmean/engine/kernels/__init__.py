"""Numba kernels, one concern per module; they see only flat arrays and scalars.

:mod:`.attention` (drivers and worker) builds on :mod:`.blas` (numpy's BLAS products,
called from compiled code), :mod:`.softmax` (one row) and :mod:`.metrics` (row metrics,
per-pair reduction);
:mod:`.means` substitutes and sums; :mod:`.norms`, :mod:`.activations` and :mod:`.heads`
are the model path's steps; :mod:`.vmath` the vectorisable float32 functions;
:mod:`.finite` the finite scan; :mod:`.rows` the row helpers that the CUDA backend
compiles into its kernels too. The backends (:mod:`qkvmean.engine.backends`) call them.
"""
