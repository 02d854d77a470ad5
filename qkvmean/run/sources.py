"""Where a run's inputs come from and how one batch of them is computed: the
:class:`Source` protocol, raw Q/K/V (:class:`QKVSource`), texts through a model
(:class:`ModelSource`), the batch computation the local run and a cluster's workers
share, and a source rebuilt from its recipe on a worker."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import engine
from ..engine import condition
from ..engine.effects import effects_of
from ..engine.kernels.means import position_sums
from ..engine.names import METRICS
from ..engine.substitution import resample_partners
from ..files import InputError
from ..io.qkv import QKVInput
from ..store.codec import crc32
from .options import Options, differences, identity


class Source(Protocol):
    """What a run needs of its input. ``compute`` and ``position_sums`` take where they
    compute (``device``) and the run's dataset means (``means``, ``over="dataset"``) as
    arguments: a source holds its input, not the run's state."""

    kind: str  # "qkv" or "model": the store's ``source``
    tasks_per_input: bool  # one task per input on the compute threads (a model)
    digests: tuple  # the tensors whose CRC-32 per input the store records
    paths: list  # the files it reads (never an output)
    n_inputs: int
    n_layers: int
    n_heads: int
    seq: int
    layer_ids: list
    ablate_layers: list
    lengths: np.ndarray
    causal: bool
    options: Options

    def describe(self) -> dict: ...  # its identity, in the run's configuration
    def notes(self): ...  # warning lines, once the run goes ahead
    def align(self) -> int: ...  # batch sizes are multiples of this (the file's chunks)
    def bytes_per_input(self) -> int: ...  # of one condition's results
    def inputs_record(self) -> dict: ...  # what the store's /input holds
    def read(self, start, stop): ...  # (inputs, digests or None)
    def changed(self, start, stop, digests) -> str | None: ...
    def compute(self, inputs, start, stop, *, device, means): ...  # (Conditions, seconds)
    def position_sums(self, inputs, start, stop, targets, *, device="cpu") -> dict: ...
    def means_from_sums(self, totals, attrs): ...
    def means_dims(self) -> dict: ...
    def recipe(self) -> dict: ...  # what a cluster's worker needs to build it again
    def close(self): ...


class QKVSource:
    """Raw Q/K/V from an HDF5 file: each layer's maps from its own Q and K."""

    kind = "qkv"
    tasks_per_input = False  # the kernels share out each batch's work themselves
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
        if options.sweep is not None or options.maps_layers is not None:
            flag = "--sweep" if options.sweep is not None else "--maps-layers"
            raise InputError(
                f"{flag} applies to --model runs: raw Q/K/V has no forward pass to branch, "
                "and each of its layers is substituted on its own"
            )
        self.map_layers = list(self.layer_ids) if options.maps else []
        self.effects = ()  # no model: no output
        _check_partners(self)

    @property
    def conditions(self) -> tuple:
        """Each target alone at every layer (each layer's own Q/K/V is substituted)."""
        o = self.options
        return condition.plain(o.targets, o.substitution, self.layer_ids, o.heads)

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

    def compute(self, inputs, start, stop, *, device, means):
        given = None if means is None else means.values
        if self.options.substitution.kind == "resample":
            given = self._resampled(inputs, start, stop)
        return qkv_conditions(
            inputs, self.lengths[start:stop], self.causal, self.options, device,
            f"{self.input.where()}: inputs {start}..{stop - 1}", given,
        )  # fmt: skip

    def _resampled(self, inputs, start, stop) -> dict:
        """``{target: (q, k) shape}``: the values each input of ``start:stop`` takes from
        its partner among all of the run's inputs (read from the file), its own past the
        partner's length."""
        partners = run_partners(self)[start:stop]
        taken = {t: np.array(x) for t, x in zip("qk", inputs, strict=True)}
        for row, r in enumerate(partners):
            theirs = self.input.read(int(r), int(r) + 1)
            m = int(min(self.lengths[start + row], self.lengths[r]))
            for i, t in enumerate("qk"):
                taken[t][row, ..., :m, :] = theirs[i][0, ..., :m, :]
        return taken

    # -- over="dataset" (qkvmean.run.means)
    def position_sums(self, inputs, start, stop, targets, *, device="cpu") -> dict:
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
        from ..engine.plan import DatasetMeans, means_from_sums, position_counts

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
            "describe": identity(self.describe()),
            "lengths": self.lengths,
            "causal": self.causal,
        }

    def close(self):
        self.input.close()


