"""Brain correlation: would a reconstruction evoke the activity that was measured?

An encoding model (``havir encode``, :mod:`havir.artifacts.encoder`) predicts each voxel's
response to an image from the backbone's features of it. For a set of voxels (the structural
set, the semantic set, an ROI), the **brain correlation** of n reconstructions is

    mean over voxels v of  r_v = Pearson r, across the n test images, between the encoder's
                                 prediction from each reconstruction and the measured
                                 (repetition-averaged) test betas,

as MindEye2 reports it. The same computed from the ground-truth stimuli is the **ceiling** (what
the encoding model allows), and the reconstructions' value over it the **ratio**. A generative
model that paints plausible scenes the brain did not encode scores near zero: so does the null
run's (shuffled voxel-image pairs).

Per image: with both sides standardised across the images (mean 0, standard deviation 1 per
voxel), ``r_v = mean over images i of z_pred[i, v] * z_meas[i, v]``, so the brain correlation is
exactly the mean over images of ``c_i = mean over voxels of z_pred[i, v] * z_meas[i, v]``. The
CSV holds ``c_i``; the interval resamples the ``c_i`` with the standardisation held fixed (the
usual approximation: it leaves out the variation of each voxel's mean and spread).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from havir.metrics.records import MetricRecord, register_metric
from havir.metrics.results import BRAIN_PREFIX

#: The brain correlation's voxel sets, each a metric of its own.
BRAIN_SETS = ("structural", "semantic")


def brain_metric_name(voxel_set: str) -> str:
    """``brain_corr_structural``, ``brain_corr_semantic``: the metric of a voxel set."""
    return f"{BRAIN_PREFIX}{voxel_set}"


for _set in BRAIN_SETS:
    register_metric(MetricRecord(brain_metric_name(_set), f"Brain corr. ({_set})", f"Brain r ({_set[:6]}.)"))


def image_contributions(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """(n,) per-image terms ``c_i`` whose mean is the brain correlation of these voxels (see the
    module docstring). ``predicted``, ``measured`` : (n images, v voxels). A voxel constant
    across the images (on either side) has no correlation and is left out."""
    predicted, measured = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    spread_p, spread_m = predicted.std(axis=0), measured.std(axis=0)
    keep = (spread_p > 0) & (spread_m > 0)
    if not keep.any():
        return np.full(len(predicted), np.nan)
    z_p = (predicted[:, keep] - predicted[:, keep].mean(axis=0)) / spread_p[keep]
    z_m = (measured[:, keep] - measured[:, keep].mean(axis=0)) / spread_m[keep]
    return (z_p * z_m).mean(axis=1)


@dataclass
class BrainConsistency:
    """Brain correlations of one set of reconstructions: ``per_image`` ``{set: (n,) c_i}``,
    ``values`` ``{set or ROI: brain correlation}`` from the reconstructions, ``ceilings`` the same
    from the ground-truth stimuli, ``ratios`` value / ceiling, ``encoder`` what scored them."""

    per_image: dict[str, np.ndarray]
    values: dict[str, float]
    ceilings: dict[str, float]
    rois: dict[str, float]
    roi_ceilings: dict[str, float]
    encoder: dict = field(default_factory=dict)

    @property
    def ratios(self) -> dict[str, float | None]:
        return {name: (self.values[name] / ceiling if ceiling > 0 else None) for name, ceiling in self.ceilings.items()}

    def record(self) -> dict:
        """What ``eval.json`` keeps beside the metrics: ceilings, ratios, per-ROI values, the encoder."""
        return {"ceilings": self.ceilings, "ratios": self.ratios, "rois": self.rois, "roi_ceilings": self.roi_ceilings,
                "encoder": self.encoder,
                "definition": "mean over voxels of the Pearson r across test images between the encoder's prediction "
                              "and the measured repetition-averaged betas; ceiling: the same from the ground-truth stimuli"}


def brain_consistency(predicted_recon: np.ndarray, predicted_truth: np.ndarray, measured: np.ndarray,
                      columns: dict[str, slice], rois: dict[str, np.ndarray], encoder: dict | None = None) -> BrainConsistency:
    """Brain correlations from predictions (n, v) of the reconstructions and of the ground truth
    against the measured betas (n, v); ``columns`` the voxel sets' columns, ``rois`` each ROI's."""
    per_image = {name: image_contributions(predicted_recon[:, columns[name]], measured[:, columns[name]]) for name in BRAIN_SETS}

    def correlation(predicted, where) -> float:
        return float(np.mean(image_contributions(predicted[:, where], measured[:, where])))

    return BrainConsistency(
        per_image=per_image,
        values={name: float(np.mean(values)) for name, values in per_image.items()},
        ceilings={name: correlation(predicted_truth, columns[name]) for name in BRAIN_SETS},
        rois={label: correlation(predicted_recon, members) for label, members in sorted(rois.items())},
        roi_ceilings={label: correlation(predicted_truth, members) for label, members in sorted(rois.items())},
        encoder=encoder or {},
    )
