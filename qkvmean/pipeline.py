"""Runs: inputs → engine → store, batch by batch, resumable after a kill.

A *source* (raw Q/K/V here; a model in :mod:`qkvmean.engine.models`) knows its sizes and
computes the maps and metrics of a range of inputs. :func:`run` does the rest: batching
with bounded memory, writing each batch into the store (and its journal) on a writer
thread while the next batch computes, progress, resume, and the atomic rename of the
finished store (:mod:`qkvmean.io.store`).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import engine
from . import means as means_mod
from ._version import __version__
from .config import compute_threads, task_pool
from .engine.kernels.means import position_sums
from .engine.names import METRICS, OVER, TARGETS, condition_names
from .io import (
    InputError,
    ReadFailed,
    check_output_dir,
    lexists,
    refuse_inputs,
    refuse_special,
)
from .io import store as st
from .io.qkv import QKVInput
from .resources import check_memory, disk_free, environment, format_bytes, memory_limit

#: Auto batch size: inputs per batch such that one batch's maps (all conditions, float32)
#: take about this many bytes. Two batches are in memory at once (one computing, one
#: being written).
BATCH_BYTES = 64 * 2**20
#: A model run's batches hold at least this many inputs per compute thread, so that the
#: threads' tasks (one input each) even out.
TASKS_PER_THREAD = 3


@dataclass
class Options:
    """What is computed and how it is stored (everything but the input itself)."""

    targets: list = field(default_factory=lambda: list(TARGETS))
    over: str = OVER[0]
    heads: list | None = None  # None: all heads
    causal: bool | None = None  # None: the input's own setting
    scale: float | None = None
    map_dtype: str = "float32"
    compression: str = "deflate"
    maps: bool = True
    mean_from: str | None = None  # over="dataset": a reference run's store with the means

    def check(self):
        if not self.targets:
            raise InputError("--targets is empty; choose from q, k, v (e.g. --targets q,k,v)")
        for t in self.targets:
            if t not in engine.api.TARGETS:
                raise InputError(f"--targets: unknown target {t!r}; choose from q, k, v")
        if len(set(self.targets)) != len(self.targets):
            raise InputError(f"--targets lists a target twice: {','.join(self.targets)}")
        if self.over not in engine.api.OVER:
            raise InputError(
                f"--over must be {', '.join(engine.api.OVER[:-1])} or {engine.api.OVER[-1]}, "
                f"got {self.over!r}"
            )
        if self.mean_from is not None:
            if self.over != OVER[2]:
                raise InputError(
                    f"--mean-from takes the means of a reference run for --over dataset, not "
                    f"--over {self.over}; drop --over (or pass --over dataset)"
                )
            if not str(self.mean_from).strip():
                raise InputError("--mean-from is empty; give the store of a --over dataset run")
        if self.map_dtype not in ("float32", "float16"):
            raise InputError(f"--dtype must be float32 or float16, got {self.map_dtype!r}")
        if self.scale is not None and not (np.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"--scale must be finite and > 0, got {self.scale}")
        if not self.maps and self.map_dtype != "float32":
            raise InputError("--dtype sets the stored maps' dtype; with --no-maps there are none")
        if self.heads is not None:
            if not self.heads:
                raise InputError("--heads is empty; give head numbers or 'all'")
            twice = sorted({h for h in self.heads if self.heads.count(h) > 1})
            if twice:
                raise InputError(f"--heads lists head {twice[0]} twice")
            self.heads = sorted(self.heads)
        # one spelling per meaning, so that --resume recognises the same run
        self.targets = [t for t in engine.api.TARGETS if t in self.targets]
        self.compression = st.canonical_compression(self.compression)

    @property
    def conditions(self):
        return condition_names(self.targets)


class QKVSource:
    """Raw Q/K/V from an HDF5 file: each layer's maps from its own Q and K."""

    kind = "qkv"
    tasks_per_input = False  # the kernels share out each batch's work themselves
    device = "cpu"  # where the batches compute (set by run()); not part of the result
    means = None  # over="dataset": the run's DatasetMeans (set by run())
    #: The tensors whose CRC-32 per input the store records, to recognise the input again.
    digests = ("q", "k", "v")

    def __init__(self, spec, options: Options):
        self.input = QKVInput(spec)
        inp = self.input
        self.paths = list(dict.fromkeys(inp.files))  # the file, and any it links to
        self.n_inputs, self.n_layers = inp.n_inputs, inp.n_layers
        self.n_heads, self.seq = inp.n_heads, inp.seq
        self.layer_ids = inp.layer_ids  # the file's layer scale, else 0, 1, ...
        self.lengths = inp.lengths
        self.causal = inp.causal_attr if options.causal is None else options.causal
        self.causal = bool(self.causal)
        _check_heads(options, self.n_heads)
        self.options = options
        self.ablate_layers = self.layer_ids  # every layer's own Q/K/V is substituted

    def describe(self):
        return {"source": "qkv", "input": self.input.spec, "input_identity": self.input.identity()}

    def notes(self):
        return iter(self.input.warnings)  # a missing lengths dataset, a pre-rotary capture

    def align(self) -> int:
        return self.input.chunk_inputs()

    def bytes_per_input(self) -> int:
        return self.n_layers * self.n_heads * self.seq * (self.seq + 3 * self.input.dim) * 4

    def inputs_record(self) -> dict:
        return {"lengths": self.lengths}

    def read(self, start, stop):
        """Inputs ``start:stop``, read and checked (on the reader thread), and the CRC-32
        of each input's q, k and v as read: ``((q, k), digests (n, 3))``."""
        q, k, v = self.input.read(start, stop)  # v is read to check its values
        return (q, k), np.stack([_crc_rows(x) for x in (q, k, v)], axis=1)

    def changed(self, start, stop, digests) -> str | None:
        """None if inputs ``start:stop`` still read as ``digests``, else what differs."""
        _, now = self.read(start, stop)
        return _first_change(now, digests, start, self.digests, self.input.where())

    def compute(self, inputs, start, stop):
        return qkv_conditions(
            inputs, self.lengths[start:stop], self.causal, self.options, self.device,
            f"{self.input.where()}: inputs {start}..{stop - 1}", self.means,
        )  # fmt: skip

    # -- over="dataset" (qkvmean.means)
    def position_sums(self, inputs, start, stop, targets) -> dict:
        """Float64 sums over inputs ``start:stop`` (``inputs`` as :meth:`read` gives them)
        of each target at each position: ``{target: (layer, heads, seq, dim)}``."""
        sums = {}
        for target in targets:
            x = None if inputs is None else inputs["qk".index(target)]
            heads = self.n_heads if x is None else x.shape[2]
            dim = self.means_dims()[target]
            total = np.zeros((self.n_layers * heads, self.seq, dim))
            if x is not None:
                flat = x.reshape(-1, self.seq, dim)
                lengths = self.lengths[start:stop]
                position_sums(flat, lengths, self.n_layers * heads, total)
            sums[target] = total.reshape(self.n_layers, heads, self.seq, dim)
        return sums

    def means_from_sums(self, totals, attrs):
        """The :class:`~qkvmean.engine.plan.DatasetMeans` of :meth:`position_sums` added
        over every input, in the compute dtype, one per query head."""
        from .engine.plan import DatasetMeans, means_from_sums, position_counts

        counts = position_counts(self.lengths, self.seq)
        wide = np.dtype(np.float64) in (self.input.q.dtype, self.input.k.dtype)
        dtype = np.float64 if wide else np.float32  # the engine's compute dtype
        values = {}
        for target, total in totals.items():
            m = means_from_sums(total, counts, dtype)
            values[target] = np.repeat(m, self.n_heads // m.shape[1], axis=1)
        return DatasetMeans(tuple(self.layer_ids), values, counts, attrs)

    def means_dims(self) -> dict:
        return {"q": self.input.dim, "k": self.input.dim, "v": self.input.dim_v}

    def recipe(self) -> dict:
        """What a cluster's worker needs to compute this source's batches."""
        return {
            "kind": "qkv",
            "spec": f"{Path(self.input.path).resolve()}:{self.input.group_name}",
            "options": self.options,
            "device": self.device,
            "describe": _identity(self.describe()),
            "lengths": self.lengths,
            "causal": self.causal,
            "means": self.means,
        }

    def close(self):
        self.input.close()


def qkv_conditions(inputs, lengths, causal, options, device, where, means=None):
    """The conditions of one batch of raw ``(q, k)``, timed: ``(Conditions, seconds)``;
    ``means``: the run's :class:`~qkvmean.engine.plan.DatasetMeans` (``over="dataset"``)."""
    q, k = inputs
    t0 = time.perf_counter()
    try:
        c = engine.conditions(
            q, k, None, targets=options.targets, over=options.over, heads=options.heads,
            lengths=lengths, causal=causal, scale=options.scale, device=device,
            maps=options.maps, means=None if means is None else means.values,
        )  # fmt: skip
    except ValueError as exc:  # e.g. values so large that the logits overflow
        raise InputError(f"{where}: {exc}") from None
    return c, time.perf_counter() - t0


def _identity(described: dict) -> dict:
    """What must be the same wherever a source is built (not where it is)."""
    return {k: v for k, v in described.items() if k not in ("input", "model", "texts")}


def source_from_recipe(recipe):
    """The source of a :meth:`QKVSource.recipe` or :meth:`ModelSource.recipe`, built on a
    cluster's worker, and checked to be the same input as the driver's."""
    if recipe["kind"] == "qkv":
        source = QKVSource(recipe["spec"], recipe["options"])
    else:
        source = ModelSource(
            recipe["model"], recipe["texts"], recipe["options"],
            ablate_layers=recipe["ablate_layers"], max_tokens=recipe["max_tokens"],
            texts_label=recipe["texts_label"],
        )  # fmt: skip
    source.device = recipe["device"]
    source.means = recipe["means"]
    here = json.loads(json.dumps(_identity(source.describe())))
    if here != json.loads(json.dumps(recipe["describe"])):
        where = recipe.get("spec") or recipe["model"]
        raise InputError(
            f"a worker reads a different input than the driver at {where}: "
            f"{_differences(recipe['describe'], here) or 'other contents'}"
        )
    return source


def batch_maps(c, layout, options) -> dict:
    """A batch's maps per condition in the stored dtype, each distinct array converted
    once (mean-V of raw Q/K/V is the baseline's array, and is encoded once too)."""
    converted, maps = {}, {}
    for n in layout.conditions:
        w = c.weights[n]
        if id(w) not in converted:
            converted[id(w)] = w.astype(options.map_dtype, copy=False)
        maps[n] = converted[id(w)]
    return maps


class ModelSource:
    """Texts through a transformer: every layer's maps, substitution at chosen layers."""

    kind = "model"
    tasks_per_input = True  # one task per input on the compute threads
    device = "cpu"
    means = None
    digests = ()  # the texts and weight files are identified whole, in the configuration

    def __init__(
        self,
        model_spec,
        texts,
        options: Options,
        *,
        ablate_layers=(0,),
        max_tokens=None,
        texts_label="built-in sentences",
    ):
        from .io.models import load_model

        if options.causal is not None:
            raise InputError(
                "--causal/--no-causal apply to --qkv inputs; a model uses its own mask "
                "(causal for decoders such as GPT-2 and Llama, none for BERT)"
            )
        if options.scale is not None:
            raise InputError("--scale applies to --qkv inputs; a model uses 1/sqrt(head dim)")
        self.model_spec = model_spec
        self.model = load_model(model_spec)
        w = self.model.weights
        self.n_layers, self.n_heads = w.n_layers, w.n_heads
        self.layer_ids = list(range(self.n_layers))
        self.ablate_layers = _check_layers(ablate_layers, self.n_layers)
        _check_heads(options, self.n_heads)
        self.causal = w.causal
        self.options = options
        self.texts = [_text(t, i) for i, t in enumerate(texts)]
        self.texts_label = texts_label
        self.paths = [texts_label] if Path(texts_label).exists() else []
        self.paths += self.model.files
        if max_tokens is not None and max_tokens > w.max_positions:
            raise InputError(
                f"--max-tokens {max_tokens} exceeds the model's {w.max_positions} positions"
            )
        self.max_tokens = max_tokens or w.max_positions
        self._tokenize()

    def _tokenize(self):
        tok = self.model.tokenizer
        tok.enable_truncation(max_length=self.max_tokens)
        try:
            encodings = tok.encode_batch(self.texts)
        finally:
            tok.no_truncation()
        self.ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        self.tokens = [list(e.tokens) for e in encodings]
        self.truncated = sum(bool(e.overflowing) for e in encodings)
        specials = tok.num_special_tokens_to_add(is_pair=False)
        if self.max_tokens <= specials:  # the tokenizer would keep its specials regardless
            raise InputError(
                f"--max-tokens {self.max_tokens} leaves no room next to the {specials} special "
                f"tokens this tokenizer adds to every input; use at least {specials + 1}"
            )
        self.empty = [i for i, ids in enumerate(self.ids) if ids.size == 0]
        vocab = self.model.weights.vocab_size
        for number, ids in enumerate(self.ids):
            if ids.size and ids.max() >= vocab:
                raise InputError(
                    f"text {number}: the tokenizer gives token id {int(ids.max())}, but the "
                    f"model has only {vocab} embeddings; tokenizer.json and the weights do "
                    "not match"
                )
        self.lengths = np.array([len(i) for i in self.ids], dtype=np.int64)
        self.n_inputs = len(self.ids)
        self.seq = max(1, int(self.lengths.max(initial=0)))

    def notes(self):
        if self.causal and self.options.over == "tokens":
            yield (
                f"warning: the mean over tokens on a causal model ({self.model.family}) leaks "
                "later tokens into earlier positions; --over causal is its natural mean"
            )
        if self.empty:
            yield (
                f"warning: {len(self.empty)} inputs have no tokens at all (the first is "
                f"text {self.empty[0]}); their maps are empty"
            )
        if self.truncated:
            yield (
                f"warning: {self.truncated} of {self.n_inputs} inputs were longer than "
                f"{self.max_tokens} tokens and were cut to {self.max_tokens} (--max-tokens)"
            )

    def describe(self):
        digest = hashlib.sha256("\n".join(self.texts).encode()).hexdigest()
        return {
            "source": "model",
            "model": self.model.name,
            "model_family": self.model.family,
            "model_architecture": self.model.weights.arch.describe(),
            "model_identity": self.model.identity,
            "texts": self.texts_label,
            "texts_sha256": digest,
            "max_tokens": self.max_tokens,
        }

    def align(self) -> int:
        return 1

    def bytes_per_input(self) -> int:
        # the maps of every layer, per condition (the baseline's, which the KL reads, is
        # one of them); an input's working buffers are small beside them
        return self.n_layers * self.n_heads * self.seq * self.seq * 4

    def inputs_record(self) -> dict:
        tokens = [t + [""] * (self.seq - len(t)) for t in self.tokens]
        return {"lengths": self.lengths, "text": self.texts, "tokens": tokens}

    def read(self, start, stop):
        """Token ids of inputs ``start:stop``, padded to the longest of them (no digests:
        the texts are identified whole)."""
        lengths = self.lengths[start:stop]
        ids = np.zeros((stop - start, max(1, int(lengths.max(initial=0)))), dtype=np.int64)
        for row, i in enumerate(range(start, stop)):
            ids[row, : lengths[row]] = self.ids[i]
        return ids, None

    def changed(self, start, stop, digests):
        return None

    def recipe(self) -> dict:
        """What a cluster's worker needs to compute this source's batches."""
        spec = self.model_spec
        if spec not in ("minilm", "synthetic"):
            spec = str(Path(spec).resolve())
        return {
            "kind": "model",
            "model": spec,
            "texts": self.texts,
            "options": self.options,
            "ablate_layers": self.ablate_layers,
            "max_tokens": self.max_tokens,
            "texts_label": self.texts_label,
            "device": self.device,
            "describe": _identity(self.describe()),
            "means": self.means,
        }

    def compute(self, ids, start, stop):
        from .engine.transformer import model_conditions

        lengths = self.lengths[start:stop]
        o = self.options
        t0 = time.perf_counter()
        try:
            c = model_conditions(
                self.model.weights,
                ids,
                lengths,
                targets=o.targets,
                over=o.over,
                heads=o.heads,
                ablate_layers=self.ablate_layers,
                seq=self.seq,
                device=self.device,
                maps=o.maps,
                means=self.means,
            )
        except ValueError as exc:
            raise InputError(f"{self.model.name}: inputs {start}..{stop - 1}: {exc}") from None
        return c, time.perf_counter() - t0

    # -- over="dataset" (qkvmean.means)
    def position_sums(self, ids, start, stop, targets) -> dict:
        """Float64 sums over inputs ``start:stop`` of each target's baseline projection at
        each ablated layer and position: ``{target: (layers, heads, seq, head_dim)}``
        (keys and values per KV head)."""
        from .engine.transformer import model_projections, projection_sums

        w = self.model.weights
        if ids is None:
            heads = {"q": w.n_heads, "k": w.n_kv_heads, "v": w.n_kv_heads}
            shape = (len(self.ablate_layers), self.seq, w.head_dim)
            return {t: np.zeros((shape[0], heads[t], *shape[1:])) for t in targets}
        lengths = self.lengths[start:stop]
        try:
            projected = model_projections(
                w, ids, lengths, layers=self.ablate_layers, seq=self.seq, device=self.device
            )
        except ValueError as exc:
            raise InputError(f"{self.model.name}: inputs {start}..{stop - 1}: {exc}") from None
        return projection_sums({t: projected[t] for t in targets}, lengths)

    def means_from_sums(self, totals, attrs):
        """The :class:`~qkvmean.engine.plan.DatasetMeans` of :meth:`position_sums` added
        over every input (float32, one per query head)."""
        from dataclasses import replace

        from .engine.plan import position_counts
        from .engine.transformer import means_of

        counts = position_counts(self.lengths, self.seq)
        means = means_of(self.model.weights, totals, counts, self.ablate_layers)
        return replace(means, attrs={**attrs, "taken_at": "projection"})

    def means_dims(self) -> dict:
        return dict.fromkeys("qkv", self.model.weights.head_dim)

    def close(self):
        pass


def _text(text, index):
    from .io.texts import check_text

    if not isinstance(text, str):
        raise InputError(f"text {index}: expected a string, got {type(text).__name__}")
    return check_text(text, f"text {index}")


def _crc_rows(x: np.ndarray) -> np.ndarray:
    """CRC-32 of each input (row of the first axis) of a C-contiguous array."""
    return np.array([st.crc32(x[i]) for i in range(x.shape[0])], dtype=np.uint32)


def _first_change(now, then, start, names, where) -> str | None:
    """None when the digests ``now`` and ``then`` agree, else which input differs."""
    now, then = np.asarray(now), np.asarray(then)
    if now.shape == then.shape and np.array_equal(now, then):
        return None
    row, col = (int(i[0]) for i in np.nonzero(now != then)) if now.shape == then.shape else (0, 0)
    return f"{names[col]} of input {start + row} in {where} differs from what was read before"


def _check_layers(layers, n_layers):
    if layers == "all":
        return list(range(n_layers))
    layers = sorted(set(layers))
    if not layers:
        raise InputError("--ablate-layers is empty; give layer numbers or 'all'")
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise InputError(
                f"--ablate-layers: layer {layer} is out of range for {n_layers} layers "
                f"(0..{n_layers - 1})"
            )
    return layers


def _check_heads(options, n_heads):
    """Check ``options.heads`` against the model; all heads listed is the same as None."""
    for h in options.heads or ():
        if not 0 <= h < n_heads:
            raise InputError(
                f"--heads: head {h} is out of range for {n_heads} heads (0..{n_heads - 1})"
            )
    if options.heads == list(range(n_heads)):
        options.heads = None


class RunFailed(Exception):
    """The run could not finish (disk full, I/O error); what is done can be resumed."""


def _reason(exc: BaseException) -> str:
    """The root cause of an I/O failure, in one line."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@dataclass
class Summary:
    path: Path
    n_inputs: int
    computed: int  # inputs computed by this invocation (the rest came from the journal)
    seconds: float
    kernel_seconds: float
    map_bytes: int  # uncompressed bytes of the maps computed by this invocation
    file_bytes: int
    already_complete: bool = False
    maps: bool = True

    def line(self):
        if self.already_complete:
            return f"{self.path}: already complete ({self.n_inputs} inputs); nothing to do"
        seconds = max(self.seconds, 1e-9)
        earlier = self.n_inputs - self.computed
        inputs = f"{self.n_inputs} inputs" + (
            f", {earlier} of them from the interrupted run" if earlier else ""
        )
        rate = f"{self.computed / seconds:.1f} inputs/s"
        if self.maps:
            rate += f", {self.map_bytes / 1e6 / seconds:.1f} MB/s of maps"
        return (
            f"wrote {self.path} ({inputs}, {self.file_bytes / 1e6:.1f} MB) in "
            f"{self.seconds:.1f} s: {rate}"
        )


def _check_output(out: Path, inputs=(), overwrite=False):
    """Refuse, before any work, an output that is an input, that cannot be written, or
    that is a link leading nowhere (the run would compute everything, then find it)."""
    if not out.name:
        raise InputError(
            f"--out {str(out)!r} names no file (it is empty, or a directory); give a file "
            "name for the store"
        )
    refuse_inputs(out, inputs)
    refuse_special(out)
    work = st.partial_dir(out).resolve()
    for path in inputs:
        if work in Path(path).resolve().parents:
            raise InputError(
                f"{path}: lies in {st.partial_dir(out)}/, where the run writing {out} keeps "
                "its work (and deletes it when done); move the input, or choose another --out"
            )
    check_output_dir(out)
    if out.is_dir():
        raise InputError(f"{out}: is a directory; give a file name for the store")
    longest = _name_max(out.parent) - len(".partial.4194304.done")
    if len(os.fsencode(out.name)) > longest:
        raise InputError(
            f"--out: the file name is too long ({len(os.fsencode(out.name))} bytes; with the "
            f"names of its work files beside it, this file system allows {longest})"
        )
    if out.is_symlink() and not out.exists() and not overwrite:
        raise InputError(
            f"{out}: is a symbolic link that leads nowhere ({os.readlink(out)}); remove it, "
            "or pass --overwrite to replace the link with the store"
        )


partial_dir = st.partial_dir


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory if str(directory) else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


#: Not compared for --resume: where the inputs are (they may have moved; their identities
#: are compared instead), the machine that computed them (a resumed run may be on
#: another), and what the model's identity (its files' checksums) already fixes.
_LOCATIONS = (
    "input", "model", "texts", "environment", "model_architecture", "cluster", "mean_from",
)  # fmt: skip
#: Recorded, but compared for --resume only where the command gives them again.
_IMPLIED = ("batch_size",)


def _differences(recorded, config) -> str:
    """'' when ``recorded`` is the same computation as ``config``, else what differs."""
    if not isinstance(recorded, dict):
        return "no readable configuration"
    current = json.loads(json.dumps(config))  # tuples → lists, as stored
    keys = sorted((recorded.keys() | current.keys()) - set(_LOCATIONS))
    keys = [k for k in keys if k not in _IMPLIED or current.get(k) is not None]
    changed = [k for k in keys if recorded.get(k) != current.get(k)]
    if not changed:
        return ""
    parts = []
    for key in changed:
        was, now = recorded.get(key), current.get(key)
        if key == "input_identity" and isinstance(was, dict) and isinstance(now, dict):
            named = [  # the input's shapes or dtypes, where those changed
                f"input {part} {was.get(part)} (now {now.get(part)})"
                for part in ("shapes", "dtypes")
                if was.get(part) != now.get(part)
            ]
            parts.extend(named or ["other input contents"])
        elif key.endswith(("identity", "sha256")):
            parts.append(f"other {key.split('_')[0]} contents")
        else:
            parts.append(f"{key} = {recorded.get(key)!r} (now {current.get(key)!r})")
    return "a different configuration: " + "; ".join(parts)


def _lock(work: Path) -> int:
    """Hold an exclusive lock on ``work`` for this process (released when it exits)."""
    fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InputError(
            f"{work}: another qkvmean run is writing this store right now; wait for it"
        ) from None
    return fd


def _atomic_json(path: Path, data):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    st.fsync_path(tmp)
    os.replace(tmp, path)


def _aligned(size, align):
    """``size`` rounded down to a multiple of ``align`` (when it is at least that)."""
    return size - size % align if size >= align > 1 else size


def _batches(n, size, align=1):
    size = _aligned(size, align)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def auto_batch_size(source, n_conditions) -> int:
    """Inputs per batch: about ``BATCH_BYTES`` of results, and for a source that computes
    one input per task (a model) at least ``TASKS_PER_THREAD`` tasks per compute thread
    where three such batches take at most a quarter of the memory."""
    per_input = max(1, source.bytes_per_input() * n_conditions)
    size = BATCH_BYTES // per_input
    if source.tasks_per_input:
        fits = int(memory_limit() / 4 / 3 // per_input)
        size = max(size, min(TASKS_PER_THREAD * compute_threads(), fits))
    return int(max(1, min(source.n_inputs, size)))


def _progress(total, initial, show, desc="starting (the first run compiles kernels)"):
    if not show:
        return None
    from tqdm import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    # a terminal that reports no size (a bare pty) would get no bar at all from tqdm
    sized = size.columns > 0 and size.lines > 0
    return tqdm(
        desc=desc,
        total=total,
        initial=initial,
        unit="input",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=sized,
        ncols=None if sized else 80,
        nrows=None if sized else 24,
    )


def _run_config(source, options: Options, batch_size) -> dict:
    """The run's identity: what must match for --resume (besides the input's location).

    ``batch_size`` is the one given (None: the automatic one, recorded when the run
    starts): with a model, the batch size changes the last bits of the results.
    """
    return {
        **source.describe(),
        **asdict(options),
        "causal": source.causal,
        "conditions": options.conditions,
        "ablate_layers": source.ablate_layers,
        "row_block": engine.api.config.ROW_BLOCK,
        "batch_size": batch_size,
    }


def _layout(source, options: Options) -> st.Layout:
    return st.Layout(
        n_inputs=source.n_inputs,
        n_layers=source.n_layers,
        n_heads=source.n_heads,
        seq=source.seq,
        conditions=options.conditions,
        map_dtype=options.map_dtype,
        compression=options.compression,
        maps=options.maps,
        layer_ids=source.layer_ids,
        digests=source.digests,
    )


def _check_sizes(source, layout: st.Layout, out: Path, batch_size):
    """Refuse, before anything is created, a run that cannot fit: a map HDF5 cannot
    store, a batch larger than memory, or a store whose fixed part exceeds the disk."""
    layout.check()
    per_input = source.bytes_per_input() * len(layout.conditions)
    # one batch computing, one being written, one being read: about three in memory
    batch = min(batch_size or 1, source.n_inputs)
    try:
        check_memory(
            3 * batch * per_input,
            f"one batch ({batch} input{'s' if batch > 1 else ''} of {source.seq} tokens, "
            f"{source.n_layers} layers x {source.n_heads} heads, {len(layout.conditions)} "
            "conditions)",
            "pass a smaller --batch-size" if batch > 1 else "cut the sequences",
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    free, need = disk_free(out.parent if str(out.parent) else "."), layout.fixed_bytes()
    if need > free:
        raise InputError(
            f"{out}: the store needs at least {format_bytes(need)} for its metrics alone, "
            f"and {out.parent} has {format_bytes(free)} free"
        )


def _new_work(work: Path, config, source, batch_size, overwrite):
    """Create the partial directory atomically (built aside, then renamed into place)."""
    size = batch_size or auto_batch_size(source, len(config["conditions"]))
    align = 1 if batch_size else source.align()  # an explicit --batch-size is honoured
    size = _aligned(size, align)
    batches = _batches(source.n_inputs, size)
    config = {**config, "batch_size": size, "environment": environment()}
    manifest = {
        "config": config,
        "batches": batches,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "qkvmean_version": __version__,
        "replaces": bool(overwrite),  # started with --overwrite: it replaces STORE.h5
    }
    staging = work.with_name(f"{work.name}.{os.getpid()}.new")
    lock = None
    try:
        staging.mkdir()
        lock = _lock(staging)
        _atomic_json(staging / "manifest.json", manifest)
        os.rename(staging, work)
    except OSError as exc:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(staging, ignore_errors=True)
        if work.exists():  # another run created it first
            raise InputError(
                f"{work}: another qkvmean run is writing this store right now"
            ) from None
        raise RunFailed(f"{work}: cannot start the run: {_reason(exc)}") from None
    manifest["batches"] = [tuple(b) for b in manifest["batches"]]
    return manifest, lock


def _finished_by(out: Path, manifest: dict) -> bool:
    """Is ``out`` the store the interrupted run of ``manifest`` finished (killed after the
    final rename, before its partial directory was removed)?"""
    try:
        with st.open_store(out) as existing:
            return existing.attrs.get("created_utc") == manifest.get(
                "created_utc"
            ) and not _differences(existing.config, manifest["config"])
    except (InputError, OSError):
        return False


#: What a run puts in its partial directory; a directory that holds anything else is
#: not ours, and is neither used nor deleted.
_OURS = re.compile(
    r"manifest\.json|manifest\.tmp|lock|store-\d+-\d+\.h5|batch-\d+-\d+\.npz(\.tmp)?"
    r"|means\.npz(\.tmp)?"
)


def _foreign(directory: Path) -> str | None:
    """None when ``directory`` is a partial directory of ours, else what says it is not.

    Ours holds a ``lock`` (every run creates it first and a deletion removes it last) and
    nothing but the names a run writes; an empty directory (a kill before the lock was
    made) is ours too.
    """
    if directory.is_symlink() or not directory.is_dir():
        return "it is not a directory" if not directory.is_symlink() else "it is a link"
    entries = list(directory.iterdir())
    for path in entries:
        if not _OURS.fullmatch(path.name) or (path.is_dir() and not path.is_symlink()):
            return f"it holds {path.name}, which no qkvmean run writes"
    if entries and not any(path.name == "lock" for path in entries):
        return "it has no lock file, which every qkvmean run makes first"
    return None


def _discard(work: Path):
    """Remove a partial directory: renamed aside first (atomically), so that a kill while
    it is being deleted never leaves a half-deleted one under the name a resume reads;
    its lock goes last, so that what a kill leaves is still recognisably ours."""
    trash = work.with_name(f"{work.name}.{os.getpid()}.done")
    try:
        os.rename(work, trash)
    except OSError:
        trash = work
    try:
        for path in sorted(trash.iterdir(), key=lambda p: p.name == "lock"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        trash.rmdir()
    except OSError:
        shutil.rmtree(trash, ignore_errors=True)


def _sweep(work: Path, inputs=()):
    """Remove what a kill left beside ``work``: a partial directory being created
    (``.<pid>.new``) or being deleted (``.<pid>.done``), if it is ours, not in use, and
    holds none of ``inputs``."""
    pattern = re.compile(re.escape(work.name) + r"\.\d+\.(new|done)")
    held = [Path(p).resolve() for p in inputs]
    for aside in work.parent.glob(f"{glob.escape(work.name)}.*"):
        if not pattern.fullmatch(aside.name) or _foreign(aside):
            continue
        if any(aside.resolve() in p.parents for p in held):
            continue
        try:
            os.close(_lock(aside))
        except (InputError, OSError):
            continue
        shutil.rmtree(aside, ignore_errors=True)


def _drop_broken(work: Path):
    """Remove a partial directory of ours whose manifest is gone or unreadable, beside a
    store that exists: what is left of a run that finished (a kill while an older qkvmean
    deleted it, or damage) — with no manifest, none of its batches could be used."""
    if _foreign(work):
        return
    lock = _lock(work)
    try:
        try:
            st.read_manifest(work)
        except InputError:
            _discard(work)
    finally:
        os.close(lock)


def _open_work(work: Path, out: Path, config, source, batch_size, resume, overwrite):
    """Lock (and create or reopen) the partial directory: ``(manifest, created, lock)``,
    or ``(None, False, None)`` when ``out`` is the finished store of the run that left
    the partial directory (which is then removed).

    The lock is taken before anything in the directory is judged or removed, so a run
    that is still going is never mistaken for an interrupted one, nor deleted; and a
    directory that is not a partial directory of ours is neither used nor deleted.
    """
    if lexists(work):
        foreign = _foreign(work)
        if foreign:
            raise InputError(
                f"{work}: is where this run would keep its work, but {foreign}; move it "
                "away, or choose another --out"
            )
        lock = _lock(work)
        try:
            if not resume:
                if not overwrite:
                    raise InputError(
                        f"{work}: an interrupted run left this; add --resume to continue it "
                        "or --overwrite to start over"
                    )
                _discard(work)
            else:
                manifest = st.read_manifest(work)
                if lexists(out) and _finished_by(out, manifest):
                    _discard(work)
                    return None, False, None
                differences = _differences(manifest["config"], config)
                covered = manifest["batches"][-1][1] if manifest["batches"] else 0
                if not differences and covered != source.n_inputs:
                    differences = f"batches of {covered} inputs (the input has {source.n_inputs})"
                if differences:
                    raise InputError(
                        f"{work}: was started with {differences}; rerun with the same "
                        "options and input, or pass --overwrite (without --resume) to start over"
                    )
                if lexists(out) and not overwrite:
                    started = "with --overwrite, " if manifest.get("replaces") else ""
                    raise InputError(
                        f"{out}: exists, and the interrupted run in {work.name}/ (started "
                        f"{started}to write {out.name}) would replace it; continue it with "
                        "--resume --overwrite"
                    )
                _remove_stale(work)
                return manifest, False, lock
        except BaseException:
            os.close(lock)
            raise
        os.close(lock)
    manifest, lock = _new_work(work, config, source, batch_size, overwrite)
    return manifest, True, lock


def _remove_stale(work: Path):
    """Half-renamed journal entries and manifests a kill left (the caller holds the lock;
    store files inside ``work`` are not stale: resume copies from them)."""
    for path in work.glob("*.tmp"):
        path.unlink(missing_ok=True)


def _verify_complete(source, out: Path, batches):
    """An existing store made from this input: every input must still read as it did
    (the store's CRC-32 of each input), else say which changed."""
    if not source.digests:
        return
    with st.open_store(out) as existing:
        recorded = existing.input_digests()
    if recorded is None:  # made before the store recorded them
        return
    for start, stop in batches:
        change = source.changed(start, stop, recorded[start:stop])
        if change:
            raise InputError(
                f"{out}: exists, but the input changed since it was made ({change}); pass "
                "--overwrite to compute it again"
            )


def _compute_batches(source, options, layout, todo, bar, assembly):
    """Compute the batches ``todo``: three stages that overlap.

    A reader thread fetches (and checks) batch ``i + 1`` while batch ``i`` computes; a
    writer thread compresses batch ``i - 1`` on the process's pool of compute threads
    (:func:`qkvmean.config.task_pool`: ISA-L and zlib release the GIL; the model path's
    tasks queue on the same pool, so the cores are never oversubscribed) and writes it
    into the store's ``assembly``. At most three batches are in
    memory. Returns ``(inputs computed, kernel seconds, bytes of maps)``.
    """
    kernel_seconds = 0.0
    map_bytes = computed = 0
    compress = task_pool()  # the model path's pool: never more busy threads than cores
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkvmean-reader") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkvmean-writer") as writer,
    ):
        pending = None
        fetched = reader.submit(source.read, *todo[0]) if todo else None
        for index, (start, stop) in enumerate(todo):
            inputs, digests = fetched.result()
            if index + 1 < len(todo):
                fetched = reader.submit(source.read, *todo[index + 1])
            c, seconds = source.compute(inputs, start, stop)
            kernel_seconds += seconds
            maps = batch_maps(c, layout, options) if options.maps else None
            metrics = {name: c.metrics[name] for name in METRICS}
            map_bytes += sum(w.nbytes for w in c.weights.values())
            if pending is not None:
                pending.result()  # at most one batch waits to be written
            pending = writer.submit(assembly.add, start, stop, maps, metrics, compress, digests)
            computed += stop - start
            if bar is not None:
                bar.set_description_str("", refresh=False)
                bar.update(stop - start)
        if pending is not None:
            pending.result()
    return computed, kernel_seconds, map_bytes


