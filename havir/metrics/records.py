"""What each metric is, as data: its name, titles, direction and notation, so the report, the
tables and the charts need no per-metric code. Pixel-level metrics also carry their scoring
function; the evaluation computes every registered one.

To add a metric computed from the images at the protocol's pixel resolution, register an
:class:`ImageMetric`::

    register_metric(ImageMetric("meanabs", "Mean abs. error", "MAE", higher_is_better=False,
                                score=lambda truth, recon, preset: abs(truth - recon).mean(axis=(1, 2, 3))))

Metrics of a feature network are :class:`~havir.metrics.protocols.FeatureMetric` entries of a
protocol preset; their records are registered here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from havir.metrics.scores import pixcorr, ssim


@dataclass(frozen=True)
class MetricRecord:
    """name : the key in ``eval.json`` and ``per_image.csv``; title : the report's heading;
    column : the short heading of the published tables; higher_is_better : the direction;
    percent : shown as a percentage (identification accuracies), else to 3 decimals;
    published : the published values, ``{(preset, method): value}`` (fractions), which the
    report and ``havir table`` show beside a run's row of the same preset
    (:data:`havir.metrics.results.PUBLISHED_ROWS` says where each row comes from)."""

    name: str
    title: str
    column: str
    higher_is_better: bool = True
    percent: bool = False
    published: dict[tuple[str, str], float] = field(default_factory=dict, compare=False)

    def format(self, value: float | None) -> str:
        """The published tables' notation: ``96.1%`` or ``0.322`` (``—`` for a missing value)."""
        if value is None:
            return "—"
        return f"{100 * value:.1f}%" if self.percent else f"{value:.3f}"


@dataclass(frozen=True)
class ImageMetric(MetricRecord):
    """A metric scored on the images themselves: ``score(truth, recon, preset)`` takes both sets as
    (n, s, s, 3) arrays in [0, 1] at the preset's pixel resolution and returns (n,) per-image scores.
    ``protocol`` : part of the published protocol (PixCorr, SSIM), else labelled as HAVIR's own."""

    score: Callable[..., np.ndarray] | None = None
    protocol: bool = False


#: Every known metric by name, in display order.
METRICS: dict[str, MetricRecord] = {}


def register_metric(record: MetricRecord) -> MetricRecord:
    """Make ``record`` known to the report and the tables (an :class:`ImageMetric`: also scored by every evaluation)."""
    METRICS[record.name] = record
    return record


def metric_record(name: str) -> MetricRecord:
    """The record of ``name``; an unregistered name gets a plain one (its name as title, 3 decimals)."""
    return METRICS.get(name) or MetricRecord(name, name, name)


def image_metrics() -> list[ImageMetric]:
    """The registered metrics the evaluation scores from the images, in registration order."""
    return [record for record in METRICS.values() if isinstance(record, ImageMetric)]


#: ``havir-method.md``'s table (MindEye2 paper, Table 1; every row computed by MindEye2's
#: evaluation code, i.e. the ``mindeye2`` preset), one method per line, in the column order below.
_MINDEYE2_TABLE_1_COLUMNS = ("pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav")
_MINDEYE2_TABLE_1 = {
    "MindEye2": (0.322, 0.431, 0.961, 0.986, 0.954, 0.930, 0.619, 0.344),
    "MindEye1": (0.319, 0.360, 0.928, 0.969, 0.946, 0.933, 0.648, 0.377),
    "Brain-Diffuser": (0.273, 0.365, 0.944, 0.966, 0.913, 0.909, 0.728, 0.421),
    "Takagi & Nishimoto": (0.246, 0.410, 0.789, 0.856, 0.838, 0.821, 0.811, 0.504),
}


def _published(name: str) -> dict[tuple[str, str], float]:
    column = _MINDEYE2_TABLE_1_COLUMNS.index(name)
    return {("mindeye2", method): values[column] for method, values in _MINDEYE2_TABLE_1.items()}


for _record in (
    ImageMetric("pixcorr", "PixCorr", "PixCorr", score=lambda truth, recon, preset: pixcorr(truth, recon), protocol=True,
                published=_published("pixcorr")),
    ImageMetric("ssim", "SSIM", "SSIM", score=lambda truth, recon, preset: ssim(truth, recon, variant=preset.ssim_variant),
                protocol=True, published=_published("ssim")),
    MetricRecord("alexnet2", "AlexNet(2)", "Alex(2)", percent=True, published=_published("alexnet2")),
    MetricRecord("alexnet5", "AlexNet(5)", "Alex(5)", percent=True, published=_published("alexnet5")),
    MetricRecord("inception", "Inception", "Incep", percent=True, published=_published("inception")),
    MetricRecord("clip", "CLIP", "CLIP", percent=True, published=_published("clip")),
    MetricRecord("effnet", "EffNet-B", "EffNet-B", higher_is_better=False, published=_published("effnet")),
    MetricRecord("swav", "SwAV", "SwAV", higher_is_better=False, published=_published("swav")),
    MetricRecord("lite0_identification", "Lite0 ident. (stand-in)", "Lite0 (stand-in)", percent=True),
):
    register_metric(_record)
