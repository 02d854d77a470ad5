"""``qkvmean inspect``: what a store holds (or an interrupted run has written), as lines
or JSON."""

from __future__ import annotations

import math
from pathlib import Path

from .version import blas_line, threads_line


def add_parser(sub):
    p = sub.add_parser(
        "inspect",
        help="summarise a store",
        description="Print what a store holds: source, shapes, conditions (a sweep's in one "
        "line: targets x layers x heads), the effects on the output it holds, the layers "
        "whose maps it keeps, configuration, completeness, size on disk and compression "
        "ratio.",
    )
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON (with the whole condition table)",
    )
    p.add_argument(
        "--conditions",
        action="store_true",
        help="print the condition table instead: one line per condition (label, target, "
        "layers, heads, substitution)",
    )
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    import json

    from ..files import lexists
    from ..store import open_store
    from ..store.workdir import describe as inspect_partial
    from ..store.workdir import partial_dir

    path = Path(args.store)
    if not lexists(path) and lexists(partial_dir(path)):
        info = inspect_partial(path)
    else:
        with open_store(path) as store:
            info = store.summary()
    if args.conditions:
        if not info["complete"]:
            print("\n".join(f"{c}" for c in info["conditions"] or []))
        else:
            print("\n".join(condition_lines(info["condition_table"])))
        return 0
    if args.json:
        print(json.dumps(_jsonable(info), indent=1, sort_keys=True, default=str))
    else:
        print("\n".join(_describe(info)))
    return 0


