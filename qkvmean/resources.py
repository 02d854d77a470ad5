"""What the machine can hold: memory and disk, checked before work that would not fit.

An output larger than memory must be a one-line ``ValueError`` that gives its size
before anything is allocated, not numpy's ``MemoryError`` (or the kernel's OOM killer)
halfway through; a store whose fixed part alone exceeds the free disk space is refused
before the run starts.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def format_bytes(n: float) -> str:
    """``1.5 GB``, ``640 kB``: decimal units, three significant digits."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def _cgroup_limit() -> float:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return float(text)
    return float("inf")


def memory_limit() -> float:
    """Bytes this process could ever hold: physical memory, or less where a cgroup or
    ``ulimit -v`` says so."""
    try:
        physical = float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not on Linux
        physical = float("inf")
    limit = min(physical, _cgroup_limit())
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        limit = min(limit, float(soft))
    return limit


def check_memory(nbytes: float, what: str, hint: str):
    """A ``ValueError`` when ``nbytes`` (what ``what`` needs) exceeds :func:`memory_limit`.

    ``hint`` says how to need less (fewer inputs at once, shorter sequences, ...).
    """
    limit = memory_limit()
    if nbytes > limit:
        raise ValueError(
            f"{what} would take {format_bytes(nbytes)}, more than this machine's "
            f"{format_bytes(limit)} of memory; {hint}"
        )


def disk_free(directory) -> float:
    """Bytes free for an unprivileged writer in ``directory`` (inf if unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return float("inf")
    return float(st.f_bavail * st.f_frsize)


def environment(threads=None) -> dict:
    """What, besides the run's configuration, can change the last bits of a model run:
    library versions, the BLAS library with its CPU kernel and threads, Numba's threads
    and threading layer, the processor. Recorded in a store's configuration; not compared
    by ``--resume`` (a resumed run may be on another machine). ``threads``: a
    :func:`qkvmean.config.describe_threads` the caller already has."""
    import platform

    import h5py
    import numba
    import numpy as np

    from . import config
    from ._version import __version__

    threads = threads or config.describe_threads()
    return {
        "qkvmean": __version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version,
        "blas": threads["blas"],
        "numba_threads": threads["numba_threads"],
        "compute_threads": threads["compute_threads"],
        "threading_layer": threads["threading_layer"],
        "machine": platform.machine(),
        "cpu": _cpu_name(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()
