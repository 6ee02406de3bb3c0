"""The work-arounds for diffusers' deprecated Versatile Diffusion, next to the breakages they fix.

If a test marked "upstream" fails, diffusers changed: the work-around may be obsolete (or need
updating); see havir/models/compat.py.
"""

import inspect

import pytest
import torch
from diffusers.models import DualTransformer2DModel

from havir.models.compat import set_text_share
from havir.models.versatile import _without_dual, build_random


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=0)


def test_upstream_dual_transformer_still_rejects_encoder_attention_mask():
    assert "encoder_attention_mask" not in inspect.signature(DualTransformer2DModel.forward).parameters


def test_upstream_unet_blocks_still_pass_encoder_attention_mask(tiny):
    plain = DualTransformer2DModel.forward
    dual = next(m for m in tiny.image_unet.modules() if isinstance(m, DualTransformer2DModel))
    with pytest.raises(TypeError, match="encoder_attention_mask"):
        plain(dual, torch.zeros(1, dual.transformers[0].config.in_channels, 4, 4), torch.zeros(1, 334, 32),
              encoder_attention_mask=None)


def test_dual_unet_runs_and_with_no_text_share_equals_the_plain_image_unet(tiny):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text, image = torch.randn(2, 77, 32, generator=generator), torch.randn(2, 257, 32, generator=generator)
    set_text_share(tiny.image_unet, 0.0)
    with torch.no_grad():
        dual = tiny.image_unet(latents, 10, encoder_hidden_states=torch.cat([text, image], 1)).sample
        plain = _without_dual(tiny.image_unet)(latents, 10, encoder_hidden_states=image).sample
        set_text_share(tiny.image_unet, 0.5)
        mixed = tiny.image_unet(latents, 10, encoder_hidden_states=torch.cat([text, image], 1)).sample
    torch.testing.assert_close(dual, plain, atol=1e-5, rtol=1e-5)
    assert (mixed - plain).abs().max() > 1e-3, "the text tokens must matter when they have a share"


def test_masks_are_refused_rather_than_ignored(tiny):
    dual = next(m for m in tiny.image_unet.modules() if isinstance(m, DualTransformer2DModel))
    with pytest.raises(ValueError, match="does not mask"):
        dual(torch.zeros(1, dual.transformers[0].config.in_channels, 4, 4), torch.zeros(1, 334, 32),
             encoder_attention_mask=torch.ones(1, 334))


def test_text_share_outside_unit_interval(tiny):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_text_share(tiny.image_unet, 1.5)


def test_upstream_pipeline_still_cannot_load_the_release_layout(tiny, tmp_path):
    """Why havir loads each component by class: diffusers refuses the release's model_index."""
    from diffusers.pipelines.deprecated.versatile_diffusion import VersatileDiffusionDualGuidedPipeline

    tiny.save_pretrained(tmp_path / "vd")
    with pytest.raises(ValueError, match="versatile_diffusion"):
        VersatileDiffusionDualGuidedPipeline.from_pretrained(tmp_path / "vd")
