"""Shared material of the golden tests (``test_golden_*.py``): fixed images and random-weight
networks of the protocols' architectures, written as the weights files the presets name.

The networks are built here once, with plain torchvision / open_clip constructors, and used by
both sides of a golden test: the literal re-implementation of the reference code (which holds
the modules directly) and ``havir eval`` (which finds the files in a weights folder and loads
them its own way). BatchNorm running statistics are set from a forward pass in training mode on
natural-looking images, so that features are not degenerate (with the initial statistics, mean
0 and variance 1, deep activations collapse and every image gives nearly the same features).

Sizes are kept small where the protocols allow it: 5 image pairs; CLIP is a 2-layer, width-64
ViT with patch 14 at 224 px (the shape the protocols feed, 257 tokens) in OpenAI's layout; the
torchvision networks are their real architectures (not configurable), with random weights.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

N_IMAGES = 5
TRUTH_SIDE, RECON_SIDE = 425, 512


def _texture(side: int, rng: np.random.Generator) -> np.ndarray:
    """Fine texture near the Nyquist frequency (a grating plus pixel noise), (side, side, 3):
    what aliases when a resize does not antialias."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    frequency, angle = rng.uniform(0.3, 0.48), rng.uniform(0, np.pi)
    grating = np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)))
    return 0.12 * grating[..., None] + 0.05 * rng.normal(size=(side, side, 3))


def golden_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth uint8 (5, 425, 425, 3), reconstructions uint8 (5, 512, 512, 3)).

    Each stimulus is a smooth random colour layout plus fine texture; each reconstruction is its
    stimulus's layout at 512 px with a different fine texture and noise, except that pair 3's
    reconstruction mostly shows stimulus 4's layout (so identification is not trivially perfect).
    """
    rng = np.random.default_rng(seed)
    layouts = [rng.uniform(0.1, 0.9, size=(6, 6, 3)) for _ in range(N_IMAGES)]

    def smooth(layout: np.ndarray, side: int) -> np.ndarray:
        image = PIL.Image.fromarray((layout * 255).astype(np.uint8)).resize((side, side), PIL.Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.float64) / 255

    truth = np.stack([smooth(layout, TRUTH_SIDE) + _texture(TRUTH_SIDE, rng) for layout in layouts])
    recon_layouts = list(layouts)
    recon_layouts[3] = 0.3 * layouts[3] + 0.7 * layouts[4]
    recon = np.stack([smooth(layout, RECON_SIDE) + _texture(RECON_SIDE, rng) + 0.05 * rng.normal(size=(RECON_SIDE, RECON_SIDE, 3))
                      for layout in recon_layouts])
    as_uint8 = lambda images: np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return as_uint8(truth), as_uint8(recon)


def calibrate_batchnorm(model: nn.Module, side: int, seed: int) -> nn.Module:
    """Set every BatchNorm's running statistics to those of a batch of smooth random images
    (one forward pass in training mode, cumulative average), then return the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(6, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    images = (images - 0.45) / 0.25
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def tiny_openai_clip(seed: int) -> nn.Module:
    """An open_clip ``CLIP`` in OpenAI's layout and QuickGELU, tiny: vision 2 layers, width 64,
    patch 14 at 224 px; text 1 layer, width 64. Weights rounded to float16 values, as OpenAI's
    released archive stores them (open_clip's OpenAI builder keeps its Linear/conv weights in
    float16, so float32 weights would not survive loading bit for bit)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(32, CLIPVisionCfg(layers=2, width=64, patch_size=14, image_size=224),
                 CLIPTextCfg(context_length=8, vocab_size=64, width=64, heads=1, layers=1), quick_gelu=True)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model.eval()


def golden_networks() -> dict[str, nn.Module]:
    """The random-weight networks: alexnet, inception, effnet_v2 / effnet_v1 (two different
    weight sets, for the two EfficientNet-B1 releases), swav (ResNet-50), clip (tiny)."""
    from torchvision.models import alexnet, efficientnet_b1, inception_v3, resnet50

    torch.manual_seed(0)
    networks = {"alexnet": alexnet(weights=None).eval()}
    networks["inception"] = calibrate_batchnorm(
        inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False), 299, 1)
    torch.manual_seed(2)
    networks["effnet_v2"] = calibrate_batchnorm(efficientnet_b1(weights=None), 240, 2)
    torch.manual_seed(3)
    networks["effnet_v1"] = calibrate_batchnorm(efficientnet_b1(weights=None), 240, 3)
    torch.manual_seed(4)
    networks["swav"] = calibrate_batchnorm(resnet50(weights=None), 224, 4)
    networks["clip"] = tiny_openai_clip(5)
    return networks


def write_weights(networks: dict[str, nn.Module], folder) -> None:
    """Save the networks under the file names the presets look for, in each release's format."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(networks["alexnet"].state_dict(), folder / "alexnet-owt-7be5be79.pth")
    torch.save(networks["inception"].state_dict(), folder / "inception_v3_google-0cc3c7bd.pth")
    torch.save(networks["effnet_v2"].state_dict(), folder / "efficientnet_b1-c27df63c.pth")
    torch.save(networks["effnet_v1"].state_dict(), folder / "efficientnet_b1_rwightman-bac287d4.pth")
    swav = {f"module.{k}": v for k, v in networks["swav"].state_dict().items() if not k.startswith("fc.")}
    swav["module.prototypes.weight"] = torch.zeros(8, 4)  # the release's extra heads: ignored
    torch.save(swav, folder / "swav_800ep_pretrain.pth.tar")
    torch.save(networks["clip"].state_dict(), folder / "ViT-L-14.pt")  # a plain state dict in OpenAI's keys


def write_prepared(folder, nsd_ids: np.ndarray, truth: np.ndarray, sessions: int) -> None:
    """A minimal ``havir prepare`` output for subject 1: the test stimuli, the normalisation's
    record and the subject's record."""
    import json

    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "subj01.h5", "w") as h5:
        h5["test/stimuli"] = truth
        h5["test/stimulus_nsd_id"] = nsd_ids
        h5.create_group("normalisation").attrs["method"] = "training"
    (folder / "subj01.json").write_text(json.dumps({"sessions": sessions}))


def write_pngs(folder, nsd_ids: np.ndarray, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for nsd_id, image in zip(nsd_ids, images):
        PIL.Image.fromarray(image).save(folder / f"{int(nsd_id)}.png")


def assert_equals_reference(evaluation, expected: dict, correlations: dict) -> None:
    """``havir eval``'s scores equal the reference's: PixCorr, SSIM and distances to 1e-6,
    identification exactly, and each identification's correlation matrix to 1e-6 (over 5 images
    the counts alone missed a changed resize size)."""
    got = {name: score.mean for name, score in evaluation.scores.items()}
    assert set(got) == set(expected)
    assert all(score.protocol for score in evaluation.scores.values())  # the preset's files, found and loaded
    for name in ("pixcorr", "ssim", "effnet", "swav"):
        assert got[name] == pytest.approx(expected[name], abs=1e-6, rel=0), name
    for name in ("alexnet2", "alexnet5", "inception", "clip"):
        assert got[name] == expected[name], name
        np.testing.assert_allclose(evaluation.scores[name].correlations, correlations[name], rtol=0, atol=1e-6, err_msg=name)
    # The data exercise the protocol: scores are neither trivial nor saturated.
    assert 0.2 < expected["pixcorr"] < 0.95 and 0.05 < expected["ssim"] < 0.9
    assert min(expected[n] for n in ("alexnet2", "alexnet5", "inception", "clip")) < 1
