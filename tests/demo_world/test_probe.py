"""The shipped scene probe (a DEMO MEASURE): it reads fresh scenes, and shuffled pairs score at chance.

Floors are measured figures less a margin: on these 300 fresh scenes (a seed neither training nor
its held-out set used) the shipped probe reads every background right and scores object-kind F1
0.980 (64 px) and 0.978 (128 px); its training held-out set: 1.000 and 0.967
(``havir/models/weights/scene-probe/config.json``).
"""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from havir.demo_world.probe import (
    BACKGROUND_NAMES,
    PROBE_WEIGHTS,
    SceneLabels,
    SceneProbe,
    content_agreement,
    content_scores,
    kind_f1,
    load_scene_probe,
    scene_labels,
)
from havir.errors import InvalidInputError, MissingInputError
from havir.nsd.scenes import render_scene, sample_scene

FRESH_SEED = 424242
SCENES = 300
BACKGROUND_FLOOR = 0.95
KIND_F1_FLOOR = 0.90


@pytest.fixture(scope="module")
def probe():
    return load_scene_probe()


@pytest.fixture(scope="module")
def fresh():
    rng = np.random.default_rng(FRESH_SEED)
    scenes = [sample_scene(rng) for _ in range(SCENES)]
    return scenes, scene_labels(scenes)


@pytest.mark.parametrize("side", [64, 128])  # the demo's stimulus and reconstruction sides
def test_probe_reads_fresh_scenes_above_its_floors(probe, fresh, side):
    scenes, truth = fresh
    read = probe.read(np.stack([render_scene(s, side) for s in scenes]))
    scores = content_scores(truth, read)
    assert scores["background_correct"].mean() >= BACKGROUND_FLOOR
    assert scores["object_kind_f1"].mean() >= KIND_F1_FLOOR


def test_shuffled_pairs_score_at_chance(probe, fresh):
    scenes, truth = fresh
    read = probe.read(np.stack([render_scene(s, 64) for s in scenes]))
    shuffled = truth.take(np.roll(np.arange(SCENES), 1))  # every image paired with another's labels
    null = content_scores(shuffled, read)
    # Chance, computed independently: background agreement of independent draws is sum_b p_b^2
    # (~0.25; one shuffle of 300 pairs has a standard deviation of 0.025, the tolerance is 4 of
    # them), and the expected F1 of a reading against another scene's kinds is the mean over all
    # mismatched pairs.
    frequencies = np.bincount(truth.background, minlength=len(BACKGROUND_NAMES)) / SCENES
    assert abs(null["background_correct"].mean() - (frequencies**2).sum()) < 0.10
    mismatched = [kind_f1(truth.kinds[np.roll(np.arange(SCENES), k)], read.kinds).mean() for k in range(1, SCENES)]
    assert abs(null["object_kind_f1"].mean() - np.mean(mismatched)) < 0.05
    assert null["object_kind_f1"].mean() < KIND_F1_FLOOR - 0.4


def test_kind_f1_matches_scikit_learn():
    rng = np.random.default_rng(0)
    reference, predicted = rng.random((500, 8)) < 0.25, rng.random((500, 8)) < 0.3
    reference[:3], predicted[:2], predicted[2, 0] = False, False, True  # empty sets: on both sides, on one
    ours = kind_f1(reference, predicted)
    assert ours.mean() == pytest.approx(f1_score(reference, predicted, average="samples", zero_division=1.0))
    assert ours[0] == ours[1] == 1.0 and ours[2] == 0.0


def test_content_agreement_reads_both_sides(probe, fresh):
    scenes, truth = fresh
    images = np.stack([render_scene(s, 64) for s in scenes[:40]])
    against_itself = content_agreement(images, images, probe)
    assert against_itself["background_correct"].mean() == 1.0 and against_itself["object_kind_f1"].mean() == 1.0
    against_truth = content_agreement(truth.take(np.arange(40)), images, probe)
    assert against_truth["background_correct"].mean() >= BACKGROUND_FLOOR


def test_fp16_weights_round_trip(probe, tmp_path):
    probe.save_pretrained(tmp_path)
    again = SceneProbe.from_pretrained(tmp_path)
    for name, tensor in probe.state_dict().items():
        assert (again.state_dict()[name] == tensor).all(), name  # shipped weights are fp16 already
    assert (PROBE_WEIGHTS / "config.json").read_text().count("DEMO MEASURE") == 1


def test_bad_inputs_are_refused(probe, tmp_path):
    with pytest.raises(MissingInputError, match="scene probe folder .* lacks config.json"):
        SceneProbe.from_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match=r"shape \(n, height, width, 3\), got \(4, 64, 64\)"):
        probe.read(np.zeros((4, 64, 64), np.uint8))
    with pytest.raises(InvalidInputError, match="3 reference labels but 2 predicted"):
        labels = SceneLabels(np.zeros(3, int), np.zeros((3, 8), bool))
        content_scores(labels, labels.take(np.arange(2)))
