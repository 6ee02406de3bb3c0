"""Training on the synthetic NSD: learning is real, the hierarchy is wired the right way round,
an interrupted run resumes to the same result, and bad input is refused."""

import dataclasses
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import havir.train
from havir.train import TrainConfig, fit_decoders, load_training_data, train_subject

TINY = TrainConfig(preset="tiny", epochs=20, batch_size=32, learning_rate=1e-3, seed=0, checkpoint_minutes=0)


def _fit(data, config, folder):
    return fit_decoders(data, config, folder, torch.device("cpu"), progress=False)["test_scores"]


@pytest.fixture(scope="module")
def outcomes(trainable, tmp_path_factory):
    """Held-out test scores of: the real run, a run with the two voxel sets swapped, and a
    control trained on shuffled voxel-to-image pairs (all seed 0).

    Measured (seed 0): latents identification 0.92 / swapped 0.59 / control 0.53; CLIP text
    0.86 / 0.60 / 0.50; CLIP image 0.90 / 0.90 / 0.48 (with random-weight CLIP the image tokens
    are pixel statistics that both voxel sets carry, so they show no hierarchy). The ridge
    baseline on the same split: 0.90 / 0.95 / 0.98."""
    data_dir, _ = trainable
    data = load_training_data(data_dir, 1, TINY)
    swap = lambda part: dataclasses.replace(part, structural=part.semantic, semantic=part.structural)
    swapped = dataclasses.replace(data, fit=swap(data.fit), val=swap(data.val), test=swap(data.test))
    control = dataclasses.replace(TINY, shuffle_control=True)
    return {
        "real": _fit(data, TINY, tmp_path_factory.mktemp("real")),
        "swapped": _fit(swapped, TINY, tmp_path_factory.mktemp("swapped")),
        "control": _fit(load_training_data(data_dir, 1, control), control, tmp_path_factory.mktemp("control")),
    }


@pytest.mark.parametrize("target", ["vae_latents", "clip_image", "clip_text"])
def test_learning_beats_chance_and_the_shuffled_control(outcomes, target):
    real, control = outcomes["real"][f"{target}_identification"], outcomes["control"][f"{target}_identification"]
    assert real > 0.75
    assert real > control + 0.2


def test_hierarchy_structural_voxels_for_latents_semantic_voxels_for_text(outcomes):
    real, swapped = outcomes["real"], outcomes["swapped"]
    assert real["vae_latents_identification"] > swapped["vae_latents_identification"] + 0.1
    assert real["clip_text_identification"] > swapped["clip_text_identification"] + 0.1


def test_training_data_is_wired_from_the_right_sets(trainable):
    data_dir, _ = trainable
    data = load_training_data(data_dir, 1, TINY)
    with h5py.File(data_dir / "subj01.h5") as h5:
        assert data.fit.structural.shape[1] == h5["train/structural"].shape[1]
        assert data.fit.semantic.shape[1] == h5["train/semantic"].shape[1]
    assert set(data.val.nsd_id).isdisjoint(data.fit.nsd_id) and set(data.test.nsd_id).isdisjoint(data.fit.nsd_id)


