"""Prepared data: ``DATA/subjXX.h5`` and its record ``DATA/subjXX.json``, written by ``havir
prepare`` (the layout is documented in :mod:`havir.prepare`), read by every later stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from havir.errors import InvalidInputError, MissingInputError
from havir.validation import reading_hdf5

#: Version of the prepared-file layout; later stages refuse files of another version.
FORMAT_VERSION = 2

#: What each ``normalisation`` does, as recorded in ``subjXX.json``'s ``protocol.normalisation``.
NORMALISATIONS = {
    "training": "per-voxel z-score with mean and std (ddof=0) of the training trials only, all sessions pooled",
    "session": "per-voxel z-score of each session's trials with the mean and std (ddof=0) of that session's "
    "training trials only (test trials never enter the statistics)",
}


def prepared_path(data: Path, subject: int) -> Path:
    """Where ``havir prepare --out DATA`` writes ``subject``'s file."""
    return Path(data) / f"subj{subject:02d}.h5"


def prepared_record_path(data: Path, subject: int) -> Path:
    """Where ``havir prepare --out DATA`` writes ``subject``'s record (protocol, sources, versions)."""
    return Path(data) / f"subj{subject:02d}.json"


def require_prepared(data: Path, subject: int, *, with_record: bool = False) -> Path:
    """``subject``'s prepared file in ``data`` (and, ``with_record``, its record), or one line
    saying to run ``havir prepare``."""
    path = prepared_path(data, subject)
    if not path.is_file() or (with_record and not prepared_record_path(data, subject).is_file()):
        raise MissingInputError(f"no prepared data for subj{subject:02d} in {data}: run `havir prepare` first")
    return path


@dataclass(frozen=True)
class PreparedSubject:
    """One split of a prepared subject, loaded into memory.

    Attributes
    ----------
    structural : float32 array (n_trials, n_structural_voxels), z-scored betas.
    semantic : float32 array (n_trials, n_semantic_voxels), z-scored betas.
    other : float32 array (n_trials, n_other_voxels), z-scored betas of the ``within``
        (``nsdgeneral``) voxels in neither set.
    nsd_id : int64 array (n_trials,), 0-based image id of each trial.
    repetition : int8 array (n_trials,), which showing (0, 1, 2) of the image.
    session : int16 array (n_trials,), 1-based session.
    """

    structural: np.ndarray
    semantic: np.ndarray
    other: np.ndarray
    nsd_id: np.ndarray
    repetition: np.ndarray
    session: np.ndarray


def reading_prepared(path: Path):
    """Open a prepared file for reading: damage or a missing dataset is one line naming it."""
    return reading_hdf5(path, what="prepared file", fix="delete it and run `havir prepare` again")


def prepared_normalisation(path: Path) -> str:
    """Which normalisation (a key of :data:`NORMALISATIONS`) a prepared file's betas went
    through, for the records of the results made from it. Files written before the choice
    existed hold no ``method`` attribute and were all z-scored with ``"training"``."""
    with reading_prepared(path) as h5:
        return str(h5["normalisation"].attrs.get("method", "training"))


def load_split(path: Path, split: str) -> PreparedSubject:
    """Load the ``"train"`` or ``"test"`` trials of a prepared file."""
    with reading_prepared(path) as h5:
        version = h5.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise InvalidInputError(
                f"{path} is a prepared file of format {version}, this HAVIR reads format {FORMAT_VERSION}: "
                "run havir prepare again"
            )
        group = h5[split]
        loaded = PreparedSubject(**{name: group[name][()] for name in PreparedSubject.__dataclass_fields__})
    rows = len(loaded.nsd_id)
    for name in ("structural", "semantic"):
        values = getattr(loaded, name)
        if values.ndim != 2 or values.shape[0] != rows or values.dtype.kind != "f":
            raise InvalidInputError(
                f"prepared file {path}: {split}/{name} is {values.dtype} {values.shape}, expected float ({rows}, voxels) "
                "for its trials: delete it and run `havir prepare` again"
            )
    return loaded


def load_voxel_coordinates(path: Path) -> dict[str, np.ndarray]:
    """``{set: (v, 3) int array}``: the ``(x, y, z)`` index on the subject's functional grid of
    each column of a prepared file's ``structural``, ``semantic`` and ``other`` betas."""
    with reading_prepared(path) as h5:
        return {name: h5[f"voxels/{name}"][()].astype(np.int64) for name in ("structural", "semantic", "other")}
