"""The results of an evaluation as data: per-metric scores, the ``--json`` summary, and the
published rows they are compared with. Read by ``havir eval``, the report and ``havir table``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from havir.metrics.protocols import MINDEYE2, PROTOCOL_METRICS
from havir.metrics.records import METRICS

#: The names of the brain correlations (:mod:`havir.metrics.brain`) start with this.
BRAIN_PREFIX = "brain_corr_"
#: Metric names in the order of the published tables (``cli.md``'s ``--json`` keys).
PROTOCOL_NAMES = ("pixcorr", "ssim") + tuple(metric.name for metric in PROTOCOL_METRICS)


@dataclass(frozen=True)
class PublishedRow:
    """One row of a published table: a method, the preset that computed its metrics, the data
    protocol (subjects averaged, sessions, images) and where it was published. Its values are
    in the metric records (:attr:`~havir.metrics.records.MetricRecord.published`)."""

    method: str
    preset: str
    subjects: tuple[int, ...]
    sessions: int
    images: int
    source: str

    @property
    def metrics(self) -> dict[str, float]:
        """``{metric: published value}`` (fractions, as HAVIR reports them), in display order."""
        key = (self.preset, self.method)
        return {name: record.published[key] for name, record in METRICS.items() if key in record.published}

    def protocol(self) -> str:
        subjects = "/".join(str(s) for s in self.subjects)
        return f"{self.preset} preset; NSD subjects {subjects} (mean), {self.sessions} sessions, {self.images} test images"


_MINDEYE2_TABLE = "MindEye2 paper, Table 1 (every row re-scored by MindEyeV2's final_evaluations.ipynb)"
#: ``havir-method.md``'s table: NSD, mean of subjects 1, 2, 5, 7, 40 sessions, 1000 test images,
#: all four rows computed by MindEye2's evaluation code, i.e. the ``mindeye2`` preset.
PUBLISHED_ROWS = tuple(
    PublishedRow(method, "mindeye2", (1, 2, 5, 7), 40, 1000, _MINDEYE2_TABLE)
    for method in ("MindEye2", "MindEye1", "Brain-Diffuser", "Takagi & Nishimoto")
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
    #: With an encoding model: ceilings, ratios, per-ROI values (:mod:`havir.metrics.brain`).
    brain: dict = field(default_factory=dict)
    #: With a null run's reconstructions: every metric for both and the difference (:func:`compare_with_null`).
    null_comparison: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The ``--json`` object of ``cli.md``: n, metrics (fractions), skipped, protocol, intervals.

        ``metrics`` holds the numbers computed with the protocol's networks, and the brain
        correlations (``brain_corr_*``, per ROI under ``brain_corr_rois``) when an encoding model
        scored them; anything else (random weights, the demo's stand-in) is under
        ``non_protocol_metrics`` with its network.
        """
        brain = {name for name in self.scores if name.startswith(BRAIN_PREFIX)}
        return {
            "n": len(self.nsd_ids),
            "metrics": {name: round(score.mean, 6) for name, score in self.scores.items() if score.protocol or name in brain}
            | ({f"{BRAIN_PREFIX}rois": {k: round(v, 6) for k, v in self.brain["rois"].items()}} if self.brain else {}),
            "non_protocol_metrics": {
                name: {"value": round(score.mean, 6), "network": score.network}
                for name, score in self.scores.items() if not score.protocol and name not in brain
            },
            "intervals_95": {name: [round(v, 6) for v in score.interval] for name, score in self.scores.items()},
            "skipped": self.skipped,
            "notes": self.notes,
            "protocol": self.protocol,
            "outputs": {kind: str(path) for kind, path in self.outputs.items()},
        } | ({"brain_consistency": self.brain} if self.brain else {}) | (
            {"null_comparison": self.null_comparison} if self.null_comparison else {})


def compare_with_null(method: dict[str, MetricScore], null: dict[str, MetricScore], *, null_folder: str,
                      resamples: int = 1000, seed: int = 0) -> dict:
    """Every metric of the method beside the same metric of the null run (the same pipeline
    trained on shuffled voxel-image pairs), on the same images: the difference of the means and
    its 95% paired bootstrap interval (images resampled, both sides together), and whether the
    method beats the null (the interval excludes zero on the metric's better side).

    A generative model paints plausible scenes from nothing: a score means something only by how
    far it beats the null's.
    """
    from havir.metrics.scores import bootstrap_interval

    rows = {}
    for name, score in method.items():
        if name not in null:
            continue
        difference = score.per_image - null[name].per_image
        low, high = bootstrap_interval(difference, resamples=resamples, seed=seed)
        rows[name] = {"method": score.mean, "null": null[name].mean, "difference": float(difference.mean()),
                      "interval_95": [low, high], "beats_null": bool(low > 0 if score.higher_is_better else high < 0)}
    return {"null_reconstructions": null_folder, "metrics": rows}


def published_rows(preset: str) -> tuple[list[PublishedRow], list[tuple[PublishedRow, str]]]:
    """The published rows computed with ``preset``, and the others with the reason they are apart."""
    same = [row for row in PUBLISHED_ROWS if row.preset == preset]
    apart = [(row, f"computed with the {row.preset} preset, not {preset}") for row in PUBLISHED_ROWS if row.preset != preset]
    return same, apart


def subject_label(data: dict) -> str:
    """``"NSD subject 1"``, or ``"synthetic subject 1"`` for data from ``havir synth-nsd``."""
    return f"{'synthetic' if data.get('synthetic') else 'NSD'} subject {data.get('subject')}"


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