def qkv_conditions(inputs, lengths, causal, options, device, where, means=None):
    """The conditions of one batch of raw ``(q, k)``, timed: ``(Conditions, seconds)``;
    ``means``: the given values by target (``over="dataset"``: the run's means;
    ``"resample"``: each input's partner's values), or None."""
    q, k = inputs
    t0 = time.perf_counter()
    try:
        c = engine.conditions(
            q, k, None, targets=options.targets, over=options.over, heads=options.heads,
            lengths=lengths, causal=causal, scale=options.scale, device=device,
            maps=options.maps, means=means,
        )  # fmt: skip
    except ValueError as exc:  # e.g. values so large that the logits overflow
        raise InputError(f"{where}: {exc}") from None
    return c, time.perf_counter() - t0


def run_partners(source) -> np.ndarray:
    """``(n_inputs,)``: each input's partner for ``--over resample``, drawn over all of
    the run's inputs from their lengths and the seed (so every batch size, a resumed run
    and a cluster's workers draw the same)."""
    return resample_partners(source.lengths, source.options.substitution.seed)


def _check_partners(source):
    """``--over resample`` needs another input to take values from."""
    if source.options.substitution.kind == "resample" and source.n_inputs < 2:
        raise InputError(
            f"--over resample takes each input's values from another input of the run, and "
            f"this one has {source.n_inputs}; give at least 2 inputs"
        )


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
    here = json.loads(json.dumps(identity(source.describe())))
    if here != json.loads(json.dumps(recipe["describe"])):
        where = recipe.get("spec") or recipe["model"]
        raise InputError(
            f"a worker reads a different input than the driver at {where}: "
            f"{differences(recipe['describe'], here) or 'other contents'}"
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
        from ..io.models import load_model

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
        self.map_layers = _map_layers(options, self.n_layers)
        self.effects = effects_of(w) if options.effects else ()
        self.causal = w.causal
        self.options = options
        _check_key_groups(
            w.arch, self.conditions, "--sweep heads" if options.sweep == "heads" else "--heads"
        )
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
        _check_partners(self)

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

    @property
    def conditions(self) -> tuple:
        """The run's conditions, from its options as they are now (``figure`` picks the
        causal mean for a causal model once the model is loaded)."""
        o = self.options
        if o.sweep is None:
            return condition.plain(o.targets, o.substitution, self.ablate_layers, o.heads)
        return condition.sweep(
            o.sweep, o.targets, self.ablate_layers, self.n_heads, o.substitution, o.heads
        )

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
        # per condition: the maps kept (the baseline's, which the KL reads, is one of
        # them) and the metrics; an input's working buffers are small beside them
        maps = len(self.map_layers) * self.n_heads * self.seq * self.seq * 4
        return maps + self.n_layers * self.n_heads * 16

    def inputs_record(self) -> dict:
        tokens = [t + [""] * (self.seq - len(t)) for t in self.tokens]
        return {"lengths": self.lengths, "text": self.texts, "tokens": tokens}

    def read(self, start, stop):
        """Token ids of inputs ``start:stop``, padded to the longest of them (no digests:
        the texts are identified whole)."""
        return self.read_rows(range(start, stop))[0], None

    def read_rows(self, rows):
        """``(ids, lengths)`` of the inputs ``rows``, padded to the longest of them."""
        lengths = self.lengths[np.asarray(rows, dtype=np.int64)]
        ids = np.zeros((len(lengths), max(1, int(lengths.max(initial=0)))), dtype=np.int64)
        for row, i in enumerate(rows):
            ids[row, : lengths[row]] = self.ids[i]
        return ids, lengths

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
            "describe": identity(self.describe()),
        }

    def compute(self, ids, start, stop, *, device, means):
        from ..engine.transformer import model_conditions

        lengths = self.lengths[start:stop]
        o = self.options
        partners = None
        if o.substitution.kind == "resample":  # drawn over all of the run's inputs
            chosen = run_partners(self)[start:stop]
            partners = self.read_rows(chosen)
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
                device=device,
                maps=bool(self.map_layers),
                means=means,
                partners=partners,
                conditions=self.conditions,
                map_layers=self.map_layers,
                effects=bool(self.effects),
            )
        except ValueError as exc:
            raise InputError(f"{self.model.name}: inputs {start}..{stop - 1}: {exc}") from None
        return c, time.perf_counter() - t0

    # -- over="dataset" (qkvmean.run.means)
    def position_sums(self, ids, start, stop, targets, *, device="cpu") -> dict:
        """Float64 sums over inputs ``start:stop`` of each target's baseline projection at
        each ablated layer and position: ``{target: (layers, heads, seq, head_dim)}``
        (keys and values per KV head)."""
        from ..engine.transformer import model_projections, projection_sums

        w = self.model.weights
        if ids is None:
            heads = {"q": w.n_heads, "k": w.n_kv_heads, "v": w.n_kv_heads}
            shape = (len(self.ablate_layers), self.seq, w.head_dim)
            return {t: np.zeros((shape[0], heads[t], *shape[1:])) for t in targets}
        lengths = self.lengths[start:stop]
        try:
            projected = model_projections(
                w, ids, lengths, layers=self.ablate_layers, seq=self.seq, device=device
            )
        except ValueError as exc:
            raise InputError(f"{self.model.name}: inputs {start}..{stop - 1}: {exc}") from None
        return projection_sums({t: projected[t] for t in targets}, lengths)

    def means_from_sums(self, totals, attrs):
        """The :class:`~qkvmean.engine.plan.DatasetMeans` of :meth:`position_sums` added
        over every input (float32, one per query head)."""
        from dataclasses import replace

        from ..engine.plan import position_counts
        from ..engine.transformer import means_of

        counts = position_counts(self.lengths, self.seq)
        means = means_of(self.model.weights, totals, counts, self.ablate_layers)
        return replace(means, attrs={**attrs, "taken_at": "projection"})

    def means_dims(self) -> dict:
        return dict.fromkeys("qkv", self.model.weights.head_dim)

    def close(self):
        pass


