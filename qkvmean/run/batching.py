"""How a run's inputs split into batches: the automatic size (memory per batch, tasks per
compute thread) and the aligned ranges."""

from __future__ import annotations

from ..config import compute_threads
from ..resources import memory_limit

#: Auto batch size: inputs per batch such that one batch's maps (all conditions, float32)
#: take about this many bytes. Two batches are in memory at once (one computing, one
#: being written).
BATCH_BYTES = 64 * 2**20

#: A model run's batches hold at least this many inputs per compute thread, so that the
#: threads' tasks (one input each) even out.
TASKS_PER_THREAD = 3

#: A model run's batches hold at most about this many (condition, input) passes, so that
#: a sweep of hundreds of conditions journals a batch every few minutes, not once at the
#: end (a kill loses one batch at most), while still giving every thread its tasks.
CONDITION_INPUTS = 4096


def aligned(size, align):
    """``size`` rounded down to a multiple of ``align`` (when it is at least that)."""
    return size - size % align if size >= align > 1 else size


def batches(n, size, align=1):
    size = aligned(size, align)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def auto_batch_size(source, n_conditions) -> int:
    """Inputs per batch: about ``BATCH_BYTES`` of results, and for a source that computes
    one input per task (a model) at most about ``CONDITION_INPUTS`` condition passes, and
    at least ``TASKS_PER_THREAD`` tasks per compute thread where three such batches take
    at most a quarter of the memory."""
    per_input = max(1, source.bytes_per_input() * n_conditions)
    size = BATCH_BYTES // per_input
    if source.tasks_per_input:
        fits = int(memory_limit() / 4 / 3 // per_input)
        threads = compute_threads()
        tasks = TASKS_PER_THREAD * threads
        most = -(-max(tasks, CONDITION_INPUTS // n_conditions) // threads) * threads
        size = min(size, most)  # a multiple of the threads: none waits alone at the end
        size = max(size, min(tasks, fits))
    return int(max(1, min(source.n_inputs, size)))
