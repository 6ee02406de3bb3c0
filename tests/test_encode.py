"""Brain consistency (issue 16, items 1-2): ``havir encode`` fits a voxel-wise encoding model that
finds the voxels the simulation drives, and ``havir eval --encoder`` ranks ground truth above the
method's reconstructions above the null run's."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from havir.artifacts.encoder import load_encoder, save_encoder
from havir.encode import fit_encoder
from havir.features import compute_features
from havir.metrics.brain import image_contributions
from havir.prepare import prepare_subject
from havir.reconstruct import reconstruct_run
from havir.train import TrainConfig, train_subject
from tests.conftest import without_progress


@pytest.fixture(scope="module")
def demo_data(two_subject_nsd, tmp_path_factory):
    """Subject 1 prepared, with the demo backbone's features (its VAE is trained on the scenes)."""
    root, truth = two_subject_nsd
    data = tmp_path_factory.mktemp("encode-data")
    prepare_subject(root, 1, data, progress=False)
    compute_features(data, 1, model="demo", progress=False)
    return data, truth


@pytest.fixture(scope="module")
def encoders(demo_data, tmp_path_factory):
    data, _ = demo_data
    folder = tmp_path_factory.mktemp("encoders")
    summaries = {control: fit_encoder(data, 1, folder / str(control), folds=3, control=control, progress=False)
                 for control in (None, "shuffled")}
    return folder, summaries


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """The method's run and the null run (shuffled voxel-image pairs) of the demo data."""
    data, _ = demo_data
    folder = tmp_path_factory.mktemp("runs")
    for name, shuffled in (("method", False), ("null", True)):
        train_subject(data, 1, folder / name, config=TrainConfig(preset="tiny", epochs=20, shuffle_control=shuffled),
                      device="cpu", progress=False)
    return folder


def test_encoding_accuracy_finds_the_driven_voxels_and_not_the_shuffled_pairs(demo_data, encoders):
    _, truth = demo_data
    folder, summaries = encoders
    model, null = load_encoder(folder / "None"), load_encoder(folder / "shuffled")
    role = truth.subjects[1].roles[tuple(model.voxels.T)]  # 1 noise, 2 layout-driven, 3 content-driven
    accuracy = {kind: float(model.cv_r[role == kind].mean()) for kind in (1, 2, 3)}
    assert accuracy[2] > 0.6 and accuracy[3] > 0.2  # measured 0.73 and 0.30
    assert abs(accuracy[1]) < 0.05  # the noise voxels among the other nsdgeneral voxels
    assert accuracy[3] - accuracy[1] > 0.15
    # The null's voxel means are noisy beyond their count: neighbouring voxels share receptive
    # fields, so their chance correlations move together (0.03 overall, 0.05 on layout voxels here).
    assert abs(float(null.cv_r.mean())) < 0.06 and abs(float(null.cv_r[role == 2].mean())) < 0.1
    assert summaries[None]["voxels"] == model.record["voxels"] and len(model.cv_r) == sum(model.record["voxels"].values())
    assert (folder / "None" / "accuracy.nii.gz").is_file() and (folder / "None" / "accuracy.png").is_file()
    assert {"V1v", "hV4", "FFA-1"} <= set(model.rois) or {"V1v", "V2v"} <= set(model.rois)


def test_the_saved_model_predicts_what_a_float64_reference_does(encoders):
    folder, _ = encoders
    model = load_encoder(folder / "None")
    rng = np.random.default_rng(0)
    features = {space: rng.normal(size=(3, weights.shape[0])).astype(np.float32) for space, weights in model.weights.items()}
    expected = model.intercept.astype(np.float64) + sum(
        ((features[s].astype(np.float64) - model.mean[s]) / model.scale[s]) @ model.weights[s].astype(np.float64)
        for s in model.weights)
    np.testing.assert_allclose(model.predict(features), expected, rtol=1e-6, atol=1e-6)


def test_image_contributions_average_to_the_mean_voxel_correlation():
    rng = np.random.default_rng(1)
    predicted, measured = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    per_voxel = [np.corrcoef(predicted[:, v], measured[:, v])[0, 1] for v in range(5)]  # independent reference
    assert image_contributions(predicted, measured).mean() == pytest.approx(np.mean(per_voxel), abs=1e-12)


