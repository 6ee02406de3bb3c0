"""`havir eval`: scoring folders of reconstructions, its outputs, and its errors."""

import base64
import csv
import io
import json
import re
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from havir.metrics.evaluate import evaluate_folder, load_ground_truth
from havir.metrics.networks import load_protocol_network
from tests.conftest import json_of


@pytest.fixture(scope="module")
def random_networks():
    """Protocol architectures with random weights, built through the API (never the CLI)."""
    return {name: load_protocol_network(name, random_weights=True) for name in ("alexnet", "effnet")}


def _write_folder(folder, nsd_ids, images, mode=None):
    folder.mkdir(parents=True)
    for nsd_id, image in zip(nsd_ids, images):
        PIL.Image.fromarray(image).save(folder / f"{int(nsd_id)}.png")
    if mode:
        (folder / "manifest.json").write_text(json.dumps({"mode": mode}))
    return folder


@pytest.fixture(scope="module")
def truth(trainable):
    data, _ = trainable
    nsd_ids, images, _ = load_ground_truth(data, 1)
    return data, nsd_ids, images


def test_perfect_reconstructions_score_perfectly(truth, random_networks, tmp_path):
    data, nsd_ids, images = truth
    recon = _write_folder(tmp_path / "recon" / "fused", nsd_ids, images, mode="fused")
    evaluation = evaluate_folder(recon, data, 1, networks=random_networks, progress=False, resamples=50)
    metrics = {name: score.mean for name, score in evaluation.scores.items()}
    # mindeye2 (the default) takes the ground truth through 224 px and float16 and not the
    # reconstructions: a copy of the stimulus scores nearly, not exactly, perfectly.
    assert 0.999 < metrics["pixcorr"] < 1 and 0.99 < metrics["ssim"] < 1
    assert metrics["alexnet2"] == 1.0 and metrics["alexnet5"] == 1.0
    assert metrics["effnet"] == pytest.approx(0.0, abs=1e-3)
    exact = evaluate_folder(recon, data, 1, protocol="brain-diffuser", networks=random_networks, progress=False,
                            resamples=50, report=False)
    assert exact.scores["pixcorr"].mean == pytest.approx(1.0) and exact.scores["ssim"].mean == pytest.approx(1.0)
    assert exact.scores["effnet"].mean == pytest.approx(0.0, abs=1e-6)
    summary = evaluation.summary()
    assert summary["n"] == len(nsd_ids) == 20
    # Random-weight networks are never reported as protocol numbers.
    assert set(summary["metrics"]) == {"pixcorr", "ssim"}
    assert "RANDOM" in summary["non_protocol_metrics"]["alexnet2"]["network"]
    assert summary["protocol"]["data"] == {"subject": 1, "sessions": 4, "test_images": 20, "normalisation": "training",
                                           "synthetic": True}  # prepared from havir synth-nsd's release


def test_shuffled_reconstructions_score_at_chance(truth, random_networks, tmp_path):
    data, nsd_ids, images = truth
    shuffled = images[np.random.default_rng(0).permutation(len(images))]
    evaluation = evaluate_folder(_write_folder(tmp_path / "shuffled", nsd_ids, shuffled), data, 1,
                                 networks=random_networks, progress=False, resamples=50)
    assert abs(evaluation.scores["alexnet5"].mean - 0.5) < 0.15
    assert evaluation.scores["pixcorr"].mean < 0.5


def test_outputs_csv_json_and_report(truth, random_networks, tmp_path):
    data, nsd_ids, images = truth
    rng = np.random.default_rng(1)
    noisy = np.clip(images + rng.normal(scale=40, size=images.shape), 0, 255).astype(np.uint8)
    _write_folder(tmp_path / "recon" / "structural", nsd_ids, noisy, mode="structural")
    recon = _write_folder(tmp_path / "recon" / "fused", nsd_ids, noisy[::-1].copy(), mode="fused")
    _write_folder(tmp_path / "recon" / "partial", nsd_ids[:2], noisy[:2], mode="semantic")  # a --limit run
    evaluation = evaluate_folder(recon, data, 1, networks=random_networks, progress=False, resamples=50)
    out = recon / "eval"
    with open(out / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["nsd_id"]) for r in rows] == list(nsd_ids)
    np.testing.assert_allclose([float(r["ssim"]) for r in rows], evaluation.scores["ssim"].per_image, atol=1e-6)
    record = json.loads((out / "eval.json").read_text())
    low, high = record["intervals_95"]["pixcorr"]
    assert low <= record["metrics"]["pixcorr"] <= high
    assert all(record["protocol"]["versions"][name] for name in ("scikit-image", "scipy", "diffusers"))
    assert record["protocol"]["threads"] == torch.get_num_threads()  # the CPU threads the scores were computed with
    assert [row["method"] for row in record["comparison"]["rows"]][-1] == "this run"
    assert record["protocol"]["preset"] == "mindeye2" and record["protocol"]["record"]["working_resize"]["size"] == 256
    page = (out / "report.html").read_text()
    assert page.count("<img") == 2 + 20 * 3  # the chart, the masks; stimulus | structural | fused for every test image
    assert "RANDOM weights" in page and "MindEye2" in page and "40 sessions" in page
    assert "synthetic subject 1" in page and "NSD subject 1" not in page
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _grid_scores(page: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf'<tr[^>]* data-{name}="([^"]+)"', page)]


