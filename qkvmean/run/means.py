"""The dataset mean of a run (``run --over dataset``): a first pass that sums Q, K and V of
the baseline at each position over every input, streamed batch by batch and resumable,
or the means recorded in a reference run's store (``--mean-from``).

The first pass reads the run's batches in order and adds each batch's float64 sums into
running totals (inputs in order within a batch, batches in order), so the means do not
depend on the thread count, the device or a cluster; they do depend on the batches,
which the run's manifest fixes (and ``--resume`` keeps). After each batch the totals and
the number of batches in them are renamed into ``STORE.h5.partial/means.npz``
atomically: a kill at any moment loses at most the batch in flight. The second pass (the
run itself) substitutes the means and writes them at ``/means`` in the store.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .. import faults
from ..engine.names import OVER
from ..files import InputError
from ..store import workdir
from ..store.reader import open_store


def wanted(source, options) -> list:
    """The targets whose means the run substitutes: raw Q/K/V's mean-V changes no weight
    (there is no model to carry it on), so its means are not taken."""
    return [t for t in options.targets if source.kind == "model" or t != "v"]


def digest(means) -> str:
    """SHA-256 of the means' layers, counts and values (what a resumed run checks)."""
    h = hashlib.sha256()
    h.update(np.asarray(means.layers, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(means.counts, dtype=np.int64).tobytes())
    for target in sorted(means.values):
        value = np.ascontiguousarray(means.values[target])
        h.update(f"{target}:{value.dtype.str}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def first_pass(source, options, manifest, work: Path, progress=None, sums=None, device="cpu"):
    """The means of the run's own inputs (its first pass), resumed from ``work``'s state.

    ``progress(n)`` is called with the inputs of each batch summed. ``sums(indices,
    targets)``, where given (a cluster's, :func:`qkvmean.run.cluster.sum_batches`),
    yields ``(index, position sums)`` of those batches in any order; they are added in
    batch order whatever order they come in, so the means are the same bits as a local
    pass's, and saved as each next batch is added. Returns the
    :class:`~qkvmean.engine.plan.DatasetMeans`.
    """
    targets = wanted(source, options)
    batches = [tuple(b) for b in manifest["batches"]]
    done, totals = workdir.load_means_state(work, batches, targets)
    if progress is not None and done:
        progress(sum(b - a for a, b in batches[:done]))

    def local(indices, targets):
        for index in indices:
            start, stop = batches[index]
            inputs, _ = source.read(start, stop)
            yield index, source.position_sums(inputs, start, stop, targets, device=device)

    waiting = {}  # batches that came back before the one to add next
    for index, part in (sums or local)(list(range(done, len(batches))), targets):
        waiting[index] = part
        while done in waiting:
            part = waiting.pop(done)
            totals = part if totals is None else {t: totals[t] + part[t] for t in targets}
            done += 1
            workdir.save_means_state(work, batches, targets, done, totals)
            faults.point("means-journaled")
        if progress is not None:
            progress(batches[index][1] - batches[index][0])
    if totals is None:  # no inputs at all
        totals = source.position_sums(None, 0, 0, targets)
    return source.means_from_sums(totals, {"taken_from": "this run's inputs"})


def from_reference(spec, source, options):
    """The means recorded in the store ``spec`` (``--mean-from``), checked against this
    run's source: ``(DatasetMeans of what this run needs, digest)``."""
    from ..engine.plan import DatasetMeans

    path = Path(spec)
    with open_store(path) as ref:
        means = ref.dataset_means()
        kind, config, n_heads = ref.source, ref.config, ref.n_heads
        layer_count = ref.n_layers
    where = f"--mean-from {path}"
    if means is None:
        raise InputError(
            f"{where}: the store has no /means (it was not made with --over {OVER[2]}); make "
            f"the reference run with --over {OVER[2]} first"
        )
    if kind != source.kind:
        raise InputError(
            f"{where}: is a store of {kind} inputs, this run reads {source.kind} inputs; use "
            "a reference run of the same kind"
        )
    if source.kind == "model":
        mine = source.describe()["model_identity"]
        if config.get("model_identity") != mine:
            raise InputError(
                f"{where}: was made with another model ({config.get('model', '?')}); the means "
                f"of a reference set must come from the same model ({source.model.name})"
            )
        layers = list(source.ablate_layers)
    else:
        layers = list(source.layer_ids)
        if layer_count != source.n_layers:
            raise InputError(f"{where}: has {layer_count} layers, this input has {source.n_layers}")
    if n_heads != source.n_heads:
        raise InputError(f"{where}: has {n_heads} heads, this input has {source.n_heads}")
    missing = [t for t in wanted(source, options) if t not in means.values]
    if missing:
        raise InputError(
            f"{where}: has no means of {', '.join(missing)} (it has "
            f"{', '.join(sorted(means.values))}); make the reference run with those targets"
        )
    absent = [layer for layer in layers if layer not in means.layers]
    if absent:
        raise InputError(
            f"{where}: has means at layers {', '.join(map(str, means.layers))} only, this run "
            f"substitutes at layer {absent[0]}; give the reference run the same --ablate-layers"
        )
    dims = source.means_dims()
    for target in wanted(source, options):
        have = means.values[target].shape[-1]
        if have != dims[target]:
            raise InputError(
                f"{where}: its means of {target} have dimension {have}, this input's "
                f"{target} has {dims[target]}"
            )
    covered = int(np.argmin(means.counts > 0)) if not means.counts.all() else means.counts.size
    longest = int(np.max(source.lengths, initial=0))
    if longest > covered:
        first = int(np.argmax(np.asarray(source.lengths) > covered))
        raise InputError(
            f"{where}: its means cover positions 0..{covered - 1} (its inputs' tokens), but "
            f"input {first} has {int(source.lengths[first])} tokens; use a reference set "
            f"with inputs at least as long" + (f", or --max-tokens {covered}"
                                               if source.kind == "model" else "")
        )  # fmt: skip
    rows = [means.layers.index(layer) for layer in layers]
    chosen = DatasetMeans(
        tuple(layers),
        {t: np.ascontiguousarray(means.values[t][rows]) for t in wanted(source, options)},
        means.counts,
        {"taken_from": str(path.resolve())},
    )
    return chosen, digest(chosen)
