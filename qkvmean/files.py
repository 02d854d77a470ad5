"""Errors of input, and the checks on paths and files that every layer shares.

The checks every command makes on the paths it is given live here, once: an input that
must exist (:func:`existing`), an HDF5 file opened with errors worded for people
(:func:`open_hdf5`), an output that must not be an input (:func:`refuse_inputs`), an
output directory that takes new files (:func:`check_output_dir`), a new output file as a
whole (:func:`check_new_file`), a finished temporary renamed into place without replacing
a file that appeared (:func:`put_in_place`) and the temporaries a kill left
(:func:`sweep_temporaries`).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import tempfile
from pathlib import Path


class InputError(ValueError):
    """An input file, dataset or option that cannot be used; the message says which."""


class ReadFailed(OSError):
    """A file could not be read (an I/O error, not a bad value); the run can be resumed."""


def _broken_link(path: Path) -> str | None:
    """Why the symbolic link ``path`` leads nowhere, or None when it is not one."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link in a loop (it leads back to itself)"
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    return None


def existing(path, kind: str = "file") -> Path:
    """``path``, which must exist and be a ``kind`` (``"file"`` or ``"directory"``).

    The message says what is wrong: no such file, a symbolic link that leads nowhere
    (missing target, loop), or the other kind of thing.
    """
    path = Path(path)
    broken = _broken_link(path)
    if broken:
        raise InputError(f"{path}: {broken}")
    if not path.exists():
        raise InputError(f"{path}: no such {kind}")
    if kind == "file" and path.is_dir():
        raise InputError(f"{path}: is a directory, not a file")
    if kind == "file" and not path.is_file():  # a FIFO or a device would block or never end
        raise InputError(f"{path}: is not a regular file (a pipe or a device?); give a file")
    if kind == "directory" and not path.is_dir():
        raise InputError(f"{path}: is not a directory")
    return path


def lexists(path) -> bool:
    """Is there anything at ``path``, a broken symbolic link included?"""
    return os.path.lexists(path)