def test_report_scores_every_image_compares_modes_and_shows_training(truth, random_networks, tmp_path):
    data, nsd_ids, images = truth
    rng = np.random.default_rng(2)
    noisy = np.clip(images + rng.normal(scale=60, size=images.shape), 0, 255).astype(np.uint8)
    structural = _write_folder(tmp_path / "recon" / "structural", nsd_ids, noisy, mode="structural")
    recon = _write_folder(tmp_path / "recon" / "fused", nsd_ids, noisy[::-1].copy(), mode="fused")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "train_loss": {"structural": 1 / e, "semantic": 2 / e}, "val_loss": {"structural": 1.5 / e, "semantic": 3 / e}}) + "\n"
        for e in (1, 2, 3)))
    (recon / "manifest.json").write_text(json.dumps({"mode": "fused", "run": str(run)}))
    first = evaluate_folder(structural, data, 1, networks=random_networks, progress=False, resamples=20)
    page = (structural / "eval" / "report.html").read_text()
    assert "Modes compared" not in page and "<h2>Training" not in page  # the fused folder is not evaluated yet; no run known
    evaluation = evaluate_folder(recon, data, 1, networks=random_networks, progress=False, resamples=20)
    page = (recon / "eval" / "report.html").read_text()
    # Every test image, with the scored folder's per-image scores, in the evaluation's order.
    for name in ("pixcorr", "alexnet5", "effnet"):
        np.testing.assert_allclose(_grid_scores(page, name), evaluation.scores[name].per_image, rtol=1e-6)
    assert 'data-key="effnet" data-higher="0"' in page and 'data-key="ssim" data-higher="1"' in page  # best first by its direction
    assert '<a href="per_image.csv">' in page
    # The modes side by side, each from its own evaluation.
    modes = page[page.index('<table id="modes">'):]
    modes = modes[:modes.index("</table>")]
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td>(.*?)</tr>", modes)
    assert [(mode, n) for mode, n, _ in rows] == [("structural", "20"), ("fused", "20")]
    assert f"<td>{first.scores['pixcorr'].mean:.3f}</td>" in rows[0][2]
    assert f"<td>{evaluation.scores['pixcorr'].mean:.3f}</td>" in rows[1][2]
    assert "<h2>Training</h2>" in page and page.count("<img") == 3 + 20 * 3  # chart, masks, curves, the grid


def test_chart_panels_by_kind_and_title():
    from havir.metrics.evaluate import Evaluation, MetricScore
    from havir.report import chart_panels, chart_title

    def score(name, protocol=True, higher=True):
        return MetricScore(name, np.array([0.5, 1.5]), (0.4, 1.6), "net", protocol, higher)

    scores = {n: score(n, higher=n not in ("effnet", "swav")) for n in ("pixcorr", "ssim", "alexnet2", "clip", "effnet", "swav")}
    evaluation = Evaluation(np.array([1, 2]), scores)
    assert chart_panels(evaluation) == [("pixel similarity", ["pixcorr", "ssim"]),
                                        ("two-way identification (chance 50%)", ["alexnet2", "clip"]),
                                        ("feature distance (lower is better)", ["effnet", "swav"])]
    assert "red" not in chart_title(evaluation)
    scores["lite0_identification"] = score("lite0_identification", protocol=False)
    assert chart_panels(evaluation)[1][1] == ["alexnet2", "clip", "lite0_identification"]
    assert chart_title(evaluation).endswith("red: not a protocol network")


