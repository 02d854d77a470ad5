"""The ``qkvmean`` command line.

Exit status: 0 on success, 1 when the job failed while running, 2 for bad input (bad
options, unreadable or invalid files): one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


class UsageError(Exception):
    """Bad input from the user: reported on one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkvmean",
        description=(
            "Attention weights under mean substitution of Query, Key or Value, "
            "stored in HDF5 and drawn as a figure."
        ),
    )
    parser.add_argument("--version", action="version", version=f"qkvmean {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"qkvmean {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qkvmean {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
