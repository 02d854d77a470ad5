"""The store's schema (version 2): its datasets, their paths, shapes, chunks and named axes.

The paths of its groups and datasets, and the axes each kind of dataset has, are spelled
here once; the writer and the reader take them from here.
The schema in words: ``docs/store.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..engine.names import METRICS
from ..files import InputError
from ..resources import format_bytes
from .codec import parse_compression

FORMAT = "qkvmean-store"
FORMAT_VERSION = 2
#: The versions the reader reads: 1 (the plain run's conditions only, maps at every layer,
#: no condition table and no effects) and 2.
READ_VERSIONS = (1, 2)
METRIC_NAMES = METRICS[:3]  # the float metrics; top_key_index is stored apart

#: The largest chunk HDF5 can store (its chunk sizes are 32-bit).
MAX_CHUNK_BYTES = 2**32 - 1

#: Maps smaller than this are chunked a few heads together, so that small maps do not
#: each pay for a chunk index entry, an HDF5 call and a compression call (at 128 tokens,
#: float32, four maps to a chunk; from 256 tokens, one).
MIN_CHUNK_BYTES = 256 * 1024

STR = h5py.string_dtype("utf-8")
#: The dtypes a store keeps its maps in (the first is the default).
MAP_DTYPES = ("float32", "float16")

# ------------------------------------------------------------------------------ paths

#: The groups and datasets of a store (and their names inside their group).
ATTENTION = "attention"  # ATTENTION/<condition>: (batch, layer, head, query, key)
METRICS_GROUP = "metrics"  # METRICS_GROUP/<metric>: (condition, batch, layer, head)
CONDITION = "metrics/condition"  # the condition scale
INPUT = "input"
LENGTHS = "input/lengths"
TEXT = "input/text"
TOKENS = "input/tokens"
CRC32 = "input/crc32"  # (batch, tensor): CRC-32 of each input's q, k, v as read
TENSOR = "input/tensor"
#: The means' own axes (their layers are the substituted ones, positions those of the
#: data set): dimension scales in /means, the head axis is the store's.
MEANS_GROUP = "means"
MEANS_COUNT = "means/count"
MEANS_LAYER = "means/layer"
#: The condition table (version 2): one string dataset per field of
#: :meth:`qkvmean.engine.condition.Condition.record`, on the condition scale.
CONDITIONS_GROUP = "conditions"
CONDITION_FIELDS = ("target", "layers", "heads", "substitution")
#: The effects on the model's output (version 2, model runs): EFFECTS/<effect>
#: (condition, batch), float32 (:mod:`qkvmean.engine.effects`).
EFFECTS_GROUP = "effects"
MAP_LAYER = "map_layer"  # the maps' layer axis: the layers whose maps are kept


#: The named axes (dimension scales at the root, and the condition scale) of each kind
#: of dataset.
MAP_AXES = ("batch", MAP_LAYER, "head", "query", "key")
EFFECT_AXES = ("condition", "batch")
METRIC_AXES = ("condition", "batch", "layer", "head")
INPUT_AXES = ("batch",)  # lengths, text, crc32 (and its tensor axis)
TOKEN_AXES = ("batch", "seq")
#: The root's dimension scales: every axis name above but the condition's.
ROOT_SCALES = ("batch", "layer", "head", "query", "key", "seq", MAP_LAYER)


def map_path(condition: str) -> str:
    return f"{ATTENTION}/{condition}"


def metric_path(name: str) -> str:
    return f"{METRICS_GROUP}/{name}"


def effect_path(name: str) -> str:
    return f"{EFFECTS_GROUP}/{name}"


def condition_field_path(name: str) -> str:
    return f"{CONDITIONS_GROUP}/{name}"


def means_path(target: str) -> str:
    return f"{MEANS_GROUP}/{target}"


def basename(path: str) -> str:
    """The name of ``path`` inside its group."""
    return path.rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Everything that fixes the datasets of a store."""

    n_inputs: int
    n_layers: int
    n_heads: int
    seq: int
    conditions: list
    map_dtype: str = MAP_DTYPES[0]
    compression: str = "deflate"
    maps: bool = True
    layer_ids: list = field(default_factory=list)  # layer numbers for the layer scale
    digests: tuple = ()  # tensors with a CRC-32 per input in /input/crc32 (raw Q/K/V)
    map_layers: list | None = None  # the layer numbers whose maps are kept (None: all)
    effects: tuple = ()  # the effects on the output stored (model runs)
    table: dict | None = None  # the condition table (qkvmean.engine.condition.table)

    def __post_init__(self):
        if not self.layer_ids:
            self.layer_ids = list(range(self.n_layers))
        if self.map_layers is None:
            self.map_layers = list(self.layer_ids) if self.maps else []
        if not self.map_layers:
            self.maps = False  # nothing to keep

    @property
    def results(self) -> tuple:
        """The per-condition arrays of a batch besides the maps: the metrics, then the
        effects."""
        return (*METRICS, *self.effects)

    def map_chunk_bytes(self) -> int:
        return int(np.prod(self.map_chunks(), dtype=np.int64)) * np.dtype(self.map_dtype).itemsize

    def fixed_bytes(self) -> int:
        """Bytes of the store that do not depend on how well the maps compress: the
        metrics, lengths, digests and dimension scales (a lower bound of its size)."""
        metrics = 4 * len(self.conditions) * self.n_inputs * self.n_layers * self.n_heads * 4
        metrics += 4 * len(self.conditions) * self.n_inputs * len(self.effects)
        per_input = 4 + 4 + 4 * len(self.digests)  # lengths, batch scale, CRCs
        return metrics + self.n_inputs * per_input

    def check(self):
        """Refuse, before anything is created, a store HDF5 could not hold."""
        if self.maps and self.map_chunk_bytes() > MAX_CHUNK_BYTES:
            item = np.dtype(self.map_dtype).itemsize
            longest = math.isqrt(MAX_CHUNK_BYTES // item)
            raise InputError(
                f"the maps of {self.seq} tokens cannot be stored: one map takes "
                f"{format_bytes(self.seq**2 * item)}, and an HDF5 chunk holds at most 4 GiB "
                f"(at most {longest} tokens in {self.map_dtype}); pass --no-maps to store the "
                "metrics only, or cut the sequences"
            )

    def map_chunks(self):
        per_map = max(self.seq, 1) ** 2 * np.dtype(self.map_dtype).itemsize
        heads = min(self.n_heads, max(1, math.ceil(MIN_CHUNK_BYTES / per_map)))
        return (1, 1, max(heads, 1), max(self.seq, 1), max(self.seq, 1))

    def create_datasets(self, f: h5py.File, n_inputs: int):
        """The map and metric datasets for ``n_inputs`` inputs."""
        filters = parse_compression(self.compression)
        if self.maps:
            group = f.require_group(ATTENTION)
            for cond in self.conditions:
                group.create_dataset(
                    cond,
                    shape=(n_inputs, len(self.map_layers), self.n_heads, self.seq, self.seq),
                    dtype=self.map_dtype,
                    chunks=self.map_chunks() if n_inputs else None,
                    **(filters if n_inputs else {}),
                )
        group = f.require_group(METRICS_GROUP)
        shape = (len(self.conditions), n_inputs, self.n_layers, self.n_heads)
        for name in METRIC_NAMES:
            group.create_dataset(name, shape=shape, dtype="float32")
        group.create_dataset(METRICS[3], shape=shape, dtype="int32")  # top_key_index
        if self.effects:
            group = f.require_group(EFFECTS_GROUP)
            for name in self.effects:
                group.create_dataset(name, shape=(len(self.conditions), n_inputs), dtype="float32")


def dimension_scales(f: h5py.File, layout: Layout):
    positions = np.arange(layout.seq, dtype=np.int32)
    values = {
        "batch": np.arange(layout.n_inputs, dtype=np.int32),
        "layer": np.asarray(layout.layer_ids, dtype=np.int32),
        "head": np.arange(layout.n_heads, dtype=np.int32),
        MAP_LAYER: np.asarray(layout.map_layers, dtype=np.int32),
    }
    scales = {name: values.get(name, positions) for name in ROOT_SCALES}
    for name, values in scales.items():
        f.create_dataset(name, data=values).make_scale(name)
    cond = f[METRICS_GROUP].create_dataset(
        basename(CONDITION), data=np.array(layout.conditions, dtype=STR)
    )
    cond.make_scale(basename(CONDITION))
    if layout.table is not None:
        group = f.create_group(CONDITIONS_GROUP)
        for name in CONDITION_FIELDS:
            d = group.create_dataset(name, data=np.array(layout.table[name], dtype=STR))
            d.dims[0].attach_scale(cond)


def attach(dset: h5py.Dataset, f: h5py.File, names):
    for axis, name in enumerate(names):
        scale = f[CONDITION] if name == basename(CONDITION) else f[name]
        dset.dims[axis].attach_scale(scale)


#: HDF5 file-format bounds of the store: the 1.10 format, which SWMR writing needs and
#: every HDF5 since 1.10 (2016) reads. (``latest`` would be HDF5 2.0's format, which
#: older tools cannot open.)
LIBVER = ("v110", "v110")


def write_means(f: h5py.File, means):
    """``/means/<target>`` ``(layer, head, position, dim)`` and ``/means/count``
    ``(position,)`` of a :class:`~qkvmean.engine.plan.DatasetMeans`, with their scales
    (``/means/layer``: the model's layer numbers; ``position``; ``dim``, ``dim_v``)."""
    group = f.create_group(MEANS_GROUP)
    for key, value in means_attrs(means).items():
        group.attrs[key] = value
    positions = int(means.counts.shape[0])
    layer = group.create_dataset(
        basename(MEANS_LAYER), data=np.asarray(means.layers, dtype=np.int32)
    )
    layer.make_scale(basename(MEANS_LAYER))
    position = group.create_dataset("position", data=np.arange(positions, dtype=np.int32))
    position.make_scale("position")
    count = group.create_dataset(
        basename(MEANS_COUNT), data=np.asarray(means.counts, dtype=np.int64)
    )
    count.dims[0].attach_scale(position)
    dims = {}
    for target in sorted(means.values, key="qkv".index):
        values = np.asarray(means.values[target])
        name = "dim" if target != "v" or values.shape[-1] == _dim_of(means) else "dim_v"
        if name not in dims:
            axis = np.arange(values.shape[-1], dtype=np.int32)
            dims[name] = group.create_dataset(name, data=axis)
            dims[name].make_scale(name)
        dset = group.create_dataset(target, data=values)
        for axis, scale in enumerate((layer, f["head"], position, dims[name])):
            dset.dims[axis].attach_scale(scale)


def _dim_of(means) -> int:
    first = next(t for t in "qkv" if t in means.values)
    return np.asarray(means.values[first]).shape[-1]


def means_attrs(means) -> dict:
    return {str(k): v for k, v in means.attrs.items()}