def _text(text, index):
    from ..io.texts import check_text

    if not isinstance(text, str):
        raise InputError(f"text {index}: expected a string, got {type(text).__name__}")
    return check_text(text, f"text {index}")


def _crc_rows(x: np.ndarray) -> np.ndarray:
    """CRC-32 of each input (row of the first axis) of a C-contiguous array."""
    return np.array([crc32(x[i]) for i in range(x.shape[0])], dtype=np.uint32)


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


def _map_layers(options, n_layers) -> list:
    """The layers whose maps a model run keeps: ``--maps-layers``, by default every layer
    (none for a sweep, whose conditions are many), none with ``--no-maps``."""
    spec = options.maps_layers
    if not options.maps:
        return []
    if spec is None:
        spec = "all" if options.sweep is None else []
    if spec == "all":
        return list(range(n_layers))
    for layer in spec:
        if not 0 <= layer < n_layers:
            raise InputError(
                f"--maps-layers: layer {layer} is out of range for {n_layers} layers "
                f"(0..{n_layers - 1})"
            )
    return sorted(set(spec))


def _check_key_groups(arch, conditions, flag):
    """The K conditions of a model whose key norm reads a token's KV heads together take
    whole KV groups (see :func:`qkvmean.engine.transformer.check_key_groups`): refused
    here, before any input is read, rather than at the first batch."""
    from ..engine.transformer import check_key_groups

    try:
        check_key_groups(arch, conditions)
    except ValueError as exc:
        raise InputError(f"{flag}: {exc} (or leave K out of --targets)") from None


def _check_heads(options, n_heads):
    """Check ``options.heads`` against the model; all heads listed is the same as None."""
    for h in options.heads or ():
        if not 0 <= h < n_heads:
            raise InputError(
                f"--heads: head {h} is out of range for {n_heads} heads (0..{n_heads - 1})"
            )
    if options.heads == list(range(n_heads)):
        options.heads = None


def batch_results(c, layout, options) -> tuple:
    """One batch's :class:`~qkvmean.engine.api.Conditions` as the store takes them:
    ``(maps per condition in the stored dtype, or None without maps; metrics)``."""
    maps = batch_maps(c, layout, options) if layout.maps else None
    effects = {name: c.effects[name] for name in layout.effects}
    return maps, {**{name: c.metrics[name] for name in METRICS}, **effects}
