"""The dual-guided sampler against the diffusers pipeline, and its reproducibility."""

import json
import shutil

import h5py
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.deprecated.versatile_diffusion import VersatileDiffusionDualGuidedPipeline

from havir.features import compute_features
from havir.metrics.scores import row_correlations, two_way_identification
from havir.models.backbone import SamplerSettings, image_noise
from havir.models.encoding import encode_clip_images, encode_clip_texts
from havir.models.sampling import build_scheduler, decode, noised_start, sample
from havir.models.versatile import build_random, load_versatile_diffusion
from havir.reconstruct import predict_test_set, reconstruct
from havir.train import TrainConfig, train_subject


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=0)


def test_strength_one_equals_the_diffusers_pipeline(tiny):
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["A red ball on the left.", "A house and a tree at night."]
    side = tiny.image_side // 8
    noise = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(1))
    pipeline = VersatileDiffusionDualGuidedPipeline(
        tokenizer=tiny.tokenizer, image_feature_extractor=tiny.image_processor, text_encoder=tiny.text_encoder,
        image_encoder=tiny.image_encoder, image_unet=tiny.image_unet, text_unet=tiny.text_unet, vae=tiny.vae,
        scheduler=tiny.scheduler,
    )
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(prompt=prompts, image=images, text_to_image_strength=0.4, height=tiny.image_side, width=tiny.image_side,
                        num_inference_steps=6, guidance_scale=7.5, latents=noise.clone(), output_type="pt").images
    # The pipeline's own unconditional inputs (its grey image is rescaled twice, to near black).
    unconditional = (pipeline._encode_text_prompt([""], "cpu", 1, False), pipeline._encode_image_prompt(
        [np.zeros((512, 512, 3)) + 0.5], "cpu", 1, False))
    settings = SamplerSettings(steps=6, strength=1.0, guidance=7.5, text_share=0.4)
    latents = sample(tiny, encode_clip_texts(tiny, prompts), encode_clip_images(tiny, images), noise, settings,
                     unconditional=unconditional)
    with torch.no_grad():
        got = (tiny.vae.decode(latents / tiny.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert (got - expected).abs().max() <= 1e-4


def test_strength_zero_is_the_decoded_start(tiny):
    side = tiny.image_side // 8
    start = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(2))
    out = sample(tiny, torch.zeros(2, 77, 32), torch.zeros(2, 257, 32), torch.randn(2, 4, side, side),
                 SamplerSettings(steps=10, strength=0.0), start_latents=start)
    assert torch.equal(out, start)
    np.testing.assert_array_equal(decode(tiny, out), decode(tiny, start))


def test_noise_depends_only_on_seed_and_image():
    both = image_noise([5, 9], (4, 2, 2), seed=3)
    assert torch.equal(both[1], image_noise([9], (4, 2, 2), seed=3)[0])
    assert not torch.equal(both[0], image_noise([5], (4, 2, 2), seed=4)[0])


@pytest.fixture
def predictions(tiny):
    generator = torch.Generator().manual_seed(0)
    side = tiny.image_side // 8
    ids = np.array([30, 4, 17])
    return ids, {
        "vae_latents": torch.randn(3, 4, side, side, generator=generator),
        "clip_image": torch.randn(3, 257, 32, generator=generator) * 0.1,
        "clip_text": torch.randn(3, 77, 32, generator=generator) * 0.1,
    }


def test_same_images_whatever_the_batch_size_and_after_a_resume(tiny, predictions, tmp_path):
    ids, predicted = predictions
    settings = SamplerSettings(steps=4, strength=0.75)
    reconstruct(tiny, predicted, ids, tmp_path / "one", settings=settings, batch_size=1)
    summary = reconstruct(tiny, predicted, ids, tmp_path / "three", settings=settings, batch_size=3)
    assert summary["n_images"] == 3 and summary["reconstructed"] == 3
    for nsd_id in ids:
        a = np.asarray(PIL.Image.open(tmp_path / f"one/{nsd_id}.png"))
        b = np.asarray(PIL.Image.open(tmp_path / f"three/{nsd_id}.png"))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float rounding across batch shapes
    (tmp_path / "three/17.png").unlink()
    resumed = reconstruct(tiny, predicted, ids, tmp_path / "three", settings=settings, batch_size=3)
    assert resumed["reconstructed"] == 1
    assert np.abs(np.asarray(PIL.Image.open(tmp_path / "three/17.png")).astype(int)
                  - np.asarray(PIL.Image.open(tmp_path / "one/17.png")).astype(int)).max() <= 1


def test_modes_and_manifest(tiny, predictions, tmp_path):
    ids, predicted = predictions
    for mode in ("structural", "semantic", "fused"):
        reconstruct(tiny, predicted, ids, tmp_path / mode, mode=mode, settings=SamplerSettings(steps=3), limit=2)
        manifest = json.loads((tmp_path / mode / "manifest.json").read_text())
        assert manifest["mode"] == mode and manifest["images"] == [4, 17]
        assert sorted(p.name for p in (tmp_path / mode).glob("*.png")) == ["17.png", "4.png"]
    structural = np.asarray(PIL.Image.open(tmp_path / "structural/4.png")).astype(int)
    assert np.abs(structural - decode(tiny, predicted["vae_latents"][1:2])[0]).max() <= 1  # batch-shape rounding
    with pytest.raises(ValueError, match="--mode must be one of"):
        reconstruct(tiny, predicted, ids, tmp_path / "x", mode="both")


def test_reconstruct_a_trained_run_from_the_command_line(trainable, tmp_path, run_cli):
    data_dir, truth = trainable
    config = tmp_path / "tiny.toml"
    config.write_text('preset = "tiny"\nepochs = 2\nbatch_size = 32\n')
    assert run_cli("train", "--data", data_dir, "--subject", 1, "--out", tmp_path / "run", "--config", config)[0] == 0
    status, stdout, stderr = run_cli("reconstruct", "--run", tmp_path / "run", "--out", tmp_path / "recon", "--steps", 3,
                                     "--limit", 3, "--threads", 1, "--json")
    assert status == 0
    assert "fused reconstructions: 3/3 images (100%)" in stderr, stderr  # progress, as plain lines off a terminal
    summary = json.loads(stdout)
    assert {"n_images", "mode", "seconds", "images_per_second"} <= set(summary) and summary["n_images"] == 3
    expected = sorted(int(i) for i in truth.shared_nsd_id)[:3]
    assert sorted(int(p.stem) for p in (tmp_path / "recon").glob("*.png")) == expected
    manifest = json.loads((tmp_path / "recon/manifest.json").read_text())
    assert manifest["settings"]["strength"] == 0.75 and manifest["model"] == "havir"
    assert manifest["threads"] == 1  # --threads, recorded with the images


def test_reconstruct_without_a_finished_run(run_cli, tmp_path):
    status, _, stderr = run_cli("reconstruct", "--run", tmp_path, "--out", tmp_path / "recon")
    assert status == 2 and "run `havir train` first" in stderr


@pytest.mark.parametrize("scheduler", ["pndm", "dpmsolver", "euler"])
def test_other_schedulers_run(tiny, predictions, tmp_path, scheduler):
    ids, predicted = predictions
    summary = reconstruct(tiny, predicted, ids, tmp_path, settings=SamplerSettings(steps=4, scheduler=scheduler), limit=1)
    image = np.asarray(PIL.Image.open(tmp_path / "4.png"))
    assert summary["reconstructed"] == 1 and image.shape == (tiny.image_side, tiny.image_side, 3) and image.std() > 0


#: A released Stable-Diffusion-era scheduler config, as diffusers' Versatile Diffusion conversion
#: script saves it (PNDM, no ``clip_sample`` key: DDIM's own default would be True).
RELEASED_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0.dev0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "dpmsolver", "euler"])
def test_schedulers_from_a_released_pndm_config_never_clip(scheduler):
    built = build_scheduler(RELEASED_PNDM_CONFIG, SamplerSettings(scheduler=scheduler))
    assert not built.config.get("clip_sample", False) and not built.config.get("thresholding", False)


