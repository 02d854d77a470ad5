"""Files: the HDF5 store (:mod:`.store`) and the inputs it is made from (:mod:`.qkv`)."""

import tempfile
from pathlib import Path


class InputError(ValueError):
    """An input file, dataset or option that cannot be used; the message says which."""


class ReadFailed(OSError):
    """A file could not be read (an I/O error, not a bad value); the run can be resumed."""


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
    except OSError:
        raise InputError(f"{path}: output directory {parent} is not writable") from None
