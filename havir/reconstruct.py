"""Reconstruction of a trained run's test images (``havir reconstruct``).

The run's decoders predict the targets (:mod:`havir.targets`) from the test voxels; the backbone
the run's features came from turns them into images (:meth:`havir.models.backbone.Backbone.generate`;
for Versatile Diffusion, the dual-guided image-to-image sampler of :mod:`havir.models.sampling`).

Modes (the paper's ablations): ``fused`` (the method), ``structural`` (the predicted latent
alone, decoded), ``semantic`` (no structural prior: from noise).

The folder (:mod:`havir.artifacts.reconstruction`) takes one ``<nsdId>.png`` per image; a
resumed run keeps the PNGs there and makes the rest. Under ``accelerate launch`` the processes
share out the batches (each batch is the one a single process would run, and each image's noise
comes from (seed, nsdId)), so the PNGs are those of a single process; the main one writes the
manifest once every image is written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import havir
from havir.artifacts.dataset import load_test_data, ridge_voxels
from havir.artifacts.encoder import VOXEL_SETS, EncodingModel, check_encoder_matches, encoder_features, load_encoder
from havir.artifacts.features_cache import features_path, features_settings
from havir.artifacts.prepared import prepared_path, reading_prepared
from havir.artifacts.reconstruction import abandon_if_empty, begin_reconstruction, write_manifest, write_reconstructions
from havir.artifacts.run import load_decoders, load_ridge, read_finished_run
from havir.devices import resolve_device, resolve_dtype, smaller_batch_on_oom
from havir.distributed import processes
from havir.errors import InvalidInputError
from havir.io import MODEL_STACK, output_folder, package_versions, write_json
from havir.metrics.scores import row_correlations
from havir.models.backbone import Backbone, SamplerSettings, load_backbone
from havir.options import RECONSTRUCT_OPTIONS
from havir.progress import progress_report
from havir.targets import TARGET_NAMES
from havir.validation import check_options

#: Subfolder of a reconstruction folder: each image's candidates' scores, when chosen by the brain.
SELECTION = "selection"


@dataclass
class BrainSelection:
    """Brain-guided selection: of several samples of an image, keep the one whose activity, as
    the subject's encoding model predicts it, best matches the activity measured for the image
    (Pearson r across all the model's voxels). ``measured`` : (n, v) test betas (repetition
    averages), rows as the reconstructed ``nsd_ids``."""

    encoder: EncodingModel
    measured: np.ndarray
    source: str

    def scores(self, backbone: Backbone, images: np.ndarray, rows: list[int]) -> np.ndarray:
        """(n,) match of each image with the activity measured for ``rows``."""
        encoded = backbone.encode_images(images)
        predicted = self.encoder.predict(encoder_features({name: value.float().cpu().numpy() for name, value in encoded.items()}))
        return row_correlations(predicted, self.measured[rows])


def reconstruct(
    backbone: Backbone,
    predictions: dict[str, torch.Tensor],
    nsd_ids: np.ndarray,
    out: Path,
    *,
    mode: str = "fused",
    settings: SamplerSettings | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    provenance: dict | None = None,
    progress: bool = True,
    candidates: int = 1,
    selection: BrainSelection | None = None,
) -> dict:
    """Reconstruct every image not already in ``out``; returns the ``--json`` summary.

    ``predictions`` holds every target (:data:`havir.targets.TARGET_NAMES`; for Versatile
    Diffusion ``vae_latents`` (n, 4, h, w), ``clip_image`` (n, 257, D), ``clip_text`` (n, 77, D))
    for ``nsd_ids``; ``backbone`` generates the images. Existing ``<nsdId>.png`` files are kept
    (resume). Under ``accelerate launch``, each process runs every N-th batch. ``progress``
    reports the images done on stderr (see :func:`havir.progress.progress_report`).

    With ``candidates`` K > 1, each image is sampled K times (candidate k from (seed, nsdId, k);
    candidate 0 is the image a single sample gives) and ``selection`` keeps one; every
    candidate's score is written to ``out/selection/<nsdId>.json`` and gathered in the manifest.
    """
    settings = settings or SamplerSettings()
    check_options(RECONSTRUCT_OPTIONS, mode=mode, limit=limit, batch_size=batch_size, candidates=candidates)
    if candidates > 1 and (selection is None or mode == "structural"):
        raise InvalidInputError("--candidates needs --encoder (to choose by the brain) and a sampled mode (fused or semantic)")
    launch = processes()
    order = np.argsort(nsd_ids)[: limit if limit is not None else None]
    # Batches are cut from the whole ordered list, not from what is left to do: a resumed run
    # computes every image in the batch it had in an uninterrupted run (same shapes, same float
    # rounding), so its PNGs are bit-identical; a batch with any image missing runs whole.
    batches = [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]
    made_with = {"mode": mode, "settings": asdict(settings), "vd": backbone.source} | (provenance or {})
    if candidates > 1:
        made_with |= {"candidates": candidates, "encoder": selection.source}
    with output_folder(Path(out), lock=launch.is_main_process) as out:
        begin_reconstruction(out, made_with, record=launch.is_main_process)
        missing = {i for i in order.tolist() if not (out / f"{int(nsd_ids[i])}.png").exists()}
        launch.wait_for_everyone()  # every process has listed the images to do before any is written
        started = time.perf_counter()
        todo = [rows for rows in batches if missing.intersection(rows)]
        mine = todo[launch.process_index :: launch.num_processes]
        try:
            with progress_report(f"{mode} reconstructions", sum(map(len, mine)), unit="images",
                                 enabled=progress and launch.is_main_process) as report:
                for rows in mine:
                    with smaller_batch_on_oom(batch_size):
                        batch = {name: torch.as_tensor(predictions[name][rows]) for name in TARGET_NAMES}
                        if candidates == 1:
                            images = backbone.generate(batch, nsd_ids[rows], mode=mode, settings=settings)
                        else:
                            images = _brain_selected(backbone, batch, nsd_ids, rows, mode, settings, candidates, selection, out)
                    kept = [k for k, row in enumerate(rows) if row in missing]
                    write_reconstructions(out, nsd_ids[rows][kept], images[kept])
                    report.advance(len(rows))
        except BaseException:
            if launch.is_main_process:  # nothing made: leave nothing
                abandon_if_empty(out)
            raise
        launch.wait_for_everyone()
        seconds = time.perf_counter() - started
        if launch.is_main_process:
            write_manifest(out, {
                "mode": mode, "settings": asdict(settings), "schedule": backbone.generation_record(settings, mode),
                "images": [int(nsd_ids[i]) for i in order.tolist()],
                "batch_size": batch_size, "vd": backbone.source, "backbone": type(backbone).__name__,
                "havir_version": havir.__version__, "torch": torch.__version__,
                "versions": package_versions(*MODEL_STACK, "pillow"), "threads": torch.get_num_threads(),
            } | (provenance or {}) | (_selection_record(out, nsd_ids[order], candidates, selection) if candidates > 1 else {}))
    return {
        "n_images": len(order), "reconstructed": len(missing), "mode": mode, "seconds": round(seconds, 3),
        "images_per_second": round(len(missing) / seconds, 3) if missing and seconds > 0 else None,
        "output": str(out),
    }


def _brain_selected(backbone, batch, nsd_ids, rows, mode, settings, candidates, selection, out) -> np.ndarray:
    """The kept candidate of each image of one batch; each image's scores go to ``out/selection/``."""
    drawn = [backbone.generate(batch, nsd_ids[rows], mode=mode, settings=settings, candidate=k) for k in range(candidates)]
    scores = np.stack([selection.scores(backbone, images, rows) for images in drawn])  # (K, n)
    best = scores.argmax(axis=0)
    (out / SELECTION).mkdir(exist_ok=True)
    for i, row in enumerate(rows):
        write_json(out / SELECTION / f"{int(nsd_ids[row])}.json",
                   {"kept": int(best[i]), "scores": [round(float(v), 6) for v in scores[:, i]]})
    return np.stack([drawn[k][i] for i, k in enumerate(best)])