def _cluster_recipe(source, layout) -> dict:
    """What the workers need (:meth:`QKVSource.recipe`, :meth:`ModelSource.recipe`), with
    the layout and a key that names the run (a worker builds its source once per key)."""
    config = json.dumps(_run_config(source, source.options, None), sort_keys=True, default=str)
    key = hashlib.sha256(config.encode()).hexdigest()[:16]
    return dict(source.recipe(), layout=layout, key=key)


def _compute_on_cluster(cluster, source, layout, todo, bar, assembly):
    """:func:`_compute_batches` on a Dask cluster (:mod:`qkvmean.distributed`)."""
    from . import distributed

    def progress(n):
        if bar is not None:
            bar.update(n)

    recipe = _cluster_recipe(source, layout)
    try:
        computed, seconds = distributed.compute_batches(
            cluster, source, recipe, todo, assembly, progress
        )
    except distributed.ClusterError as exc:
        raise RunFailed(
            f"{exc}; the finished batches are kept in {assembly.work.name}/: rerun with "
            "--resume (on a cluster or here)"
        ) from None
    per_input = layout.n_layers * layout.n_heads * layout.seq**2 * np.dtype("float32").itemsize
    maps = computed * per_input * len(layout.conditions) if layout.maps else 0
    return computed, seconds, maps