def open_hdf5(path, what: str = "an HDF5 file"):
    """``h5py.File(path, "r")`` with the reasons it fails said plainly.

    A file another program holds open for writing, a truncated or damaged file, and a
    file the system will not let us read each get their own one-line
    :class:`InputError`.
    """
    import h5py

    path = existing(path)
    try:
        ok = h5py.is_hdf5(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {_why(exc)}") from None
    if not ok:
        raise InputError(f"{path}: not {what}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        text = str(exc)
        if "unable to lock file" in text.lower():
            hint = (
                "another program has it open for writing: wait for it, or set "
                "HDF5_USE_FILE_LOCKING=FALSE to read it anyway"
            )
        elif "already open for write" in text:  # a live SWMR writer, or a dead one's flag
            hint = (
                "it is marked open for writing (by a program writing it now in SWMR mode, or "
                "one that died while writing): wait for the writer, or, if none is left, "
                "clear the mark with h5clear -s"
            )
        elif "truncated file" in text:
            hint = "the file is truncated (a copy or a write that did not finish?)"
        elif exc.errno:
            hint = _why(exc)
        else:
            hint = f"the file is damaged ({hdf5_reason(text)})"
        raise InputError(f"{path}: cannot open: {hint}") from None


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else hdf5_reason(str(exc))


def hdf5_reason(text: str) -> str:
    """HDF5's innermost reason, without h5py's "Unable to synchronously ..." prefix."""
    text = text.strip().splitlines()[0] if text.strip() else "unknown error"
    if "(" in text and text.endswith(")"):
        text = text[text.index("(") + 1 : -1]
    return text


def same_file(a, b) -> bool:
    """Do ``a`` and ``b`` name the same file (through symbolic or hard links)?"""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a loop: it is no file, so it is not ``b``
        return False
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def refuse_special(out, flag: str = "--out"):
    """An :class:`InputError` when the output ``out`` exists (through links too) and is
    neither a regular file nor a directory: a device (``/dev/null``), a named pipe or a
    socket is never replaced by a file, whatever ``--overwrite`` says."""
    import stat

    try:
        mode = os.stat(out).st_mode
    except (OSError, ValueError):
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = (
        "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a named pipe (FIFO)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    raise InputError(
        f"{flag} {out}: is {kind}, not a regular file; qkvmean writes only regular files "
        "and never replaces anything else, --overwrite or not: give a file name"
    )


def refuse_inputs(out, inputs, flag: str = "--out"):
    """An :class:`InputError` when the output ``out`` is one of ``inputs`` (or would
    write through a link onto one): no command writes over what it reads, whatever
    ``--overwrite`` says."""
    for path in inputs:
        if same_file(out, path):
            which = "" if str(out) == str(path) else f" ({path})"
            raise InputError(
                f"{flag} {out}: is an input of this command{which}; write the output elsewhere"
            )


def load_json(text):
    """``json.loads``, with every way it can fail a ``ValueError``: nesting too deep for
    Python's recursion limit, integers too long to convert, bytes that are not UTF-8."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise ValueError(getattr(exc, "msg", None) or str(exc)) from None


def parse_causal(value, where):
    """The ``causal`` attribute: a bool, 0/1, or a string such as "true"/"no"."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "1", "on"):
            return True
        if word in ("false", "no", "0", "off", ""):
            return False
    else:
        import numpy as np

        arr = np.asarray(value)
        if arr.size == 1 and arr.dtype.kind in "biu" and arr.item() in (0, 1):
            return bool(arr.item())
    raise InputError(f"{where}: attribute causal = {value!r} is not a boolean (use true/false)")


def check_output_dir(path: Path):
    """``path``'s directory exists and takes new files, or an :class:`InputError`.

    Tried, not asked: ``os.access`` says yes to root even on a read-only file system.
    """
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: output directory {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InputError(f"{path}: output directory {parent} is full (no space left)") from None
        raise InputError(f"{path}: output directory {parent} is not writable") from None


def sweep_temporaries(path: Path):
    """Remove the temporary files of earlier saves of ``path`` whose process is gone (a
    kill while it wrote): ``.NAME.<pid>.tmp.EXT``, and only those."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)" + re.escape(f".tmp{path.suffix}"))
    parent = path.parent if str(path.parent) else Path(".")
    for tmp in parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        match = pattern.fullmatch(tmp.name)
        if not match or not tmp.is_file() or tmp.is_symlink():
            continue
        try:
            os.kill(int(match[1]), 0)
        except ProcessLookupError:  # its writer is dead
            tmp.unlink(missing_ok=True)
        except (OSError, OverflowError, ValueError):
            continue


def check_new_file(
    path, overwrite=False, inputs=(), *, flag="-o", noun="file", existing_ok=False
) -> Path:
    """``path`` as an output we may write, or an :class:`InputError` before any work:
    never one of ``inputs`` (nor a device or FIFO), whatever ``overwrite`` says; its
    directory must be writable; not a directory; a dangling link or an existing file only
    with ``overwrite`` (an existing file also with ``existing_ok``: the caller decides, as
    a run that may be resumed does). ``noun`` names what will be written there."""
    path = Path(path)
    refuse_inputs(path, inputs, flag=flag)
    refuse_special(path, flag=flag)
    check_output_dir(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; give a file name for the {noun}")
    if path.is_symlink() and not path.exists() and not overwrite:
        raise InputError(
            f"{flag} {path}: is a symbolic link that leads nowhere ({os.readlink(path)}); "
            f"remove it, or pass --overwrite to replace the link with the {noun}"
        )
    if lexists(path) and not (overwrite or existing_ok):
        raise InputError(f"{flag} {path}: exists; pass --overwrite to replace it")
    return path


def put_in_place(tmp: Path, path: Path, overwrite: bool, *, flag="-o", noun="file"):
    """Rename the finished ``tmp`` onto ``path``; without ``overwrite`` through a hard
    link, so that a file that appeared at ``path`` meanwhile is not replaced either."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise InputError(
            f"{flag} {path}: appeared while the {noun} was written; pass --overwrite to replace it"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
        if lexists(path):  # a file system without hard links: look, then rename
            raise InputError(f"{flag} {path}: exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)
