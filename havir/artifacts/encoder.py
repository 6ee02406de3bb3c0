"""An encoding model: the folder ``havir encode --out ENC`` writes, ``havir eval --encoder ENC`` reads.

An encoding model runs the other way from the decoders: from an image's features to each
voxel's response. Its features are the backbone's own: the VAE latent (flattened) and the CLIP
image embedding (the class token of the image tokens), two *feature spaces* each standardised
with its training mean and spread. The prediction is linear in each space,

    response[v] = intercept[v] + sum over spaces s of ((x_s - mean_s) / scale_s) @ weights_s[:, v],

the primal form of the banded kernel ridge ``havir encode`` fits (one band per space).

Files:

* ``encoder.json``: the subject, its grid, the voxel counts of each set, which features cache
  (backbone, dtype, seed) the features came from, the feature spaces and their sizes, the fit's
  settings and summary, the versions;
* ``encoder.safetensors``: ``weights/<space>`` (p, v), ``mean/<space>``, ``scale/<space>`` (p,),
  ``intercept`` (v,), ``cv_r`` (v,) the cross-validated accuracy of each voxel, ``voxels`` (v, 3)
  their (x, y, z) on the subject's grid (the structural set's columns first, then the semantic
  set's, then the other ``nsdgeneral`` voxels', each as in the prepared file), ``roi/<label>``
  the columns of each ROI of the mask definition;
* ``accuracy.nii.gz`` (``cv_r`` on the grid, NaN outside the sets) and ``accuracy.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from havir.errors import InvalidInputError, MissingInputError
from havir.io import atomic_path, write_json
from havir.validation import read_json

ENCODER_FORMAT = 1
RECORD = "encoder.json"
WEIGHTS = "encoder.safetensors"
ACCURACY_MAP = "accuracy.nii.gz"
ACCURACY_FIGURE = "accuracy.png"
#: The feature spaces, each read from one target of the features cache (see :func:`encoder_features`).
FEATURE_SPACES = ("vae_latents", "clip_image")
#: The prepared file's voxel sets, in the order of the model's columns.
VOXEL_SETS = ("structural", "semantic", "other")
_REFIT = "run `havir encode` again into a new --out"


def encoder_features(targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder's feature spaces from an image's targets (as the features cache or the
    backbone's ``encode_images`` give them): ``vae_latents`` (n, C, s, s) flattened to (n, C*s*s);
    ``clip_image`` (n, tokens, D) -> its class token (n, D), the image's CLIP embedding."""
    return {
        "vae_latents": np.asarray(targets["vae_latents"], dtype=np.float32).reshape(len(targets["vae_latents"]), -1),
        "clip_image": np.asarray(targets["clip_image"], dtype=np.float32)[:, 0, :],
    }


@dataclass
class EncodingModel:
    """A fitted encoding model (see the module docstring); arrays are float32 numpy."""

    record: dict
    weights: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]
    scale: dict[str, np.ndarray]
    intercept: np.ndarray
    cv_r: np.ndarray
    voxels: np.ndarray
    rois: dict[str, np.ndarray]

    def predict(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Predicted responses (n, v) from the feature spaces of n images (:func:`encoder_features`)."""
        response = np.broadcast_to(self.intercept, (len(features[FEATURE_SPACES[0]]), len(self.intercept))).astype(np.float64)
        for space in FEATURE_SPACES:
            standardised = (np.asarray(features[space], dtype=np.float64) - self.mean[space]) / self.scale[space]
            response = response + standardised @ self.weights[space].astype(np.float64)
        return response

    def columns(self, voxel_set: str) -> slice:
        """The columns of ``voxel_set`` (one of :data:`VOXEL_SETS`)."""
        return voxel_columns(self.record["voxels"])[voxel_set]


def voxel_columns(counts: dict[str, int]) -> dict[str, slice]:
    """``{voxel set: its columns}`` from the sets' voxel counts, in :data:`VOXEL_SETS` order."""
    stops = np.cumsum([counts[name] for name in VOXEL_SETS]).tolist()
    return {name: slice(stop - counts[name], stop) for name, stop in zip(VOXEL_SETS, stops)}


def save_encoder(folder: Path, model: EncodingModel) -> None:
    """Write ``encoder.safetensors`` then ``encoder.json`` (which marks the folder complete)."""
    from safetensors.numpy import save_file

    tensors = {"intercept": model.intercept, "cv_r": model.cv_r, "voxels": model.voxels.astype(np.int32)}
    for space in FEATURE_SPACES:
        tensors |= {f"weights/{space}": model.weights[space], f"mean/{space}": model.mean[space], f"scale/{space}": model.scale[space]}
    tensors |= {f"roi/{label}": members.astype(np.int64) for label, members in model.rois.items()}
    with atomic_path(Path(folder) / WEIGHTS) as temporary:
        save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()}, str(temporary))
    write_json(Path(folder) / RECORD, model.record | {"format_version": ENCODER_FORMAT})