def _root_attrs(source, options, config, created_utc) -> dict:
    heads = options.heads if options.heads is not None else range(source.n_heads)
    return {
        "format": st.FORMAT,
        "format_version": np.int32(st.FORMAT_VERSION),
        "qkvmean_version": __version__,
        "created_utc": created_utc,
        "source": source.kind,
        "causal": bool(source.causal),
        "over": options.over,
        "ablate_layers": np.asarray(source.ablate_layers, dtype=np.int32),
        "ablate_heads": np.asarray(heads, dtype=np.int32),
        "config": json.dumps(config, sort_keys=True),
    }


def run(
    source,
    out,
    options: Options,
    *,
    batch_size=None,
    resume=False,
    overwrite=False,
    show_progress=None,
    notes=None,
    device="cpu",
    cluster=None,
) -> Summary:
    """Compute every input of ``source`` and write the store ``out``.

    ``cluster``: a :class:`qkvmean.distributed.Cluster` to compute the batches on (the
    store is written here, the same as a local run's; how it was made is recorded in the
    configuration's ``cluster``). ``device``: ``"cpu"`` or ``"cuda"`` (see
    :func:`qkvmean.engine.api.choose_device`);
    the store is the same either way (maps within float32 rounding), so it is not part of
    the run's configuration and a run may be resumed on the other device.

    ``show_progress``: None shows a progress bar only when stderr is a terminal.
    ``notes``: called with each line the run has to say on the way (the source's warnings,
    batches of an interrupted run whose inputs changed since, and are computed again).
    """
    out = Path(out)
    try:
        engine.api.backend(device)
    except ValueError as exc:  # unknown, or CUDA that cannot run here
        raise InputError(str(exc)) from None
    source.device = device
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    notes = notes or (lambda line: None)
    _check_output(out, source.paths, overwrite)
    config = _run_config(source, options, batch_size)
    config["cluster"] = cluster.describe() if cluster is not None else "local"
    own_means = options.over == OVER[2] and options.mean_from is None
    source.means = None
    if options.mean_from is not None:  # a reference run's: checked, and part of the run
        source.means, config["means_sha256"] = means_mod.from_reference(
            options.mean_from, source, options
        )
    layout = _layout(source, options)
    _check_sizes(source, layout, out, batch_size)
    for line in source.notes():  # once the run is known to go ahead
        notes(line)
    work = partial_dir(out)
    _sweep(work, source.paths)
    if resume and lexists(out) and lexists(work):
        _drop_broken(work)
    if lexists(out) and not overwrite and not lexists(work):
        if not resume:
            raise InputError(f"{out}: exists; pass --overwrite to replace it")
        with st.open_store(out) as existing:
            differences = _differences(existing.config, config)
        if differences:
            raise InputError(
                f"{out}: exists, made with {differences}; pass --overwrite to replace it"
            )
        size = auto_batch_size(source, len(options.conditions))
        _verify_complete(source, out, _batches(source.n_inputs, size, source.align()))
        return _already_complete(out, source)

    manifest, created, lock = _open_work(work, out, config, source, batch_size, resume, overwrite)
    if manifest is None:
        return _already_complete(out, source)
    try:
        config = manifest["config"]  # with the batch size the run started with
        batches = set(manifest["batches"])
        entries = st.journal(work)
        for key in entries.keys() - batches:  # not this manifest's: cannot be used
            entries.pop(key).unlink()
        t_start = time.perf_counter()
        bar = assembly = None
        try:
            if own_means:  # the first pass: the means of this run's inputs
                source.means = _first_pass(
                    source, options, manifest, work, show_progress, cluster, layout
                )
            attrs = _root_attrs(source, options, config, manifest["created_utc"])
            assembly = st.Assembly(work, layout, attrs, source.inputs_record(), source.means)
            done = assembly.salvage(entries, source.changed if source.digests else None)
            for start, stop, change in assembly.changed:
                notes(
                    f"warning: inputs {start}..{stop - 1} changed since the interrupted run "
                    f"read them ({change}); computing them again"
                )
            todo = [b for b in manifest["batches"] if b not in done]
            bar = _progress(source.n_inputs, sum(b - a for a, b in done), show_progress)
            if cluster is None:
                computed, kernel_seconds, map_bytes = _compute_batches(
                    source, options, layout, todo, bar, assembly
                )
            else:
                computed, kernel_seconds, map_bytes = _compute_on_cluster(
                    cluster, source, layout, todo, bar, assembly
                )
            try:
                assembly.finish(out, overwrite)
            except FileExistsError:
                raise RunFailed(
                    f"{out} appeared while this run was writing (another run?) and was left "
                    f"as it is; this run's store is {assembly.path}"
                ) from None
            assembly = None
        except InputError:
            if created:  # the input is bad: there is nothing worth resuming
                _discard(work)
            raise
        except ReadFailed as exc:
            raise RunFailed(
                f"{exc}; the finished batches are kept in {work.name}/: fix the cause and "
                "rerun with --resume"
            ) from exc
        except (OSError, RuntimeError) as exc:  # h5py reports a failed flush as RuntimeError
            raise RunFailed(
                f"writing {out} failed: {_reason(exc)}; the finished batches are kept in "
                f"{work.name}/: fix the cause and rerun with --resume"
            ) from exc
        finally:
            if bar is not None:
                bar.close()
            if assembly is not None:
                assembly.abort()
        _discard(work)
    finally:
        os.close(lock)
    return Summary(
        out,
        source.n_inputs,
        computed,
        time.perf_counter() - t_start,
        kernel_seconds,
        map_bytes,
        out.stat().st_size,
        maps=options.maps,
    )


