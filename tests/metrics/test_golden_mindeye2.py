"""Golden test of the ``mindeye2`` preset: ``havir eval`` against a literal re-implementation of
MindEyeV2's ``src/final_evaluations.ipynb`` (camera-ready commit 1b14747), cell by cell.

The reference below uses only torch, numpy, scipy, PIL and scikit-image, on the notebook's own
steps; it never calls havir. torchvision 0.16's ``transforms.Resize`` on float tensors (which did
not antialias) is ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=False)``.
The networks are the random-weight ones of ``tests/metrics/golden.py``; havir loads them from the
files the preset names, the reference holds the modules.
"""

import numpy as np
import pytest
import scipy as sp
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity as ssim

from havir.metrics.evaluate import evaluate_folder
from tests.metrics.golden import assert_equals_reference

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
CLIP = dict(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])


def Resize(size):  # noqa: N802 - torchvision 0.16's transforms.Resize on a float batch
    return lambda images: F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def Normalize(mean, std):  # noqa: N802
    return lambda images: (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def Compose(steps):  # noqa: N802
    def run(images):
        for step in steps:
            images = step(images)
        return images
    return run


def all_images_224(stimuli: np.ndarray) -> torch.Tensor:
    """evals/all_images.pt: (N, 3, 224, 224), float16 from coco_images_224_float16.hdf5. How that
    was made is not public; the preset's stated choice: PIL antialiased bilinear 425 -> 224."""
    small = np.stack([np.asarray(Image.fromarray(s).resize((224, 224), Image.BILINEAR)) for s in stimuli])
    return (torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255).half()


def two_way_identification(all_recons, all_images, model, preprocess, feature_layer=None):
    """The notebook's function (return_avg=True), with per-image preprocessing as it does; it
    also returns ``r``, the correlations the count comes from (a finer check than the count)."""
    with torch.no_grad():
        preds = model(torch.stack([preprocess(recon[None])[0] for recon in all_recons], dim=0))
        reals = model(torch.stack([preprocess(indiv[None])[0] for indiv in all_images], dim=0))
    if feature_layer is None:
        preds = preds.float().flatten(1).cpu().numpy()
        reals = reals.float().flatten(1).cpu().numpy()
    else:
        preds = preds[feature_layer].float().flatten(1).cpu().numpy()
        reals = reals[feature_layer].float().flatten(1).cpu().numpy()
    r = np.corrcoef(reals, preds)
    r = r[:len(all_images), len(all_images):]
    congruents = np.diag(r)
    success = r < congruents
    success_cnt = np.sum(success, 0)
    return np.mean(success_cnt) / (len(all_images) - 1), r


def layers(model, names):
    """create_feature_extractor(model, return_nodes=names), written with forward hooks."""
    def run(images):
        outputs = {}
        hooks = [model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: outputs.__setitem__(name, output)) for name in names]
        try:
            model(images)
        finally:
            for hook in hooks:
                hook.remove()
        return outputs
    return run


