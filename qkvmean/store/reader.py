"""The reader: a store opened, every dataset it relies on checked once, and the maps,
metrics and inputs read back by name (:func:`open_store`)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..engine.condition import BASELINE_RECORD, Condition, from_record
from ..engine.names import BASELINE, CONDITIONS, EFFECTS, METRICS, target_of
from ..files import InputError, hdf5_reason, lexists, load_json, open_hdf5, parse_causal
from .schema import (
    ATTENTION,
    CONDITION,
    CONDITION_FIELDS,
    CONDITIONS_GROUP,
    CRC32,
    EFFECTS_GROUP,
    FORMAT,
    LENGTHS,
    MAP_LAYER,
    MEANS_COUNT,
    MEANS_GROUP,
    MEANS_LAYER,
    METRIC_NAMES,
    METRICS_GROUP,
    READ_VERSIONS,
    TEXT,
    TOKENS,
    condition_field_path,
    effect_path,
    map_path,
    means_path,
    metric_path,
)
from .workdir import interrupted_message, partial_dir

#: A version 1 store's conditions, in its order.
V1_CONDITIONS = CONDITIONS


class Store:
    """A qkvmean store opened for reading. Use :func:`open_store`.

    Attributes
    ----------
    path : Path
    attrs : dict
        The root attributes.
    config : dict
        The run configuration (the ``config`` attribute, parsed).
    conditions : list of str
        ``baseline``, ``mean_q``, … in the order of the metrics' first axis.
    n_inputs, n_layers, n_heads, seq : int
    lengths : ndarray of int
        Valid tokens per input.
    has_maps : bool
        False for a store written with ``--no-maps`` (metrics only).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not lexists(self.path) and lexists(partial_dir(self.path)):
            raise InputError(f"{self.path}: {interrupted_message(self.path)}")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a store")
        self._f = open_hdf5(self.path, "an HDF5 file (a qkvmean store is HDF5)")
        try:
            self._validate()
        except InputError:
            self._f.close()
            raise
        except (KeyError, RuntimeError, OSError, ValueError) as exc:
            self._f.close()
            raise self._unreadable(exc) from None
        except BaseException:
            self._f.close()
            raise

    def _unreadable(self, exc) -> Exception:
        """What HDF5 failing to read the store's own structure means: damage (a bad
        checksum, an address past the end), unless the system said why."""
        if isinstance(exc, OSError) and exc.errno:
            return exc

        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return self._damaged(f"HDF5 cannot read its structure ({hdf5_reason(str(text))})")

    def _text(self, values, where) -> list:
        """Strings of a UTF-8 string dataset; text that is not UTF-8 is damage."""
        try:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
        except UnicodeDecodeError:
            raise self._damaged(f"{where} holds text that is not UTF-8") from None

    def _damaged(self, what: str) -> InputError:
        return InputError(
            f"{self.path}: {what}; the store is damaged or was not written by qkvmean"
        )

    def _dataset(self, name, *, kind, ndim, shape=None):
        """The dataset at ``name``, checked: exists, is a dataset, has the dtype ``kind``
        (numpy kind letters), ``ndim`` axes and, where given, ``shape``."""
        try:
            obj = self._f.get(name)
        except (KeyError, OSError, RuntimeError, ValueError):  # e.g. a link to nowhere
            obj = None
        if obj is None:
            raise self._damaged(f"no /{name}")
        if not isinstance(obj, h5py.Dataset):
            raise self._damaged(f"/{name} is a group, not a dataset")
        if obj.dtype.kind not in kind or obj.ndim != ndim:
            raise self._damaged(f"/{name} has dtype {obj.dtype} and shape {obj.shape}")
        if shape is not None and obj.shape != tuple(shape):
            raise self._damaged(f"/{name} has shape {obj.shape}, expected {tuple(shape)}")
        return obj

    def _validate(self):
        """Everything the reader, ``inspect`` and ``render`` rely on, checked once."""
        f = self._f
        self._check_format()
        self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
        try:
            self.causal = parse_causal(self.attrs.get("causal", False), str(self.path))
        except InputError:
            raise self._damaged(
                f"its causal attribute {self.attrs.get('causal')!r} is not a boolean"
            ) from None
        try:
            self.config = load_json(self.attrs.get("config", "{}"))
        except (TypeError, ValueError):
            raise self._damaged("its config attribute is not JSON") from None
        if not isinstance(self.config, dict):
            raise self._damaged("its config attribute is not a JSON object")
        if not isinstance(f.get(METRICS_GROUP), h5py.Group):
            raise self._damaged("no /metrics group")
        names = self._dataset(CONDITION, kind="OSU", ndim=1)[...]
        self.conditions = self._text(names, "/" + CONDITION)
        if self.format_version == 1:  # the plain run's conditions, in their order
            unknown = [c for c in self.conditions if c not in V1_CONDITIONS]
            if unknown:
                raise self._damaged(
                    f"unknown condition {unknown[0]!r} in /metrics/condition (qkvmean knows "
                    f"{', '.join(V1_CONDITIONS)})"
                )
            in_order = sorted(set(self.conditions), key=V1_CONDITIONS.index)
        else:
            in_order = [BASELINE] + sorted(
                set(self.conditions) - {BASELINE}, key=self.conditions.index
            )
        if self.conditions != in_order or self.conditions[:1] != [BASELINE]:
            raise self._damaged(
                f"/metrics/condition lists {', '.join(self.conditions)}: baseline first, each "
                f"condition once" + (f", in the order {', '.join(V1_CONDITIONS)}"
                                     if self.format_version == 1 else "")
            )  # fmt: skip
        entropy = self._dataset(metric_path("entropy"), kind="f", ndim=4)
        shape = entropy.shape
        if shape[0] != len(self.conditions):
            raise self._damaged(
                f"/metrics/entropy has {shape[0]} conditions, /metrics/condition names "
                f"{len(self.conditions)}"
            )
        for name in METRIC_NAMES[1:]:
            self._dataset(metric_path(name), kind="f", ndim=4, shape=shape)
        self._dataset(metric_path("top_key_index"), kind="iu", ndim=4, shape=shape)
        self.n_inputs, self.n_layers, self.n_heads = shape[1:]
        self._read_table()
        self.seq = self._dataset("seq", kind="iu", ndim=1).shape[0]
        layer = self._dataset("layer", kind="iu", ndim=1, shape=(self.n_layers,))
        self.layer_ids = [int(x) for x in layer[...]]
        for name, size in (("batch", self.n_inputs), ("head", self.n_heads)):
            self._dataset(name, kind="iu", ndim=1, shape=(size,))
        for name in ("query", "key"):
            self._dataset(name, kind="iu", ndim=1, shape=(self.seq,))
        lengths = self._dataset(LENGTHS, kind="iu", ndim=1, shape=(self.n_inputs,))
        raw = lengths[...]  # checked before the conversion: a uint64 above 2**63 would wrap
        bad = np.flatnonzero((raw < 0) | (raw > self.seq))
        self.lengths = raw.astype(np.int64)
        if bad.size:
            i = int(bad[0])
            raise self._damaged(
                f"/input/lengths gives input {i} length {int(raw[i])}, outside 0..{self.seq}"
            )
        if TEXT in f:
            self._dataset(TEXT, kind="OSU", ndim=1, shape=(self.n_inputs,))
        if TOKENS in f:
            self._dataset(TOKENS, kind="OSU", ndim=2, shape=(self.n_inputs, self.seq))
        self._check_means()
        self.map_layer_ids = list(self.layer_ids)  # version 1: maps at every layer
        if self.format_version > 1:
            scale = self._dataset(MAP_LAYER, kind="iu", ndim=1)
            self.map_layer_ids = [int(x) for x in scale[...]]
            if not set(self.map_layer_ids) <= set(self.layer_ids):
                raise self._damaged(f"/{MAP_LAYER} names layers that /layer does not have")
        self._check_effects()
        self.has_maps = ATTENTION in f
        if not self.has_maps and self.config.get("maps", True) and self.map_layer_ids:
            raise self._damaged("no /attention, though its config says the maps were stored")
        if self.has_maps:
            if not isinstance(f[ATTENTION], h5py.Group):
                raise self._damaged("/attention is a dataset, not a group of maps")
            extra = sorted(set(f[ATTENTION]) - set(self.conditions))
            if extra:
                raise self._damaged(
                    f"/attention/{extra[0]} is not one of the conditions in /metrics/condition"
                )
            full = (self.n_inputs, len(self.map_layer_ids), self.n_heads, self.seq, self.seq)
            for cond in self.conditions:
                self._dataset(map_path(cond), kind="f", ndim=5, shape=full)

    def _read_table(self):
        """The condition table (:attr:`condition_table`): stored (version 2), or what a
        version 1 store's attributes say (each target alone, at ``ablate_layers``, in
        ``ablate_heads``, by ``over``)."""
        f = self._f
        if self.format_version == 1:
            over = str(self.attrs.get("over", "tokens"))
            layers = [int(x) for x in np.atleast_1d(self.attrs.get("ablate_layers", [0]))]
            heads = [int(x) for x in np.atleast_1d(self.attrs.get("ablate_heads", []))]
            # every head listed is every head, as version 2 says it
            heads = "all" if heads == list(range(self.n_heads)) else json.dumps(heads)
            rows = [dict(BASELINE_RECORD)] + [
                {"target": target_of(c), "layers": json.dumps(layers),
                 "heads": heads, "substitution": over}
                for c in self.conditions[1:]
            ]  # fmt: skip
        else:
            if not isinstance(f.get(CONDITIONS_GROUP), h5py.Group):
                raise self._damaged("no /conditions group (the condition table)")
            columns = {}
            for name in CONDITION_FIELDS:
                d = self._dataset(
                    condition_field_path(name), kind="OSU", ndim=1, shape=(len(self.conditions),)
                )
                columns[name] = self._text(d[...], "/" + condition_field_path(name))
            rows = [
                {k: columns[k][i] for k in CONDITION_FIELDS} for i in range(len(self.conditions))
            ]
        self.condition_table = []
        for label, row in zip(self.conditions, rows, strict=True):
            try:
                condition = from_record(label, row)
            except (ValueError, TypeError, KeyError):
                raise self._damaged(f"/conditions holds a bad row for {label!r}: {row}") from None
            # (version 1 named every kind mean_<target>)
            if (
                self.format_version > 1
                and condition is not None
                and label.split("@")[0]
                != Condition(condition.target, substitution=condition.substitution).label
            ):
                raise self._damaged(
                    f"condition {label!r} does not match its row of the condition table "
                    f"(target {condition.target}, {condition.substitution.spec})"
                )
            entry = {"label": label, **row}
            if condition is not None:
                entry["layers"] = list(condition.layers)
                entry["heads"] = "all" if condition.heads is None else list(condition.heads)
            else:
                entry["layers"], entry["heads"] = [], []
            self.condition_table.append(entry)

    def _check_effects(self):
        """``/effects`` (model runs, version 2): ``(condition, batch)`` float datasets."""
        group = self._f.get(EFFECTS_GROUP)
        self.effects = []
        if group is None:
            return
        if not isinstance(group, h5py.Group):
            raise self._damaged("/effects is a dataset, not a group")
        for name in group:
            if name not in EFFECTS:
                raise self._damaged(f"/effects/{name} is not an effect qkvmean knows")
            self._dataset(effect_path(name), kind="f", ndim=2,
                          shape=(len(self.conditions), self.n_inputs))  # fmt: skip
        self.effects = [name for name in EFFECTS if name in group]

    def effect(self, name) -> np.ndarray:
        """``/effects/<name>``: ``(condition, input)`` float32."""
        if name not in self.effects:
            have = (
                ", ".join(self.effects) if self.effects else "none (a raw Q/K/V or version 1 store)"
            )
            raise InputError(f"{self.path.name} has no effect {name!r} (it has {have})")
        try:
            return self._f[effect_path(name)][...]
        except (OSError, RuntimeError) as exc:
            raise self._unreadable(exc) from None

    @property
    def sweep(self):
        """``"heads"`` or ``"layers"`` for a ``--sweep`` run's store, else None."""
        return self.config.get("sweep")

    def map_layer_index(self, layer) -> int:
        """The position on the maps' layer axis of layer index ``layer`` (as
        :meth:`layer_index` takes it), or an InputError where no maps were kept."""
        number = self.layer_ids[self.layer_index(layer)]
        if number not in self.map_layer_ids:
            kept = ", ".join(map(str, self.map_layer_ids)) or "none"
            raise InputError(
                f"{self.path.name} keeps no maps at layer {number} (maps at layers: {kept}; "
                "rerun with --maps-layers to keep them)"
            )
        return self.map_layer_ids.index(number)

    def _check_means(self):
        """``/means`` (stores of ``--over dataset`` runs): the datasets the reader needs,
        with consistent shapes."""
        self.has_means = MEANS_GROUP in self._f
        if not self.has_means:
            return
        if not isinstance(self._f[MEANS_GROUP], h5py.Group):
            raise self._damaged("/means is a dataset, not a group")
        count = self._dataset(MEANS_COUNT, kind="iu", ndim=1)
        layers = self._dataset(MEANS_LAYER, kind="iu", ndim=1)
        self.mean_targets = [t for t in "qkv" if t in self._f[MEANS_GROUP]]
        if not self.mean_targets:
            raise self._damaged("/means holds no q, k or v")
        for target in self.mean_targets:
            d = self._dataset(means_path(target), kind="f", ndim=4)
            if d.shape[:3] != (layers.shape[0], self.n_heads, count.shape[0]):
                raise self._damaged(
                    f"/means/{target} has shape {d.shape}; its first axes must be (layer "
                    f"{layers.shape[0]}, head {self.n_heads}, position {count.shape[0]})"
                )

    def dataset_means(self):
        """The means an ``--over dataset`` run substituted
        (:class:`~qkvmean.engine.plan.DatasetMeans`: ``values[target]`` ``(layer, head,
        position, dim)``, ``counts``, ``layers``), or None for other stores."""
        if not self.has_means:
            return None
        from ..engine.plan import DatasetMeans

        g = self._f[MEANS_GROUP]
        try:
            counts = self._f[MEANS_COUNT][...].astype(np.int64)
            layers = tuple(int(x) for x in self._f[MEANS_LAYER][...])
            values = {t: g[t][...] for t in self.mean_targets}
        except (OSError, RuntimeError, KeyError) as exc:
            raise self._unreadable(exc) from None
        if np.any(counts < 0) or any(not np.isfinite(v).all() for v in values.values()):
            raise self._damaged("/means holds negative counts, NaN or infinity")
        return DatasetMeans(layers, values, counts, {k: _plain(v) for k, v in g.attrs.items()})

    def _check_format(self):
        try:
            fmt = _plain(self._f.attrs.get("format"))
        except (OSError, TypeError, ValueError):  # an attribute h5py cannot read
            fmt = None
        if not isinstance(fmt, str) or fmt != FORMAT:
            raise InputError(f"{self.path}: not a qkvmean store (no format = {FORMAT!r} attribute)")
        version = _plain(self._f.attrs.get("format_version"))
        if isinstance(version, list) and len(version) == 1:
            version = version[0]
        if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
            raise self._damaged(f"its format_version {version!r} is not an integer")
        if int(version) not in READ_VERSIONS:
            from .._version import __version__

            raise InputError(
                f"{self.path}: store format_version {version} is not one this qkvmean "
                f"({__version__}) reads (versions {', '.join(map(str, READ_VERSIONS))}); use "
                "a matching qkvmean"
            )
        self.format_version = int(version)

    # -- context manager
    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (
            f"<qkvmean Store {self.path.name}: {self.n_inputs} inputs, {self.n_layers} "
            f"layers, {self.n_heads} heads, seq {self.seq}, {self._conditions_line()}>"
        )

    def _conditions_line(self, most=8) -> str:
        """The conditions, or (a sweep's hundreds) their count and the first and last."""
        if len(self.conditions) <= most:
            return ", ".join(self.conditions)
        return (
            f"{len(self.conditions)} conditions: {', '.join(self.conditions[:3])}, ..., "
            f"{self.conditions[-1]}"
        )

    def _repr_html_(self) -> str:
        """A summary table for Jupyter (``qkvmean.render.view.View(store)`` shows the maps)."""
        from html import escape

        cfg = self.config
        model = cfg.get("model") or cfg.get("input")
        lengths = (
            f"{int(self.lengths.min())}..{int(self.lengths.max())} tokens"
            if self.n_inputs
            else "none"
        )
        maps = (
            f"yes ({cfg.get('map_dtype', 'float32')}, {cfg.get('compression', 'deflate')})"
            if self.has_maps
            else "no (--no-maps: metrics only)"
        )
        source = "a --model run"
        if self.source != "model":
            source = f"raw Q/K/V ({self.source}" + (
                f": {cfg.get('input')})" if cfg.get("input") else ")"
            )
        rows = [
            ("file", str(self.path)),
            ("source", source),
            ("conditions", self._conditions_line()),
            ("inputs", f"{self.n_inputs} ({lengths}; seq {self.seq})"),
            ("layers", f"{self.n_layers} ({', '.join(str(x) for x in self.layer_ids)})"),
            ("heads", str(self.n_heads)),
            ("model", str(model) if self.source == "model" and model else "none (raw Q/K/V)"),
            ("maps", maps),
        ]
        body = "".join(
            f'<tr><th style="text-align: left">{escape(k)}</th><td style="text-align: '
            f'left">{escape(v)}</td></tr>'
            for k, v in rows
        )
        return (
            f'<table class="qkvmean-store"><caption style="text-align: left">qkvmean store '
            f"<code>{escape(self.path.name)}</code></caption>{body}</table>"
        )

    # -- inputs
    @property
    def source(self) -> str:
        return str(self.attrs.get("source", ""))

    @property
    def texts(self):
        """The input texts (model stores), else None."""
        if TEXT not in self._f:
            return None
        return self._text(self._f[TEXT][...], "/" + TEXT)

    @property
    def has_tokens(self) -> bool:
        return TOKENS in self._f

    def tokens(self, index: int):
        """Token strings of one input (its valid positions), or None without tokens."""
        index = self.input_index(index)
        if not self.has_tokens:
            return None
        row = self._f[TOKENS][index, : self.lengths[index]]
        return self._text(row, f"/input/tokens of input {index}")

    def input_digests(self):
        """``/input/crc32``: the CRC-32 of each input's q, k and v as read (raw Q/K/V
        runs), ``(batch, tensor)``; None where the store has none."""
        d = self._f.get(CRC32)
        if not isinstance(d, h5py.Dataset) or d.shape[:1] != (self.n_inputs,):
            return None
        return d[...]

    # -- maps
    def input_index(self, index) -> int:
        """A valid input index (negative counts from the end), or an InputError."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"input index must be an int, got {index!r}")
        return self._in_range(index, self.n_inputs, "input")

    def layer_index(self, layer) -> int:
        """A valid layer index (negative counts from the last), or an InputError."""
        return self._in_range(layer, self.n_layers, "layer")

    def head_index(self, head) -> int:
        """A valid head index (negative counts from the last), or an InputError."""
        if isinstance(head, (bool, np.bool_)) or not isinstance(head, (int, np.integer)):
            raise TypeError(f"head must be an int or 'mean', got {head!r}")
        return self._in_range(head, self.n_heads, "head")

    def _in_range(self, value, count, noun) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{noun} index must be an int, got {value!r}")
        if not -count <= value < count:
            raise InputError(
                f"{self.path.name} has {count} {noun}s (0..{count - 1}); there is no {noun} {value}"
            )
        return int(value) % count

    def _condition(self, condition) -> str:
        if condition not in self.conditions:
            raise InputError(
                f"{self.path.name} has no condition {condition!r} "
                f"(it has {', '.join(self.conditions)})"
            )
        if not self.has_maps:
            if self.config.get("maps", True) is False:
                raise InputError(
                    f"{self.path.name} was written with --no-maps: it holds metrics only"
                )
            raise InputError(
                f"{self.path.name} keeps no maps (a sweep keeps none unless --maps-layers "
                "names layers): it holds metrics and effects only"
            )
        return condition

    def map(self, condition, index, layer=-1, head="mean", trim=True):
        """One attention map ``(query, key)``.

        ``head``: an index, or ``"mean"`` for the mean over heads. ``trim``: only the valid
        ``n × n`` region of the input. A map that cannot be read (a damaged chunk) or that
        holds values no attention weight can have (NaN, below 0, above 1) is an
        :class:`~qkvmean.files.InputError` naming the input, condition and layer.
        """
        condition = self._condition(condition)
        dset = self._f[ATTENTION][condition]
        b = self.input_index(index)
        layer = self.layer_index(layer)
        at = self.map_layer_index(layer)
        if isinstance(head, str):
            if head != "mean":
                raise InputError(f"head must be an index or 'mean', got {head!r}")
            heads = slice(None)
        else:
            heads = self.head_index(head)
        m = self._checked(dset, condition, b, layer, heads, at)
        m = m.astype(np.float64).mean(axis=0) if heads == slice(None) else m
        m = m.astype(np.float32)
        if trim:
            n = self.lengths[b]
            m = m[:n, :n]
        return m

    def layer_maps(self, condition, index, layer):
        """Every head's map of one input at one layer, ``(head, n, n)`` (the valid
        region), checked as :meth:`map` checks one."""
        condition = self._condition(condition)
        b, layer = self.input_index(index), self.layer_index(layer)
        n = self.lengths[b]
        dset = self._f[ATTENTION][condition]
        at = self.map_layer_index(layer)
        return self._checked(dset, condition, b, layer, slice(None), at)[:, :n, :n]

    def _checked(self, dset, condition, b, layer, heads, at):
        where = f"input {b}, condition {condition}, layer {self.layer_ids[layer]}"
        m = self._read(dset, (b, at, heads), where)
        check_weights(m, self.path, where)
        return m

    def _read(self, dset, index, where):
        try:
            return dset[index]
        except IndexError as exc:
            raise InputError(f"{self.path.name}: {where}: {exc}") from None
        except (OSError, RuntimeError) as exc:
            raise InputError(
                f"{self.path}: cannot read the maps of {where} ({hdf5_reason(str(exc))}); "
                "the store is damaged"
            ) from None

    def maps(self, condition, inputs=slice(None), layer=slice(None), head=slice(None)):
        """A slice of ``/attention/<condition>``, as stored (numpy indexing; ``layer``
        indexes the maps' own layer axis, :attr:`map_layer_ids`)."""
        condition = self._condition(condition)
        where = f"inputs {inputs}, condition {condition}, layers {layer}"
        return self._read(self._f[ATTENTION][condition], (inputs, layer, head), where)

    def metric(self, name):
        """``/metrics/<name>``: ``(condition, input, layer, head)``."""
        if name not in METRICS:
            raise InputError(
                f"unknown metric {name!r}; the store has "
                f"{', '.join((*METRIC_NAMES, 'top_key_index'))}"
            )
        return self._f[metric_path(name)][...]

    def metric_block(self, name, condition, start=0, stop=None):
        """``/metrics/<name>[condition, start:stop]``: one condition's metric for a run of
        inputs, ``(input, layer, head)``, read without the rest (for stores too large to
        read whole)."""
        if name not in METRICS:
            self.metric(name)  # raises, with the names the store has
        if condition not in self.conditions:
            raise InputError(
                f"{self.path.name} has no condition {condition!r} "
                f"(it has {', '.join(self.conditions)})"
            )
        where = f"inputs {start}..{stop}, condition {condition}"
        dset = self._f[metric_path(name)]
        try:
            return dset[self.conditions.index(condition), start:stop]
        except (OSError, RuntimeError) as exc:
            raise InputError(
                f"{self.path}: cannot read /metrics/{name} of {where} "
                f"({hdf5_reason(str(exc))}); the store is damaged"
            ) from None

    def to_xarray(self):
        """The whole store as an :class:`xarray.Dataset` with named dimensions, backed by
        the file: nothing large is read until it is used. Needs xarray and h5netcdf
        (``pip install 'qkvmean[xarray]'``).

        Variables: the metrics ``(condition, batch, layer, head)``, the maps as
        ``attention_<condition>`` ``(batch, map_layer, head, query, key)`` (absent in
        stores without maps), the effects as ``effect_<name>`` ``(condition, batch)``,
        the condition table as ``condition_target``, ``condition_layers``,
        ``condition_heads`` and ``condition_substitution`` coordinates on ``condition``,
        ``lengths``, ``text``/``tokens`` (model runs), and in
        ``--over dataset`` stores ``means_<target>`` ``(means_layer, head, position,
        dim)`` with ``means_count``. The root attributes are its ``attrs``.

        The Dataset opens the file itself: it keeps working after this Store is closed,
        as long as the file stays where it is. Close it with ``ds.close()`` (or ``with
        store.to_xarray() as ds:``).
        """
        from .export import xarray_dataset

        return xarray_dataset(self)

    # -- sizes
    def storage(self):
        """``(bytes on disk, bytes of the maps uncompressed, bytes of the maps stored)``."""
        raw = stored = 0
        if self.has_maps:
            for cond in self.conditions:
                d = self._f[ATTENTION][cond]
                raw += d.size * d.dtype.itemsize
                try:
                    stored += d.id.get_storage_size()
                except (KeyError, RuntimeError, OSError) as exc:  # a damaged chunk index
                    raise self._unreadable(exc) from None
        return self.path.stat().st_size, raw, stored

    def summary(self) -> dict:
        """What ``qkvmean inspect`` shows, as plain JSON-ready values."""
        on_disk, raw, stored = self.storage()
        cfg = self.config
        return {
            "store": str(self.path),
            "complete": True,
            "format_version": self.format_version,
            "qkvmean_version": self.attrs.get("qkvmean_version"),
            "created_utc": self.attrs.get("created_utc"),
            "source": self.source,
            "input": cfg.get("input") or cfg.get("model"),
            "texts": cfg.get("texts"),
            "inputs_done": self.n_inputs,
            "inputs_total": self.n_inputs,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "seq": self.seq,
            "lengths": {
                "min": int(self.lengths.min()) if self.n_inputs else 0,
                "mean": float(self.lengths.mean()) if self.n_inputs else 0.0,
                "max": int(self.lengths.max()) if self.n_inputs else 0,
            },
            "conditions": self.conditions,
            "condition_table": self.condition_table,
            "sweep": self.sweep,
            "effects": self.effects,
            "map_layers": self.map_layer_ids,
            "over": self.attrs.get("over"),
            "causal": self.causal,
            "ablate_layers": self.attrs.get("ablate_layers"),
            "ablate_heads": self.attrs.get("ablate_heads"),
            "scale": cfg.get("scale"),
            "maps": self.has_maps,
            "map_dtype": cfg.get("map_dtype") if self.has_maps else None,
            "compression": cfg.get("compression") if self.has_maps else None,
            "bytes_on_disk": on_disk,
            "map_bytes_uncompressed": raw,
            "map_bytes_stored": stored,
            "compression_ratio": raw / stored if stored else None,
            "means": self._means_summary(),
            "config": cfg,
        }

    def _means_summary(self):
        """What ``inspect`` says of ``/means`` (None for stores without)."""
        if not self.has_means:
            return None
        g = self._f[MEANS_GROUP]
        counts = self._f[MEANS_COUNT][...]
        return {
            "targets": self.mean_targets,
            "layers": [int(x) for x in self._f[MEANS_LAYER][...]],
            "positions": int((counts > 0).sum()),
            "inputs_at_first_position": int(counts[0]) if counts.size else 0,
            "taken_from": _plain(g.attrs.get("taken_from")),
        }


def check_weights(m: np.ndarray, path, where: str):
    """Attention weights lie in [0, 1]; anything else is damage, not something to draw."""
    if m.size and not (np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 + 1e-3):
        bad = "NaN or infinity" if not np.isfinite(m).all() else "values outside 0..1"
        raise InputError(f"{path}: the maps of {where} hold {bad}; the store is damaged")


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_store(path) -> Store:
    """Open a qkvmean store for reading.

    Refuses files that are not stores, and stores of a ``format_version`` this version of
    qkvmean does not know, with a :class:`~qkvmean.files.InputError` (a ``ValueError``).

    Examples
    --------
    >>> import qkvmean
    >>> with qkvmean.open_store("run.h5") as store:  # doctest: +SKIP
    ...     m = store.map("mean_k", 0, layer=-1, head="mean")
    """
    return Store(path)
