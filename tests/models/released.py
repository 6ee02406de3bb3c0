"""The hub repository ``shi-labs/versatile-diffusion`` as released, with tiny random weights.

The layout is the one diffusers' conversion script writes (``scripts/convert_versatile_diffusion_
to_diffusers.py``: ``VersatileDiffusionPipeline(...).save_pretrained``): its ``model_index.json``
(``text_unet`` declared under the library ``versatile_diffusion``), the eight component folders,
a ``PNDMScheduler`` config without ``clip_sample``, CLIP's preprocessor config in the
``CLIPFeatureExtractor`` form of ``openai/clip-vit-large-patch14``, the tokenizer's four files,
and a pickled ``.bin`` beside every ``.safetensors`` (the era's default), which must never be read.
Only the sizes are tiny (the ``tiny`` configs); the image UNet's ``sample_size`` (16 latents,
128-pixel images) tells the loader the image side, as diffusers' pipelines read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from havir.models.versatile import build_random

MODEL_INDEX = {
    "_class_name": "VersatileDiffusionPipeline",
    "_diffusers_version": "0.8.0.dev0",
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_unet": ["versatile_diffusion", "UNetFlatConditionModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0.dev0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
PREPROCESSOR_CONFIG = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
#: Not a pickle: loading any ``.bin`` fails loudly.
NOT_A_PICKLE = b"this .bin must not be read: only safetensors are loaded\n"


def write_released_folder(folder: Path, seed: int = 0) -> Path:
    """Write the release's layout with ``tiny``'s random weights (seed ``seed``) into ``folder``."""
    folder = Path(folder)
    vd = build_random("tiny", seed)
    vd.save_pretrained(folder)  # the weights and model configs; the release's own files replace the rest
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    for stale in (folder / "scheduler").iterdir():
        stale.unlink()
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    for stale in (folder / "image_feature_extractor").iterdir():
        stale.unlink()
    (folder / "image_feature_extractor/preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    _write_tokenizer(folder / "tokenizer", vd.tokenizer)
    for name in ("image_unet", "text_unet"):
        config = json.loads((folder / name / "config.json").read_text())
        config["sample_size"] = vd.image_side // 8 if name == "image_unet" else None
        (folder / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, pickled in (("image_unet", "diffusion_pytorch_model.bin"), ("text_unet", "diffusion_pytorch_model.bin"),
                          ("vae", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin"),
                          ("image_encoder", "pytorch_model.bin")):
        (folder / name / pickled).write_bytes(NOT_A_PICKLE)
    return folder


def _write_tokenizer(folder: Path, tokenizer) -> None:
    """CLIP's slow-tokenizer files, as ``openai/clip-vit-large-patch14`` ships them (tiny's byte vocabulary)."""
    for stale in folder.iterdir():
        stale.unlink()
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(special | {
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "tokenizer_class": "CLIPTokenizer",
    }))


def write_hub_cache(cache: Path, repo_id: str = "shi-labs/versatile-diffusion", seed: int = 0) -> Path:
    """The release in the Hugging Face cache layout: ``models--owner--name/blobs/<sha256>``,
    ``snapshots/<commit>/...`` links to the blobs, ``refs/main`` holding the commit. Returns the snapshot."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    staging = write_released_folder(repo / "staging", seed)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        path.replace(blob)
        link = snapshot / path.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for directory in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        directory.rmdir()
    staging.rmdir()
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(commit)
    return snapshot
