"""Writing outputs so that an interrupted command never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from importlib import metadata
from typing import Any


def ensure_output_dir(path: Path) -> Path:
    """Create the folder ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".havir-write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"output folder {path} is not writable ({err.strerror or err}): choose another --out"
        ) from err
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps ``path``'s suffixes, so writers that choose a format by suffix
    (nibabel, matplotlib) write the right one.
    """
    path = Path(path)
    temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def package_versions(*packages: str) -> dict[str, str]:
    """HAVIR's, Python's and ``packages``' versions, for the record every result file keeps."""
    from havir import __version__

    return {"havir": __version__, "python": platform.python_version()} | {
        package: metadata.version(package) for package in packages
    }
