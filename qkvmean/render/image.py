"""A figure's image file: its format (from the extension), its size, and a write that
leaves the whole file or none (both figures, ``render`` and ``figure``)."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from ..files import InputError, check_new_file, put_in_place, sweep_temporaries

FORMATS = (".png", ".pdf", ".svg")
#: Largest raster image (pixels).
MAX_PIXELS = 200e6


def check_output(path, overwrite=False, inputs=()) -> Path:
    """Refuse an output we cannot or should not write, before any work: never one of
    ``inputs`` (the store being drawn), whatever ``overwrite`` says."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InputError(
            f"{path}: unknown format {path.suffix or '(none)'!r}; use .png, .pdf or .svg"
        )
    return check_new_file(path, overwrite, inputs, flag="-o", noun="image")


def save(fig: Figure, path, *, dpi=150, overwrite=True):
    """Write ``fig`` (format from the extension) whole or not at all: a temporary file put
    in place at the end (without ``overwrite`` never over a file that appeared since)."""
    path = Path(path)
    width, height = fig.get_size_inches()
    if path.suffix.lower() == ".png" and width * height * dpi * dpi > MAX_PIXELS:
        raise InputError(
            f"{path}: {width * dpi:.0f} x {height * dpi:.0f} pixels is too large an image; "
            "lower --dpi, draw fewer inputs, or write .pdf/.svg"
        )
    sweep_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower())
        put_in_place(tmp, path, overwrite, flag="-o", noun="image")
    finally:
        tmp.unlink(missing_ok=True)
    return path
