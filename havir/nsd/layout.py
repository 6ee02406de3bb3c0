"""Where each file of the NSD release lives under ``NSD_ROOT``.

The Natural Scenes Dataset is distributed as one bucket (``natural-scenes-dataset``); users mirror
the parts they need into one folder. Every reader in HAVIR asks this module for a path, so the
layout is written down once and a missing file is reported with its full expected location.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from havir.errors import InvalidInputError, MissingInputError

#: Atlases HAVIR reads, in ``nsddata/ppdata/subjXX/func1pt8mm/roi/<atlas>.nii.gz``.
ATLASES = (
    "nsdgeneral",
    "prf-visualrois",
    "prf-eccrois",
    "streams",
    "floc-faces",
    "floc-bodies",
    "floc-places",
    "floc-words",
)

#: Label names per atlas (values 1..n in this order), used when the ``.ctab`` file is absent.
FALLBACK_LABELS: dict[str, tuple[str, ...]] = {
    "nsdgeneral": ("nsdgeneral",),
    "prf-visualrois": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"),
    "prf-eccrois": ("ecc05", "ecc10", "ecc20", "ecc40", "ecc40p"),
    "streams": ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"),
    "floc-faces": ("OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"),
    "floc-bodies": ("EBA", "FBA-1", "FBA-2", "mTL-bodies"),
    "floc-places": ("OPA", "PPA", "RSC"),
    "floc-words": ("OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"),
}

#: The GLM whose single-trial betas the anchors (Brain-Diffuser, MindEye) use.
BETAS_VERSION = "betas_fithrf_GLMdenoise_RR"
RESOLUTION = "func1pt8mm"
SUBJECTS = range(1, 9)

_SESSION_FILE = re.compile(r"betas_session(\d{2})\.(nii\.gz|hdf5)$")


def check_subject(subject: int) -> int:
    """Return ``subject`` if it is an NSD subject number (1..8), else raise ``ValueError``."""
    if not isinstance(subject, int) or subject not in SUBJECTS:
        raise InvalidInputError(f"subject must be one of 1..8 (NSD has eight participants), got {subject!r}")
    return subject


@dataclass(frozen=True)
class NSDLayout:
    """Paths of the NSD release under one root folder.

    Parameters
    ----------
    root : path of the folder that mirrors the ``natural-scenes-dataset`` bucket (it holds
        ``nsddata/``, ``nsddata_betas/`` and ``nsddata_stimuli/``).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_expdesign.mat"

    @property
    def stim_info(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"

    @property
    def annotations_dir(self) -> Path:
        """Where NSD's own access code looks for COCO's caption files."""
        return self.root / "nsddata_stimuli/stimuli/nsd/annotations"

    def betas_dir(self, subject: int) -> Path:
        return self.root / f"nsddata_betas/ppdata/subj{subject:02d}/{RESOLUTION}/{BETAS_VERSION}"

    def betas_file(self, subject: int, session: int, fmt: str) -> Path:
        """``fmt`` is ``"nifti"`` (``.nii.gz``, (X, Y, Z, trials)) or ``"hdf5"`` (``(trials, Z, Y, X)``)."""
        suffix = {"nifti": "nii.gz", "hdf5": "hdf5"}[fmt]
        return self.betas_dir(subject) / f"betas_session{session:02d}.{suffix}"

    def roi_file(self, subject: int, atlas: str) -> Path:
        return self.root / f"nsddata/ppdata/subj{subject:02d}/{RESOLUTION}/roi/{atlas}.nii.gz"

    def mean_volume(self, subject: int) -> Path:
        """The subject's mean functional volume (a background for figures; optional)."""
        return self.root / f"nsddata/ppdata/subj{subject:02d}/{RESOLUTION}/mean.nii.gz"

    def ctab_file(self, atlas: str) -> Path:
        return self.root / f"nsddata/freesurfer/fsaverage/label/{atlas}.mgz.ctab"

    def check_root(self) -> None:
        """Raise ``FileNotFoundError`` unless the root folder exists."""
        if not self.root.is_dir():
            raise MissingInputError(
                f"NSD root {self.root} does not exist: pass the folder that holds nsddata/, "
                "nsddata_betas/ and nsddata_stimuli/ (a mirror of the natural-scenes-dataset bucket)"
            )

    def sessions_on_disk(self, subject: int) -> dict[int, dict[str, Path]]:
        """Map each session number found for ``subject`` to its betas files by format.

        Raises ``FileNotFoundError`` when the subject has no betas at all.
        """
        folder = self.betas_dir(subject)
        found: dict[int, dict[str, Path]] = {}
        if folder.is_dir():
            for path in folder.iterdir():
                match = _SESSION_FILE.match(path.name)
                if match:
                    fmt = "nifti" if match.group(2) == "nii.gz" else "hdf5"
                    found.setdefault(int(match.group(1)), {})[fmt] = path
        if not found:
            raise MissingInputError(
                f"no betas for subj{subject:02d}: expected betas_sessionNN.nii.gz or .hdf5 in {folder} "
                "(download nsddata_betas for this subject, or pick a subject you have)"
            )
        return dict(sorted(found.items()))


def require_file(path: Path, what: str, hint: str) -> Path:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` naming it and ``hint``."""
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path} ({hint})")
    return path