def _selection_record(out: Path, nsd_ids: np.ndarray, candidates: int, selection: BrainSelection) -> dict:
    """The manifest's ``selection``: how candidates were chosen, and each image's scores."""
    from havir.validation import read_json

    chosen = {str(int(i)): read_json(out / SELECTION / f"{int(i)}.json", what="candidate scores",
                                    fix="delete the folder's PNGs and reconstruct again") for i in nsd_ids}
    return {"selection": {"candidates": candidates, "encoder": selection.source,
                          "score": "Pearson r across voxels between the encoder's prediction and the measured test betas",
                          "images": chosen}}


def brain_selection(encoder: Path, data: Path, subject: int, nsd_ids: np.ndarray) -> BrainSelection:
    """The selection by ``encoder`` (``havir encode``'s folder, of this subject and features cache)
    against the measured test betas of ``nsd_ids``."""
    model = load_encoder(encoder)
    with reading_prepared(prepared_path(data, subject)) as h5:
        voxels = {name: h5[f"voxels/{name}"][()] for name in VOXEL_SETS}
    check_encoder_matches(model, subject, voxels, features_settings(features_path(data, subject), ("model", "dtype", "seed")))
    test = load_test_data(data, subject)
    measured = np.concatenate([getattr(test, name) for name in VOXEL_SETS], axis=1)
    return BrainSelection(model, measured[np.searchsorted(test.nsd_id, nsd_ids)], str(Path(encoder).resolve()))