def test_brain_correlation_ranks_truth_above_method_above_null(demo_data, encoders, runs, tmp_path, run_cli, monkeypatch):
    import havir.metrics.evaluate

    data, _ = demo_data
    folder, _ = encoders
    scores = {}
    for name in ("method", "null"):
        recon = tmp_path / name / "structural"
        reconstruct_run(runs / name, recon, mode="structural", device="cpu", progress=False)
        status, stdout, stderr = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing",
                                         "--encoder", folder / "None", "--json")
        assert status == 0, stderr
        scores[name] = json.loads(stdout)
    backbones = []  # loaded once for both sets, with the encoding model
    monkeypatch.setattr(havir.metrics.evaluate, "load_backbone",
                        lambda *a, load=havir.metrics.evaluate.load_backbone, **k: backbones.append(a) or load(*a, **k))
    status, stdout, stderr = run_cli("eval", "--recon", tmp_path / "method" / "structural", "--data", data, "--subject", 1,
                                     "--skip-missing", "--encoder", folder / "None", "--null", tmp_path / "null" / "structural",
                                     "--out", tmp_path / "versus", "--json")
    assert status == 0, stderr
    assert len(backbones) == 1
    versus = json.loads(stdout)["null_comparison"]["metrics"]
    for name in ("brain_corr_structural", "brain_corr_semantic"):  # as when each set is evaluated alone
        for run in ("method", "null"):
            assert versus[name][run] == pytest.approx(scores[run]["metrics"][name], abs=5e-5), (name, run)  # 4 decimals
    page = (tmp_path / "versus" / "report.html").read_text()
    assert "<h2>Method vs null</h2>" in page and "<h2>Brain consistency</h2>" in page and "<td>V1v</td>" in page
    for name in ("brain_corr_structural", "brain_corr_semantic", "pixcorr"):
        assert versus[name]["beats_null"] and versus[name]["interval_95"][0] > 0, (name, versus[name])
        assert versus[name]["difference"] == pytest.approx(versus[name]["method"] - versus[name]["null"])
    method, null = scores["method"], scores["null"]
    for voxel_set in ("structural", "semantic"):
        key = f"brain_corr_{voxel_set}"
        ceiling = method["brain_consistency"]["ceilings"][voxel_set]
        assert ceiling > method["metrics"][key] > null["metrics"][key] + 0.15, (voxel_set, ceiling, method["metrics"][key], null["metrics"][key])
        assert abs(null["metrics"][key]) < 0.15
    assert method["brain_consistency"]["ratios"]["structural"] > 0.8  # measured 0.96 (0.71 of 0.74)
    assert "V1v" in method["metrics"]["brain_corr_rois"]
    with open(tmp_path / "method" / "structural" / "eval" / "per_image.csv") as handle:
        header = next(csv.reader(handle))
    assert {"brain_corr_structural", "brain_corr_semantic"} <= set(header)
    report = (tmp_path / "method" / "structural" / "eval" / "report.html").read_text()
    assert "Brain corr. (structural)" in report


def test_an_encoder_of_another_subject_grid_or_backbone_is_refused(demo_data, encoders, tmp_path, run_cli):
    data, _ = demo_data
    folder, _ = encoders
    recon = tmp_path / "recon"
    recon.mkdir()
    import h5py
    import PIL.Image

    with h5py.File(data / "subj01.h5") as h5:
        for nsd_id, image in zip(h5["test/stimulus_nsd_id"][()], h5["test/stimuli"][()]):
            PIL.Image.fromarray(image).save(recon / f"{int(nsd_id)}.png")
    model = load_encoder(folder / "None")
    for change, expected in (
        (lambda m: m.record.update(subject=4), "was fit for subj04, not subj01"),
        (lambda m: setattr(m, "voxels", m.voxels + 1), "was fit on other voxels of subj01"),
        (lambda m: m.record["features"].update(model="tiny"), "reads features of another model (model='tiny'; this data's features cache has model='demo')"),
    ):
        other = load_encoder(folder / "None")
        change(other)
        target = tmp_path / f"encoder-{len(list(tmp_path.iterdir()))}"
        target.mkdir()
        save_encoder(target, other)
        status, _, stderr = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing", "--encoder", target)
        lines = without_progress(stderr)
        assert status == 2 and len(lines) == 1 and expected in lines[0], stderr
    assert model.record["subject"] == 1


def test_encode_refuses_bad_input_in_one_line(tmp_path, run_cli):
    status, _, stderr = run_cli("encode", "--data", tmp_path / "nowhere", "--subject", 1, "--out", tmp_path / "enc")
    assert status == 2 and "run `havir prepare` first" in stderr and len(without_progress(stderr)) == 1
    status, _, stderr = run_cli("encode", "--data", tmp_path, "--subject", 1, "--out", tmp_path / "enc", "--folds", 1)
    assert status == 2 and "folds" in stderr
    assert not (tmp_path / "enc").exists()


