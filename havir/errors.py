"""User errors: what the command line reports as one line and exit status 2.

Raise a :class:`HavirError` subclass for anything the user can fix (a bad option, a missing or
malformed file, a full disk, a folder another run is writing). Everything else is a bug and keeps
its traceback. The subclasses also derive from the built-in exception a caller would expect
(``ValueError``, ``FileNotFoundError``, ``OSError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class HavirError(Exception):
    """Base of every user error: the message is the one line the user sees."""


class InvalidInputError(HavirError, ValueError):
    """An option, setting or input file has a value the command cannot use."""


class MissingInputError(HavirError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class DiskFullError(HavirError, OSError):
    """Writing an output failed for lack of space (``ENOSPC``) or quota (``EDQUOT``)."""


class FolderBusyError(HavirError, RuntimeError):
    """Another process is writing the same output folder (its advisory lock is held)."""


class BatchTooLargeError(HavirError, MemoryError):
    """A batch did not fit in the device's memory: the message names a smaller batch size."""


class NotWritableError(HavirError, PermissionError):
    """An output folder cannot be written (permissions, a read-only file system)."""
