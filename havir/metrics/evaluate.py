"""Score a folder of reconstructions against a subject's NSD test images (``havir eval``).

Any method can be scored: the folder only has to hold one ``<nsdId>.png`` per test image. The
ground truth comes from the prepared data (``havir prepare`` copies the test stimuli), so the
protocol (which subject, how many sessions, how many images) is read from the same place and
written into every result.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import PIL.Image
import torch

from havir.io import atomic_path, package_versions, write_json
from havir.metrics.networks import (
    PROTOCOL_METRICS,
    STANDIN_METRICS,
    FeatureMetric,
    FeatureNetwork,
    MissingWeightsError,
    load_protocol_network,
    load_standin_network,
)
from havir.metrics.scores import (
    bootstrap_interval,
    correlation_distance,
    pixcorr,
    pixel_pairs,
    ssim,
    two_way_identification,
)
from havir.nsd.layout import check_subject
from havir.prepare import prepared_normalisation
from havir.progress import track

#: Metric names in the order of the published tables (``cli.md``'s ``--json`` keys).
PROTOCOL_NAMES = ("pixcorr", "ssim") + tuple(metric.name for metric in PROTOCOL_METRICS)

#: NSD, mean of subjects 1, 2, 5, 7, 40 sessions, 1000 test images, as recomputed in the
#: MindEye2 paper (``havir-method.md``); fractions, as HAVIR reports them.
PUBLISHED = {
    "MindEye2": dict(pixcorr=0.322, ssim=0.431, alexnet2=0.961, alexnet5=0.986, inception=0.954, clip=0.930, effnet=0.619, swav=0.344),
    "MindEye1": dict(pixcorr=0.319, ssim=0.360, alexnet2=0.928, alexnet5=0.969, inception=0.946, clip=0.933, effnet=0.648, swav=0.377),
    "Brain-Diffuser": dict(pixcorr=0.273, ssim=0.365, alexnet2=0.944, alexnet5=0.966, inception=0.913, clip=0.909, effnet=0.728, swav=0.421),
    "Takagi & Nishimoto": dict(pixcorr=0.246, ssim=0.410, alexnet2=0.789, alexnet5=0.856, inception=0.838, clip=0.821, effnet=0.811, swav=0.504),
}
PUBLISHED_PROTOCOL = "NSD subjects 1/2/5/7 (mean), 40 sessions, 1000 test images"


@dataclass
class MetricScore:
    """One metric over a set of images.

    ``per_image`` : (n,) scores in the order of the evaluation's ``nsd_ids``; ``mean`` is the
    reported number and ``interval`` its bootstrap 95% confidence interval.
    """

    name: str
    per_image: np.ndarray
    interval: tuple[float, float]
    network: str
    protocol: bool
    higher_is_better: bool

    @property
    def mean(self) -> float:
        return float(self.per_image.mean())


@dataclass
class Evaluation:
    """Scores of n reconstructions; ``skipped`` maps a metric to why it was not computed."""

    nsd_ids: np.ndarray
    scores: dict[str, MetricScore]
    skipped: dict[str, str] = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)  # files written, by kind

    def summary(self) -> dict:
        """The ``--json`` object of ``cli.md``: n, metrics (fractions), skipped, protocol, intervals.

        ``metrics`` holds only numbers computed with the protocol's networks; anything else
        (random weights, the demo's stand-in) is under ``non_protocol_metrics`` with its network.
        """
        return {
            "n": len(self.nsd_ids),
            "metrics": {name: round(score.mean, 6) for name, score in self.scores.items() if score.protocol},
            "non_protocol_metrics": {
                name: {"value": round(score.mean, 6), "network": score.network}
                for name, score in self.scores.items() if not score.protocol
            },
            "intervals_95": {name: [round(v, 6) for v in score.interval] for name, score in self.scores.items()},
            "skipped": self.skipped,
            "protocol": self.protocol,
            "outputs": {kind: str(path) for kind, path in self.outputs.items()},
        }


def _feature_score(metric: FeatureMetric, truth: np.ndarray, recon: np.ndarray) -> np.ndarray:
    score = two_way_identification if metric.score == "identification" else correlation_distance
    return score(truth, recon)


def score_images(
    ground_truth: np.ndarray,
    reconstructions: np.ndarray,
    *,
    networks: Mapping[str, FeatureNetwork],
    metrics: Sequence[FeatureMetric] = PROTOCOL_METRICS,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    resamples: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, MetricScore]:
    """PixCorr, SSIM and every metric in ``metrics`` whose network is in ``networks``.

    ``ground_truth`` : uint8 (n, s, s, 3), the stimuli; ``reconstructions`` : uint8 (n, h, w, 3),
    row i reconstructs row i. Scores do not depend on ``batch_size`` or on the order of the rows
    (beyond float rounding); intervals are seeded by ``seed``.
    """
    device = torch.device(device)

    def interval(per_image: np.ndarray) -> tuple[float, float]:
        return bootstrap_interval(per_image, resamples=resamples, seed=seed)

    results = {}
    pairs = pixel_pairs(ground_truth, reconstructions)
    for name, function in (("pixcorr", pixcorr), ("ssim", ssim)):
        per_image = function(*pairs, paired=True)
        results[name] = MetricScore(name, per_image, interval(per_image), "pixels", True, True)
    wanted = [metric for metric in metrics if metric.network in networks]
    for network_name in track(list(dict.fromkeys(m.network for m in wanted)), "feature networks", enabled=progress):
        network = networks[network_name]
        layers = [metric.layer for metric in wanted if metric.network == network_name]
        truth = network.features(ground_truth, layers, device=device, batch_size=batch_size)
        recon = network.features(reconstructions, layers, device=device, batch_size=batch_size)
        for metric in (m for m in wanted if m.network == network_name):
            per_image = _feature_score(metric, truth[metric.layer], recon[metric.layer])
            results[metric.name] = MetricScore(
                metric.name, per_image, interval(per_image), network.label, network.protocol,
                metric.score == "identification",
            )
    return results


def load_ground_truth(data: Path, subject: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A subject's test stimuli from the prepared data: (nsd_ids (n,), uint8 images (n, s, s, 3),
    the data protocol: subject, sessions read, number of test images, normalisation)."""
    check_subject(subject)
    prepared = Path(data) / f"subj{subject:02d}.h5"
    if not prepared.is_file():
        raise FileNotFoundError(f"no prepared data for subj{subject:02d} in {data}: run `havir prepare` first")
    with h5py.File(prepared, "r") as h5:
        if "test/stimuli" not in h5:
            raise ValueError(f"{prepared} holds no test stimuli: run `havir prepare` again")
        nsd_ids = h5["test/stimulus_nsd_id"][()]
        images = h5["test/stimuli"][()]
    record_path = prepared.with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    protocol = {"subject": subject, "sessions": record.get("sessions"), "test_images": int(len(nsd_ids)),
                "normalisation": prepared_normalisation(prepared)}
    return nsd_ids, images, protocol


_NAME = re.compile(r"^(\d+)\.png$")


def load_reconstructions(folder: Path, nsd_ids: np.ndarray, *, exact: bool = True) -> np.ndarray:
    """The reconstructions ``<nsdId>.png`` in ``folder`` for ``nsd_ids``, as uint8 (n, h, w, 3).

    With ``exact`` (scoring) the folder must hold exactly these images: a missing or an extra
    id is an error naming them, so that two methods are never compared on different image sets.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reconstruction folder {folder} does not exist: pass the --out folder of `havir reconstruct`")
    present = {int(m.group(1)) for path in folder.iterdir() if (m := _NAME.match(path.name))}
    wanted = {int(i) for i in nsd_ids}

    def listed(ids: set[int]) -> str:
        shown = ", ".join(str(i) for i in sorted(ids)[:5])
        return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    if wanted - present:
        raise FileNotFoundError(
            f"{folder} lacks {len(wanted - present)} of the {len(wanted)} test images (nsdId {listed(wanted - present)}): "
            "reconstruct all of them (`havir reconstruct` without --limit) before scoring"
        )
    if exact and present - wanted:
        raise ValueError(
            f"{folder} holds {len(present - wanted)} images that are not this subject's test images "
            f"(nsdId {listed(present - wanted)}): is it another subject's folder?"
        )
    images = []
    for nsd_id in nsd_ids:
        with PIL.Image.open(folder / f"{int(nsd_id)}.png") as image:
            images.append(np.asarray(image.convert("RGB")))
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"the reconstructions in {folder} have different sizes: {sorted({i.shape for i in images})}")
    return np.stack(images)


def load_networks(
    weights_dir: Path | None = None, *, skip_missing: bool = False, standin: bool = False
) -> tuple[dict[str, FeatureNetwork], dict[str, str]]:
    """The protocol networks whose weights are here, and the metrics skipped with the reason.

    Without ``skip_missing`` a missing file stops everything (:class:`MissingWeightsError`).
    ``standin`` adds the offline EfficientNet-Lite0 (the demo's labelled stand-in).
    """
    networks, skipped = {}, {}
    for name in dict.fromkeys(metric.network for metric in PROTOCOL_METRICS):
        try:
            networks[name] = load_protocol_network(name, weights_dir)
        except MissingWeightsError as err:
            if not skip_missing:
                raise
            for metric in PROTOCOL_METRICS:
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
) -> Evaluation:
    """Score the reconstructions in ``recon`` against subject ``subject``'s test images in ``data``
    and write ``eval.json``, ``per_image.csv`` and (with ``report``) ``report.html`` into ``out``
    (default ``recon/eval``).

    Networks are the protocol's, with weights found on this machine (``weights_dir`` first);
    ``networks`` replaces them (the Python API's way to pass other networks; they are labelled
    by their own ``label`` and ``protocol`` flag in every output), and ``skipped`` then lists
    the metrics the caller could not provide, with the reason.
    """
    from havir.devices import resolve_device
    from havir.io import ensure_output_dir
    from havir.report import write_report

    nsd_ids, truth, data_protocol = load_ground_truth(data, subject)
    reconstructions = load_reconstructions(recon, nsd_ids)
    out = ensure_output_dir(Path(out) if out is not None else Path(recon) / "eval")
    skipped = dict(skipped or {})
    if networks is None:
        networks, skipped = load_networks(weights_dir, skip_missing=skip_missing, standin=standin)
    scores = score_images(
        truth, reconstructions, networks=networks, metrics=PROTOCOL_METRICS + STANDIN_METRICS,
        device=resolve_device(device), batch_size=batch_size, resamples=resamples, seed=seed, progress=progress,
    )
    protocol = {
        "data": data_protocol,
        "reconstructions": str(Path(recon).resolve()),
        "reconstruction_size": list(reconstructions.shape[1:3]),
        "ground_truth_size": list(truth.shape[1:3]),
        "networks": {name: {"label": net.label, "weights": net.weights, "protocol": net.protocol, "input_size": net.input_size}
                     for name, net in networks.items()},
        "pixcorr": "Pearson r of RGB pixels in [0, 1], reconstruction resized (bilinear, antialiased) to the ground truth",
        "ssim": "skimage structural_similarity on rgb2gray, gaussian_weights, sigma 1.5, population covariance, data_range 1",
        "identification": "two-way: fraction of other ground truths i with corr(G_i, R_j) < corr(G_j, R_j), mean over j",
        "bootstrap": {"resamples": resamples, "level": 0.95, "seed": seed},
        "published_protocol": PUBLISHED_PROTOCOL,
        "versions": package_versions("torch", "torchvision", "scikit-image", "numpy", "transformers"),
    }
    evaluation = Evaluation(nsd_ids, scores, skipped, protocol)
    evaluation.outputs = {"json": out / "eval.json", "csv": out / "per_image.csv"}
    if report:
        evaluation.outputs |= {"report": out / "report.html", "chart": out / "metrics.png"}
        write_report(evaluation, truth, Path(recon), out, notes=notes)
    write_evaluation(evaluation, out)
    return evaluation


def write_per_image_csv(evaluation: Evaluation, path: Path) -> None:
    """One row per image (``nsd_id`` then every metric), atomically."""
    names = list(evaluation.scores)
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["nsd_id", *names])
        for row, nsd_id in enumerate(evaluation.nsd_ids):
            writer.writerow([int(nsd_id), *(f"{evaluation.scores[name].per_image[row]:.6f}" for name in names)])


def comparison_rows(evaluation: Evaluation, label: str) -> list[dict]:
    """The published rows and this evaluation's, each with its protocol, for one table."""
    data = evaluation.protocol.get("data", {})
    ours = {
        "method": label,
        "protocol": f"NSD subject {data.get('subject')}, {data.get('sessions')} sessions, {len(evaluation.nsd_ids)} test images",
    } | {name: evaluation.scores[name].mean for name in PROTOCOL_NAMES if name in evaluation.scores and evaluation.scores[name].protocol}
    return [{"method": method, "protocol": PUBLISHED_PROTOCOL} | row for method, row in PUBLISHED.items()] + [ours]


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
