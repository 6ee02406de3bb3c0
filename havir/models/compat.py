"""Compatibility with diffusers' deprecated Versatile Diffusion code, in one place.

Versatile Diffusion lives in ``diffusers.pipelines.deprecated.versatile_diffusion`` and has
bit-rotted there (checked on diffusers 0.42.1). Each work-around below is tested in
``tests/models/test_compat.py`` together with the upstream behaviour it works around, so the
tests fail loudly when upstream changes and a work-around can go.

1. ``DualTransformer2DModel.forward`` rejects the ``encoder_attention_mask`` argument that the
   UNet's cross-attention blocks now pass (diffusers issue 13651), so a dual-guided UNet cannot
   run a forward pass. :func:`make_dual_unet` gives its dual transformers a forward that accepts
   the argument (Versatile Diffusion never masks its condition tokens, so only ``None`` is valid).
2. A pipeline folder whose ``model_index.json`` names ``UNetFlatConditionModel`` (the release
   declares it under the library ``versatile_diffusion``) cannot be loaded by
   ``DiffusionPipeline.from_pretrained``: diffusers refuses that library name, and aliasing the
   module does not help. HAVIR therefore loads every component by its own class
   (:mod:`havir.models.versatile`) and never asks diffusers to resolve the index.
"""

from __future__ import annotations

from types import SimpleNamespace

from diffusers.models import DualTransformer2DModel, UNet2DConditionModel

from havir.errors import InvalidInputError
from havir.library_logging import quiet_model_libraries

# Importing the deprecated pipeline makes transformers warn that its fast image processor needs
# torchvision; HAVIR uses the PIL one (CLIPImageProcessorPil), so the warning is noise.
with quiet_model_libraries():
    from diffusers.pipelines.deprecated.versatile_diffusion import VersatileDiffusionDualGuidedPipeline
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

__all__ = ["UNetFlatConditionModel", "make_dual_unet", "set_text_share"]


class _MaskTolerantDualTransformer(DualTransformer2DModel):
    """A ``DualTransformer2DModel`` whose forward accepts ``encoder_attention_mask=None``."""

    def forward(self, hidden_states, encoder_hidden_states, *args, encoder_attention_mask=None, **kwargs):
        if encoder_attention_mask is not None:
            raise ValueError("Versatile Diffusion's dual transformer does not mask its condition tokens")
        return super().forward(hidden_states, encoder_hidden_states, *args, **kwargs)


def make_dual_unet(image_unet: UNet2DConditionModel, text_unet: UNetFlatConditionModel) -> UNet2DConditionModel:
    """Turn ``image_unet`` (in place) into Versatile Diffusion's dual-guided UNet.

    Each ``Transformer2DModel`` becomes a dual transformer holding the image UNet's transformer
    (for the 257 image tokens) and the text UNet's matching one (for the 77 text tokens). The
    conversion is upstream's own (the pipeline method only reads ``image_unet`` and
    ``text_unet``); the dual transformers then get the mask-tolerant forward.
    """
    VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention(SimpleNamespace(image_unet=image_unet, text_unet=text_unet))
    for module in image_unet.modules():
        if type(module) is DualTransformer2DModel:
            module.__class__ = _MaskTolerantDualTransformer
    return image_unet


def set_text_share(dual_unet: UNet2DConditionModel, text_share: float, text_tokens: int = 77, image_tokens: int = 257) -> None:
    """Set how much each dual transformer takes from the text condition (``mix_ratio``).

    Output = text * ``text_share`` + image * (1 - ``text_share``) + input, with the condition
    tokens ordered [text | image]: the pipeline's ``text_to_image_strength``.
    """
    if not 0.0 <= text_share <= 1.0:
        raise InvalidInputError(f"text share must be in [0, 1], got {text_share}")
    for module in dual_unet.modules():
        if isinstance(module, DualTransformer2DModel):
            module.mix_ratio = text_share
            module.condition_lengths = [text_tokens, image_tokens]
            module.transformer_index_for_condition = [1, 0]  # text tokens -> text transformer

