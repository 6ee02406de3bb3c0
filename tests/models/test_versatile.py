"""Loading Versatile Diffusion: built-in architectures, local folders, the hub cache, errors."""

import json
import shutil

import pytest
import torch
from accelerate import init_empty_weights

from havir.models.versatile import build_random, load_versatile_diffusion


def parameters(module, skip=None):
    return sum(p.numel() for name, p in module.named_parameters() if not (skip and skip in name))


def test_full_random_has_the_released_architecture():
    """Parameter counts of the released components (Stable Diffusion 1.x UNet and VAE share
    Versatile Diffusion's image-flow shapes; CLIP ViT-L/14 text and vision towers)."""
    with init_empty_weights():  # shapes only: no memory, no time
        vd = build_random("full-random")
    assert parameters(vd.image_unet, skip=".transformers.1.") == 859_520_964
    assert parameters(vd.vae) == 83_653_863
    assert parameters(vd.text_encoder.text_model) == 123_060_480
    assert parameters(vd.image_encoder.vision_model) == 303_179_776
    assert vd.embedding_dim == 768 and vd.image_side == 512
    assert vd.vae.config.scaling_factor == 0.18215
    assert vd.scheduler.config.beta_schedule == "scaled_linear" and vd.scheduler.config.beta_end == 0.012


def test_tiny_keeps_the_token_counts():
    vd = build_random("tiny")
    pixels = vd.image_processor(images=[torch.zeros(3, 64, 64).numpy().transpose(1, 2, 0).astype("uint8")], return_tensors="pt").pixel_values
    assert vd.image_encoder(pixels).last_hidden_state.shape[1] == 257
    ids = vd.tokenizer(["a red ball"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and vd.text_encoder(ids).last_hidden_state.shape[1] == 77


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_random("tiny", 0), build_random("tiny", 0), build_random("tiny", 1)
    wa, wb, wc = (next(iter(x.vae.parameters())) for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_save_and_load_round_trip_exactly(tmp_path):
    vd = build_random("tiny", seed=3)
    vd.save_pretrained(tmp_path / "vd")
    index = json.loads((tmp_path / "vd/model_index.json").read_text())
    assert index["text_unet"] == ["versatile_diffusion", "UNetFlatConditionModel"]  # as the release has it
    loaded = load_versatile_diffusion(tmp_path / "vd")
    for name, module in vd.modules().items():
        original, reloaded = module.state_dict(), loaded.modules()[name].state_dict()
        assert original.keys() == reloaded.keys(), name
        for key in original:
            assert torch.equal(original[key], reloaded[key]), f"{name}.{key}"
    assert loaded.image_side == vd.image_side
    assert loaded.tokenizer(["A red ball."]).input_ids == vd.tokenizer(["A red ball."]).input_ids
    assert loaded.image_processor.to_dict()["image_mean"] == vd.image_processor.to_dict()["image_mean"]
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.scheduler.config) == public(vd.scheduler.config)


def test_folder_missing_a_component_names_it(tmp_path):
    build_random("tiny").save_pretrained(tmp_path / "vd")
    shutil.rmtree(tmp_path / "vd/vae")
    with pytest.raises(FileNotFoundError, match="lacks vae"):
        load_versatile_diffusion(tmp_path / "vd")


def test_hub_id_offline_and_not_cached_says_where_it_looked(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache .*hub.* and HF_HUB_OFFLINE is set"):
        load_versatile_diffusion("shi-labs/versatile-diffusion")


def test_hub_id_resolves_through_the_cache(tmp_path, monkeypatch):
    """A snapshot in the cache layout (models--owner--name/snapshots/REV) loads offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-vd" / "snapshots" / ("0" * 40)
    build_random("tiny", seed=5).save_pretrained(snapshot)
    (cache / "models--someone--tiny-vd" / "refs").mkdir()
    (cache / "models--someone--tiny-vd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    loaded = load_versatile_diffusion("someone/tiny-vd")
    assert torch.equal(next(iter(loaded.vae.parameters())), next(iter(build_random("tiny", seed=5).vae.parameters())))


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_versatile_diffusion(tmp_path / "nowhere")


def test_demo_vae_reconstructs_synthetic_scenes():
    """The demo's VAE was trained on the scene generator: it round-trips unseen scenes closely
    (held-out MSE 0.009 in [-1, 1] at the end of training), where tiny's random VAE cannot."""
    import numpy as np

    from havir.nsd.scenes import render_scene, sample_scene

    rng = np.random.default_rng(99)
    images = np.stack([render_scene(sample_scene(rng), 128) for _ in range(8)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    errors = {}
    for name in ("demo", "tiny"):
        vae = load_versatile_diffusion(name).vae
        with torch.no_grad():
            errors[name] = torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x).item()
    assert errors["demo"] < 0.03 < errors["tiny"]
