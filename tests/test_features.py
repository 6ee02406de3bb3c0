"""Training targets: equal to Versatile Diffusion's own encoding, cached, resumable."""

import json
from pathlib import Path

import h5py
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.deprecated.versatile_diffusion import VersatileDiffusionDualGuidedPipeline

import havir.features
import havir.models.versatile
from havir.features import compute_features, features_path
from havir.models.encoding import encode_clip_images, encode_clip_texts, encode_vae_latents
from havir.models.versatile import VersatileDiffusion
from havir.models.versatile import build_random
from havir.prepare import prepare_subject


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=0)


@pytest.fixture(scope="module")
def pipeline(tiny):
    # image_unet is already dual-guided (its config says so), so the pipeline keeps it as it is.
    return VersatileDiffusionDualGuidedPipeline(
        tokenizer=tiny.tokenizer, image_feature_extractor=tiny.image_processor, text_encoder=tiny.text_encoder,
        image_encoder=tiny.image_encoder, image_unet=tiny.image_unet, text_unet=tiny.text_unet, vae=tiny.vae,
        scheduler=tiny.scheduler,
    )


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)


def test_clip_image_tokens_equal_the_pipelines(tiny, pipeline, images):
    expected = pipeline._encode_image_prompt([PIL.Image.fromarray(i) for i in images], "cpu", 1, False)
    for given in (images, [PIL.Image.fromarray(i) for i in images]):
        got = encode_clip_images(tiny, given)
        assert got.shape == (3, 257, 32)
        assert (got - expected).abs().max() <= 1e-5


def test_clip_text_tokens_equal_the_pipelines(tiny, pipeline):
    texts = ["A red ball on the left.", "Two things at night: a car and a sign.", ""]
    expected = pipeline._encode_text_prompt(texts, "cpu", 1, False)
    got = encode_clip_texts(tiny, texts)
    assert got.shape == (3, 77, 32) and (got - expected).abs().max() <= 1e-5


def test_float_images_are_refused_because_clip_would_rescale_them_twice(tiny, images):
    twice = tiny.image_processor(images=list(images / 255.0), return_tensors="pt").pixel_values
    once = tiny.image_processor(images=list(images), return_tensors="pt").pixel_values
    assert (twice - once).abs().max() > 1.0  # the trap is real in this transformers version
    with pytest.raises(TypeError, match="uint8"):
        encode_clip_images(tiny, images / 255.0)


def test_vae_latents_follow_the_definition(tiny, images):
    side = tiny.image_side
    pixels = np.stack([np.asarray(PIL.Image.fromarray(i).resize((side, side), PIL.Image.LANCZOS)) for i in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        expected = tiny.vae.encode(2 * x - 1).latent_dist.mode() * tiny.vae.config.scaling_factor
    got = encode_vae_latents(tiny, images)
    assert got.shape == (3, 4, side // 8, side // 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def prepared(_small_nsd, tmp_path):
    root, _ = _small_nsd
    prepare_subject(root, 1, tmp_path / "data", progress=False)
    return tmp_path / "data"


def test_features_cache_content(prepared, tiny):
    summary = compute_features(prepared, 1, model="tiny", batch_size=7, progress=False)
    with h5py.File(features_path(prepared, 1)) as h5, h5py.File(prepared / "subj01.h5") as data:
        ids = h5["nsd_id"][()]
        np.testing.assert_array_equal(ids, np.union1d(data["train/nsd_id"][()], data["test/nsd_id"][()]))
        assert h5["vae_latents"].dtype == np.float16 and h5["clip_image"].shape == (len(ids), 257, 32)
        row = 5
        captions = data["captions/text"].asstr()[()][data["captions/nsd_id"][()] == ids[row]]
        clip_text, clip_image = h5["clip_text"][row], h5["clip_image"][row]
    assert summary["images"] == len(ids) and summary["resumed_from"] == 0
    expected_text = encode_clip_texts(tiny, list(captions)).mean(0).numpy()
    np.testing.assert_allclose(clip_text, expected_text, atol=2e-3, rtol=2e-3)
    with h5py.File(_stimuli_of(prepared)) as h5:
        image = h5["imgBrick"][int(ids[row])]
    np.testing.assert_allclose(clip_image, encode_clip_images(tiny, image[None])[0].numpy(), atol=2e-3, rtol=2e-3)


def _stimuli_of(data):
    return Path(json.loads((data / "subj01.json").read_text())["nsd_root"]) / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def test_interrupted_run_resumes_and_ends_identical(prepared, interrupt_on_call):
    reference = compute_features(prepared, 1, model="tiny", batch_size=8, progress=False)
    with h5py.File(reference["output"]) as h5:
        expected = {name: h5[name][()] for name in ("nsd_id", "vae_latents", "clip_image", "clip_text")}
    features_path(prepared, 1).unlink()

    restore = interrupt_on_call(VersatileDiffusion, "encode_texts", 3)
    with pytest.raises(KeyboardInterrupt):
        compute_features(prepared, 1, model="tiny", batch_size=8, progress=False)
    assert not features_path(prepared, 1).exists(), "an unfinished cache must not take the final name"
    restore()
    resumed = compute_features(prepared, 1, model="tiny", batch_size=8, progress=False)
    assert resumed["resumed_from"] == 16
    with h5py.File(resumed["output"]) as h5:
        for name, values in expected.items():
            np.testing.assert_array_equal(h5[name][()], values, err_msg=name)
    again = compute_features(prepared, 1, model="tiny", batch_size=8, progress=False)
    assert again["resumed_from"] == again["images"], "a finished cache is reused, not recomputed"


def test_features_without_prepared_data(run_cli, tmp_path):
    status, _, stderr = run_cli("features", "--data", tmp_path, "--subject", 1, "--vd", "tiny")
    assert status == 2 and "run `havir prepare` first" in stderr and len(stderr.strip().splitlines()) == 1


def test_features_with_an_incomplete_model_folder(run_cli, prepared, tmp_path):
    (tmp_path / "vd" / "vae").mkdir(parents=True)
    status, _, stderr = run_cli("features", "--data", prepared, "--subject", 1, "--vd", tmp_path / "vd")
    assert status == 2 and "lacks tokenizer" in stderr


def test_prepared_file_of_another_version(run_cli, prepared):
    with h5py.File(prepared / "subj01.h5", "r+") as h5:
        h5.attrs["format_version"] = 99
    status, _, stderr = run_cli("features", "--data", prepared, "--subject", 1, "--vd", "tiny")
    assert status == 2 and "format 99" in stderr and "run `havir prepare` again" in stderr


def test_out_of_gpu_memory_names_a_batch_size(run_cli, prepared, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(havir.models.versatile, "encode_vae_latents", out_of_memory)
    status, _, stderr = run_cli("features", "--data", prepared, "--subject", 1, "--vd", "tiny", "--batch-size", 32)
    assert status == 2 and "try --batch-size 16" in stderr
    assert not features_path(prepared, 1).exists()
