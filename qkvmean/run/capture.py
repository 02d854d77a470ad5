"""``qkvmean capture``: Q, K and V of every layer of a model's baseline pass, written in the
Q/K/V exchange format (docs/store.md) that ``run --qkv`` and other tools read.

``at="projection"`` takes them where qkvmean substitutes (the projection output, bias
included, before any q/k norm and rotary embedding); ``at="attention"`` after those, what
the attention's dot products see (so that ``run --qkv`` on the file gives the model's own
baseline maps for rotary families too). Keys and values keep their KV heads. The file is
written in batches (memory bounded by a batch) beside its final name and renamed onto it
when complete: a kill never leaves a half-written file under that name.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..files import InputError, check_output_dir, lexists, refuse_inputs, refuse_special

AT = ("projection", "attention")
#: Inputs per batch: about this many bytes of Q, K and V in memory at once.
BATCH_BYTES = 64 * 2**20


def capture(source, out, *, at="projection", batch_size=None, device="cpu", overwrite=False,
            progress=None):  # fmt: skip
    """Write the Q/K/V of ``source`` (a :class:`qkvmean.run.sources.ModelSource`) to ``out``.

    Returns ``(path, inputs, seconds)``. ``progress(n)`` is called after each batch.
    """
    from ..engine.transformer import model_projections
    from ..io.qkv import QKVWriter
    from .batching import batches

    if at not in AT:
        raise InputError(f"--at must be projection or attention, got {at!r}")
    out = Path(out)
    refuse_special(out)
    refuse_inputs(out, source.paths)
    if lexists(out) and not overwrite:
        raise InputError(f"{out}: exists; pass --overwrite to replace it")
    check_output_dir(out)
    w = source.model.weights
    arch = w.arch
    layers = list(range(w.n_layers))
    per_input = w.n_layers * (arch.n_heads + 2 * arch.n_kv_heads) * source.seq * arch.head_dim * 4
    size = batch_size or max(1, min(source.n_inputs, BATCH_BYTES // max(per_input, 1)))
    tokens = [t + [""] * (source.seq - len(t)) for t in source.tokens]
    attrs = {
        "captured_at": at,
        "model": source.model.name,
        "model_family": source.model.family,
        # the maps of a file captured before these are not the model's
        "rotary": bool(arch.rotary is not None or arch.qk_norm),
    }
    t0 = time.perf_counter()
    writer = QKVWriter(
        out, n_inputs=source.n_inputs, n_layers=w.n_layers, n_heads=arch.n_heads,
        n_kv_heads=arch.n_kv_heads, seq=source.seq, dim=arch.head_dim, dim_v=arch.head_dim,
        lengths=source.lengths, causal=bool(w.causal), tokens=tokens, text=source.texts,
        attrs=attrs, overwrite=overwrite,
    )  # fmt: skip
    try:
        for start, stop in batches(source.n_inputs, size):
            ids, _ = source.read(start, stop)
            try:
                qkv = model_projections(
                    w, ids, source.lengths[start:stop], layers=layers, at=at, seq=source.seq,
                    device=device,
                )  # fmt: skip
            except ValueError as exc:
                where = f"{source.model.name}: inputs {start}..{stop - 1}"
                raise InputError(f"{where}: {exc}") from None
            writer.write(start, qkv["q"], qkv["k"], qkv["v"])
            if progress is not None:
                progress(stop - start)
        path = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return path, source.n_inputs, time.perf_counter() - t0