def test_interrupted_run_resumes_to_the_same_weights(trainable, tmp_path, interrupt_on_call):
    data_dir, _ = trainable
    config = dataclasses.replace(TINY, epochs=4)
    train_subject(data_dir, 1, tmp_path / "whole", config=config, device="cpu", progress=False)

    # (15 steps + one validation) per epoch: the 37th call falls inside the third epoch.
    restore = interrupt_on_call(havir.train, "_losses", 2 * 16 + 5)
    with pytest.raises(KeyboardInterrupt):
        train_subject(data_dir, 1, tmp_path / "resumed", config=config, device="cpu", progress=False)
    restore()
    assert json.loads((tmp_path / "resumed/checkpoint/state.json").read_text())["epoch"] == 2
    summary = train_subject(data_dir, 1, tmp_path / "resumed", config=config, device="cpu", progress=False)
    for name in ("structural", "semantic"):
        whole = load_file(tmp_path / f"whole/checkpoint/{name}.safetensors")
        resumed = load_file(tmp_path / f"resumed/checkpoint/{name}.safetensors")
        for key in whole:
            torch.testing.assert_close(resumed[key], whole[key], atol=1e-5, rtol=1e-5)
    lines = (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert summary["epochs"] == 4


def test_havir_and_ridge_from_the_command_line(trainable, tmp_path, run_cli):
    data_dir, _ = trainable
    config = tmp_path / "tiny.toml"
    config.write_text('preset = "tiny"\nepochs = 2\nbatch_size = 32\n')
    for model in ("havir", "ridge"):
        status, stdout, stderr = run_cli("train", "--data", data_dir, "--subject", 1, "--out", tmp_path / model,
                                         "--config", config, "--model", model, "--json")
        assert status == 0
        if model == "havir":  # stderr is not a terminal here: plain progress lines, with the losses
            assert "training: 2/2 epochs (100%)" in stderr and "loss structural " in stderr, stderr
        summary = json.loads(stdout)
        assert {"subject", "model", "epochs", "train_seconds", "test_scores"} <= set(summary)
        assert summary["normalisation"] == "training"  # the prepared data's, recorded with the results
        assert summary["test_scores"]["vae_latents_identification"] > 0.5
    assert (tmp_path / "havir/structural/diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "havir/config.toml").read_text().startswith('preset = "tiny"')
    assert (tmp_path / "ridge/ridge/model.safetensors").is_file()


def test_unknown_config_key(run_cli, trainable, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("epochs = 3\nlearning_rat = 0.1\n")
    status, _, stderr = run_cli("train", "--data", trainable[0], "--subject", 1, "--out", tmp_path / "run", "--config", config)
    assert status == 2 and "unknown keys learning_rat" in stderr


def test_run_folder_holding_another_run(trainable, tmp_path):
    data_dir, _ = trainable
    train_subject(data_dir, 1, tmp_path / "run", config=dataclasses.replace(TINY, epochs=1), device="cpu", progress=False)
    with pytest.raises(ValueError, match="holds another run"):
        train_subject(data_dir, 1, tmp_path / "run", config=dataclasses.replace(TINY, epochs=2), device="cpu", progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trainable, tmp_path, monkeypatch):
    data_dir, _ = trainable
    original, calls = havir.train._losses, {"n": 0}

    def nan_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        losses = original(*args, **kwargs)
        if calls["n"] == 16 + 3:
            losses["semantic"] = losses["semantic"] * float("nan")
        return losses

    monkeypatch.setattr(havir.train, "_losses", nan_in_epoch_two)
    with pytest.raises(ValueError, match=r"became .*nan.* at epoch 2.*last good checkpoint \(epoch 1\)"):
        train_subject(data_dir, 1, tmp_path / "run", config=dataclasses.replace(TINY, epochs=3), device="cpu", progress=False)
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["epoch"] == 1


def test_features_of_another_subject_are_refused(trainable, tmp_path):
    data_dir, _ = trainable
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    with h5py.File(copy / "subj01_features.h5", "r+") as h5:
        h5.attrs["subject"] = 2
    with pytest.raises(ValueError, match="features of subject 2"):
        load_training_data(copy, 1, TINY)


def test_vd_other_than_the_features_is_refused(trainable, tmp_path):
    with pytest.raises(ValueError, match="computed with --vd tiny, not full-random"):
        train_subject(trainable[0], 1, tmp_path / "run", config=TINY, vd="full-random", device="cpu", progress=False)


def test_test_data_alone_equals_the_test_part_of_the_training_data(trainable):
    from havir.train import load_test_data

    alone, within = load_test_data(trainable[0], 1), load_training_data(trainable[0], 1, TINY).test
    for field in dataclasses.fields(alone):
        np.testing.assert_array_equal(getattr(alone, field.name), getattr(within, field.name), err_msg=field.name)


def test_brain_diffuser_ridge_preset(trainable, tmp_path):
    """Every nsdgeneral voxel (the two sets and the rest), one averaged row per training image,
    fixed strengths, and test predictions re-scaled to the training targets' statistics; the
    reconstruction step reads the same inputs back."""
    from havir.models.ridge import RidgeDecoder
    from havir.prepare import load_split
    from havir.reconstruct import predict_test_set

    data_dir, _ = trainable
    config = TrainConfig(ridge_preset="brain-diffuser", seed=0)
    summary = train_subject(data_dir, 1, tmp_path / "run", model="ridge", config=config, device="cpu", progress=False)
    train = load_split(data_dir / "subj01.h5", "train")
    n_voxels = train.structural.shape[1] + train.semantic.shape[1] + train.other.shape[1]
    assert train.other.shape[1] > 0  # nsdgeneral is more than the two sets
    ridge = RidgeDecoder.from_pretrained(tmp_path / "run/ridge")
    assert ridge.x_mean_.shape == (n_voxels,) and ridge.rescale and ridge.standardise_inputs
    assert summary["alpha"] == {"vae_latents": 5e4, "clip_image": 6e4, "clip_text": 1e5}
    assert summary["ridge"]["inputs"] == "nsdgeneral" and summary["ridge"]["fit_rows"] == len(np.unique(train.nsd_id))
    _, predicted, _ = predict_test_set(tmp_path / "run", torch.device("cpu"))
    latents = predicted["vae_latents"].flatten(1).numpy()
    np.testing.assert_allclose(latents.std(0), ridge.target_std_["vae_latents"].numpy(), rtol=1e-3, atol=1e-5)
    assert summary["test_scores"]["clip_text_identification"] > 0.6


def test_ridge_preset_must_be_known(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('ridge_preset = "mindeye"\n')
    with pytest.raises(ValueError, match="ridge_preset must be one of search, brain-diffuser"):
        TrainConfig.from_toml(path)


def test_semantic_rank_setting_reaches_the_heads(trainable, tmp_path):
    from havir.train import build_decoders

    path = tmp_path / "config.toml"
    data = load_training_data(trainable[0], 1, TINY)
    for rank, expected in (('"full"', "full"), ("16", 16), ('"preset"', 8)):
        path.write_text(f'preset = "tiny"\nsemantic_rank = {rank}\n')
        _, semantic = build_decoders(data, TrainConfig.from_toml(path))
        assert semantic.config.rank == expected
    path.write_text('semantic_rank = 0\n')
    with pytest.raises(ValueError, match="semantic_rank must be one of preset, full or a whole number >= 1, got 0"):
        TrainConfig.from_toml(path)