def test_ddim_from_a_released_pndm_config_keeps_large_clean_latents():
    """One DDIM step with eps = 0 from x_t = 3: x0 = x_t / sqrt(abar_t) (about 11) is kept, not
    clamped to 1; the setting turns clipping back on."""
    built = build_scheduler(RELEASED_PNDM_CONFIG, SamplerSettings())
    built.set_timesteps(50)
    t, t_prev = 721, 701
    x_t = torch.full((1, 4, 2, 2), 3.0)
    got = built.step(torch.zeros_like(x_t), t, x_t).prev_sample
    abar = built.alphas_cumprod.double()
    assert torch.allclose(got.double(), abar[t_prev].sqrt() * x_t.double() / abar[t].sqrt(), rtol=1e-5)
    clipping = build_scheduler(RELEASED_PNDM_CONFIG, SamplerSettings(clip_sample=True))
    clipping.set_timesteps(50)
    assert torch.allclose(clipping.step(torch.zeros_like(x_t), t, x_t).prev_sample.double(), abar[t_prev].sqrt() * 1.0)


def test_sampling_from_a_released_pndm_config_equals_the_unclipped_ddim(tiny):
    """The same model with the release's PNDM config samples exactly as with an explicit
    ``clip_sample=False`` DDIM config (random tiny weights predict clean latents far outside [-1, 1])."""
    from dataclasses import replace

    from diffusers import PNDMScheduler

    side = tiny.image_side // 8
    generator = torch.Generator().manual_seed(4)
    noise, start = torch.randn(1, 4, side, side, generator=generator), torch.randn(1, 4, side, side, generator=generator)
    embeds = torch.randn(1, 77, 32, generator=generator) * 0.1, torch.randn(1, 257, 32, generator=generator) * 0.1
    settings = SamplerSettings(steps=5, strength=0.8)
    released = replace(tiny, scheduler=PNDMScheduler.from_config(RELEASED_PNDM_CONFIG))
    assert torch.equal(sample(released, *embeds, noise, settings, start_latents=start),
                       sample(tiny, *embeds, noise, settings, start_latents=start))


