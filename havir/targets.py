"""The training targets, written once: what the decoders predict, the features cache stores, the
losses compare and the sampler conditions on.

Each :class:`Target` says which decoder predicts it, the shape of one image's target from the
backbone's sizes (:class:`TargetSizes`) and how it is stored. Features, losses, decoders,
reconstruction and the files loop over :data:`TARGETS` instead of spelling the names out.

* ``vae_latents`` (structural): the image's VAE latent, (latent_channels, side, side), 4x64x64;
* ``clip_image`` (semantic): CLIP image tokens, (image_tokens, dim), 257x768;
* ``clip_text`` (semantic): CLIP text tokens, mean over the captions, (text_tokens, dim), 77x768.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TargetSizes:
    """The backbone's sizes the targets' shapes follow (Versatile Diffusion's in brackets).

    latent_channels, latent_side : the VAE latent (4, 64); image_tokens, text_tokens : CLIP's
    token counts (257, 77); dim : the CLIP token width (768).
    """

    latent_channels: int
    latent_side: int
    image_tokens: int
    text_tokens: int
    dim: int


@dataclass(frozen=True)
class Target:
    """One target: ``name`` (its dataset in the features cache and key in every dict of
    targets), the ``decoder`` that predicts it, what the backbone encodes it ``from``
    (``"image"``, or ``"text"``: one per caption, averaged over the image's captions), its
    per-image ``shape`` from the backbone's sizes, the ``stored_dtype`` of the cache and the
    ``dtype`` losses and sampling use."""

    name: str
    decoder: str
    encoded_from: str
    shape: Callable[[TargetSizes], tuple[int, ...]]
    description: str
    stored_dtype: type = np.float16  # half the disk; the values are what the fp16/bf16 encoders give
    dtype: torch.dtype = torch.float32


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("vae_latents", "structural", "image", lambda s: (s.latent_channels, s.latent_side, s.latent_side), "VAE latent"),
        Target("clip_image", "semantic", "image", lambda s: (s.image_tokens, s.dim), "CLIP image tokens"),
        Target("clip_text", "semantic", "text", lambda s: (s.text_tokens, s.dim), "CLIP text tokens (mean over the captions)"),
    )
}

#: The target names in their fixed order (features cache, run files, predictions).
TARGET_NAMES: tuple[str, ...] = tuple(TARGETS)


def targets_of(decoder: str) -> tuple[str, ...]:
    """The names of the targets ``decoder`` (``"structural"`` or ``"semantic"``) predicts, in order."""
    return tuple(name for name, target in TARGETS.items() if target.decoder == decoder)


def encoded_from(source: str) -> tuple[str, ...]:
    """The names of the targets a backbone encodes from ``source`` (``"image"`` or ``"text"``), in order."""
    return tuple(name for name, target in TARGETS.items() if target.encoded_from == source)


def target_shapes(sizes: TargetSizes) -> dict[str, tuple[int, ...]]:
    """``{name: per-image shape}`` of every target for a backbone of these sizes."""
    return {name: target.shape(sizes) for name, target in TARGETS.items()}


def stored_bytes(sizes: TargetSizes) -> int:
    """Bytes one image's targets take in the features cache."""
    return sum(int(np.prod(target.shape(sizes))) * np.dtype(target.stored_dtype).itemsize for target in TARGETS.values())
