"""``qkvmean run``: compute the maps and metrics of every input into a store (here, or
on a Dask cluster)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..engine.condition import SWEEPS
from ..engine.names import OVER, TARGETS
from ..store.schema import MAP_DTYPES
from .common import UsageError, make_source, note, resolve_device
from .options import (
    add_ablate_layers,
    add_device,
    add_heads,
    add_over,
    add_text,
    comma_separated,
    parse_maps_layers,
    positive_float,
    positive_int,
)


def add_parser(sub):
    p = sub.add_parser(
        "run",
        help="compute attention maps and metrics into an HDF5 store",
        description=(
            "Compute baseline and mean-substituted attention maps, with metrics, for every "
            "input, and write them to a store. Resumable: after an interruption, run the "
            "same command with --resume."
        ),
    )
    src = p.add_argument_group(
        "input (default: the built-in demo, all-MiniLM-L6-v2 if installed, else the "
        "synthetic model, on three built-in sentences)"
    )
    which = src.add_mutually_exclusive_group()
    which.add_argument(
        "--qkv",
        metavar="FILE.h5[:/GROUP]",
        help="raw Q/K/V: datasets q, k, v of shape (batch, [layer,] head, seq, dim), "
        "optional lengths (batch,) and attribute causal",
    )
    which.add_argument(
        "--model",
        metavar="MODEL",
        help="a Hugging Face-format directory (config.json, model.safetensors, "
        "tokenizer.json, of a family that 'qkvmean --version --verbose' lists), 'minilm' "
        "or 'synthetic'",
    )
    add_text(src, "texts for --model")
    add_ablate_layers(src, "--model: layers")
    src.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="--model: cut longer inputs to N tokens (default: the model's positions)",
    )
    p.add_argument("--out", "-o", metavar="STORE.h5", required=True, help="the store to write")
    what = p.add_argument_group("what to compute")
    what.add_argument(
        "--targets",
        type=comma_separated(str),
        default=list(TARGETS),
        help="tensors to mean-substitute, comma-separated (default: q,k,v)",
    )
    add_over(what, "(default: tokens; with --mean-from, dataset)")
    what.add_argument(
        "--mean-from",
        metavar="STORE.h5",
        default=None,
        help="--over dataset with the means recorded in another run's store (a reference "
        "set, same model or Q/K/V shapes) instead of this run's inputs' own",
    )
    add_heads(what)
    what.add_argument(
        "--sweep",
        choices=list(SWEEPS),
        default=None,
        help="--model: one condition per target and layer (layers: every head of that "
        "layer) or per target, layer and head (heads: each head alone), at --ablate-layers "
        "(default for a sweep: every layer) and --heads; metrics and effects for every "
        "condition, maps only at --maps-layers",
    )
    what.add_argument(
        "--effects",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--model: store each condition's effect on the output at /effects (the change "
        "of the final hidden state; next-token KL and cross-entropy change with a "
        "language-model head; embedding cosine for encoders) (default: --effects)",
    )
    what.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="causal mask (default: the input's causal attribute, else off)",
    )
    what.add_argument(
        "--scale",
        type=positive_float,
        default=None,
        help="logit scale (default: 1/sqrt(head dim))",
    )
    out = p.add_argument_group("store")
    out.add_argument(
        "--dtype",
        choices=list(MAP_DTYPES),
        default="float32",
        help="dtype of the stored maps (default: float32)",
    )
    out.add_argument(
        "--compression",
        default="deflate",
        metavar="{deflate[:L],gzip[:L],lzf,none}",
        help="map compression; deflate (with shuffle, level 1) is readable by "
        "every HDF5 tool (default: deflate)",
    )
    out.add_argument(
        "--maps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store the maps; --no-maps stores metrics only (default: --maps)",
    )
    out.add_argument(
        "--maps-layers",
        type=parse_maps_layers,
        default=None,
        metavar="L[,L...]|all|none",
        help="--model: the layers whose maps are stored (default: all; with --sweep: none)",
    )
    runp = p.add_argument_group("running")
    runp.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="inputs per batch (default: about 64 MB of maps per batch; with a model, at "
        "least 3 inputs per thread)",
    )
    add_device(runp)
    where = runp.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        default=None,
        help="compute the batches on this Dask cluster (pip install 'qkvmean[dask]'); the "
        "store is written here, the same as a local run's",
    )
    where.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="compute the batches on a local Dask cluster of N processes (--threads: "
        "threads per process)",
    )
    runp.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="compute threads (default: the cores this process may use; "
        "qkvmean --version --verbose shows them)",
    )
    runp.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: the same command plus --resume (with "
        "--overwrite too when the run was started with it)",
    )
    runp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store; without --resume, an interrupted run's batches "
        "are discarded too",
    )
    runp.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=cmd_run)


def _set_threads(n):
    if n is None:
        return
    import numba

    from .. import config

    config.kernel_guard()  # starts Numba's threads (loading TBB first) before resizing them
    limit = numba.config.NUMBA_NUM_THREADS
    if n > limit:
        raise UsageError(f"--threads {n} exceeds the {limit} threads available (NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)
    config.THREADS = n  # the model path's tasks and the store's compression


def _cluster(args):
    """The Dask cluster of ``--scheduler``/``--workers``, after a line saying what it is;
    one line and exit 1 when it cannot be reached."""
    from ..run.cluster import Cluster, ClusterError
    from ..run.options import RunFailed

    if args.scheduler is not None and not args.scheduler.strip():
        raise UsageError("--scheduler is empty; give the scheduler's address, tcp://HOST:PORT")
    try:
        cluster = Cluster(args.scheduler, args.workers, args.threads)
    except ClusterError as exc:
        raise RunFailed(f"{exc}; nothing was computed") from None
    info = cluster.describe()
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    note(args, f"{info['kind']}: {plural(info['workers'], 'worker')}, "
          f"{plural(info['threads'], 'thread')} ({info['scheduler']})")  # fmt: skip
    return cluster


def cmd_run(args) -> int:
    from ..run import local
    from ..run.options import Options

    over = args.over or (OVER[2] if args.mean_from is not None else OVER[0])
    options = Options(
        targets=args.targets,
        over=over,
        mean_from=args.mean_from,
        heads=args.heads,
        causal=args.causal,
        scale=args.scale,
        map_dtype=args.dtype,
        compression=args.compression,
        maps=args.maps,
        sweep=args.sweep,
        maps_layers=args.maps_layers,
        effects=args.effects,
    )
    if not args.out:
        raise UsageError("--out is empty; give a file name for the store")
    if args.workers is None:
        _set_threads(args.threads)
    device = resolve_device(args)
    source = make_source(args, options)
    cluster = None
    try:
        if args.scheduler is not None or args.workers is not None:
            cluster = _cluster(args)
        summary = local.run(
            source,
            Path(args.out),
            options,
            batch_size=args.batch_size,
            resume=args.resume,
            overwrite=args.overwrite,
            show_progress=False if args.quiet else None,
            notes=lambda line: print(f"qkvmean run: {line}", file=sys.stderr),
            device=device,
            cluster=cluster,
        )
    finally:
        source.close()
        if cluster is not None:
            cluster.close()
    if not args.quiet:
        import numba

        from .. import config

        line = summary.line()
        if summary.computed and cluster is not None:
            line += " on the cluster"
        elif summary.computed and device == "cpu":
            config.kernel_guard()  # the layer starts with the first parallel kernel: maybe none ran
            line += f" on {config.compute_threads()} threads ({numba.threading_layer()} layer)"
        elif summary.computed:
            line += f" on {device}"
        print(line)
    return 0
