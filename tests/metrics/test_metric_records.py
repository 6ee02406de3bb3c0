"""Metrics as records (issue 15, item 6): a new metric is one object registered in its own file;
the evaluation scores it and the report shows it, with no per-metric code elsewhere."""

from __future__ import annotations

import csv
import json

import numpy as np
import PIL.Image
import pytest

from havir.metrics.evaluate import evaluate_folder, load_ground_truth
from havir.metrics.records import METRICS, ImageMetric, metric_record


def mean_absolute_error(truth: np.ndarray, recon: np.ndarray, preset) -> np.ndarray:
    return np.abs(truth.astype(np.float64) - recon.astype(np.float64)).mean(axis=(1, 2, 3))


TOY = ImageMetric("mae", "Mean absolute error", "MAE", higher_is_better=False, score=mean_absolute_error)


@pytest.fixture
def toy_metric(monkeypatch):
    monkeypatch.setitem(METRICS, TOY.name, TOY)  # registered for this test only
    return TOY


def _write(folder, nsd_ids, images):
    folder.mkdir(parents=True)
    for nsd_id, image in zip(nsd_ids, images):
        PIL.Image.fromarray(image).save(folder / f"{int(nsd_id)}.png")
    return folder


def test_a_registered_metric_is_scored_and_reported(trainable, tmp_path, toy_metric):
    data, _ = trainable
    nsd_ids, images, _ = load_ground_truth(data, 1)
    inverted = 255 - images
    recon = _write(tmp_path / "recon", nsd_ids, inverted)
    evaluation = evaluate_folder(recon, data, 1, protocol="brain-diffuser", networks={}, progress=False, resamples=20)
    expected = np.abs(images / 255.0 - inverted / 255.0).mean(axis=(1, 2, 3))  # float64, at the stimuli's own size
    score = evaluation.scores["mae"]
    np.testing.assert_allclose(score.per_image, expected, rtol=1e-5)
    assert not score.higher_is_better and not score.protocol and score.network == "pixels"
    record = json.loads((tmp_path / "recon" / "eval" / "eval.json").read_text())
    assert record["non_protocol_metrics"]["mae"]["value"] == pytest.approx(expected.mean(), rel=1e-5)
    with open(tmp_path / "recon" / "eval" / "per_image.csv") as handle:
        assert "mae" in next(csv.reader(handle))
    report = (tmp_path / "recon" / "eval" / "report.html").read_text()
    assert f"<td>Mean absolute error</td><td>{expected.mean():.3f}</td>" in report


def test_records_give_titles_directions_and_notation():
    assert metric_record("alexnet2").format(0.9612) == "96.1%" and metric_record("swav").format(0.4213) == "0.421"
    assert not metric_record("effnet").higher_is_better and metric_record("clip").higher_is_better
    assert metric_record("inception").column == "Incep" and metric_record("inception").title == "Inception"
    assert metric_record("unregistered").format(None) == "—"


def test_published_values_live_in_the_records(monkeypatch):
    """A metric's published values are part of its record: the published rows (and so the report
    and ``havir table``) read them from there, a new metric's included."""
    from havir.metrics.results import PUBLISHED_ROWS, Evaluation, MetricScore, comparison_rows

    mindeye2 = next(row for row in PUBLISHED_ROWS if row.method == "MindEye2")
    assert mindeye2.metrics["alexnet2"] == 0.961 and mindeye2.metrics["swav"] == 0.344
    assert list(mindeye2.metrics) == ["pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav"]
    monkeypatch.setitem(METRICS, "mae", ImageMetric("mae", "MAE", "MAE", higher_is_better=False,
                                                  published={("mindeye2", "MindEye2"): 0.123}))
    evaluation = Evaluation(np.arange(3), {"pixcorr": MetricScore("pixcorr", np.full(3, 0.2), (0.1, 0.3), "pixels", True, True)},
                            protocol={"preset": "mindeye2", "data": {"subject": 1, "sessions": 40}})
    rows = {row["method"]: row for row in comparison_rows(evaluation, "HAVIR")["rows"]}
    assert rows["MindEye2"]["mae"] == 0.123 and "mae" not in rows["MindEye1"]
    assert rows["HAVIR"]["pixcorr"] == pytest.approx(0.2)
