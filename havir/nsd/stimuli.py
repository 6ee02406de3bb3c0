"""NSD stimuli: the 73k images (``imgBrick``), their stimulus table, and their COCO captions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from havir.errors import InvalidInputError
from havir.nsd.layout import require_file

#: Images read from ``imgBrick`` per HDF5 call (425x425x3 uint8: about 0.5 MB each).
STIMULUS_BLOCK = 64


def read_stim_info(path: Path) -> pd.DataFrame:
    """Read ``nsd_stim_info_merged.csv``, indexed by the 0-based ``nsdId``."""
    require_file(path, "NSD stimulus table", "download nsddata/experiments/nsd/ from the NSD release")
    try:
        table = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as err:  # bad UTF-8, empty file, ragged rows
        raise InvalidInputError(f"stimulus table {path} is not a readable CSV ({err}): re-download it from the NSD release") from err
    missing = {"nsdId", "cocoId", "cocoSplit"} - set(table.columns)
    if missing:
        raise InvalidInputError(f"stimulus table {path} lacks the columns {', '.join(sorted(missing))}")
    return table.set_index("nsdId", drop=False)


def _checked_brick(h5: h5py.File, path: Path) -> h5py.Dataset:
    """``imgBrick``, refused unless it is uint8 images (n, side, side, 3) as in the release."""
    brick = h5["imgBrick"]
    if brick.ndim != 4 or brick.shape[1] != brick.shape[2] or brick.shape[3] != 3 or brick.dtype != np.uint8:
        raise InvalidInputError(
            f"{path}: imgBrick is {brick.dtype} {brick.shape}, expected uint8 (n, side, side, 3) RGB images: "
            "re-download nsd_stimuli.hdf5"
        )
    return brick


def iter_stimuli(path: Path, nsd_ids: np.ndarray, block: int = STIMULUS_BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(nsd_ids, images)`` blocks from ``imgBrick`` in ascending ``nsdId`` order.

    Parameters
    ----------
    path : ``nsd_stimuli.hdf5``.
    nsd_ids : 0-based image ids; read sorted and without repeats (HDF5 point selections must
        increase), ``block`` at a time so memory stays bounded whatever the number asked for.

    Yields
    ------
    ids : int64 array of shape (n,), ascending.
    images : uint8 array of shape (n, side, side, 3).
    """
    require_file(path, "NSD stimuli", "download nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5 (37 GiB)")
    ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    try:
        with h5py.File(path, "r") as h5:
            brick = _checked_brick(h5, path)
            if ids.size and ids[-1] >= brick.shape[0]:
                raise InvalidInputError(f"{path} holds {brick.shape[0]} images; image id {ids[-1]} asked for")
            for start in range(0, ids.size, block):
                chunk = ids[start : start + block]
                yield chunk, brick[chunk]
    except (OSError, KeyError) as err:
        raise InvalidInputError(f"cannot read stimuli from {path} ({err}); re-download nsd_stimuli.hdf5") from err


def stimulus_side(path: Path) -> int:
    """Side length in pixels of the square stimuli (425 in the release)."""
    require_file(path, "NSD stimuli", "download nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5 (37 GiB)")
    try:
        with h5py.File(path, "r") as h5:
            return int(_checked_brick(h5, path).shape[1])
    except (OSError, KeyError) as err:
        raise InvalidInputError(f"cannot read stimuli from {path} ({err}); re-download nsd_stimuli.hdf5") from err


def read_captions(
    stim_info: pd.DataFrame, nsd_ids: np.ndarray, annotations_dir: Path
) -> dict[int, list[str]]:
    """COCO captions of each image, joined through the stimulus table's ``cocoId`` and ``cocoSplit``.

    Parameters
    ----------
    stim_info : the stimulus table from :func:`read_stim_info`.
    nsd_ids : 0-based image ids whose captions are wanted.
    annotations_dir : folder with COCO's ``captions_train2017.json`` and ``captions_val2017.json``.

    Returns
    -------
    ``{nsdId: [caption, ...]}`` (COCO has five to seven captions per image).
    """
    ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    absent = np.setdiff1d(ids, stim_info.index.to_numpy())
    if absent.size:
        raise InvalidInputError(
            f"the stimulus table lacks rows for {absent.size} images the subject saw (nsdId {absent[0]} first): "
            "re-download nsd_stim_info_merged.csv from the NSD release"
        )
    rows = stim_info.loc[ids]
    captions: dict[int, list[str]] = {}
    for split, group in rows.groupby("cocoSplit"):
        path = require_file(
            Path(annotations_dir) / f"captions_{split}.json",
            "COCO captions",
            "copy COCO 2017's annotations there, or pass --captions-dir",
        )
        try:
            annotations = json.loads(path.read_text())["annotations"]
        except (ValueError, KeyError, TypeError) as err:
            raise InvalidInputError(f"COCO caption file {path} is not valid COCO JSON ({err})") from err
        by_coco: dict[int, list[str]] = {}
        for entry in annotations:
            if not (isinstance(entry, dict) and isinstance(entry.get("caption"), str) and isinstance(entry.get("image_id"), int)):
                raise InvalidInputError(
                    f"COCO caption file {path} has an annotation without an integer image_id and a caption text "
                    f"({str(entry)[:80]}): use COCO 2017's captions_{split}.json"
                )
            by_coco.setdefault(entry["image_id"], []).append(entry["caption"].strip())
        for nsd_id, coco_id in zip(group["nsdId"].tolist(), group["cocoId"].tolist()):
            if int(coco_id) not in by_coco:
                raise InvalidInputError(f"{path} has no caption for COCO image {coco_id} (nsdId {nsd_id})")
            captions[int(nsd_id)] = by_coco[int(coco_id)]
    return captions