def predict_test_set(run: Path, device: torch.device) -> tuple[np.ndarray, dict[str, torch.Tensor], dict]:
    """Predictions of a trained run for its subject's test images (repetition averages).

    Returns (nsd_ids (n,), {target name: tensor} for every target of :mod:`havir.targets`, the run's record).
    """
    record = read_finished_run(run)
    test = load_test_data(Path(record["data"]), record["subject"])
    with torch.no_grad():
        if record["model"] == "ridge":
            ridge = load_ridge(run, device)
            predicted = ridge.predict(ridge_voxels(test, record.get("ridge", {}).get("inputs", "sets")))
            predictions = {name: torch.as_tensor(value) for name, value in predicted.items()}
        else:
            decoders = load_decoders(run, device)
            predicted = {}
            for role, decoder in decoders.items():  # each reads its own voxels (see havir.targets)
                predicted |= decoder.predict(torch.as_tensor(getattr(test, role), device=device))
            predictions = {name: value.float().cpu() for name, value in predicted.items()}
    return test.nsd_id, predictions, record


def reconstruct_run(
    run: Path,
    out: Path,
    *,
    mode: str = "fused",
    settings: SamplerSettings | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    candidates: int = 1,
    encoder: Path | None = None,
) -> dict:
    """Reconstruct a trained run's test images into ``out`` (``<nsdId>.png`` + ``manifest.json``).

    The backbone is the one the run's features came from (same weights seed). ``candidates`` K
    with ``encoder`` (the subject's ``havir encode`` folder): brain-guided selection, the best of
    K samples per image (:class:`BrainSelection`).
    """
    check_options(RECONSTRUCT_OPTIONS, mode=mode, limit=limit, batch_size=batch_size, candidates=candidates)  # before any work
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    nsd_ids, predictions, record = predict_test_set(run, torch_device)
    features = features_settings(features_path(Path(record["data"]), record["subject"]))
    if (encoder is None) != (candidates == 1):
        raise InvalidInputError("brain-guided selection takes both --candidates K (K > 1 samples per image) and --encoder "
                                "(the subject's `havir encode` folder, which scores them): give both or neither")
    selection = None
    if encoder is not None:
        selection = brain_selection(Path(encoder), Path(record["data"]), record["subject"], nsd_ids)
    backbone = load_backbone(features["model"], device=torch_device, dtype=torch_dtype, seed=features["seed"])
    return reconstruct(
        backbone, predictions, nsd_ids, Path(out), mode=mode, settings=settings, batch_size=batch_size, limit=limit,
        provenance={"run": str(Path(run).resolve()), "subject": record["subject"], "model": record["model"]},
        progress=progress, candidates=candidates, selection=selection,
    )
