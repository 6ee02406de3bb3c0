"""NSD's ROI atlases: integer label volumes on each subject's functional grid, and label names.

Each atlas is a volume ``nsddata/ppdata/subjXX/func1pt8mm/roi/<atlas>.nii.gz`` whose voxels hold a
label value (``<= 0``: unlabelled or outside the brain). Names come from the FreeSurfer colour
table ``nsddata/freesurfer/fsaverage/label/<atlas>.mgz.ctab`` (``value name [r g b a]`` per line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from havir.errors import InvalidInputError
from havir.nsd.layout import ATLASES, FALLBACK_LABELS, NSDLayout, require_file


@dataclass(frozen=True)
class Atlas:
    """One ROI atlas of one subject.

    Attributes
    ----------
    name : atlas name, e.g. ``"prf-visualrois"``.
    labels : int16 array of shape (X, Y, Z), the label value of each voxel.
    affine : float array of shape (4, 4), voxel to scanner coordinates (mm).
    names : mapping from label name to label value, e.g. ``{"V1v": 1, ...}``.
    names_from : where ``names`` came from (the ``.ctab`` file, or HAVIR's built-in list).
    """

    name: str
    labels: np.ndarray
    affine: np.ndarray
    names: dict[str, int]
    names_from: str = "HAVIR's built-in label list"

    def voxels(self, label: str) -> np.ndarray:
        """Boolean (X, Y, Z) mask of the voxels that carry ``label``."""
        if label not in self.names:
            raise InvalidInputError(
                f"atlas {self.name} has no label {label!r}; its labels are {', '.join(self.names) or 'none'} "
                f"(from {self.names_from}): fix the label in the mask definition, or re-download a damaged colour table"
            )
        return self.labels == self.names[label]


def read_ctab(path: Path) -> dict[str, int]:
    """Read a FreeSurfer colour table into ``{name: value}``, skipping value 0 (unknown)."""
    names: dict[str, int] = {}
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"colour table {path} is not text ({err.reason} at byte {err.start}): re-download it") from err
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            value = int(fields[0])
        except ValueError as err:
            raise InvalidInputError(f"colour table {path}: line {line!r} does not start with a label value") from err
        if value > 0 and len(fields) > 1:
            names[fields[1]] = value
    return names


def label_names(layout: NSDLayout, atlas: str) -> dict[str, int]:
    """Label names of ``atlas`` from its ``.ctab`` when present, else the documented fallback."""
    ctab = layout.ctab_file(atlas)
    if ctab.is_file():
        return read_ctab(ctab)
    return {name: value for value, name in enumerate(FALLBACK_LABELS[atlas], start=1)}


def read_volume(path: Path, what: str) -> nib.Nifti1Image:
    """Load a NIfTI header and check the file is readable; ``what`` names it in errors."""
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib errors...
        raise InvalidInputError(f"cannot read {what} {path}: {err}; re-download the file") from err


def read_atlas(layout: NSDLayout, subject: int, atlas: str) -> Atlas:
    """Read one ROI atlas of ``subject``."""
    if atlas not in ATLASES:
        raise InvalidInputError(f"unknown atlas {atlas!r}; HAVIR reads {', '.join(ATLASES)}")
    path = require_file(
        layout.roi_file(subject, atlas),
        f"ROI atlas {atlas} of subj{subject:02d}",
        "download nsddata/ppdata/subjXX/func1pt8mm/roi/ from the NSD release",
    )
    image = read_volume(path, f"ROI atlas {atlas}")
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as err:
        raise InvalidInputError(f"cannot read ROI atlas {path}: {err}; re-download the file") from err
    if data.ndim != 3:
        raise InvalidInputError(f"ROI atlas {path} has shape {data.shape}; expected a 3-D label volume")
    # Labels are small integers stored as float in some releases; round, never truncate.
    labels = np.rint(data).astype(np.int16)
    ctab = layout.ctab_file(atlas)
    return Atlas(name=atlas, labels=labels, affine=image.affine, names=label_names(layout, atlas),
                 **({"names_from": str(ctab)} if ctab.is_file() else {}))
