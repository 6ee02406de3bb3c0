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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import PIL.Image
import torch

from havir.errors import InvalidInputError, MissingInputError
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
    PROTOCOL_METRICS,
    FeatureMetric,
    ProtocolPreset,
    get_preset,
    pixel_images,
    working_images,
)
from havir.metrics.scores import (
    bootstrap_interval,
    correlation_distance,
    correlation_matrix,
    identification_from_correlations,
    pixcorr,
    ssim,
)
from havir.nsd.layout import check_subject
from havir.prepare import prepared_normalisation
from havir.progress import track

#: Metric names in the order of the published tables (``cli.md``'s ``--json`` keys).
PROTOCOL_NAMES = ("pixcorr", "ssim") + tuple(metric.name for metric in PROTOCOL_METRICS)


@dataclass(frozen=True)
class PublishedRow:
    """One row of a published table: a method's metrics (fractions, as HAVIR reports them), the
    preset that computed them, and the data protocol (subjects averaged, sessions, images)."""

    method: str
    preset: str
    subjects: tuple[int, ...]
    sessions: int
    images: int
    source: str
    metrics: dict

    def protocol(self) -> str:
        subjects = "/".join(str(s) for s in self.subjects)
        return f"{self.preset} preset; NSD subjects {subjects} (mean), {self.sessions} sessions, {self.images} test images"


_MINDEYE2_TABLE = "MindEye2 paper, Table 1 (every row re-scored by MindEyeV2's final_evaluations.ipynb)"
#: ``havir-method.md``'s table: NSD, mean of subjects 1, 2, 5, 7, 40 sessions, 1000 test images,
#: all four rows computed by MindEye2's evaluation code, i.e. the ``mindeye2`` preset.
PUBLISHED_ROWS = tuple(
    PublishedRow(method, "mindeye2", (1, 2, 5, 7), 40, 1000, _MINDEYE2_TABLE, dict(zip(PROTOCOL_NAMES, values)))
    for method, values in (
        ("MindEye2", (0.322, 0.431, 0.961, 0.986, 0.954, 0.930, 0.619, 0.344)),
        ("MindEye1", (0.319, 0.360, 0.928, 0.969, 0.946, 0.933, 0.648, 0.377)),
        ("Brain-Diffuser", (0.273, 0.365, 0.944, 0.966, 0.913, 0.909, 0.728, 0.421)),
        ("Takagi & Nishimoto", (0.246, 0.410, 0.789, 0.856, 0.838, 0.821, 0.811, 0.504)),
    )
)


@dataclass
class MetricScore:
    """One metric over a set of images.

    ``per_image`` : (n,) scores in the order of the evaluation's ``nsd_ids``; ``mean`` is the
    reported number and ``interval`` its bootstrap 95% confidence interval. ``correlations``
    (identification metrics only, kept in memory): the (n, n) matrix C[i, j] = corr(ground truth
    i, reconstruction j) the identification counts from, a finer check than the counts.
    """

    name: str
    per_image: np.ndarray
    interval: tuple[float, float]
    network: str
    protocol: bool
    higher_is_better: bool
    correlations: np.ndarray | None = None

    @property
    def mean(self) -> float:
        return float(self.per_image.mean())


@dataclass
class Evaluation:
    """Scores of n reconstructions; ``skipped`` maps a metric to why it was not computed;
    ``notes`` are things the user should know (a sibling folder left out of the report...)."""

    nsd_ids: np.ndarray
    scores: dict[str, MetricScore]
    skipped: dict[str, str] = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)  # files written, by kind
    notes: list[str] = field(default_factory=list)

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
            "notes": self.notes,
            "protocol": self.protocol,
            "outputs": {kind: str(path) for kind, path in self.outputs.items()},
        }


