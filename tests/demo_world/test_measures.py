"""Bootstrap intervals of the demo measures over test images, against the exact bootstrap
distribution enumerated by hand on a small fixed example (every one of the n^n equally likely
draws of n = 5 images, scored by plain loops)."""

import itertools

import numpy as np
import pytest

from havir.demo_world.measures import DemoMeasures, paired_difference, resampled_identification, summarise
from havir.metrics.scores import identification_from_correlations

N = 5
DRAWS = 20_000  # Monte-Carlo error of a 2.5% quantile's level: about 0.001


def _measures(seed: int, signal: float) -> DemoMeasures:
    rng = np.random.default_rng(seed)
    correlations = rng.normal(size=(N, N)) + signal * np.eye(N)
    f1 = rng.random(N)
    return DemoMeasures({"object_kind_f1": f1, "mini_clip_identification": identification_from_correlations(correlations)},
                        correlations)


def _identification_by_hand(correlations, drawn) -> float:
    """Each drawn reconstruction against the drawn stimuli of other images; nan without any."""
    fractions = []
    for b in range(len(drawn)):
        distractors = [k for k in range(len(drawn)) if drawn[k] != drawn[b]]
        if distractors:
            own = correlations[drawn[b], drawn[b]]
            fractions.append(sum(correlations[drawn[k], drawn[b]] < own for k in distractors) / len(distractors))
    return sum(fractions) / len(fractions) if fractions else float("nan")


def _by_hand(measures: DemoMeasures, name: str, drawn) -> float:
    if name == "mini_clip_identification":
        return _identification_by_hand(measures.clip_correlations, drawn)
    return sum(measures.per_image[name][i] for i in drawn) / len(drawn)


def _exact_levels(values: np.ndarray, interval) -> tuple[tuple[float, float], ...]:
    """Where each bound sits in the exact bootstrap distribution: the range of levels p whose
    quantile is the bound or an atom next to it (the distribution is discrete, and a percentile
    interpolates between atoms; bounds are rounded to 4 decimals)."""
    values = np.round(values[~np.isnan(values)], 9)  # one atom, however its sum was rounded
    atoms = np.unique(values)
    levels = []
    for bound in interval:
        below = atoms[atoms <= bound + 1e-4].max(initial=atoms[0])
        above = atoms[atoms >= bound - 1e-4].min(initial=atoms[-1])
        levels.append((np.mean(values < below), np.mean(values <= above)))
    return tuple(levels)


@pytest.mark.parametrize("name", ["object_kind_f1", "mini_clip_identification"])
def test_interval_bounds_are_the_exact_bootstrap_quantiles(name):
    measures = _measures(seed=4, signal=1.0)
    exact = np.array([_by_hand(measures, name, drawn) for drawn in itertools.product(range(N), repeat=N)])
    interval = summarise(measures, resamples=DRAWS)[name]["interval"]
    (low_from, low_to), (high_from, high_to) = _exact_levels(exact, interval)
    assert low_from - 0.005 <= 0.025 <= low_to + 0.005, (interval, low_from, low_to)
    assert high_from - 0.005 <= 0.975 <= high_to + 0.005, (interval, high_from, high_to)


def test_paired_difference_is_resampled_on_the_same_images():
    first, second = _measures(seed=5, signal=2.0), _measures(seed=6, signal=0.5)
    name = "mini_clip_identification"
    exact = np.array([_by_hand(first, name, d) - _by_hand(second, name, d) for d in itertools.product(range(N), repeat=N)])
    result = paired_difference(first, second, name, resamples=DRAWS)
    assert result["difference"] == pytest.approx(first.per_image[name].mean() - second.per_image[name].mean(), abs=1e-4)
    (low_from, low_to), (high_from, high_to) = _exact_levels(exact, result["interval"])
    assert low_from - 0.005 <= 0.025 <= low_to + 0.005 and high_from - 0.005 <= 0.975 <= high_to + 0.005
    assert result["higher"] == (result["interval"][0] > 0)
    same = paired_difference(first, first, name)
    assert same == {"difference": 0.0, "interval": [0.0, 0.0], "higher": False}


def test_resampled_identification_on_every_image_is_the_identification():
    measures = _measures(seed=7, signal=1.0)
    every = np.arange(N)
    assert resampled_identification(measures.clip_correlations, every) == pytest.approx(
        identification_from_correlations(measures.clip_correlations).mean())
    assert np.isnan(resampled_identification(measures.clip_correlations, np.zeros(N, int)))  # no distractor
    batch = np.array([[0, 0, 1, 2, 3], [4, 4, 4, 1, 1]])
    assert resampled_identification(measures.clip_correlations, batch) == pytest.approx(
        [_identification_by_hand(measures.clip_correlations, row) for row in batch])
