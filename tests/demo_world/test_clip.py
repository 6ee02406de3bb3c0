"""The miniature CLIP: its tokenizer, its retrieval on fresh scenes (and a shuffled null), and its
place in a Versatile Diffusion folder beside the ``tiny`` UNets."""

import json

import numpy as np
import pytest
import torch

from havir.demo_world.clip import (
    DEMO_CLIP,
    caption_vocabulary,
    embed_images,
    embed_texts,
    load_demo_clip,
    retrieval_top1,
    scene_tokenizer,
)
from havir.errors import MissingInputError
from havir.models.versatile import TEXT_TOKENS
from havir.nsd.scenes import describe_scene, render_scene, sample_scene

FRESH_SEED = 515151
CANDIDATES = 100
#: Floor of image-to-caption top-1 among 100 candidates: the issue's acceptance bar, 80%. The
#: shipped towers score 0.832 on these 500 scenes (0.838 and 0.794 on two other seeds' 500, 0.812
#: on training's held-out set): they meet the bar on average, with a thin margin.
RETRIEVAL_FLOOR = 0.80


@pytest.fixture(scope="module")
def clip():
    return load_demo_clip()


@pytest.fixture(scope="module")
def fresh_pairs():
    """Five groups of 100 fresh scenes at the demo stimulus side, one caption each."""
    rng = np.random.default_rng(FRESH_SEED)
    scenes = [sample_scene(rng) for _ in range(5 * CANDIDATES)]
    return np.stack([render_scene(s, 64) for s in scenes]), [describe_scene(s, rng, n_captions=1)[0] for s in scenes]


def test_each_caption_word_is_one_token_and_captions_fit():
    tokenizer = scene_tokenizer()
    for word in caption_vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    rng = np.random.default_rng(1)
    captions = [c for _ in range(200) for c in describe_scene(sample_scene(rng), rng, n_captions=6)]
    longest = max(len(tokenizer(c).input_ids) for c in captions)
    assert longest <= 40 < TEXT_TOKENS  # whole words: far inside CLIP's 77 (characters would not fit)
    # Text outside the vocabulary falls back to CLIP's byte alphabet, one token per character.
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra", add_special_tokens=False).input_ids) == ["z", "e", "b", "r", "a</w>"]


def test_shipped_tokenizer_is_the_one_the_captions_build(clip):
    rng = np.random.default_rng(2)
    captions = [c for _ in range(50) for c in describe_scene(sample_scene(rng), rng, n_captions=6)]
    assert clip.tokenizer(captions).input_ids == scene_tokenizer()(captions).input_ids


def test_image_to_caption_retrieval_on_fresh_scenes(clip, fresh_pairs):
    images, captions = fresh_pairs
    image_embeds, text_embeds = embed_images(clip, images), embed_texts(clip, captions)
    groups = [slice(g, g + CANDIDATES) for g in range(0, len(captions), CANDIDATES)]
    top1 = np.mean([retrieval_top1(image_embeds[g], text_embeds[g]) for g in groups])
    assert top1 >= RETRIEVAL_FLOOR
    # Null control: each image paired with another scene's caption; top-1 falls to chance (1%).
    shuffled = text_embeds[torch.from_numpy(np.roll(np.arange(len(captions)), 1))]
    null = np.mean([retrieval_top1(image_embeds[g], shuffled[g]) for g in groups])
    assert null <= 0.05


def test_retrieval_top1_counts_the_diagonal_wins():
    image_embeds = torch.eye(4)
    text_embeds = torch.eye(4)[[0, 1, 3, 2]]  # images 2 and 3 find each other's captions
    assert retrieval_top1(image_embeds, text_embeds) == 0.5


def test_miniature_clip_conditions_the_tiny_unets(clip, tmp_path):
    """Put together as a Versatile Diffusion folder with the ``demo`` UNets and VAE, the
    miniature CLIP loads as a released folder does, and its tokens (77 text, 257 image, of the
    UNets' cross-attention width) drive the dual-guided UNet."""
    from havir.models.encoding import encode_clip_images, encode_clip_texts
    from havir.models.versatile import load_versatile_diffusion

    vd = load_versatile_diffusion("demo")
    vd.tokenizer, vd.image_processor = clip.tokenizer, clip.image_processor
    vd.text_encoder, vd.image_encoder = clip.text_encoder, clip.image_encoder
    loaded = load_versatile_diffusion(vd.save_pretrained(tmp_path / "vd"))
    rng = np.random.default_rng(3)
    scene = sample_scene(rng)
    text = encode_clip_texts(loaded, describe_scene(scene, rng, n_captions=1))
    image = encode_clip_images(loaded, render_scene(scene, 64)[None])
    assert text.shape == (1, TEXT_TOKENS, 32) and image.shape == (1, 257, 32)
    assert loaded.image_unet.config.cross_attention_dim == loaded.embedding_dim == 32
    latents = torch.zeros(1, 4, 16, 16)
    noise = loaded.image_unet(latents, 10, encoder_hidden_states=torch.cat([text, image], dim=1)).sample
    assert noise.shape == latents.shape and torch.isfinite(noise).all()
    assert torch.equal(loaded.text_encoder.text_projection.weight, clip.text_encoder.text_projection.weight)


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(MissingInputError, match="miniature CLIP folder .* lacks tokenizer, image_feature_extractor"):
        load_demo_clip(tmp_path)
    assert DEMO_CLIP.name == "demo-vd"


def test_training_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Three steps in one run, and one step, a stop and a resumed run, end in the same weights (a
    resume that dropped the optimiser's moments or a random stream would not)."""
    import sys

    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[2] / "scripts"))
    import train_demo_clip

    def train(out, *extra):
        small = ["--steps", "3", "--batch-size", "4", "--held-out-groups", "1", "--checkpoint-every", "5"]
        monkeypatch.setattr(sys, "argv", ["train_demo_clip.py", *small, "--checkpoint", str(tmp_path / f"{out}-checkpoint"), "--out", str(tmp_path / out), *extra])
        train_demo_clip.main()

    train("straight")
    train("resumed", "--max-minutes", "0")  # checkpoints and stops after its first step
    assert not (tmp_path / "resumed").exists()
    capsys.readouterr()
    train("resumed")
    assert "resuming at step 1" in capsys.readouterr().out
    for tower in ("text_encoder", "image_encoder"):
        straight, resumed = (load_file(tmp_path / run / tower / "model.safetensors") for run in ("straight", "resumed"))
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), tower
    assert json.loads((tmp_path / "resumed" / "training-clip.json").read_text())["settings"]["steps"] == 3