def _feature_score(metric: FeatureMetric, truth: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-image scores, the correlation matrix for an identification metric else None)."""
    if metric.score == "identification":
        if len(truth) < 2:
            raise ValueError("two-way identification needs at least two images")
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
) -> dict[str, MetricScore]:
    """PixCorr, SSIM and every metric in ``metrics`` (default: the preset's and the stand-in's)
    whose network is in ``networks``, each image taken through ``preset``'s steps.

    ``ground_truth`` : uint8 (n, s, s, 3), the stimuli; ``reconstructions`` : uint8 (n, h, w, 3),
    row i reconstructs row i. Images are prepared batch by batch (memory stays bounded for 1000
    images); scores do not depend on ``batch_size`` or on the order of the rows (beyond float
    rounding); intervals are seeded by ``seed``.
    """
    device = torch.device(device)
    metrics = tuple(preset.metrics) + STANDIN_METRICS if metrics is None else tuple(metrics)
    if len(ground_truth) != len(reconstructions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(reconstructions)} reconstructions")
    if len(ground_truth) == 0:
        raise ValueError("no images to score")
    truth_side = ground_truth.shape[1]

    def batches():
        for start in range(0, len(ground_truth), batch_size):
            stop = start + batch_size
            yield (working_images(preset, ground_truth[start:stop], ground_truth=True),
                   working_images(preset, reconstructions[start:stop], ground_truth=False))

    def interval(per_image: np.ndarray) -> tuple[float, float]:
        return bootstrap_interval(per_image, resamples=resamples, seed=seed)

    pixel_scores: dict[str, list[np.ndarray]] = {"pixcorr": [], "ssim": []}
    for truth, recon in batches():
        truth_px, recon_px = pixel_images(preset, truth, recon, truth_side)
        pixel_scores["pixcorr"].append(pixcorr(truth_px, recon_px))
        pixel_scores["ssim"].append(ssim(truth_px, recon_px, variant=preset.ssim_variant))
    results = {}
    for name, parts in pixel_scores.items():
        per_image = np.concatenate(parts)
        results[name] = MetricScore(name, per_image, interval(per_image), "pixels", True, True)
    wanted = [metric for metric in metrics if metric.network in networks]
    for network_name in track(list(dict.fromkeys(m.network for m in wanted)), "feature networks", enabled=progress, unit="networks"):
        network = networks[network_name]
        layers = [metric.layer for metric in wanted if metric.network == network_name]
        features: dict[str, list[dict]] = {"truth": [], "recon": []}
        for truth, recon in batches():
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
                "normalisation": prepared_normalisation(prepared), "synthetic": _synthetic(record)}
    return nsd_ids, images, protocol


def _synthetic(record: dict) -> bool:
    """Whether prepared data came from ``havir synth-nsd`` (its release holds ``synth_truth.json``)."""
    root = record.get("nsd_root")
    return isinstance(root, str) and (Path(root) / "synth_truth.json").is_file()


def subject_label(data: dict) -> str:
    """``"NSD subject 1"``, or ``"synthetic subject 1"`` for data from ``havir synth-nsd``."""
    return f"{'synthetic' if data.get('synthetic') else 'NSD'} subject {data.get('subject')}"


_PNG_NAME = re.compile(r"^(\d+)\.png$")
_CANONICAL = re.compile(r"^(0|[1-9]\d*)\.png$")


def reconstruction_ids(folder: Path) -> set[int]:
    """The nsdIds of the ``<nsdId>.png`` files in ``folder``.

    Names are strict: one canonical name per image, the decimal nsdId without leading zeros
    (``12.png``). ``0012.png`` would be a second name for the same image (and ``12.png`` and
    ``0012.png`` side by side would score only one of them), so any such name is refused.
    """
    numbered = [path.name for path in Path(folder).iterdir() if _PNG_NAME.match(path.name)]
    odd = sorted(name for name in numbered if not _CANONICAL.match(name))
    if odd:
        example = f"{int(odd[0][:-4])}.png"
        raise InvalidInputError(
            f"{folder} holds {len(odd)} reconstruction(s) with leading zeros in the name (e.g. {odd[0]}): name each "
            f"image <nsdId>.png without leading zeros ({odd[0]} -> {example}), one file per image"
        )
    return {int(name[:-4]) for name in numbered}


def read_reconstruction(path: Path) -> np.ndarray:
    """One reconstruction as uint8 (h, w, 3).

    8-bit images of any PIL mode are converted to RGB. 16-bit grayscale PNGs are scaled by
    255/65535 (PIL's RGB conversion would clip them to white); 16-bit colour PNGs are refused
    (PIL keeps only their high byte). An image over PIL's decompression-bomb limit is refused.
    """
    try:
        with PIL.Image.open(path) as image:
            rawmode = image.tile[0].args if image.tile else ""
            if image.mode.startswith("I;16"):
                levels = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
                gray = np.rint(levels).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=2)
            if image.mode in ("I", "F"):
                raise InvalidInputError(
                    f"{path} is a {image.mode} (32-bit) image: save reconstructions as 8-bit RGB PNGs"
                )
            if isinstance(rawmode, str) and ";16" in rawmode:
                raise InvalidInputError(
                    f"{path} is a 16-bit colour PNG ({rawmode}), which PIL reads only to 8 bits by truncation: "
                    "save reconstructions as 8-bit RGB PNGs"
                )
            return np.asarray(image.convert("RGB"))
    except PIL.Image.DecompressionBombError as err:
        raise InvalidInputError(
            f"{path} is too large to be a reconstruction ({err}): save it at the stimulus size (425 or 512 px)"
        ) from None
    except PIL.UnidentifiedImageError:
        raise InvalidInputError(f"{path} is not an image PIL can read: write reconstructions as PNG files") from None


def load_reconstructions(folder: Path, nsd_ids: np.ndarray, *, exact: bool = True) -> np.ndarray:
    """The reconstructions ``<nsdId>.png`` in ``folder`` for ``nsd_ids``, as uint8 (n, h, w, 3).

    With ``exact`` (scoring) the folder must hold exactly these images: a missing or an extra
    id is an error naming them, so that two methods are never compared on different image sets.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"reconstruction folder {folder} does not exist: pass the --out folder of `havir reconstruct`")
    present = reconstruction_ids(folder)
    wanted = {int(i) for i in nsd_ids}

    def listed(ids: set[int]) -> str:
        shown = ", ".join(str(i) for i in sorted(ids)[:5])
        return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    if wanted - present:
        raise MissingInputError(
            f"{folder} lacks {len(wanted - present)} of the {len(wanted)} test images (nsdId {listed(wanted - present)}): "
            "reconstruct all of them (`havir reconstruct` without --limit) before scoring"
        )
    if exact and present - wanted:
        raise InvalidInputError(
            f"{folder} holds {len(present - wanted)} images that are not this subject's test images "
            f"(nsdId {listed(present - wanted)}): is it another subject's folder?"
        )
    images = [read_reconstruction(folder / f"{int(nsd_id)}.png") for nsd_id in nsd_ids]
    if len({image.shape for image in images}) > 1:
        raise InvalidInputError(f"the reconstructions in {folder} have different sizes: {sorted({i.shape for i in images})}")
    return np.stack(images)


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
) -> Evaluation:
    """Score the reconstructions in ``recon`` against subject ``subject``'s test images in ``data``
    under the protocol preset ``protocol`` (``mindeye2`` or ``brain-diffuser``) and write
    ``eval.json``, ``per_image.csv`` and (with ``report``) ``report.html`` into ``out``
    (default ``recon/eval``).

    Networks are the preset's, with weights found on this machine (``weights_dir`` first);
    ``networks`` replaces them (the Python API's way to pass other networks; they are labelled
    by their own ``label`` and ``protocol`` flag in every output), and ``skipped`` then lists
    the metrics the caller could not provide, with the reason.
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
    evaluation = Evaluation(nsd_ids, scores, skipped, record)
    if data_protocol["test_images"] != preset.expected_images or data_protocol["sessions"] != preset.expected_sessions:
        evaluation.notes.append(
            f"this run scored {data_protocol['test_images']} images of {data_protocol['sessions']} sessions; the "
            f"{preset.name} preset's published rows used {preset.expected_images} images of {preset.expected_sessions} "
            "sessions: not comparable with them"
        )
    evaluation.outputs = {"json": out / "eval.json", "csv": out / "per_image.csv"}
    if report:
        evaluation.outputs |= {"report": out / "report.html", "chart": out / "metrics.png"}
        write_report(evaluation, truth, Path(recon), out, notes=notes)
    write_evaluation(evaluation, out)
    return evaluation


def method_label(recon: Path) -> str:
    """What produced the reconstructions in ``recon``: "<model> (<mode>)" from the manifest
    ``havir reconstruct`` writes, else the folder's name (any other method's folder)."""
    try:
        manifest = json.loads((Path(recon) / "manifest.json").read_text())
        return f"{manifest['model']} ({manifest['mode']})"
    except (OSError, ValueError, KeyError, TypeError):
        return Path(recon).resolve().name


def write_per_image_csv(evaluation: Evaluation, path: Path) -> None:
    """One row per image (``nsd_id`` then every metric), atomically."""
    names = list(evaluation.scores)
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["nsd_id", *names])
        for row, nsd_id in enumerate(evaluation.nsd_ids):
            writer.writerow([int(nsd_id), *(f"{evaluation.scores[name].per_image[row]:.6f}" for name in names)])


def published_rows(preset: str) -> tuple[list[PublishedRow], list[tuple[PublishedRow, str]]]:
    """The published rows computed with ``preset``, and the others with the reason they are apart."""
    same = [row for row in PUBLISHED_ROWS if row.preset == preset]
    apart = [(row, f"computed with the {row.preset} preset, not {preset}") for row in PUBLISHED_ROWS if row.preset != preset]
    return same, apart


def comparison_rows(evaluation: Evaluation, label: str) -> dict:
    """This evaluation's row beside the published rows of its own preset; rows of other presets
    are listed apart (``other_presets``), each with the reason."""
    preset = evaluation.protocol.get("preset", MINDEYE2.name)
    data = evaluation.protocol.get("data", {})
    ours = {
        "method": label,
        "protocol": f"{preset} preset; {subject_label(data)}, {data.get('sessions')} sessions, "
                    f"{len(evaluation.nsd_ids)} test images",
    } | {name: evaluation.scores[name].mean for name in PROTOCOL_NAMES if name in evaluation.scores and evaluation.scores[name].protocol}
    same, apart = published_rows(preset)
    return {
        "preset": preset,
        "rows": [{"method": row.method, "protocol": row.protocol(), "source": row.source} | row.metrics for row in same] + [ours],
        "other_presets": [{"method": row.method, "protocol": row.protocol(), "reason": reason} | row.metrics for row, reason in apart],
        "notes": list(evaluation.notes),
    }


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
