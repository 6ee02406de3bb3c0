"""Golden test of the ``brain-diffuser`` preset: ``havir eval`` against a literal re-implementation
of ozcelikfu/brain-diffuser's ``scripts/eval_extract_features.py`` and
``scripts/evaluate_reconstruction.py`` (commit 31d52c0).

The reference uses only torch, numpy, scipy, PIL and scikit-image, following the scripts' steps;
it never calls havir. Its pinned stack: Pillow 9.2 (``Image.resize`` defaults to bicubic, as
Pillow 13 still does), torchvision 0.13 (``T.functional.resize`` of a PIL image is PIL's
bilinear resize), scikit-image 0.17.2, whose ``multichannel=True`` on a 2-D grayscale image
looped over its last axis: written out below as that loop of 1-D SSIMs.
"""

import numpy as np
import pytest
import scipy as sp
import torch
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from havir.metrics.evaluate import evaluate_folder
from tests.metrics.golden import assert_equals_reference

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
CLIP = dict(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])


def ssim_skimage_0_17_multichannel(X, Y, **kwargs):
    """scikit-image 0.17.2's structural_similarity(X, Y, multichannel=True, ...) on 2-D images:
    ``for ch in range(X.shape[-1]): structural_similarity(X[..., ch], Y[..., ch], ...)``, mean."""
    return np.mean([structural_similarity(X[..., ch], Y[..., ch], **kwargs) for ch in range(X.shape[-1])])


def batch_generator_external_images(images: np.ndarray, net_name: str) -> torch.Tensor:
    """The script's Dataset, for every image at once: PIL resize (224, 224) (bilinear),
    to_tensor, normalise (CLIP's statistics for clip, ImageNet's for the rest)."""
    stats = CLIP if net_name == "clip" else IMAGENET
    items = []
    for array in images:
        img = Image.fromarray(array).resize((224, 224), Image.BILINEAR)
        img = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255  # T.functional.to_tensor
        items.append((img - torch.tensor(stats["mean"]).view(3, 1, 1)) / torch.tensor(stats["std"]).view(3, 1, 1))
    return torch.stack(items)


def extract(images: np.ndarray, net_name: str, layer, networks) -> np.ndarray:
    """eval_extract_features.py for one (net, layer): forward hooks, outputs concatenated."""
    feat_list = []

    def fn(module, inputs, outputs):
        feat_list.append(outputs.cpu().numpy())

    if net_name == "inceptionv3":
        net = networks["inception"]
        hook = net.avgpool.register_forward_hook(fn)
    elif net_name == "alexnet":
        net = networks["alexnet"]
        hook = net.features[4 if layer == 2 else 11].register_forward_hook(fn)
    elif net_name == "clip":
        net = networks["clip"].visual.to(torch.float32)
        hook = net.register_forward_hook(fn)
    elif net_name == "efficientnet":
        net = networks["effnet_v1"]  # efficientnet_b1(weights=True): the legacy pretrained=True, V1
        hook = net.avgpool.register_forward_hook(fn)
    else:  # swav
        net = networks["swav"]
        hook = net.avgpool.register_forward_hook(fn)
    net.eval()
    try:
        with torch.no_grad():
            net(batch_generator_external_images(images, net_name))
    finally:
        hook.remove()
    return np.concatenate(feat_list)


def pairwise_corr_all(ground_truth, predictions):
    """The script's function; returns (perf, r) where it returns (perf, binomial p): ``r`` is
    the finer check, the p-value is not part of the table."""
    r = np.corrcoef(ground_truth, predictions)
    r = r[:len(ground_truth), len(ground_truth):]
    congruents = np.diag(r)
    success = r < congruents
    success_cnt = np.sum(success, 0)
    return np.mean(success_cnt) / (len(ground_truth) - 1), r


def reference_brain_diffuser(stimuli: np.ndarray, reconstructions: np.ndarray, networks) -> tuple[dict, dict]:
    """evaluate_reconstruction.py on the features of eval_extract_features.py: the eight numbers
    and the identification metrics' correlation matrices."""
    names = {("inceptionv3", "avgpool"): "inception", ("clip", "final"): "clip", ("alexnet", 2): "alexnet2",
             ("alexnet", 5): "alexnet5", ("efficientnet", "avgpool"): "effnet", ("swav", "avgpool"): "swav"}
    num_test = len(stimuli)
    results, correlations = {}, {}
    for (net_name, layer), name in names.items():
        gt_feat = extract(stimuli, net_name, layer, networks)
        eval_feat = extract(reconstructions, net_name, layer, networks)
        gt_feat = gt_feat.reshape((len(gt_feat), -1))
        eval_feat = eval_feat.reshape((len(eval_feat), -1))
        if net_name in ["efficientnet", "swav"]:
            results[name] = np.array([sp.spatial.distance.correlation(gt_feat[i], eval_feat[i]) for i in range(num_test)]).mean()
        else:
            results[name], correlations[name] = pairwise_corr_all(gt_feat[:num_test], eval_feat[:num_test])
    ssim_list, pixcorr_list = [], []
    for i in range(num_test):
        gen_image = Image.fromarray(reconstructions[i]).resize((425, 425))
        gt_image = Image.fromarray(stimuli[i])
        gen_image = np.array(gen_image) / 255.0
        gt_image = np.array(gt_image) / 255.0
        pixcorr_list.append(np.corrcoef(gt_image.reshape(1, -1), gen_image.reshape(1, -1))[0, 1])
        gen_image = rgb2gray(gen_image)
        gt_image = rgb2gray(gt_image)
        ssim_list.append(ssim_skimage_0_17_multichannel(gen_image, gt_image, gaussian_weights=True, sigma=1.5,
                                                        use_sample_covariance=False, data_range=1.0))
    results["pixcorr"] = np.array(pixcorr_list).mean()
    results["ssim"] = np.array(ssim_list).mean()
    return results, correlations


@pytest.fixture(scope="module")
def havir_brain_diffuser(golden, tmp_path_factory):
    root = golden["root"]
    return evaluate_folder(root / "recon", root / "data", 1, protocol="brain-diffuser", weights_dir=root / "weights",
                           out=tmp_path_factory.mktemp("golden_bd"), device="cpu", batch_size=8, resamples=10,
                           report=False, progress=False)


def test_brain_diffuser_preset_equals_the_reference_scripts(golden, havir_brain_diffuser):
    expected, correlations = reference_brain_diffuser(golden["truth"], golden["recon"], golden["networks"])
    assert_equals_reference(havir_brain_diffuser, expected, correlations)


def test_the_per_column_ssim_is_not_the_2d_ssim(golden, havir_brain_diffuser):
    """The label matters: on these images Brain-Diffuser's SSIM differs from the true 2-D SSIM."""
    truth, recon = golden["truth"], golden["recon"]
    gen = rgb2gray(np.array(Image.fromarray(recon[0]).resize((425, 425))) / 255.0)
    true_2d = structural_similarity(gen, rgb2gray(truth[0] / 255.0), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
    assert abs(havir_brain_diffuser.scores["ssim"].per_image[0] - true_2d) > 1e-3  # far above float noise
    assert havir_brain_diffuser.protocol["record"]["ssim_variant"] == "per-column-1d"
    assert havir_brain_diffuser.protocol["networks"]["effnet"]["weights"].endswith("efficientnet_b1_rwightman-bac287d4.pth")