@pytest.mark.parametrize(("start", "t_noise"), [("diffusers", 721), ("brain-diffuser", 741)])
def test_img2img_start_noises_to_the_closed_form(tiny, start, t_noise):
    """50 DDIM steps, strength 0.75: 37 steps run from t = 721 under both conventions; the start is
    sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with t = 721 (diffusers) or 741 (Brain-Diffuser), abar
    from the scaled-linear schedule in float64."""
    settings = SamplerSettings(steps=50, strength=0.75, img2img_start=start)
    scheduler = build_scheduler(tiny.scheduler.config, settings)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    timesteps, latents = noised_start(scheduler, settings, x0, eps)
    assert len(timesteps) == 37 and int(timesteps[0]) == 721 and int(timesteps[-1]) == 1
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)[t_noise]
    assert round(abar, 4) == {721: 0.0705, 741: 0.0604}[t_noise]
    expected = np.sqrt(abar) * x0.double().numpy() + np.sqrt(1 - abar) * eps.double().numpy()
    np.testing.assert_allclose(latents.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_manifest_records_the_img2img_start(tiny, predictions, tmp_path):
    ids, predicted = predictions
    for start, t_noise in (("diffusers", 721), ("brain-diffuser", 741)):
        settings = SamplerSettings(steps=50, strength=0.75, img2img_start=start)
        images = reconstruct(tiny, predicted, ids, tmp_path / start, settings=settings, limit=1)
        manifest = json.loads((tmp_path / start / "manifest.json").read_text())
        assert images["n_images"] == 1 and manifest["settings"]["img2img_start"] == start
        assert manifest["schedule"] == {"scheduler": "DDIMScheduler", "clip_sample": False, "thresholding": False, "start": start,
                                        "denoising_steps": 37, "noised_to_timestep": t_noise, "first_timestep": 721}
    with pytest.raises(ValueError, match="--img2img-start must be one of diffusers, brain-diffuser, got 'ldm'"):
        SamplerSettings(img2img_start="ldm")


def test_bad_strength(run_cli, tmp_path):
    status, _, stderr = run_cli("reconstruct", "--run", tmp_path, "--out", tmp_path / "recon", "--strength", 1.5)
    assert status == 2 and "--strength must be a finite number in [0, 1], got 1.5" in stderr


def test_structural_reconstructions_resemble_their_own_stimuli(trainable, tmp_path):
    """With the demo VAE (trained on the synthetic scenes), structural-mode reconstructions of
    held-out images correlate with their own stimulus far more than with the others'.
    Measured (seed 7 NSD, seed 0 training): PixCorr 0.73 own vs 0.31 shuffled, identification 0.96."""
    data_dir, _ = trainable
    data = tmp_path / "data"
    data.mkdir()
    for name in ("subj01.h5", "subj01.json"):
        shutil.copy(data_dir / name, data / name)
    compute_features(data, 1, model="demo", progress=False)
    config = TrainConfig(preset="tiny", epochs=20, batch_size=32, learning_rate=1e-3, seed=0)
    train_subject(data, 1, tmp_path / "run", config=config, device="cpu", progress=False)
    ids, predicted, _ = predict_test_set(tmp_path / "run", torch.device("cpu"))
    recon = decode(load_versatile_diffusion("demo"), predicted["vae_latents"])
    with h5py.File(data / "subj01.h5") as h5:
        assert np.array_equal(h5["test/stimulus_nsd_id"][()], ids)
        stimuli = h5["test/stimuli"][()]
    side = recon.shape[1]
    stimuli = np.stack([np.asarray(PIL.Image.fromarray(s).resize((side, side), PIL.Image.BICUBIC)) for s in stimuli])
    own = row_correlations(recon, stimuli).mean()
    others = row_correlations(recon, np.roll(stimuli, 1, axis=0)).mean()
    assert own > 0.5 and own > others + 0.2
    assert two_way_identification(stimuli, recon).mean() > 0.8
