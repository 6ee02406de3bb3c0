"""Score a folder of reconstructions against a subject's NSD test images (``havir eval``).

Any method can be scored: the folder only has to hold one ``<nsdId>.png`` per test image. The
ground truth comes from the prepared data (``havir prepare`` copies the test stimuli), so the
protocol (which subject, how many sessions, how many images) is read from the same place and
written into every result.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from havir.artifacts.dataset import averaged
from havir.artifacts.encoder import FEATURE_SPACES, VOXEL_SETS, check_encoder_matches, encoder_features, load_encoder
from havir.artifacts.features_cache import features_settings, require_features
from havir.artifacts.prepared import load_split, prepared_normalisation, prepared_record_path, reading_prepared, require_prepared
from havir.artifacts.reconstruction import load_reconstructions, read_manifest, read_reconstruction, reconstruction_ids  # noqa: F401
from havir.devices import smaller_batch_on_oom
from havir.errors import HavirError, InvalidInputError
from havir.io import atomic_path, package_versions, write_json
from havir.metrics.networks import (
    STANDIN_METRICS,
    FeatureNetwork,
    MissingWeightsError,
    load_protocol_network,
    load_standin_network,
)
from havir.metrics.protocols import (
    MINDEYE2,
    FeatureMetric,
    ProtocolPreset,
    get_preset,
    pixel_images,
    working_images,
)
from havir.metrics.brain import BRAIN_SETS, BrainConsistency, brain_consistency, brain_metric_name
from havir.metrics.records import image_metrics
from havir.models.backbone import load_backbone
from havir.metrics.results import (  # noqa: F401 (also read here by their old path)
    PROTOCOL_NAMES,
    PUBLISHED_ROWS,
    Evaluation,
    MetricScore,
    PublishedRow,
    compare_with_null,
    comparison_rows,
    published_rows,
)
from havir.metrics.scores import (
    bootstrap_interval,
    correlation_distance,
    correlation_matrix,
    identification_from_correlations,
)
from havir.nsd.layout import check_subject
from havir.progress import track

def _feature_score(metric: FeatureMetric, truth: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-image scores, the correlation matrix for an identification metric else None)."""
    if metric.score == "identification":
        if len(truth) < 2:
            raise InvalidInputError("two-way identification needs at least two images: reconstruct two or more test images (--limit 2 or more) and evaluate again")
        matrix = correlation_matrix(truth, recon)
        return identification_from_correlations(matrix), matrix
    return correlation_distance(truth, recon), None