def _jsonable(value):
    """``value`` with every float JSON cannot hold (NaN, infinity) as its name."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _numbers(values) -> str:
    """``[0, 1, 2, 3, 5]`` -> ``"0-3,5"``."""
    values = sorted({int(v) for v in values})
    spans = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _spelled(value) -> str:
    return value if isinstance(value, str) else _numbers(value) or "-"


def condition_lines(table) -> list:
    """``inspect --conditions``: the condition table, a header and one aligned line per
    condition."""
    rows = [("condition", "target", "layers", "heads", "substitution")] + [
        (r["label"], r["target"] or "-", _spelled(r["layers"]), _spelled(r["heads"]),
         r["substitution"] or "-")
        for r in table
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]


def conditions_line(info) -> str:
    """The conditions in one line: listed for a plain run, summarised for a sweep (``432
    conditions: q,k,v x layers 0-11 x heads 0-11 (--sweep heads)``)."""
    table = info.get("condition_table") or []
    sweep = info.get("sweep")
    if not sweep or len(table) < 2:
        return ", ".join(info["conditions"])
    rows = table[1:]
    targets = ",".join(t for t in "qkv" if any(r["target"] == t for r in rows))
    layers = _numbers(x for r in rows for x in r["layers"])
    heads = {r["heads"] if r["heads"] == "all" else tuple(r["heads"]) for r in rows}
    if sweep == "heads":
        shape = f"x heads {_numbers(h for hs in heads for h in hs)}"
    else:
        shape = "(every head)" if heads == {"all"} else (
            f"(heads {', '.join(_spelled(list(h)) for h in sorted(heads))})"
        )  # fmt: skip
    return (
        f"{len(rows)} conditions and the baseline: {targets} x layers {layers} {shape} "
        f"(--sweep {sweep}; inspect --conditions lists them)"
    )


def _partial_conditions(names) -> str:
    names = list(names or [])
    if len(names) <= 8:
        return ", ".join(names)
    return f"{len(names)}: {', '.join(names[:3])}, ..., {names[-1]}"


def _describe(info) -> list:
    """The human lines of ``qkvmean inspect``."""
    mb = info["bytes_on_disk"] / 1e6
    if not info["complete"]:
        running = info.get("running")
        return [
            f"store        {info['store']} (not written yet: "
            + ("a run is writing it right now)" if running else "an interrupted run)"),
            f"source       {info['source']}: {info['input']}",
            f"inputs       {info['inputs_done']} of {info['inputs_total']} done; "
            + (
                "wait for it to finish" if running else "finish with the same command plus --resume"
            ),
            f"conditions   {_partial_conditions(info['conditions'])}",
            f"on disk      {mb:.2f} MB in {info['partial']}",
        ]
    cfg = info["config"]
    lengths = info["lengths"]
    heads = info["ablate_heads"]
    heads = "all" if heads == list(range(info["heads"])) else heads
    lines = [
        f"store        {info['store']} (format v{info['format_version']}, qkvmean "
        f"{info['qkvmean_version']}, created {info['created_utc']})",
        f"source       {info['source']}: {info['input']}"
        + (f" on {info['texts']}" if info.get("texts") else ""),
        f"inputs       {info['inputs_done']} of {info['inputs_total']} (complete); lengths "
        f"{lengths['min']}..{lengths['max']}, mean {lengths['mean']:.1f}",
        f"shape        {info['layers']} layers x {info['heads']} heads x {info['seq']} tokens",
        f"conditions   {conditions_line(info)}",
        f"substitution {_substitution(info, heads)}; "
        f"causal mask {'on' if info['causal'] else 'off'}; scale "
        f"{info['scale'] if info['scale'] is not None else 'default (1/sqrt(head dim))'}",
    ]
    effects = info.get("effects") or []
    if effects:
        lines.append(f"effects      {', '.join(effects)} (per condition and input, /effects)")
    elif info.get("format_version", 1) >= 2:
        lines.append("effects      none (a raw Q/K/V run has no model output)")
    else:
        lines.append("effects      none (a version 1 store)")
    means = info.get("means")
    if isinstance(means, dict):
        lines.append(
            f"means        of {', '.join(means['targets'])} at layers {means['layers']}, over "
            f"{means['inputs_at_first_position']} inputs at {means['positions']} positions, "
            f"taken from {means['taken_from']} (/means)"
        )
    if info["maps"]:
        ratio = info["compression_ratio"]
        lines.append(
            f"maps         {info['map_dtype']}, {info['compression']}: "
            f"{info['map_bytes_uncompressed'] / 1e6:.2f} MB stored in "
            f"{info['map_bytes_stored'] / 1e6:.2f} MB"
            + (f" (ratio {ratio:.2f})" if ratio else "")
            + _map_layers(info)
        )
    elif info.get("sweep") and info["config"].get("maps", True) is not False:
        lines.append("maps         none (a sweep keeps none unless --maps-layers names layers)")
    else:
        lines.append("maps         none (metrics only)")
    lines.append(f"on disk      {mb:.2f} MB")
    extra = {
        k: v
        for k, v in cfg.items()
        if k in ("batch_size", "max_tokens", "model_family", "row_block")
    }
    if extra:
        lines.append("config       " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    arch = cfg.get("model_architecture")
    if isinstance(arch, dict):
        lines.append(f"architecture {_arch_line(arch)}")
    env = cfg.get("environment")
    if isinstance(env, dict):
        lines.append(
            f"computed on  {threads_line(env)}; BLAS {blas_line(env.get('blas'))}; {env.get('cpu')}"
        )
    cluster = cfg.get("cluster")
    if isinstance(cluster, dict):  # (this machine wrote the store; the workers computed)
        lines.append(
            f"batches on   a Dask {cluster.get('kind')}: {cluster.get('workers')} workers, "
            f"{cluster.get('threads')} threads ({cluster.get('scheduler')}); the line above "
            "is the machine that wrote the store"
        )
    return lines


def _substitution(info, heads) -> str:
    """What the substitution is, and where (a sweep: each head or layer alone)."""
    from ..engine.names import substitution_phrase

    table = info.get("condition_table") or []
    spec = next((r["substitution"] for r in table[1:] if r.get("substitution")), None)
    what = substitution_phrase(spec or info["over"])
    if info.get("sweep") == "heads":
        return f"{what}, each head of each layer alone"
    if info.get("sweep") == "layers":
        return f"{what}, each layer alone"
    return f"{what}, layers {info['ablate_layers']}, heads {heads}"


def _map_layers(info) -> str:
    """The layers whose maps are kept: ``"; every layer"``, ``"; layers 1,3 only"``."""
    kept = info.get("map_layers")
    if kept is None or len(kept) == info["layers"]:
        return "; every layer"
    return f"; layers {_numbers(kept)} only (--maps-layers)"


def _arch_line(arch: dict) -> str:
    """A model's recorded architecture in one line (``inspect``)."""
    rotary = arch.get("rotary")
    positions = "learned positions"
    if isinstance(rotary, dict):  # (as recorded; str() of whatever a damaged store holds)
        scaling = rotary.get("scaling", "default")
        theta = rotary.get("theta")
        theta = f"{theta:g}" if isinstance(theta, (int, float)) else str(theta)
        factor = rotary.get("factor")
        factor = f"{factor:g}" if isinstance(factor, (int, float)) else str(factor)
        positions = f"rotary (theta {theta}, {rotary.get('dim')} dims" + (
            f", {scaling} x{factor})" if scaling != "default" else ")"
        )
    heads = f"{arch.get('heads')} heads"
    if arch.get("kv_heads") != arch.get("heads"):
        heads += f" / {arch.get('kv_heads')} KV heads"
    parts = [
        f"{arch.get('placement')}-norm {arch.get('norm')}",
        str(arch.get("activation")),
        positions,
        f"{heads} of {arch.get('head_dim')}",
    ]
    if arch.get("qk_norm"):
        parts.append("q/k norm")
    return ", ".join(parts)
