"""``qkvmean --version --verbose``: what computes here (libraries, threads, BLAS, CPU,
CUDA), and the same lines from a store's record of its machine (``inspect``)."""

from __future__ import annotations

import sys


def blas_line(blas) -> str:
    if not blas:
        return "none found"
    return "; ".join(
        f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')} kernels), "
        f"{b.get('num_threads')} threads"
        for b in blas
    )


def threads_line(env) -> str:
    """How a run computes: threads and threading layer (from an environment record)."""
    return (
        f"{env.get('compute_threads', env.get('numba_threads'))} compute threads, Numba's "
        f"{env.get('threading_layer')} layer"
    )


def machine_lines() -> list:
    import platform

    from .. import config
    from ..resources import environment

    t = config.describe_threads()  # (threadpoolctl's scan of the libraries, once)
    env = environment(t)
    tbb = f" ({t['tbb_library']})" if t["tbb_library"] else ""
    return [
        f"python       {platform.python_version()} ({sys.executable})",
        f"libraries    numpy {env['numpy']}, numba {env['numba']}, h5py {env['h5py']} "
        f"(HDF5 {env['hdf5']})",
        f"threads      {t['compute_threads']} compute threads ({t['available_cores']} cores "
        f"available; --threads to change); Numba: {t['threading_layer']} layer{tbb}, "
        f"{t['numba_threads']} threads",
        f"BLAS         {blas_line(t['blas'])}; the kernels call {_gemm_line()}, one BLAS "
        "thread per compute thread",
        f"cpu          {env['cpu']} ({env['machine']})",
        f"cuda         {_cuda_line()}",
        f"families     {_families_line()}",
    ]


def _families_line() -> str:
    from ..io.models import families_text

    return families_text()


def _gemm_line() -> str:
    from ..engine.kernels import blas

    return blas.describe()


def _cuda_line() -> str:
    """What ``--device cuda`` would use, or why it cannot run here."""
    from ..engine.backends import load

    ops, why = load("cuda")
    return f"{ops.describe()} (--device cuda)" if ops is not None else f"not usable: {why}"