def score_images(
    ground_truth: np.ndarray,
    reconstructions: np.ndarray,
    *,
    networks: Mapping[str, FeatureNetwork],
    preset: ProtocolPreset = MINDEYE2,
    metrics: Sequence[FeatureMetric] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    resamples: int = 1000,
    seed: int = 0,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> dict[str, MetricScore]:
    """PixCorr, SSIM and every metric in ``metrics`` (default: the preset's and the stand-in's)
    whose network is in ``networks``, each image taken through ``preset``'s steps.

    ``ground_truth`` : uint8 (n, s, s, 3), the stimuli; ``reconstructions`` : uint8 (n, h, w, 3),
    row i reconstructs row i. Images are prepared batch by batch (memory stays bounded for 1000
    images); scores do not depend on ``batch_size`` or on the order of the rows (beyond float
    rounding); intervals are seeded by ``seed``.

    ``timings``, a dict, is filled with the seconds spent on each part: every pixel metric's name
    (its scoring; the images' preparation and pixel resize, shared, under ``"pixel_images"``) and every network's name (its
    images' preparation, features and scores), as ``bench/bench_eval.py`` reports them.
    """
    device = torch.device(device)
    timings = {} if timings is None else timings

    def timed(part: str, started: float) -> None:
        if device.type == "cuda":  # the GPU's queued work belongs to this part
            torch.cuda.synchronize(device)
        timings[part] = timings.get(part, 0.0) + time.perf_counter() - started

    metrics = tuple(preset.metrics) + STANDIN_METRICS if metrics is None else tuple(metrics)
    if len(ground_truth) != len(reconstructions):
        raise InvalidInputError(f"{len(ground_truth)} ground-truth images but {len(reconstructions)} reconstructions")
    if len(ground_truth) == 0:
        raise InvalidInputError("no images to score")
    truth_side = ground_truth.shape[1]

    def batches():
        for start in range(0, len(ground_truth), batch_size):
            stop = start + batch_size
            yield (working_images(preset, ground_truth[start:stop], ground_truth=True),
                   working_images(preset, reconstructions[start:stop], ground_truth=False))

    def interval(per_image: np.ndarray) -> tuple[float, float]:
        return bootstrap_interval(per_image, resamples=resamples, seed=seed)

    pixel_metrics = image_metrics()  # PixCorr, SSIM and any other registered ImageMetric
    pixel_scores: dict[str, list[np.ndarray]] = {metric.name: [] for metric in pixel_metrics}
    started = time.perf_counter()
    for truth, recon in batches():
        truth_px, recon_px = pixel_images(preset, truth, recon, truth_side)
        timed("pixel_images", started)
        for metric in pixel_metrics:
            started = time.perf_counter()
            pixel_scores[metric.name].append(np.asarray(metric.score(truth_px, recon_px, preset)))
            timed(metric.name, started)
        started = time.perf_counter()
    results = {}
    for metric in pixel_metrics:
        per_image = np.concatenate(pixel_scores[metric.name])
        results[metric.name] = MetricScore(metric.name, per_image, interval(per_image), "pixels", metric.protocol,
                                           metric.higher_is_better)
    wanted = [metric for metric in metrics if metric.network in networks]
    for network_name in track(list(dict.fromkeys(m.network for m in wanted)), "feature networks", enabled=progress, unit="networks"):
        started = time.perf_counter()
        network = networks[network_name]
        layers = [metric.layer for metric in wanted if metric.network == network_name]
        features: dict[str, list[dict]] = {"truth": [], "recon": []}
        for truth, recon in batches():
            with smaller_batch_on_oom(batch_size):
                features["truth"].append(network.features(truth, layers, device=device, batch_size=batch_size))
                features["recon"].append(network.features(recon, layers, device=device, batch_size=batch_size))
        for metric in (m for m in wanted if m.network == network_name):
            truth_features = np.concatenate([part[metric.layer] for part in features["truth"]])
            recon_features = np.concatenate([part[metric.layer] for part in features["recon"]])
            per_image, matrix = _feature_score(metric, truth_features, recon_features)
            results[metric.name] = MetricScore(
                metric.name, per_image, interval(per_image), network.label, network.protocol,
                metric.score == "identification", matrix,
            )
        timed(network_name, started)
    return results


def load_ground_truth(data: Path, subject: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A subject's test stimuli from the prepared data: (nsd_ids (n,), uint8 images (n, s, s, 3),
    the data protocol: subject, sessions read, number of test images, normalisation)."""
    check_subject(subject)
    prepared = require_prepared(data, subject)
    with reading_prepared(prepared) as h5:  # a damaged file is one line, not a traceback
        if "test/stimuli" not in h5:
            raise InvalidInputError(f"{prepared} holds no test stimuli: run `havir prepare` again")
        nsd_ids = h5["test/stimulus_nsd_id"][()]
        images = h5["test/stimuli"][()]
    record_file = prepared_record_path(data, subject)
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    protocol = {"subject": subject, "sessions": record.get("sessions"), "test_images": int(len(nsd_ids)),
                "normalisation": prepared_normalisation(prepared), "synthetic": _synthetic(record)}
    return nsd_ids, images, protocol


def _synthetic(record: dict) -> bool:
    """Whether prepared data came from ``havir synth-nsd`` (its release holds ``synth_truth.json``)."""
    root = record.get("nsd_root")
    return isinstance(root, str) and (Path(root) / "synth_truth.json").is_file()


def load_networks(
    weights_dir: Path | None = None, *, preset: ProtocolPreset = MINDEYE2, skip_missing: bool = False, standin: bool = False
) -> tuple[dict[str, FeatureNetwork], dict[str, str]]:
    """The networks of ``preset`` whose weights are here, and the metrics skipped with the reason.

    Without ``skip_missing`` a missing file stops everything (:class:`MissingWeightsError`).
    ``standin`` adds the offline EfficientNet-Lite0 (the demo's labelled stand-in).
    """
    networks, skipped = {}, {}
    for name in dict.fromkeys(metric.network for metric in preset.metrics):
        try:
            networks[name] = load_protocol_network(name, weights_dir, preset=preset)
        except MissingWeightsError as err:
            if not skip_missing:
                raise
            for metric in preset.metrics:
                if metric.network == name:
                    skipped[metric.name] = err.reason
    if standin:
        try:
            networks["lite0"] = load_standin_network()
        except FileNotFoundError as err:  # its package is not installed
            if not skip_missing:
                raise
            for metric in STANDIN_METRICS:
                skipped[metric.name] = str(err)
    return networks, skipped


def evaluate_folder(
    recon: Path,
    data: Path,
    subject: int,
    *,
    protocol: str | ProtocolPreset = "mindeye2",
    out: Path | None = None,
    weights_dir: Path | None = None,
    skip_missing: bool = False,
    standin: bool = False,
    networks: Mapping[str, FeatureNetwork] | None = None,
    skipped: Mapping[str, str] | None = None,
    device: str = "auto",
    batch_size: int = 32,
    resamples: int = 1000,
    seed: int = 0,
    report: bool = True,
    notes: Sequence[str] = (),
    progress: bool = True,
    encoder: Path | None = None,
    null: Path | None = None,
) -> Evaluation:
    """Score the reconstructions in ``recon`` against subject ``subject``'s test images in ``data``
    under the protocol preset ``protocol`` (``mindeye2`` or ``brain-diffuser``) and write
    ``eval.json``, ``per_image.csv`` and (with ``report``) ``report.html`` into ``out``
    (default ``recon/eval``).

    Networks are the preset's, with weights found on this machine (``weights_dir`` first);
    ``networks`` replaces them (the Python API's way to pass other networks; they are labelled
    by their own ``label`` and ``protocol`` flag in every output), and ``skipped`` then lists
    the metrics the caller could not provide, with the reason.

    ``encoder`` (a folder of ``havir encode`` for this subject and features cache) adds the brain
    correlations (:mod:`havir.metrics.brain`): ``brain_corr_structural``, ``brain_corr_semantic``,
    per ROI, and their ceilings from the ground-truth stimuli. ``null`` (the reconstructions of
    the null run, ``havir train --control shuffled``) adds "method vs null": every metric scored
    on both, with the difference and its paired interval (:func:`~havir.metrics.results.compare_with_null`).
    """
    from havir.devices import resolve_device
    from havir.io import ensure_output_dir
    from havir.report import write_report

    preset = get_preset(protocol) if isinstance(protocol, str) else protocol
    nsd_ids, truth, data_protocol = load_ground_truth(data, subject)
    reconstructions = load_reconstructions(recon, nsd_ids)
    skipped = dict(skipped or {})
    if networks is None:
        networks, skipped = load_networks(weights_dir, preset=preset, skip_missing=skip_missing, standin=standin)
    out = ensure_output_dir(Path(out) if out is not None else Path(recon) / "eval")
    scores = score_images(
        truth, reconstructions, networks=networks, preset=preset, device=resolve_device(device),
        batch_size=batch_size, resamples=resamples, seed=seed, progress=progress,
    )
    record = {
        "preset": preset.name,
        "record": preset.record(),
        "method": method_label(Path(recon)),
        "data": data_protocol,
        "reconstructions": str(Path(recon).resolve()),
        "reconstruction_size": list(reconstructions.shape[1:3]),
        "ground_truth_size": list(truth.shape[1:3]),
        "networks": {name: {"label": net.label, "weights": net.weights, "route": net.route, "protocol": net.protocol,
                            "resize": dataclasses.asdict(net.resize), "dtype": "float32"}
                     for name, net in networks.items()},
        "identification": "two-way: fraction of other ground truths i with corr(G_i, R_j) < corr(G_j, R_j), mean over j",
        "bootstrap": {"resamples": resamples, "level": 0.95, "seed": seed},
        "versions": package_versions("torch", "torchvision", "scikit-image", "numpy", "scipy", "pillow", "transformers", "diffusers",
                                     "open_clip_torch"),
        "threads": torch.get_num_threads(),
    }
    consistency, brain = None, None
    if encoder is not None:  # the encoding model, the backbone and the truth's predictions: once for both sets
        brain = brain_scorer(Path(encoder), data, subject, nsd_ids, truth, device=resolve_device(device), batch_size=batch_size)
        consistency = _add_brain_scores(scores, brain(reconstructions), resamples=resamples, seed=seed)
    evaluation = Evaluation(nsd_ids, scores, skipped, record)
    if consistency is not None:
        evaluation.brain = consistency.record()
    if null is not None:
        null_images = load_reconstructions(null, nsd_ids)
        null_scores = score_images(truth, null_images, networks=networks, preset=preset, device=resolve_device(device),
                                   batch_size=batch_size, resamples=resamples, seed=seed)
        if brain is not None:
            _add_brain_scores(null_scores, brain(null_images), resamples=resamples, seed=seed)
        evaluation.null_comparison = compare_with_null(scores, null_scores, null_folder=str(Path(null).resolve()),
                                                       resamples=resamples, seed=seed)
    if data_protocol["test_images"] != preset.expected_images or data_protocol["sessions"] != preset.expected_sessions:
        evaluation.notes.append(
            f"this run scored {data_protocol['test_images']} images of {data_protocol['sessions']} sessions; the "
            f"{preset.name} preset's published rows used {preset.expected_images} images of {preset.expected_sessions} "
            "sessions: not comparable with them"
        )
    evaluation.outputs = {"json": out / "eval.json", "csv": out / "per_image.csv"}
    if report:
        evaluation.outputs |= {"report": out / "report.html", "chart": out / "metrics.png"}
        write_report(evaluation, truth, Path(recon), out, notes=notes, data=Path(data))
    write_evaluation(evaluation, out)
    return evaluation


def _add_brain_scores(scores: dict, consistency: BrainConsistency, *, resamples: int, seed: int) -> BrainConsistency:
    """Add ``brain_corr_structural`` and ``brain_corr_semantic`` of ``consistency`` to ``scores``; returns it."""
    for name in BRAIN_SETS:
        per_image = consistency.per_image[name]
        scores[brain_metric_name(name)] = MetricScore(
            brain_metric_name(name), per_image, bootstrap_interval(per_image, resamples=resamples, seed=seed),
            f"encoding model ({consistency.encoder['path']})", False, True,
        )
    return consistency


def brain_scorer(encoder: Path, data: Path, subject: int, nsd_ids: np.ndarray, truth: np.ndarray, *,
                 device: torch.device, batch_size: int = 32) -> Callable[[np.ndarray], BrainConsistency]:
    """A function giving the brain correlations of a set of reconstructions (rows of ``nsd_ids``)
    under the encoding model in ``encoder``, which must be this subject's, on these voxels and
    this features cache's backbone. The model and the backbone are loaded, and the ground truth's
    responses predicted, once here, however many sets are scored (the method's and the null's)."""
    model = load_encoder(encoder)
    prepared = require_prepared(data, subject)
    with reading_prepared(prepared) as h5:
        voxels = {name: h5[f"voxels/{name}"][()] for name in VOXEL_SETS}
    settings = features_settings(require_features(data, subject), ("model", "dtype", "seed"))
    check_encoder_matches(model, subject, voxels, settings)
    test = load_split(prepared, "test")
    measured, measured_ids = averaged(np.concatenate([getattr(test, name) for name in VOXEL_SETS], axis=1), test.nsd_id)
    if not np.isin(nsd_ids, measured_ids).all():
        raise InvalidInputError(f"{prepared} lacks the test betas of some scored images: run `havir prepare` again")
    measured = measured[np.searchsorted(measured_ids, nsd_ids)]
    backbone = load_backbone(settings["model"], device=device, dtype=getattr(torch, settings["dtype"]), seed=settings["seed"])

    def predicted(images: np.ndarray) -> np.ndarray:
        spaces: dict[str, list[np.ndarray]] = {space: [] for space in FEATURE_SPACES}
        for start in range(0, len(images), batch_size):
            with smaller_batch_on_oom(batch_size):
                encoded = backbone.encode_images(images[start : start + batch_size])
            for space, values in encoder_features({k: v.float().cpu().numpy() for k, v in encoded.items()}).items():
                spaces[space].append(values)
        return model.predict({space: np.concatenate(parts) for space, parts in spaces.items()})

    predicted_truth = predicted(truth)
    columns = {name: model.columns(name) for name in VOXEL_SETS}
    about = {"path": str(Path(encoder).resolve()), "control": model.record["fit"].get("control"),
             "cv_r_mean": model.record["summary"]["cv_r_mean"]}

    def score(reconstructions: np.ndarray) -> BrainConsistency:
        return brain_consistency(predicted(reconstructions), predicted_truth, measured, columns, model.rois, encoder=about)

    return score


def method_label(recon: Path) -> str:
    """What produced the reconstructions in ``recon``: "<model> (<mode>)" from the manifest
    ``havir reconstruct`` writes, else the folder's name (any other method's folder)."""
    try:
        manifest = read_manifest(recon)
        return f"{manifest['model']} ({manifest['mode']})"
    except (HavirError, KeyError):
        return Path(recon).resolve().name


def write_per_image_csv(evaluation: Evaluation, path: Path) -> None:
    """One row per image (``nsd_id`` then every metric), atomically."""
    names = list(evaluation.scores)
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["nsd_id", *names])
        for row, nsd_id in enumerate(evaluation.nsd_ids):
            writer.writerow([int(nsd_id), *(f"{evaluation.scores[name].per_image[row]:.6f}" for name in names)])


def write_evaluation(evaluation: Evaluation, out: Path) -> None:
    """Write ``out/eval.json`` (summary, per-metric details, comparison) and ``out/per_image.csv``."""
    details = {
        name: {"mean": score.mean, "interval_95": list(score.interval), "network": score.network,
               "protocol_network": score.protocol, "higher_is_better": score.higher_is_better}
        for name, score in evaluation.scores.items()
    }
    summary = evaluation.summary() | {"details": details, "comparison": comparison_rows(evaluation, "this run")}
    write_json(Path(out) / "eval.json", summary)
    write_per_image_csv(evaluation, Path(out) / "per_image.csv")
