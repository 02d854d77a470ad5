"""What a run computes, as a value: its options (checked once, in one spelling), the
configuration it records, and the comparison that decides whether ``--resume`` continues
the same run."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import config as _config
from ..engine.condition import SWEEPS
from ..engine.names import BASELINE, OVER, TARGETS
from ..engine.substitution import Substitution
from ..files import InputError
from ..store.codec import canonical_compression
from ..store.schema import MAP_DTYPES


class RunFailed(Exception):
    """The run could not finish (disk full, I/O error); what is done can be resumed."""


@dataclass
class Options:
    """What is computed and how it is stored (everything but the input itself)."""

    targets: list = field(default_factory=lambda: list(TARGETS))
    over: str = OVER[0]  # a Substitution's spelling: tokens, causal, window:W, zero, ...
    heads: list | None = None  # None: all heads
    causal: bool | None = None  # None: the input's own setting
    scale: float | None = None
    map_dtype: str = MAP_DTYPES[0]
    compression: str = "deflate"
    maps: bool = True
    mean_from: str | None = None  # over="dataset": a reference run's store with the means
    sweep: str | None = None  # "layers" or "heads": one condition per target x layer (x head)
    maps_layers: list | str | None = None  # layers whose maps are kept; None: the default
    effects: bool = True  # the effects on the model's output (model runs)

    def __post_init__(self):
        self.check()  # an Options is valid from the start, however it is made

    def check(self):
        """Refuse a bad option (:class:`InputError`, naming it) and spell the rest one
        way per meaning, so that ``--resume`` recognises the same run."""
        if not self.targets:
            raise InputError("--targets is empty; choose from q, k, v (e.g. --targets q,k,v)")
        for t in self.targets:
            if t not in TARGETS:
                raise InputError(f"--targets: unknown target {t!r}; choose from q, k, v")
        if len(set(self.targets)) != len(self.targets):
            raise InputError(f"--targets lists a target twice: {','.join(self.targets)}")
        try:
            self.over = Substitution.parse(self.over).spec  # one spelling: resample:0 → resample
        except (TypeError, ValueError) as exc:
            raise InputError(f"--over: {exc}") from None
        if self.mean_from is not None:
            if self.over != OVER[2]:
                raise InputError(
                    f"--mean-from takes the means of a reference run for --over dataset, not "
                    f"--over {self.over}; drop --over (or pass --over dataset)"
                )
            if not str(self.mean_from).strip():
                raise InputError("--mean-from is empty; give the store of a --over dataset run")
        if self.sweep is not None and self.sweep not in SWEEPS:
            raise InputError(f"--sweep must be {' or '.join(SWEEPS)}, got {self.sweep!r}")
        if self.maps_layers is not None:
            if not self.maps:
                raise InputError(
                    "--maps-layers names the layers whose maps are kept, and --no-maps keeps "
                    "none; drop one of them"
                )
            if self.maps_layers != "all":
                self.maps_layers = sorted(set(int(x) for x in self.maps_layers))
        if self.map_dtype not in MAP_DTYPES:
            raise InputError(f"--dtype must be {' or '.join(MAP_DTYPES)}, got {self.map_dtype!r}")
        if self.scale is not None and not (np.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"--scale must be finite and > 0, got {self.scale}")
        if not self.maps and self.map_dtype != MAP_DTYPES[0]:
            raise InputError("--dtype sets the stored maps' dtype; with --no-maps there are none")
        if self.heads is not None:
            if not self.heads:
                raise InputError("--heads is empty; give head numbers or 'all'")
            twice = sorted({h for h in self.heads if self.heads.count(h) > 1})
            if twice:
                raise InputError(f"--heads lists head {twice[0]} twice")
            self.heads = sorted(self.heads)
        # one spelling per meaning, so that --resume recognises the same run
        self.targets = [t for t in TARGETS if t in self.targets]
        self.compression = canonical_compression(self.compression)

    @property
    def substitution(self) -> Substitution:
        return Substitution.parse(self.over)


def reason(exc: BaseException) -> str:
    """The root cause of an I/O failure, in one line."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


#: Not compared for --resume: where the inputs are (they may have moved; their identities
#: are compared instead), the machine that computed them (a resumed run may be on
#: another), and what the model's identity (its files' checksums) already fixes.
_LOCATIONS = (
    "input", "model", "texts", "environment", "model_architecture", "cluster", "mean_from",
)  # fmt: skip

#: Recorded, but compared for --resume only where the command gives them again.
_IMPLIED = ("batch_size",)


def differences(recorded, config) -> str:
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


def identity(described: dict) -> dict:
    """What must be the same wherever a source is built (not where it is)."""
    return {k: v for k, v in described.items() if k not in ("input", "model", "texts")}


def run_config(source, options: Options, batch_size) -> dict:
    """The run's identity: what must match for --resume (besides the input's location).

    ``batch_size`` is the one given (None: the automatic one, recorded when the run
    starts): with a model, the batch size changes the last bits of the results.
    """
    return {
        **source.describe(),
        **asdict(options),
        "causal": source.causal,
        "conditions": [BASELINE] + [c.label for c in source.conditions],
        "ablate_layers": source.ablate_layers,
        "row_block": _config.ROW_BLOCK,
        "batch_size": batch_size,
    }