def test_cli_missing_weights_stop_with_one_line(truth, tmp_path, run_cli, offline_caches):
    data, nsd_ids, images = truth
    recon = _write_folder(tmp_path / "recon", nsd_ids, images)
    status, out, err = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1)
    assert status == 2 and "alexnet-owt-7be5be79.pth" in err and "Traceback" not in err
    assert not (recon / "eval" / "eval.json").exists()


def test_cli_skip_missing_lists_what_was_skipped(truth, tmp_path, run_cli, offline_caches):
    data, nsd_ids, images = truth
    recon = _write_folder(tmp_path / "recon", nsd_ids, images)
    status, out, err = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing", "--json")
    assert status == 0, err
    result = json_of(out)
    assert result["n"] == 20 and set(result["metrics"]) == {"pixcorr", "ssim"}
    assert set(result["skipped"]) == {"alexnet2", "alexnet5", "inception", "clip", "effnet", "swav"}
    assert "swav_800ep_pretrain.pth.tar" in result["skipped"]["swav"]
    assert {"networks", "versions", "data"} <= set(result["protocol"])
    assert (recon / "eval" / "report.html").is_file()


def test_cli_mismatched_sets_name_the_ids(truth, tmp_path, run_cli, offline_caches):
    data, nsd_ids, images = truth
    recon = _write_folder(tmp_path / "recon", nsd_ids, images)
    (recon / f"{int(nsd_ids[3])}.png").unlink()
    status, _, err = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing")
    assert status == 2 and f"nsdId {int(nsd_ids[3])}" in err and "lacks 1 of the 20" in err
    shutil.copy(recon / f"{int(nsd_ids[0])}.png", recon / f"{int(nsd_ids[3])}.png")
    shutil.copy(recon / f"{int(nsd_ids[0])}.png", recon / "99999.png")
    status, _, err = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing")
    assert status == 2 and "99999" in err and "not this subject's test images" in err
    status, _, err = run_cli("eval", "--recon", tmp_path / "nowhere", "--data", data, "--subject", 1)
    assert status == 2 and "does not exist" in err
    status, _, err = run_cli("eval", "--recon", recon, "--data", tmp_path, "--subject", 1)
    assert status == 2 and "havir prepare" in err


def _masks_section(recon):
    page = (recon / "eval" / "report.html").read_text()
    found = re.search(r'<h2>Masks</h2>.*?<img[^>]* src="data:image/png;base64,([^"]+)"', page, re.S)
    return page, (np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(found[1]))).convert("RGB")) if found else None)


def test_report_draws_the_subjects_masks_from_its_prepared_record(truth, tmp_path):
    """The prepared record names the NSD release and the mask definition: the report shows the
    ROIs on the brain, the first structural ROI in autumn's red, the first semantic one in
    winter's blue (one colour per ROI)."""
    data, nsd_ids, images = truth
    recon = _write_folder(tmp_path / "recon", nsd_ids, images)
    evaluate_folder(recon, data, 1, networks={}, progress=False, resamples=10)
    _, figure = _masks_section(recon)
    assert figure is not None
    colours = {tuple(c) for c in figure.reshape(-1, 3)[::3]}
    assert (255, 0, 0) in colours and (0, 0, 255) in colours


def test_report_without_drawable_masks_has_no_masks_section(truth, tmp_path):
    """No record of the masks (data prepared elsewhere): no section, no note. A record whose NSD
    release has moved: no section, and a note saying why."""
    data, nsd_ids, images = truth
    recon = _write_folder(tmp_path / "recon", nsd_ids, images)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved, ignore=shutil.ignore_patterns("*_features.h5"))
    record = json.loads((moved / "subj01.json").read_text())
    (moved / "subj01.json").write_text(json.dumps(record | {"nsd_root": str(tmp_path / "gone")}))
    evaluation = evaluate_folder(recon, moved, 1, networks={}, progress=False, resamples=10)
    page, figure = _masks_section(recon)
    assert figure is None and "<h2>Masks</h2>" not in page
    assert any(note.startswith("masks not drawn") and "gone" in note for note in evaluation.notes)
    assert "masks not drawn" in page
    (moved / "subj01.json").write_text(json.dumps({"sessions": record["sessions"]}))
    evaluation = evaluate_folder(recon, moved, 1, networks={}, progress=False, resamples=10)
    page, figure = _masks_section(recon)
    assert figure is None and "Masks" not in page and not any("masks" in note for note in evaluation.notes)
