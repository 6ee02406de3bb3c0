"""The release's own folder layout (``shi-labs/versatile-diffusion``), as a plain folder and as a
Hugging Face cache snapshot read offline, through ``features``, ``train`` and ``reconstruct``."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from havir.errors import MissingInputError
from havir.models.versatile import build_random, load_versatile_diffusion
from havir.prepare import prepare_subject
from tests.models.released import write_hub_cache, write_released_folder

REPO_ID = "shi-labs/versatile-diffusion"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_folder(tmp_path_factory.mktemp("released") / "versatile-diffusion", seed=0)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """The release in a Hugging Face cache, with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    write_hub_cache(cache, REPO_ID, seed=0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: follow the environment
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_the_released_folder_loads_the_weights_it_holds(released):
    """Every weight, the tokenizer, CLIP's preprocessing; the image side from the UNet's
    sample_size (16 latents: 128 pixels); the release's PNDM config read as a DDIM that never clips."""
    loaded, tiny = load_versatile_diffusion(released), build_random("tiny", seed=0)
    for name, module in tiny.modules().items():
        expected, got = module.state_dict(), loaded.modules()[name].state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name
    assert loaded.tokenizer(["A red ball."]).input_ids == tiny.tokenizer(["A red ball."]).input_ids
    pixels = np.random.default_rng(0).integers(0, 256, (1, 96, 96, 3), dtype=np.uint8)
    assert torch.equal(loaded.image_processor(images=list(pixels), return_tensors="pt").pixel_values,
                       tiny.image_processor(images=list(pixels), return_tensors="pt").pixel_values)
    assert loaded.image_side == tiny.image_side == 128
    assert loaded.scheduler.config.clip_sample is False and loaded.scheduler.config.steps_offset == 1


def test_pickled_weights_alone_are_refused(released, tmp_path):
    folder = shutil.copytree(released, tmp_path / "vd")
    for weights in (folder / "image_unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(MissingInputError, match=r"no \.safetensors weights in image_unet .*never unpickles"):
        load_versatile_diffusion(folder)


@pytest.mark.parametrize("source", ["folder", "hub cache"])
def test_features_train_and_reconstruct_from_the_release(source, released, small_nsd, tmp_path, run_cli, request):
    """From the release layout, the features equal those of the same weights built in memory, and
    a ridge run reconstructs from them."""
    root, _ = small_nsd
    vd = str(released) if source == "folder" else REPO_ID
    if source == "hub cache":
        request.getfixturevalue("offline_cache")
    data = tmp_path / "data"
    prepare_subject(root, 1, data, progress=False)
    assert run_cli("features", "--data", data, "--subject", 1, "--vd", vd, "--device", "cpu")[0] == 0
    with h5py.File(data / "subj01_features.h5") as h5:
        assert json.loads(h5.attrs["settings"])["model"] == vd
        ids, latents, image_tokens = h5["nsd_id"][()], h5["vae_latents"][()], h5["clip_image"][()]
    assert latents.shape[1:] == (4, 16, 16) and image_tokens.shape[1:] == (257, 32)
    from havir.models.encoding import encode_clip_images, encode_vae_latents
    from havir.nsd.stimuli import iter_stimuli

    tiny = build_random("tiny", seed=0)
    _, first = next(iter_stimuli(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", ids[:2]))
    np.testing.assert_array_equal(latents[:2], encode_vae_latents(tiny, first).numpy().astype(np.float16))
    np.testing.assert_array_equal(image_tokens[:2], encode_clip_images(tiny, first).numpy().astype(np.float16))

    assert run_cli("train", "--data", data, "--subject", 1, "--out", tmp_path / "run", "--model", "ridge", "--device", "cpu")[0] == 0
    status, _, stderr = run_cli("reconstruct", "--run", tmp_path / "run", "--out", tmp_path / "recon", "--steps", 2,
                                "--limit", 1, "--device", "cpu")
    assert status == 0, stderr
    manifest = json.loads((tmp_path / "recon/manifest.json").read_text())
    assert manifest["vd"].endswith("versatile-diffusion") or REPO_ID.replace("/", "--") in manifest["vd"]
    assert manifest["schedule"]["clip_sample"] is False and len(list((tmp_path / "recon").glob("*.png"))) == 1
