"""The demo world's own measures of what a reconstruction shows: DEMO MEASURES, never protocol metrics.

The protocol's metrics need networks the demo cannot download, and its pixel metrics cannot tell
a scene with the right objects from one with the right colours. The demo world has two readers
trained on its scenes that can:

* the **scene probe** (:mod:`havir.demo_world.probe`): *content accuracy* (the background read
  from the reconstruction is the stimulus's; chance 25%) and *object-kind F1* (the object kinds
  present);
* the **miniature CLIP** (:mod:`havir.demo_world.clip`): *mini-CLIP identification*, two-way
  identification (as the protocol's CLIP metric) on its pooled image embeddings; chance 50%.

Every measure gets a 95% percentile bootstrap interval over **test images**
(:data:`BOOTSTRAP`, ``scipy.stats.bootstrap``): a resample draws n test images with replacement
and recomputes the measure on them alone. For the per-image measures that is the mean of the
drawn images' values. For identification the comparison set is resampled too: each drawn
reconstruction is compared with the drawn stimuli of the *other* images only (a second copy of
its own image is no distractor), so the interval carries both sources of its spread, which
reconstructions are drawn and which distractors they meet. (Resampling only the per-image
fractions, each still scored against all n stimuli, leaves the second source out.) Fused against
structural is a *paired* difference: both modes are scored on the same drawn images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.stats

from havir.demo_world.clip import DemoClip, embed_images, load_demo_clip
from havir.demo_world.probe import SceneProbe, content_agreement, load_scene_probe
from havir.metrics.scores import correlation_matrix, identification_from_correlations

#: Name -> (title, chance level) of each demo measure.
DEMO_MEASURES: dict[str, tuple[str, float | None]] = {
    "content_accuracy": ("content accuracy (background)", 0.25),
    "object_kind_f1": ("object-kind F1", None),
    "mini_clip_identification": ("mini-CLIP identification", 0.5),
}
#: How every demo measure's interval is drawn (recorded in ``demo.json``).
BOOTSTRAP = {"resamples": 1000, "level": 0.95, "method": "percentile", "seed": 0, "resampled": "test images"}
#: Resamples evaluated at once (bounds the (batch, n, n) identification arrays: 32 MB at n = 200).
_BATCH = 100


@dataclass(frozen=True)
class DemoMeasures:
    """The demo measures of n reconstructions against their stimuli.

    ``per_image``: name -> float (n,) (content accuracy and object-kind F1 as 0/1 and [0, 1] per
    image; mini-CLIP identification as each reconstruction's fraction of the other n - 1 stimuli
    it beats). ``clip_correlations``: float64 (n, n), C[i, j] = Pearson r between the miniature
    CLIP's embeddings of stimulus i and of reconstruction j, from which identification is
    recomputed on resampled images.
    """

    per_image: dict[str, np.ndarray]
    clip_correlations: np.ndarray

    def __len__(self) -> int:
        return len(self.clip_correlations)

    def on_images(self, name: str, images: np.ndarray) -> np.ndarray:
        """Measure ``name`` recomputed on the test images ``images``: int (..., m) indices (with
        repeats) -> float (...). On ``np.arange(n)`` it is the measure's mean."""
        if name == "mini_clip_identification":
            return resampled_identification(self.clip_correlations, images)
        return self.per_image[name][images].mean(axis=-1)


@dataclass(frozen=True)
class PooledMeasures:
    """The mean of several runs' demo measures on the same test images (the demo's null-brain
    runs): per image, and recomputed on resampled images run by run, then averaged, so that each
    run's identification counts against its own reconstructions only."""

    runs: tuple[DemoMeasures, ...]

    def __post_init__(self):
        if not self.runs or len({len(run) for run in self.runs}) != 1:
            raise ValueError("pooled measures need one or more runs of the same test images")

    def __len__(self) -> int:
        return len(self.runs[0])

    @property
    def per_image(self) -> dict[str, np.ndarray]:
        return {name: np.mean([run.per_image[name] for run in self.runs], axis=0) for name in self.runs[0].per_image}

    def on_images(self, name: str, images: np.ndarray) -> np.ndarray:
        return np.mean([run.on_images(name, images) for run in self.runs], axis=0)


def demo_measures(
    stimuli: np.ndarray, reconstructions: np.ndarray, *, probe: SceneProbe | None = None, clip: DemoClip | None = None
) -> DemoMeasures:
    """The demo measures between ``reconstructions`` and their ``stimuli``.

    ``stimuli``, ``reconstructions``: uint8 (n, h, w, 3), row i reconstructing stimulus i (any
    sides: each reader resizes).
    """
    probe = probe or load_scene_probe()
    clip = clip or load_demo_clip()
    content = content_agreement(stimuli, reconstructions, probe)
    correlations = correlation_matrix(embed_images(clip, stimuli).numpy(), embed_images(clip, reconstructions).numpy())
    return DemoMeasures(
        per_image={
            "content_accuracy": content["background_correct"],
            "object_kind_f1": content["object_kind_f1"],
            "mini_clip_identification": identification_from_correlations(correlations),
        },
        clip_correlations=correlations,
    )