def reference_mindeye2(stimuli: np.ndarray, reconstructions: np.ndarray, networks) -> tuple[dict, dict]:
    """final_evaluations.ipynb, from loading the images to the eight numbers; returns them and
    the identification metrics' correlation matrices."""
    # cells 4-5: ground truth (224 px, float16) and reconstructions (float in [0, 1])
    all_images = all_images_224(stimuli)
    all_recons = torch.from_numpy(reconstructions).permute(0, 3, 1, 2).contiguous().float() / 255  # as torch.load gives it
    # cell 7
    imsize = 256
    if all_images.shape[-1] != imsize:
        all_images = Resize(imsize)(all_images.float()).float()
    if all_recons.shape[-1] != imsize:
        all_recons = Resize(imsize)(all_recons).float()
    results, correlations = {}, {}
    # cell 16: PixCorr
    preprocess = Compose([Resize(425)])
    all_images_flattened = preprocess(all_images).reshape(len(all_images), -1).cpu()
    all_recons_flattened = preprocess(all_recons).view(len(all_recons), -1).cpu()
    corrsum = 0
    for i in range(len(all_images)):
        corrsum += np.corrcoef(all_images_flattened[i], all_recons_flattened[i])[0][1]
    results["pixcorr"] = corrsum / len(all_images)
    # cell 18: SSIM (multichannel=True is ignored by scikit-image >= 0.22, as by the pinned 0.22)
    img_gray = rgb2gray(preprocess(all_images).permute((0, 2, 3, 1)).cpu().numpy())
    recon_gray = rgb2gray(preprocess(all_recons).permute((0, 2, 3, 1)).cpu().numpy())
    ssim_score = []
    for im, rec in zip(img_gray, recon_gray):
        ssim_score.append(ssim(rec, im, multichannel=True, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, data_range=1.0))
    results["ssim"] = np.mean(ssim_score)
    # cell 20: AlexNet
    alex_model = layers(networks["alexnet"], ["features.4", "features.11"])
    preprocess = Compose([Resize(256), Normalize(**IMAGENET)])
    results["alexnet2"], correlations["alexnet2"] = two_way_identification(all_recons, all_images, alex_model, preprocess, "features.4")
    results["alexnet5"], correlations["alexnet5"] = two_way_identification(all_recons, all_images, alex_model, preprocess, "features.11")
    # cell 22: Inception v3 (DEFAULT weights: transform_input=True)
    preprocess = Compose([Resize(342), Normalize(**IMAGENET)])
    results["inception"], correlations["inception"] = two_way_identification(
        all_recons, all_images, layers(networks["inception"], ["avgpool"]), preprocess, "avgpool")
    # cell 24: CLIP encode_image (fp16 on the notebook's GPU; float32 here and in havir)
    preprocess = Compose([Resize(224), Normalize(**CLIP)])
    results["clip"], correlations["clip"] = two_way_identification(
        all_recons, all_images, networks["clip"].encode_image, preprocess, None)
    # cells 26, 28: EfficientNet-B1 (DEFAULT = IMAGENET1K_V2) and SwAV, correlation distance
    for name, key, size in (("effnet", "effnet_v2", 255), ("swav", "swav", 224)):
        model = layers(networks[key], ["avgpool"])
        preprocess = Compose([Resize(size), Normalize(**IMAGENET)])
        with torch.no_grad():
            gt = model(preprocess(all_images))["avgpool"]
            gt = gt.reshape(len(gt), -1).cpu().numpy()
            fake = model(preprocess(all_recons))["avgpool"]
            fake = fake.reshape(len(fake), -1).cpu().numpy()
        results[name] = np.array([sp.spatial.distance.correlation(gt[i], fake[i]) for i in range(len(gt))]).mean()
    return results, correlations


@pytest.fixture(scope="module")
def havir_mindeye2(golden, tmp_path_factory):
    root = golden["root"]
    return evaluate_folder(root / "recon", root / "data", 1, protocol="mindeye2", weights_dir=root / "weights",
                           out=tmp_path_factory.mktemp("golden_me2"), device="cpu", batch_size=8, resamples=10,
                           report=False, progress=False)


def test_mindeye2_preset_equals_the_reference_notebook(golden, havir_mindeye2):
    expected, correlations = reference_mindeye2(golden["truth"], golden["recon"], golden["networks"])
    assert_equals_reference(havir_mindeye2, expected, correlations)
    assert 0 < expected["effnet"] < 1 and 0 < expected["swav"] < 1


def test_mindeye2_record_in_eval_json(havir_mindeye2):
    record = havir_mindeye2.protocol
    assert record["preset"] == "mindeye2"
    assert record["record"]["networks"][3]["weights_file"] == "efficientnet_b1-c27df63c.pth"
    assert record["networks"]["effnet"]["weights"].endswith("efficientnet_b1-c27df63c.pth")
    assert record["networks"]["clip"]["route"] == "openai-archive"
    assert any("5 images of 40 sessions" in note and "not comparable" in note for note in havir_mindeye2.notes)
