"""How every command writes, so that a kill, a full disk or a second run never corrupts an output.

The protocol, in four parts:

* **One rename commits.** An output is assembled under a temporary name beside it
  (``.partial-<pid>-<name>``, a file or a folder), flushed to the disk (``fsync`` of the file, then
  of its folder) and renamed over the old one (:func:`atomic_path`). A state made of several files
  (a training checkpoint) is one folder committed by one rename. So every crash point leaves
  either the old or the new output, never a mix.
* **Stale temporaries are removed.** A temporary whose process is dead is deleted the next time a
  command writes the folder (:func:`remove_stale_temporaries`); a folder swap cut between its two
  renames is finished or undone. A temporary is never reused: only the resumable ``.partial``
  files of ``prepare`` and ``features`` are, after their own checks.
* **One writer per folder.** :func:`output_folder` takes an advisory lock (``flock``) on the
  folder; a second command writing there stops at once with :class:`~havir.errors.FolderBusyError`.
* **A full disk is one line.** ``ENOSPC``/``EDQUOT`` become :class:`~havir.errors.DiskFullError`
  naming the folder and the space free; HDF5 files are written through :func:`open_h5`, because
  HDF5 crashes the interpreter (segmentation fault) when it closes a file it failed to write.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.filesize import decimal

from havir.errors import DiskFullError, FolderBusyError, NotWritableError

#: Prefix of a temporary output (file or folder): ``.partial-<pid>-<final name>``.
TEMPORARY_PREFIX = ".partial-"
#: Prefix of an old folder while a new one takes its place: ``.replaced-<pid>-<name>``.
REPLACED_PREFIX = ".replaced-"
#: The advisory lock file inside an output folder (removed when the writer ends); a lock of one
#: subject's files adds ``-subjXX``.
LOCK_NAME = ".havir-lock"
_STALE = re.compile(rf"^({re.escape(TEMPORARY_PREFIX)}|{re.escape(REPLACED_PREFIX)})(\d+)-(.+)$")
# How libraries that bypass Python's OSError (HDF5, safetensors' Rust writer) report a full disk.
_FULL_DISK_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


def ensure_output_dir(path: Path) -> Path:
    """Create the folder ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".havir-write-test-"):
            pass
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path) from err
        raise NotWritableError(
            f"output folder {path} is not writable ({err.strerror or err}): choose another --out"
        ) from err
    return path


