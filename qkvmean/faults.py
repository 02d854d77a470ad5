"""Fault points: where the crash tests kill a run, deterministically.

A run passes named points on its way (:func:`point`); the environment variable
``QKVMEAN_FAULT`` makes the process SIGKILL itself at the N-th time it reaches one, so that
a test kills a run exactly after its second journal entry, not whenever a polling loop
happens to look. Without the variable, a point costs one dictionary look-up.

``QKVMEAN_FAULT`` is a comma-separated list of ``NAME:N``, ``NAME:N@MARKER`` and either
with ``:stop`` after it, which SIGSTOPs the process instead (it stays alive, holding what
it holds, until it is sent SIGCONT: a test of a *live* run waits for the stop with
``os.waitpid(pid, os.WUNTRACED)``). With a
marker file, the fault fires once across every process that has the variable (a cluster's
workers, the one the nanny restarts): the first to reach it creates ``MARKER`` (atomically)
and dies; the others, and later counts, find it there and go on. A process counts its
passages anew whenever the variable's value changes.

The points:

``journaled``
    a batch's journal entry is in place (the store and the entry agree).
``means-journaled``
    the first pass of ``--over dataset`` has saved its sums after a batch.
``worker-batch``
    a cluster's worker has computed a batch, before it returns it.
``worker-sum``
    a cluster's worker has summed a batch of the first pass, before it returns it.
"""

from __future__ import annotations

import os
import signal

POINTS = ("journaled", "means-journaled", "worker-batch", "worker-sum")
VARIABLE = "QKVMEAN_FAULT"

_reached: dict = {}


def _faults(spec: str) -> dict:
    faults = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, rest = part.partition(":")
        action = signal.SIGKILL
        if rest.endswith(":stop"):
            rest, action = rest[: -len(":stop")], signal.SIGSTOP
        count, _, marker = rest.partition("@")
        if name not in POINTS or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"{VARIABLE}={spec!r}: {part!r} is not NAME:N[@MARKER][:stop] with NAME one "
                f"of {', '.join(POINTS)} and N >= 1"
            )
        faults[name] = (int(count), marker or None, action)
    return faults


def point(name: str) -> None:
    """Pass the fault point ``name``: die (or stop) here if ``QKVMEAN_FAULT`` says so."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    fault = _faults(spec).get(name)
    if fault is None:
        return
    count, marker, action = fault
    key = (spec, name)  # counted afresh whenever the variable changes (a long-lived worker)
    _reached[key] = _reached.get(key, 0) + 1
    if _reached[key] != count:
        return
    if marker is not None:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return  # fired already, in this process or another
    os.kill(os.getpid(), action)
