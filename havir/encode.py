"""``havir encode``: a voxel-wise encoding model of one subject, image features -> brain responses.

The decoders read the brain to predict an image's features; an encoding model predicts the
brain from an image's features. Fit on the training images, it asks of any image, a
reconstruction included, "would this evoke the activity that was measured?" (``havir eval
--encoder``): the check of the encoder-based reconstruction literature, which a generative model
cannot pass by painting a plausible scene the brain did not encode.

The fit, for every voxel of both sets at once:

* inputs: the backbone's own features of each training image from the features cache, as two
  feature spaces (:data:`~havir.artifacts.encoder.FEATURE_SPACES`: the VAE latent, the CLIP image
  embedding), each standardised;
* outputs: the image's repetition-averaged, z-scored betas (the prepared file's training split)
  of every ``nsdgeneral`` voxel: both sets, and the voxels in neither (``other``), so the
  accuracy map shows where the features explain the brain and where they do not;
* model: banded ridge (himalaya's ``MultipleKernelRidgeCV`` on one linear kernel per space):
  each voxel gets its own regularisation and its own weighting of the two spaces, chosen by
  cross-validation over images inside the training set. The kernel form costs (images)^2, not
  (features)^2: the released VAE latent alone has 16,384 features;
* accuracy: each voxel's Pearson r between its measured responses and the predictions of a model
  fit without those images (``folds``-fold cross-validation split by image, r per fold, averaged);
  then the model is fit on every training image and saved in its primal form
  (:mod:`havir.artifacts.encoder`).

``control="shuffled"`` pairs each image's features with another image's responses (a fixed
random permutation): the null model, whose accuracy must stay near zero.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import havir
from havir.artifacts.dataset import averaged, checked_inputs, check_covered
from havir.artifacts.encoder import (
    ACCURACY_FIGURE,
    ACCURACY_MAP,
    FEATURE_SPACES,
    VOXEL_SETS,
    EncodingModel,
    voxel_columns,
    encoder_features,
    save_encoder,
)
from havir.artifacts.features_cache import features_settings, reading_features
from havir.artifacts.prepared import load_split, prepared_record_path, reading_prepared
from havir.devices import resolve_device
from havir.errors import HavirError, InvalidInputError
from havir.io import atomic_path, output_folder, package_versions
from havir.metrics.scores import row_correlations
from havir.nsd.atlas import read_atlas
from havir.nsd.layout import NSDLayout
from havir.progress import track
from havir.options import ENCODE_OPTIONS
from havir.validation import check_options, read_json

#: Regularisation strengths searched per voxel, and how many weightings of the two spaces.
ALPHAS = np.logspace(-2, 8, 21)
SPACE_WEIGHTINGS = 20


def fit_encoder(data: Path, subject: int, out: Path, *, folds: int = 5, seed: int = 0, control: str | None = None,
                device: str = "auto", progress: bool = True) -> dict:
    """Fit and save ``subject``'s encoding model into ``out``; returns the summary.

    Parameters
    ----------
    data : folder of ``havir prepare`` and ``havir features``.
    subject : NSD subject, 1..8.
    out : folder for the model (:mod:`havir.artifacts.encoder`).
    folds : cross-validation folds (split by image) for each voxel's accuracy.
    seed : seed of the folds, the search and the shuffled control.
    control : ``"shuffled"`` for the null model (features paired with other images' responses).
    device : ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``: himalaya's ``torch_cuda``
        backend on a GPU, its ``numpy`` one on a CPU (``bench/bench_encode.py``: a realistic
        subject's fit is hours of CPU, a GPU job).
    """
    started = time.perf_counter()
    check_options(ENCODE_OPTIONS, folds=folds, seed=seed, control=control)
    backend = "torch_cuda" if resolve_device(device).type == "cuda" else "numpy"
    prepared, cache, feature_ids = checked_inputs(data, subject)
    settings = features_settings(cache, ("model", "dtype", "seed"))
    train = load_split(prepared, "train")
    check_covered(cache, feature_ids, train.nsd_id)
    responses, nsd_ids = averaged(np.concatenate([getattr(train, name) for name in VOXEL_SETS], axis=1), train.nsd_id)
    if len(nsd_ids) < 2 * folds:
        raise InvalidInputError(f"{prepared} has {len(nsd_ids)} training images, too few for {folds}-fold "
                                "cross-validation: prepare more sessions or lower --folds")
    with reading_features(cache) as h5:
        rows = np.searchsorted(feature_ids, nsd_ids).tolist()
        features = encoder_features({name: h5[name][rows] for name in FEATURE_SPACES})
    rng = np.random.default_rng(seed)
    if control == "shuffled":
        responses = responses[rng.permutation(len(responses))]
    with reading_prepared(prepared) as h5:
        voxels = {name: h5[f"voxels/{name}"][()].astype(np.int32) for name in VOXEL_SETS}
    record = read_json(prepared_record_path(data, subject), what="prepared subject's record", fix="run `havir prepare` again",
                       keys=("nsd_root", "masks"))

    with output_folder(Path(out)) as out:
        # Each fold's r is computed on its own held-out images, then averaged over the folds: pooled
        # over folds, each fold's intercept (the mean of the others) anticorrelates with its own
        # images' mean and biases every voxel's r below zero (-0.08 here for a null model).
        fold_of = rng.permutation(len(nsd_ids)) % folds
        fold_r = []
        for fold in track(range(folds), f"subj{subject:02d}: encoding model, cross-validation", total=folds,
                          enabled=progress, unit="folds"):
            held = fold_of == fold
            model = fit_banded_ridge({s: x[~held] for s, x in features.items()}, responses[~held], seed, backend)
            predicted = model.predict({s: x[held] for s, x in features.items()})
            fold_r.append(row_correlations(predicted.T, responses[held].T))
        cv_r = np.mean(fold_r, axis=0).astype(np.float32)
        model = fit_banded_ridge(features, responses, seed, backend)
        rois, roi_note = _voxel_rois(record, subject, voxels)
        sets = {name: len(voxels[name]) for name in VOXEL_SETS}
        model.cv_r, model.voxels, model.rois = cv_r, np.concatenate([voxels[n] for n in VOXEL_SETS]), rois
        summary = {
            "subject": subject,
            "images": int(len(nsd_ids)),
            "voxels": sets,
            "control": control,
            "folds": folds,
            "cv_r_mean": {name: float(np.nanmean(cv_r[span])) if span.stop > span.start else None
                          for name, span in voxel_columns(sets).items()},
            "output": str(out),
        }
        model.record = {
            "subject": subject, "grid": record["masks"].get("grid"), "voxels": sets, "features": settings,
            "feature_spaces": {space: int(features[space].shape[1]) for space in FEATURE_SPACES},
            "fit": {"model": "himalaya MultipleKernelRidgeCV, one linear kernel per feature space", "alphas": ALPHAS.tolist(),
                    "space_weightings": SPACE_WEIGHTINGS, "folds": folds, "seed": seed, "control": control,
                    "responses": "repetition-averaged z-scored betas of the training images"},
            "summary": summary, "notes": [roi_note] if roi_note else [],
            "data": str(Path(data).resolve()), "havir_version": havir.__version__,
            "versions": package_versions("numpy", "himalaya", "scikit-learn", "nibabel", "nilearn"),
        }
        affine = _write_accuracy_map(out, record, subject, model)
        save_encoder(out, model)
    return summary | {"seconds": round(time.perf_counter() - started, 3), "affine_from": affine}


def fit_banded_ridge(features: dict[str, np.ndarray], responses: np.ndarray, seed: int, backend: str = "numpy") -> EncodingModel:
    """Banded kernel ridge on ``features`` -> ``responses`` (n, v), in primal form, on himalaya's
    ``backend`` (``"numpy"``, ``"torch"``, ``"torch_cuda"``); the result is numpy float32."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import ColumnKernelizer, Kernelizer, MultipleKernelRidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    himalaya = set_backend(backend, on_error="raise")
    sizes = np.cumsum([0] + [features[space].shape[1] for space in FEATURE_SPACES])
    kernelizer = ColumnKernelizer([
        (space, make_pipeline(StandardScaler(), Kernelizer(kernel="linear")), slice(int(start), int(stop)))
        for space, start, stop in zip(FEATURE_SPACES, sizes[:-1], sizes[1:])
    ])
    ridge = MultipleKernelRidgeCV(
        kernels="precomputed", solver="random_search", fit_intercept=True, cv=5, random_state=seed,
        solver_params={"n_iter": SPACE_WEIGHTINGS, "alphas": ALPHAS, "progress_bar": False},
    )
    X = np.concatenate([features[space] for space in FEATURE_SPACES], axis=1).astype(np.float64)
    make_pipeline(kernelizer, ridge).fit(X, responses.astype(np.float64))
    scalers = [pipeline[0] for _, pipeline, _ in kernelizer.transformers_]
    weights = ridge.get_primal_coef(kernelizer.get_X_fit())
    return EncodingModel(
        record={},
        weights={space: np.asarray(himalaya.to_numpy(w), dtype=np.float32) for space, w in zip(FEATURE_SPACES, weights)},
        mean={space: s.mean_.astype(np.float32) for space, s in zip(FEATURE_SPACES, scalers)},
        scale={space: s.scale_.astype(np.float32) for space, s in zip(FEATURE_SPACES, scalers)},
        intercept=np.asarray(himalaya.to_numpy(ridge.intercept_), dtype=np.float32),
        cv_r=np.zeros(0, np.float32), voxels=np.zeros((0, 3), np.int32), rois={},
    )


def _voxel_rois(record: dict, subject: int, voxels: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """``{ROI label: columns}`` for the labels of the mask definition the data was prepared with,
    read from the subject's atlases in the NSD release; when the release is no longer at hand,
    no ROIs and a note saying so."""
    definition = record["masks"].get("definition_content", {})
    rois, offset = {}, 0
    try:
        layout = NSDLayout(Path(record["nsd_root"]))
        for voxel_set in VOXEL_SETS:
            coords = voxels[voxel_set]
            for selection in definition.get(voxel_set, ()):
                atlas = read_atlas(layout, subject, selection["atlas"])
                at = atlas.labels[tuple(coords.T)]
                for label in selection["labels"]:
                    members = np.flatnonzero(at == atlas.names[label]) + offset
                    if members.size:
                        rois[label] = np.union1d(rois.get(label, members), members)
            offset += len(coords)
    except (HavirError, OSError, KeyError) as err:
        return {}, f"no per-ROI accuracy: the atlases of the release at {record['nsd_root']} cannot be read ({err})"
    return rois, ""


def _write_accuracy_map(out: Path, record: dict, subject: int, model: EncodingModel) -> str:
    """``accuracy.nii.gz`` (each voxel's cross-validated r on the subject's grid, NaN elsewhere)
    and ``accuracy.png``; returns where the grid's affine came from."""
    import matplotlib

    matplotlib.use("Agg")
    import nibabel as nib
    from nilearn import plotting

    try:
        atlas = read_atlas(NSDLayout(Path(record["nsd_root"])), subject, "nsdgeneral")
        grid, affine, source = atlas.labels.shape, atlas.affine, "the release's nsdgeneral atlas"
    except (HavirError, OSError) as err:
        grid = tuple(record["masks"]["grid"])
        affine, source = np.diag([1.8, 1.8, 1.8, 1.0]), f"1.8 mm, no origin (the release's atlas cannot be read: {err})"
    volume = np.full(grid, np.nan, dtype=np.float32)
    volume[tuple(model.voxels.T)] = model.cv_r
    image = nib.Nifti1Image(volume, affine)
    with atomic_path(out / ACCURACY_MAP) as temporary:
        nib.save(image, temporary)
    display = plotting.plot_stat_map(
        nib.Nifti1Image(np.nan_to_num(volume), affine), bg_img=None, display_mode="z", cut_coords=6, cmap="cold_hot", vmax=1.0, black_bg=True, draw_cross=False,
        title=f"subj{subject:02d}: cross-validated encoding accuracy (r)",
    )
    with atomic_path(out / ACCURACY_FIGURE) as temporary:
        display.savefig(str(temporary), dpi=100)
    display.close()
    return source