# --- A full disk -------------------------------------------------------------------------------


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` (from Python, HDF5 or safetensors) means no space or quota was left."""
    if isinstance(err, DiskFullError):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(err) for text in _FULL_DISK_TEXT)


def _free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds (or will hold) ``folder``."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    return shutil.disk_usage(existing).free


def disk_full(folder: Path, needed: int | None = None) -> DiskFullError:
    """The one-line error for a full disk under ``folder`` (``needed``: bytes, where known)."""
    folder = Path(folder)
    need = f", about {decimal(needed)} needed" if needed else ""
    return DiskFullError(
        f"the disk holding {folder} is full ({decimal(_free_bytes(folder))} free{need}): "
        "free some space or write to another folder"
    )


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse to start when ``folder``'s disk has less than ``needed`` bytes free.

    Checked before a long write, so a full disk stops the command at once instead of after hours.
    """
    if _free_bytes(Path(folder)) < needed:
        raise disk_full(folder, needed)


@contextmanager
def reporting_full_disk(folder: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full-disk error raised inside the block into :class:`DiskFullError` naming ``folder``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full(folder, needed) from err
        raise


# --- Committing by one rename ------------------------------------------------------------------


def temporary_name(path: Path) -> Path:
    """Where ``path`` is assembled: ``.partial-<pid>-<name>`` beside it, keeping its suffixes
    (writers that choose a format by suffix, nibabel and matplotlib, write the right one)."""
    path = Path(path)
    return path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder and every file in it) to the disk."""
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                _fsync(child)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit(temporary: Path, path: Path) -> None:
    """Make the finished ``temporary`` (a file or a folder) become ``path`` by one rename.

    A folder cannot be renamed over another: the old one steps aside as ``.replaced-<pid>-<name>``
    first, and :func:`remove_stale_temporaries` finishes the swap if a crash cuts it in two.
    """
    temporary, path = Path(temporary), Path(path)
    _fsync(temporary)
    if temporary.is_dir() and path.exists():
        replaced = path.with_name(f"{REPLACED_PREFIX}{os.getpid()}-{path.name}")
        os.replace(path, replaced)
        os.replace(temporary, path)
        _remove(replaced)
    else:
        os.replace(temporary, path)
    _fsync(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; it becomes ``path`` only if the block succeeds.

    The block may write a file or a whole folder there (see :func:`commit`); on failure the
    temporary is removed, and a full disk is raised as :class:`DiskFullError`.
    """
    path = Path(path)
    temporary = temporary_name(path)
    _remove(temporary)
    try:
        with reporting_full_disk(path.parent):
            yield temporary
            commit(temporary, path)
    finally:
        _remove(temporary)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Delete temporaries left in ``folder`` (and, ``recursive``, below) by processes that are
    dead, or by this one before it took the folder's lock; returns them.

    A ``.replaced-`` folder means a folder swap was cut between its renames: when the new folder
    is in place the old one is deleted, otherwise the old one is put back.
    """
    removed = []
    for parent, folders, files in os.walk(folder):
        for name in files:
            if name.startswith(LOCK_NAME) and _remove_if_unlocked(Path(parent) / name):
                removed.append(Path(parent) / name)
        for name in folders + files:
            match = _STALE.match(name)
            pid = int(match.group(2)) if match else 0
            if match is None or (pid != os.getpid() and _alive(pid)):  # our own are stale: we hold the lock
                continue
            stale, final = Path(parent) / name, Path(parent) / match.group(3)
            if match.group(1) == REPLACED_PREFIX and not final.exists():
                os.replace(stale, final)
            else:
                _remove(stale)
                removed.append(stale)
        folders[:] = [name for name in folders if recursive and (Path(parent) / name).exists()]
    return removed


def _remove_if_unlocked(lock_path: Path) -> bool:
    """Delete a lock file that no process holds (its holder was killed); True if deleted."""
    if lock_path.resolve() in _held:
        return False
    try:
        descriptor = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:  # a process that opened it before this unlink sees another inode in place and retries
        lock_path.unlink(missing_ok=True)
        return True
    finally:
        os.close(descriptor)


# --- One writer per folder ---------------------------------------------------------------------

_held: dict[Path, list] = {}  # lock file -> [its descriptor, depth]: re-entrant within a process


@contextmanager
def folder_lock(folder: Path, scope: str | None = None) -> Iterator[None]:
    """Hold the advisory lock of ``folder`` (which must exist) for the block; with ``scope``
    (``"subj01"``), only the lock of that part of the folder's files.

    Another process holding it raises :class:`FolderBusyError` at once. The lock file holds the
    holder's pid (for the message) and is deleted on release.
    """
    lock_path = Path(folder).resolve() / (f"{LOCK_NAME}-{scope}" if scope else LOCK_NAME)
    what = f"{scope}'s files in {folder} are" if scope else f"{folder} is"
    key = lock_path
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise FolderBusyError(
                f"{what} being written by another havir process (pid {holder}): wait for it to "
                "finish or choose another output folder"
            ) from None
        try:  # the holder before us may have deleted the file we locked: lock the one in place
            if os.stat(lock_path).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
    except OSError:  # the pid is only for the message; a full disk is reported by the writes
        pass
    _held[key] = [descriptor, 1]
    try:
        yield
    finally:
        del _held[key]
        lock_path.unlink(missing_ok=True)
        os.close(descriptor)


@contextmanager
def output_folder(folder: Path, *, lock: bool = True, scope: str | None = None, recursive: bool = False) -> Iterator[Path]:
    """The folder one command writes: created, locked, cleared of stale temporaries (in its
    subfolders too with ``recursive``, for commands that write a tree: ``synth-nsd``, ``demo``).
    ``scope`` locks only one subject's files (``"subj01"``): ``prepare`` and ``features`` of
    several subjects may share a data folder.

    A full disk inside the block is raised as :class:`DiskFullError` naming ``folder``. A folder
    this call created and the command left empty (it failed early) is removed, so a failed
    command leaves nothing behind. ``lock=False`` on the processes of a multi-process launch
    other than the main one (the main one locks and cleans for all).
    """
    folder = Path(folder)
    created = not folder.exists()
    ensure_output_dir(folder)
    try:
        if not lock:
            with reporting_full_disk(folder):
                yield folder
            return
        with folder_lock(folder, scope):
            remove_stale_temporaries(folder, recursive=recursive)
            with reporting_full_disk(folder):
                yield folder
    finally:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# --- HDF5 ---------------------------------------------------------------------------------------


class _SpaceGuardedFile(io.FileIO):
    """A file for h5py's ``fileobj`` driver that survives a full disk.

    A write that fails for lack of space is recorded and reported to HDF5 as done: HDF5 must not
    see it fail, because a failed write inside HDF5 (a chunk written when a dataset object is
    freed, the flush when a file closes) leaves it in a state where it later crashes the
    interpreter (segmentation fault; seen with HDF5 2.0 and h5py 3.16). The file is worthless
    from then on: :func:`flush_h5` and the end of :func:`open_h5` raise :class:`DiskFullError`.
    """

    error: OSError | None = None

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self._write(data)
            except OSError as err:
                if not is_disk_full(err):
                    raise
                self.error = err
        return memoryview(data).nbytes

    def _write(self, data) -> int:
        return super().write(data)


_guards: dict[int, tuple[_SpaceGuardedFile, Path, int | None]] = {}  # HDF5 file id -> its guard, folder, need


@contextmanager
def open_h5(path: Path, mode: str = "a", *, needed: int | None = None, **kwargs) -> Iterator[Any]:
    """``h5py.File(path, mode)`` for writing (``"w"`` or ``"a"``), turning a full disk into
    :class:`DiskFullError` (``needed``: bytes, for the message) instead of a crash."""
    import h5py

    if mode not in ("w", "a"):
        raise ValueError(f"open_h5 writes; use h5py.File to read (mode {mode!r})")
    path = Path(path)
    existing = mode == "a" and path.is_file() and path.stat().st_size > 0
    raw = _SpaceGuardedFile(path, "r+" if existing else "w+")
    with raw, reporting_full_disk(path.parent, needed):
        try:
            with h5py.File(raw, "r+" if existing else "w", **kwargs) as h5:
                key = h5.id.id
                _guards[key] = (raw, path.parent, needed)
                try:
                    yield h5
                finally:
                    del _guards[key]
        finally:
            if raw.error is not None:
                raise disk_full(path.parent, needed) from raw.error


def flush_h5(h5) -> None:
    """Flush a file opened by :func:`open_h5` to the OS; :class:`DiskFullError` if any of its
    writes so far failed for lack of space (call it before recording work as done)."""
    h5.flush()
    raw, folder, needed = _guards[h5.id.id]
    if raw.error is not None:
        raise disk_full(folder, needed) from raw.error


#: The model stack whose versions every model artefact records (features cache, run, reconstructions).
MODEL_STACK = ("torch", "diffusers", "transformers", "numpy")


def package_versions(*packages: str) -> dict[str, str]:
    """HAVIR's, Python's and ``packages``' versions, for the record every result file keeps."""
    from havir import __version__

    return {"havir": __version__, "python": platform.python_version()} | {
        package: metadata.version(package) for package in packages
    }
