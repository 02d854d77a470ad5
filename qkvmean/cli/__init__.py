"""The ``qkvmean`` command line: :func:`main`, the entry point.

Exit status: 0 on success, 1 when the job failed while running, 2 for bad input (bad
options, unreadable or invalid files): one line on stderr, no traceback.

One module per command (``run``, ``capture``, ``inspect``, ``export``, ``view``,
``render``, ``figure``; ``version`` for ``--version --verbose``), the parser in
``parser``, the option types and groups they share in ``options``, and what they share
while running in ``common``. A command imports what it needs when it runs, so that
``qkvmean --help`` starts fast.
"""

from __future__ import annotations

import os
import sys

from .._version import __version__
from .common import UsageError, one_line
from .parser import build_parser
from .version import machine_lines


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
            print("\n".join(machine_lines()))
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from ..files import InputError
    from ..run.options import RunFailed

    try:
        return args.func(args)
    except (UsageError, InputError) as exc:
        print(f"qkvmean {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader (| head) went away: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        hint = "; continue with the same command plus --resume" if args.command == "run" else ""
        print(f"qkvmean {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (RunFailed, OSError) as exc:
        print(f"qkvmean {args.command}: failed: {one_line(exc)}", file=sys.stderr)
        return 1


__all__ = ["UsageError", "build_parser", "main"]
