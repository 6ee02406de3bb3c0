"""The training targets of images and captions, as Versatile Diffusion conditions on them:
VAE latents, CLIP image tokens, CLIP text tokens (see :mod:`havir.targets`). ``havir features``
encodes every image a subject saw with these; ``havir reconstruct`` encodes the unconditional
prompts with them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from havir.models.backbone import Images

if TYPE_CHECKING:
    from havir.models.versatile import VersatileDiffusion

#: CLIP's text context: every caption is 77 tokens (padded or truncated).
TEXT_TOKENS = 77


def _as_pil(images: Images) -> list[PIL.Image.Image]:
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise TypeError(f"images must be uint8 of shape (n, height, width, 3), got {images.dtype} {images.shape}")
        return [PIL.Image.fromarray(image) for image in images]
    return [image.convert("RGB") for image in images]


@torch.no_grad()
def encode_vae_latents(vd: VersatileDiffusion, images: Images) -> torch.Tensor:
    """VAE latents of ``images`` (uint8 (n, h, w, 3) or PIL) resized to ``vd.image_side``:
    float (n, 4, side / 8, side / 8), i.e. (n, 4, 64, 64) for the released model."""
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vd.vae.config.block_out_channels) - 1))
    pixels = processor.preprocess(_as_pil(images), height=vd.image_side, width=vd.image_side)  # in [-1, 1]
    pixels = pixels.to(device=vd.device, dtype=vd.vae.dtype)
    return vd.vae.encode(pixels).latent_dist.mode() * vd.vae.config.scaling_factor


@torch.no_grad()
def encode_clip_images(vd: VersatileDiffusion, images: Images) -> torch.Tensor:
    """CLIP image tokens as Versatile Diffusion conditions on them: float (n, 257, D)."""
    pixels = vd.image_processor(images=_as_pil(images), return_tensors="pt").pixel_values
    encoder = vd.image_encoder
    hidden = encoder(pixels.to(device=encoder.device, dtype=encoder.dtype)).last_hidden_state
    tokens = encoder.visual_projection(encoder.vision_model.post_layernorm(hidden))
    return tokens / torch.norm(tokens[:, 0:1], dim=-1, keepdim=True)


@torch.no_grad()
def encode_clip_texts(vd: VersatileDiffusion, texts: Sequence[str]) -> torch.Tensor:
    """CLIP text tokens as Versatile Diffusion conditions on them: float (n, 77, D)."""
    ids = vd.tokenizer(
        list(texts), padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    output = vd.text_encoder(ids.to(vd.text_encoder.device))
    tokens = vd.text_encoder.text_projection(output.last_hidden_state)
    return tokens / torch.norm(output.text_embeds.unsqueeze(1), dim=-1, keepdim=True)