def load_encoder(folder: Path) -> EncodingModel:
    """The encoding model in ``folder``; a missing, unfinished or damaged one is one line."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    folder = Path(folder)
    if not (folder / RECORD).is_file():
        raise MissingInputError(f"{folder} holds no encoding model (no {RECORD}): run `havir encode` first")
    record = read_json(folder / RECORD, what="encoding model record", fix=_REFIT,
                       keys=("subject", "grid", "voxels", "features", "format_version"))
    if record["format_version"] != ENCODER_FORMAT:
        raise InvalidInputError(f"{folder} holds an encoding model of format {record['format_version']}, "
                                f"this HAVIR reads format {ENCODER_FORMAT}: {_REFIT}")
    try:
        tensors = load((folder / WEIGHTS).read_bytes())
        return EncodingModel(
            record=record,
            weights={space: tensors[f"weights/{space}"] for space in FEATURE_SPACES},
            mean={space: tensors[f"mean/{space}"] for space in FEATURE_SPACES},
            scale={space: tensors[f"scale/{space}"] for space in FEATURE_SPACES},
            intercept=tensors["intercept"], cv_r=tensors["cv_r"], voxels=tensors["voxels"],
            rois={name.removeprefix("roi/"): value for name, value in tensors.items() if name.startswith("roi/")},
        )
    except (OSError, KeyError, SafetensorError) as err:
        raise InvalidInputError(f"encoding model weights {folder / WEIGHTS} cannot be read ({type(err).__name__}: {err}): {_REFIT}") from err


def check_encoder_matches(model: EncodingModel, subject: int, voxels: dict[str, np.ndarray], features: dict) -> None:
    """Refuse an encoding model made for another subject, another grid or voxel sets, or from
    another features cache (backbone, dtype or seed) than the data it is to score: its voxel
    columns or its feature spaces would not mean the same thing."""
    record, where = model.record, "the encoding model"
    if record["subject"] != subject:
        raise InvalidInputError(f"{where} was fit for subj{record['subject']:02d}, not subj{subject:02d}: "
                                f"pass the encoder of subj{subject:02d} (`havir encode --subject {subject}`)")
    ours = np.concatenate([voxels[name] for name in VOXEL_SETS]).astype(np.int32)
    if ours.shape != model.voxels.shape or not np.array_equal(ours, model.voxels):
        raise InvalidInputError(f"{where} was fit on other voxels of subj{subject:02d} (another grid or mask definition: "
                                f"{record['voxels']} voxels): run `havir encode` again on this prepared data")
    fit_on = record["features"]
    differs = sorted(key for key in ("model", "dtype", "seed") if fit_on.get(key) != features.get(key))
    if differs:
        theirs = ", ".join(f"{key}={fit_on.get(key)!r}" for key in differs)
        ours_ = ", ".join(f"{key}={features.get(key)!r}" for key in differs)
        raise InvalidInputError(f"{where} reads features of another {', '.join(differs)} ({theirs}; this data's features "
                                f"cache has {ours_}): fit it on this features cache (`havir encode`) or score with the matching one")
