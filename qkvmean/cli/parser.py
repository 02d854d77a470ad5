"""The ``qkvmean`` parser: argparse with one-line usage errors, a subcommand per module."""

from __future__ import annotations

import argparse

from . import capture, export, figure, inspect, render, run, view
from .common import one_line


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the usage itself is one --help away)."""

    def error(self, message):
        message = one_line(message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    figure.add_parser(sub)
    run.add_parser(sub)
    render.add_parser(sub)
    capture.add_parser(sub)
    inspect.add_parser(sub)
    export.add_parser(sub)
    view.add_parser(sub)
    return parser