def resampled_identification(correlations: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Two-way identification of the drawn test images ``images``, int (..., m) -> float (...).

    Drawn reconstruction b is compared with every drawn stimulus k of another image (``images[k]
    != images[b]``; a copy of its own is no distractor): the fraction with C[k, b] < C[b, b],
    averaged over the m drawn reconstructions. ``correlations``: (n, n) as
    :attr:`DemoMeasures.clip_correlations`. A draw of one image only has no distractor: nan.
    """
    images = np.asarray(images)
    drawn = correlations[images[..., :, None], images[..., None, :]]  # (..., m, m): [k, b] = C[images[k], images[b]]
    own = correlations[images, images]  # (..., m)
    others = images[..., :, None] != images[..., None, :]
    beaten = ((drawn < own[..., None, :]) & others).sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (beaten / others.sum(axis=-2)).mean(axis=-1)


def image_bootstrap(statistic, n: int, *, resamples: int = BOOTSTRAP["resamples"], seed: int = BOOTSTRAP["seed"]) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``statistic`` over n test images.

    ``statistic``: int (..., n) drawn image indices -> float (...). ``scipy.stats.bootstrap``
    draws the images (resampling ``arange(n)``, seeded), so any measure of the drawn images, or a
    paired difference of two, is resampled the same way. The interval is the 2.5% and 97.5%
    quantiles (linear, as scipy's percentile method) of the defined draws: identification is
    undefined on a draw of one image n times (probability n^(1 - n), none in practice at n >= 10),
    so such a draw is left out rather than turning the interval into nan.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)  # its nan interval is replaced below
        draws = scipy.stats.bootstrap(
            (np.arange(n),), lambda images, axis: statistic(np.moveaxis(images, axis, -1)), n_resamples=resamples,
            batch=_BATCH, vectorized=True, method=BOOTSTRAP["method"], rng=np.random.default_rng(seed),
        ).bootstrap_distribution
    tail = (1 - BOOTSTRAP["level"]) / 2
    low, high = np.nanquantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def summarise(measures: DemoMeasures, *, resamples: int = BOOTSTRAP["resamples"], seed: int = BOOTSTRAP["seed"]) -> dict[str, dict]:
    """Mean and 95% bootstrap interval over test images of each demo measure."""
    every = np.arange(len(measures))
    return {
        name: {"mean": round(float(measures.on_images(name, every)), 4),
               "interval": [round(bound, 4) for bound in image_bootstrap(lambda images, name=name: measures.on_images(name, images), len(measures), resamples=resamples, seed=seed)]}
        for name in measures.per_image
    }


#: The measures where fusion must add the semantic pathway's content to the structural one's.
FUSION_GAINS = ("object_kind_f1", "mini_clip_identification")


def paired_difference(first: DemoMeasures, second: DemoMeasures, name: str, *, resamples: int = BOOTSTRAP["resamples"],
                      seed: int = BOOTSTRAP["seed"]) -> dict:
    """``first`` - ``second`` on measure ``name``, both of the same test images, with its 95%
    bootstrap interval (each draw scores both on the same images); ``higher`` is True when the
    whole interval lies above 0, False when not."""
    if len(first) != len(second):
        raise ValueError(f"a paired difference needs the same test images: {len(first)} against {len(second)}")
    difference = lambda images: first.on_images(name, images) - second.on_images(name, images)  # noqa: E731
    low, high = image_bootstrap(difference, len(first), resamples=resamples, seed=seed)
    return {"difference": round(float(difference(np.arange(len(first)))), 4), "interval": [round(low, 4), round(high, 4)],
            "higher": bool(low > 0)}


def summarise_runs(measures: dict[str, dict[str, DemoMeasures]]) -> dict:
    """What ``demo.json`` and the demo page show of ``measures[run][mode]``: ``by_mode[run][mode]``
    (:func:`summarise`), ``fusion_vs_structural[run][name]`` (:func:`paired_difference`, fused -
    structural, for :data:`FUSION_GAINS`) and the ``bootstrap`` settings."""
    return {
        "by_mode": {run: {mode: summarise(of_mode) for mode, of_mode in by_mode.items()} for run, by_mode in measures.items()},
        "fusion_vs_structural": {run: {name: paired_difference(by_mode["fused"], by_mode["structural"], name) for name in FUSION_GAINS}
                                 for run, by_mode in measures.items() if {"fused", "structural"} <= by_mode.keys()},
        "bootstrap": BOOTSTRAP,
    }
