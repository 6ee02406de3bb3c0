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
from dataclasses import dataclass

import numpy as np

from havir.metrics.scores import pixcorr, ssim


@dataclass(frozen=True)
class MetricRecord:
    """name : the key in ``eval.json`` and ``per_image.csv``; title : the report's heading;
    column : the short heading of the published tables; higher_is_better : the direction;
    percent : shown as a percentage (identification accuracies), else to 3 decimals."""

    name: str
    title: str
    column: str
    higher_is_better: bool = True
    percent: bool = False

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


for _record in (
    ImageMetric("pixcorr", "PixCorr", "PixCorr", score=lambda truth, recon, preset: pixcorr(truth, recon), protocol=True),
    ImageMetric("ssim", "SSIM", "SSIM", score=lambda truth, recon, preset: ssim(truth, recon, variant=preset.ssim_variant),
                protocol=True),
    MetricRecord("alexnet2", "AlexNet(2)", "Alex(2)", percent=True),
    MetricRecord("alexnet5", "AlexNet(5)", "Alex(5)", percent=True),
    MetricRecord("inception", "Inception", "Incep", percent=True),
    MetricRecord("clip", "CLIP", "CLIP", percent=True),
    MetricRecord("effnet", "EffNet-B", "EffNet-B", higher_is_better=False),
    MetricRecord("swav", "SwAV", "SwAV", higher_is_better=False),
    MetricRecord("lite0_identification", "Lite0 ident. (stand-in)", "Lite0 (stand-in)", percent=True),
):
    register_metric(_record)
