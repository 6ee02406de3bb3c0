"""A subject's prepared data joined with its features cache, as ``havir train`` and ``havir
reconstruct`` read them: voxels and targets of the same images, row by row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from havir.artifacts.features_cache import FEATURES_FORMAT, reading_features, require_features
from havir.artifacts.prepared import load_split, require_prepared
from havir.errors import InvalidInputError
from havir.nsd.layout import check_subject
from havir.targets import TARGET_NAMES

#: The fixes named when the inputs hold NaN or infinite values.
REPREPARE = "run `havir prepare` again (check the betas for NaN)"
RECOMPUTE = "run `havir features` again (with --dtype fp32 if fp16 overflowed)"


@dataclass
class Split:
    """Inputs and targets of one part of the data (rows are samples).

    structural, semantic : float32 (n, voxels); vae_latents (n, 4, s, s), clip_image (n, 257, D),
    clip_text (n, 77, D) float32; nsd_id (n,); other : float32 (n, voxels), the nsdgeneral voxels
    in neither set (only the ridge baseline reads them).
    """

    structural: np.ndarray
    semantic: np.ndarray
    vae_latents: np.ndarray
    clip_image: np.ndarray
    clip_text: np.ndarray
    nsd_id: np.ndarray
    other: np.ndarray | None = None

    def targets(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in TARGET_NAMES}


def averaged(betas: np.ndarray, nsd_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``betas`` averaged per image (n_images, v) float32, the images' ids ascending)."""
    images, inverse = np.unique(nsd_id, return_inverse=True)
    sums = np.zeros((len(images), betas.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, betas)
    return (sums / np.bincount(inverse)[:, None]).astype(np.float32), images


def checked_inputs(data: Path, subject: int) -> tuple[Path, Path, np.ndarray]:
    """The subject's prepared file, its features cache and the cache's image ids, checked."""
    check_subject(subject)
    prepared = require_prepared(data, subject)
    cache = require_features(data, subject)
    with reading_features(cache) as h5:
        if h5.attrs.get("subject") != subject or h5.attrs.get("format_version") != FEATURES_FORMAT:
            raise InvalidInputError(
                f"{cache} holds features of subject {h5.attrs.get('subject')} (format {h5.attrs.get('format_version')}), "
                f"not of subj{subject:02d} in format {FEATURES_FORMAT}: run `havir features` again"
            )
        nsd_id = h5["nsd_id"][()]
        for name in TARGET_NAMES:
            if h5[name].ndim < 3 or h5[name].shape[0] != len(nsd_id) or h5[name].dtype.kind != "f":
                raise InvalidInputError(
                    f"features cache {cache}: {name} is {h5[name].dtype} {h5[name].shape}, expected float rows for its "
                    f"{len(nsd_id)} images: delete it and run `havir features` again"
                )
        return prepared, cache, nsd_id


def check_finite(path: Path, arrays: dict[str, np.ndarray], fix: str) -> None:
    """Refuse NaN or infinite inputs before training: they would surface epochs later as a
    non-finite loss, which looks like a learning rate too high."""
    for name, values in arrays.items():
        finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if not finite.all():
            raise InvalidInputError(
                f"{path} holds NaN or infinite values in {name} ({int((~finite).sum())} of {len(values)} rows): {fix}"
            )


def check_covered(cache: Path, feature_ids: np.ndarray, nsd_ids: np.ndarray) -> None:
    missing = np.setdiff1d(nsd_ids, feature_ids)
    if missing.size:
        raise InvalidInputError(f"{cache} lacks features of {missing.size} images of the prepared data: run `havir features` again")


def averaged_split(structural, semantic, nsd_id, features: dict[str, np.ndarray], feature_ids, other=None) -> Split:
    """Repetition averages of each image, with its targets (``features`` rows by ``feature_ids``)."""
    averaged_structural, ids = averaged(structural, nsd_id)
    rows = np.searchsorted(feature_ids, ids)
    return Split(averaged_structural, averaged(semantic, nsd_id)[0], *(features[name][rows] for name in TARGET_NAMES), ids,
                 other=None if other is None else averaged(other, nsd_id)[0])


def load_test_data(data: Path, subject: int) -> Split:
    """The test images of a subject (repetition averages) with their targets, reading only their rows."""
    prepared, cache, feature_ids = checked_inputs(data, subject)
    test = load_split(prepared, "test")
    check_covered(cache, feature_ids, test.nsd_id)
    ids = np.unique(test.nsd_id)
    with reading_features(cache) as h5:
        rows = np.searchsorted(feature_ids, ids).tolist()  # ascending, as h5py's fancy reads require
        features = {name: h5[name][rows].astype(np.float32) for name in TARGET_NAMES}
    check_finite(prepared, {f"test/{name}": getattr(test, name) for name in ("structural", "semantic", "other")}, REPREPARE)
    check_finite(cache, features, RECOMPUTE)
    return averaged_split(test.structural, test.semantic, test.nsd_id, features, ids, test.other)


def ridge_voxels(part: Split, inputs: str) -> np.ndarray:
    """The ridge's input (n, v): HAVIR's two sets (``"sets"``), or with the other nsdgeneral
    voxels too (``"nsdgeneral"``: all of them, as Brain-Diffuser reads them)."""
    sets = [part.structural, part.semantic] + ([part.other] if inputs == "nsdgeneral" else [])
    return np.concatenate(sets, axis=1)