def _first_pass(source, options, manifest, work, show_progress, cluster=None, layout=None):
    """:func:`qkvmean.means.first_pass`, with its own progress bar; on a cluster where its
    workers can do it (a model, or raw Q/K/V in a file they see), else here."""
    bar = _progress(source.n_inputs, 0, show_progress, "dataset means (pass 1 of 2)")
    sums, lost = None, ()
    if cluster is not None:
        from . import distributed

        lost = distributed.ClusterError
        paths = [Path(p) for p in source.paths if Path(p).is_file()]
        if source.kind == "model" or cluster.see(paths):
            recipe = _cluster_recipe(source, layout)
            batches = [tuple(b) for b in manifest["batches"]]

            def sums(indices, targets):
                return distributed.sum_batches(cluster, source, recipe, batches, indices, targets)

    try:
        return means_mod.first_pass(
            source, options, manifest, work, None if bar is None else bar.update, sums
        )
    except lost as exc:
        raise RunFailed(
            f"{exc}; the means added up so far are kept in {work.name}/: rerun with "
            "--resume (on a cluster or here)"
        ) from None
    finally:
        if bar is not None:
            bar.close()


def _already_complete(out: Path, source) -> Summary:
    return Summary(out, source.n_inputs, 0, 0.0, 0.0, 0, out.stat().st_size, True)


def inspect_partial(out: Path) -> dict:
    """Summary of an interrupted run (``STORE.h5.partial/``) for ``qkvmean inspect``."""
    work = partial_dir(out)
    manifest = st.read_manifest(work)
    done, total = st.progress(work, manifest)
    cfg = manifest["config"]
    return {
        "store": str(out),
        "complete": False,
        "running": st.run_is_live(work),
        "partial": str(work),
        "created_utc": manifest.get("created_utc"),
        "source": cfg.get("source"),
        "input": cfg.get("input") or cfg.get("model"),
        "inputs_done": done,
        "inputs_total": total,
        "conditions": cfg.get("conditions"),
        "bytes_on_disk": sum(p.stat().st_size for p in work.iterdir() if p.is_file()),
        "config": cfg,
    }