def test_selection_needs_both_candidates_and_an_encoder(runs, tmp_path, run_cli):
    for extra in (("--candidates", 4), ("--encoder", tmp_path / "enc")):
        status, _, stderr = run_cli("reconstruct", "--run", runs / "method", "--out", tmp_path / "recon", *extra)
        assert status == 2 and "give both or neither" in stderr and len(without_progress(stderr)) == 1, stderr
    assert not (tmp_path / "recon").exists()


def test_brain_guided_selection_helps_the_method_and_not_a_consistent_null(demo_data, encoders, runs, tmp_path):
    """Best of 4 fused samples, chosen by the encoder, against one sample. The null run chooses
    with the null encoder: a real encoder would carry the measured brain into the null's
    pictures by selection alone (brain correlation -0.08 -> +0.15 measured), so the consistent
    null shuffles every learned part, the chooser included."""
    from havir.artifacts.reconstruction import load_reconstructions, read_manifest
    from havir.demo_world.measures import demo_measures
    from havir.metrics.evaluate import evaluate_folder, load_ground_truth
    from havir.models.backbone import SamplerSettings

    data, _ = demo_data
    folder, _ = encoders
    nsd_ids, truth, _ = load_ground_truth(data, 1)
    settings = SamplerSettings(steps=10)
    result = {}
    for name, k, chooser in (("method", 1, None), ("method", 4, "None"), ("null", 1, None), ("null", 4, "shuffled")):
        recon = tmp_path / f"{name}-{k}" / "fused"
        reconstruct_run(runs / name, recon, mode="fused", settings=settings, device="cpu", progress=False, candidates=k,
                        encoder=folder / chooser if chooser else None)
        evaluation = evaluate_folder(recon, data, 1, networks={}, resamples=20, progress=False, report=False, encoder=folder / "None")
        measures = demo_measures(truth, load_reconstructions(recon, nsd_ids))
        result[name, k] = {"brain": evaluation.scores["brain_corr_structural"].mean + evaluation.scores["brain_corr_semantic"].mean,
                           "identification": float(measures.per_image["mini_clip_identification"].mean())}
    selection = read_manifest(tmp_path / "method-4" / "fused")["selection"]
    assert selection["candidates"] == 4 and len(selection["images"]) == len(nsd_ids)
    kept = selection["images"][str(int(nsd_ids[0]))]
    assert len(kept["scores"]) == 4 and kept["scores"][kept["kept"]] == max(kept["scores"])
    # measured: brain 0.88 -> 0.97, mini-CLIP identification 0.79 -> 0.80; null brain -0.14 -> -0.07
    assert result["method", 4]["brain"] > result["method", 1]["brain"] + 0.05
    assert result["method", 4]["identification"] >= result["method", 1]["identification"]
    assert result["null", 4]["brain"] < result["null", 1]["brain"] + 0.1, result  # selection does not lift the null
    assert abs(result["null", 4]["brain"]) < 0.15 and result["null", 4]["identification"] < 0.6, result
    assert result["method", 4]["brain"] - result["null", 4]["brain"] > 0.7


def test_train_control_shuffled_is_the_null_run(demo_data, tmp_path, run_cli):
    data, _ = demo_data
    config = tmp_path / "config.toml"
    config.write_text('preset = "tiny"\nepochs = 1\n')
    status, _, stderr = run_cli("train", "--data", data, "--subject", 1, "--out", tmp_path / "null", "--config", config,
                                "--control", "shuffled", "--device", "cpu")
    assert status == 0, stderr
    import tomllib

    assert tomllib.loads((tmp_path / "null" / "config.toml").read_text())["shuffle_control"] is True


def test_the_gpu_backend_path_fits_the_same_model(monkeypatch):
    """``--device cuda`` fits with himalaya's torch backend: here its CPU twin, against numpy's."""
    from havir.encode import fit_banded_ridge

    rng = np.random.default_rng(0)
    features = {"vae_latents": rng.normal(size=(60, 40)).astype(np.float32), "clip_image": rng.normal(size=(60, 8)).astype(np.float32)}
    responses = (features["vae_latents"][:, :5] + 0.5 * rng.normal(size=(60, 5))).astype(np.float32)
    on_numpy, on_torch = (fit_banded_ridge(features, responses, seed=0, backend=backend) for backend in ("numpy", "torch"))
    np.testing.assert_allclose(on_torch.predict(features), on_numpy.predict(features), rtol=1e-3, atol=1e-3)
