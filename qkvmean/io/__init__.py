"""Files: the HDF5 store (:mod:`.store`) and the inputs it is made from (:mod:`.qkv`)."""


class InputError(ValueError):
    """An input file, dataset or option that cannot be used; the message says which."""


class ReadFailed(OSError):
    """A file could not be read (an I/O error, not a bad value); the run can be resumed."""
