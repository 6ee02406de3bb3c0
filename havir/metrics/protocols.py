"""Evaluation protocols as data: one frozen record per preset, and the image steps they name.

A published number is only comparable with a run that took the same steps: which ground truth,
which working resolution, which resize (library, interpolation, antialiasing) before each
metric, which network weights. Each preset records every such choice, as its reference code
makes it, and is written whole into every ``eval.json`` (``protocol.preset``). Two presets:

``mindeye2`` (the default)
    MindEyeV2's ``src/final_evaluations.ipynb`` (ICML camera-ready, commit 1b14747), the script
    behind the published comparison table (``havir-method.md``).
``brain-diffuser``
    ozcelikfu/brain-diffuser's ``scripts/eval_extract_features.py`` and
    ``scripts/evaluate_reconstruction.py``, to reproduce Brain-Diffuser's own paper numbers.

The steps a preset names are implemented here once (:func:`resize`, :func:`working_images`,
:func:`pixel_images`); the scores themselves live in :mod:`havir.metrics.scores`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image

from havir.errors import InvalidInputError

if TYPE_CHECKING:  # imported where tensors are made (see _is_tensor)
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALISATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}


@dataclass(frozen=True)
class Resize:
    """One resize step, as the reference code calls it.

    ``size`` : output side in pixels (square output); None keeps the ground truth's own side.
    ``backend`` : "tensor" (torchvision ``Resize`` on float tensors in [0, 1], no rounding) or
        "pil" (``PIL.Image.resize`` on 8-bit images, output rounded to uint8).
    ``interpolation`` : "bilinear" or "bicubic".
    ``antialias`` : for "tensor", torchvision's flag (torchvision 0.16, which MindEye2 pinned,
        did not antialias tensors by default); PIL always antialiases when it shrinks, so it must
        be True for "pil".
    """

    size: int | None
    backend: str
    interpolation: str = "bilinear"
    antialias: bool = False

    def __post_init__(self):
        if self.backend not in ("tensor", "pil"):
            raise ValueError(f"resize backend must be 'tensor' or 'pil', got {self.backend!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"resize interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")
        if self.backend == "pil" and not self.antialias:
            raise ValueError("PIL always antialiases when shrinking: a 'pil' resize must say antialias=True")


@dataclass(frozen=True)
class NetworkInput:
    """How one feature network is built and fed under a preset.

    ``network`` : alexnet, inception, clip, effnet or swav. ``weights`` : the release (a
    torchvision enum name, or the release's own name); ``weights_file`` : its file name (where
    the reference's library caches it). ``resize`` brings the preset's working images to the
    network's input (no crop in either reference); ``normalisation`` : "imagenet" or "clip";
    ``reference_dtype`` : the precision the reference ran it in (havir runs float32: the
    difference is far below the published digits; both are recorded).
    """

    network: str
    weights: str
    weights_file: str
    resize: Resize
    normalisation: str = "imagenet"
    reference_dtype: str = "float32"


@dataclass(frozen=True)
class FeatureMetric:
    """One feature metric: which network, which layer, and how features are compared:
    "identification" (two-way, higher is better) or "distance" (correlation, lower is better)."""

    name: str
    network: str
    layer: str
    score: str


PROTOCOL_METRICS = (
    FeatureMetric("alexnet2", "alexnet", "features.4", "identification"),
    FeatureMetric("alexnet5", "alexnet", "features.11", "identification"),
    FeatureMetric("inception", "inception", "avgpool", "identification"),
    FeatureMetric("clip", "clip", "image_embeds", "identification"),
    FeatureMetric("effnet", "effnet", "avgpool", "distance"),
    FeatureMetric("swav", "swav", "avgpool", "distance"),
)


@dataclass(frozen=True)
class ProtocolPreset:
    """Every choice of one evaluation protocol (see the module docstring for the two presets).

    Steps, in order, for N reconstructions and their N ground-truth stimuli (uint8, 425 px in NSD):

    1. ``ground_truth_resize`` (None: the stimuli as they are), then ``ground_truth_dtype``
       rounding ("float16" or "uint8": no rounding beyond the 8-bit file).
    2. ``working_resize``: both sets to the working resolution (None: each set stays as it is).
    3. PixCorr and SSIM on ``pixel_resize`` of the working images (for ground truth and
       reconstructions alike, except that a resize to the ground truth's own size leaves the
       ground truth untouched), computed in ``pixel_dtype``; SSIM as ``ssim_variant``: "2d"
       (true 2-D SSIM on the grayscale image) or "per-column-1d" (old scikit-image's
       ``multichannel=True`` on a 2-D grayscale image: a 1-D SSIM down each pixel column,
       averaged over columns).
    4. Each network of ``networks`` fed the working images through its own resize.

    ``expected_images`` / ``expected_sessions``: the test set its published rows used (NSD's
    shared images seen in all 40 sessions, or in the 37 sessions every subject completed).
    ``notes``: what the record cannot express, and every known difference from the reference.
    """

    name: str
    reference: str
    ground_truth_resize: Resize | None
    ground_truth_dtype: str
    working_resize: Resize | None
    pixel_resize: Resize
    pixel_dtype: str
    ssim_variant: str
    networks: tuple[NetworkInput, ...]
    metrics: tuple[FeatureMetric, ...]
    expected_images: int
    expected_sessions: int
    notes: tuple[str, ...] = ()

    def network(self, name: str) -> NetworkInput:
        """The :class:`NetworkInput` of network ``name``."""
        for entry in self.networks:
            if entry.network == name:
                return entry
        raise KeyError(f"preset {self.name} has no network {name!r}")

    def record(self) -> dict:
        """The whole preset as JSON-ready data (what ``eval.json`` stores under ``protocol``)."""
        return dataclasses.asdict(self)


_TENSOR = dict(backend="tensor", interpolation="bilinear", antialias=False)
_PIL_224 = Resize(224, "pil", "bilinear", True)

MINDEYE2 = ProtocolPreset(
    name="mindeye2",
    reference="MedARC-AI/MindEyeV2 src/final_evaluations.ipynb (commit 1b14747, ICML camera-ready)",
    ground_truth_resize=_PIL_224,
    ground_truth_dtype="float16",
    working_resize=Resize(256, **_TENSOR),
    pixel_resize=Resize(425, **_TENSOR),
    pixel_dtype="float32",
    ssim_variant="2d",
    networks=(
        NetworkInput("alexnet", "IMAGENET1K_V1", "alexnet-owt-7be5be79.pth", Resize(256, **_TENSOR)),
        NetworkInput("inception", "IMAGENET1K_V1", "inception_v3_google-0cc3c7bd.pth", Resize(342, **_TENSOR)),
        NetworkInput("clip", "OpenAI ViT-L/14", "ViT-L-14.pt", Resize(224, **_TENSOR), "clip", "float16"),
        NetworkInput("effnet", "IMAGENET1K_V2", "efficientnet_b1-c27df63c.pth", Resize(255, **_TENSOR)),
        NetworkInput("swav", "SwAV 800 epochs", "swav_800ep_pretrain.pth.tar", Resize(224, **_TENSOR)),
    ),
    metrics=PROTOCOL_METRICS,
    expected_images=1000,
    expected_sessions=40,
    notes=(
        "Ground truth: the notebook loads evals/all_images.pt, (1000, 3, 224, 224) in the camera-ready "
        "run, made from coco_images_224_float16.hdf5 by code that is not public; havir makes it from "
        "the 425-px stimuli with PIL's antialiased bilinear resize to 224, divides by 255 and rounds "
        "to float16, then works in float32.",
        "The latest notebook (commit ca64e15) printed all_images as 256 px: the file was remade; the "
        "published table predates it.",
        "MindEye2 scores its 'enhanced' reconstructions (0.75 image + 0.25 blurry branch): part of "
        "its method, not of this protocol; havir scores the images it is given.",
        "SSIM: the notebook passes multichannel=True, which scikit-image 0.22 (pinned) ignores: true "
        "2-D SSIM, computed in float32 as scikit-image does for float32 input.",
        "CLIP ran in float16 on a GPU (clip.load default); havir runs float32.",
    ),
)

BRAIN_DIFFUSER = ProtocolPreset(
    name="brain-diffuser",
    reference="ozcelikfu/brain-diffuser scripts/eval_extract_features.py and scripts/evaluate_reconstruction.py (commit 31d52c0)",
    ground_truth_resize=None,
    ground_truth_dtype="uint8",
    working_resize=None,
    pixel_resize=Resize(None, "pil", "bicubic", True),
    pixel_dtype="float64",
    ssim_variant="per-column-1d",
    networks=(
        NetworkInput("alexnet", "IMAGENET1K_V1", "alexnet-owt-7be5be79.pth", _PIL_224),
        NetworkInput("inception", "IMAGENET1K_V1", "inception_v3_google-0cc3c7bd.pth", _PIL_224),
        NetworkInput("clip", "OpenAI ViT-L/14", "ViT-L-14.pt", _PIL_224, "clip", "float32"),
        NetworkInput("effnet", "IMAGENET1K_V1", "efficientnet_b1_rwightman-bac287d4.pth", _PIL_224),
        NetworkInput("swav", "SwAV 800 epochs", "swav_800ep_pretrain.pth.tar", _PIL_224),
    ),
    metrics=PROTOCOL_METRICS,
    expected_images=982,
    expected_sessions=37,
    notes=(
        "Feature networks: every image (425-px stimulus, 512-px reconstruction) goes through "
        "torchvision's resize of a PIL image to (224, 224), i.e. PIL bilinear with antialiasing, "
        "then to_tensor and normalisation; no crop, Inception too.",
        "EfficientNet-B1: efficientnet_b1(weights=True) is the legacy pretrained=True, IMAGENET1K_V1.",
        "PixCorr and SSIM: the reconstruction is resized to 425 with PIL's default filter of the "
        "pinned Pillow 9.2 (bicubic); the stimulus stays at 425; float64.",
        "SSIM: scikit-image 0.17.2 with multichannel=True on 2-D grayscale images treats the last axis "
        "as channels: a 1-D Gaussian SSIM (window 11) down each pixel column, averaged over the 425 "
        "columns. Labelled 'per-column-1d'; it is not the true 2-D SSIM of the mindeye2 preset.",
        "CLIP: OpenAI ViT-L/14's visual tower cast to float32, final (projected) output.",
        "Not reproduced: the reference ran the networks on a GPU in batches of 64 (float rounding "
        "only); it scores images named 0..981 in its own order (identification does not depend on "
        "order); Inception's and SwAV's files are the same as under mindeye2.",
    ),
)

PRESETS = {preset.name: preset for preset in (MINDEYE2, BRAIN_DIFFUSER)}


def get_preset(name: str) -> ProtocolPreset:
    """The preset called ``name``; a one-line error listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInputError(f"unknown evaluation protocol {name!r}: choose one of {', '.join(PRESETS)}") from None


# -- the steps -----------------------------------------------------------------------------------

_PIL_FILTERS = {"bilinear": PIL.Image.Resampling.BILINEAR, "bicubic": PIL.Image.Resampling.BICUBIC}


def _is_tensor(images) -> bool:
    # torch is imported where tensors are made, not here: `havir table` reads presets without it (1.6 s).
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(images, torch.Tensor)


def _as_uint8_arrays(images) -> np.ndarray:
    """(n, h, w, 3) uint8 for a PIL step: PIL resizes 8-bit images, so a float batch is refused."""
    if _is_tensor(images) or np.asarray(images).dtype != np.uint8:
        raise TypeError("a PIL resize takes uint8 (n, h, w, 3) images: put it before any float step of the preset")
    return np.asarray(images)


def as_float_tensor(images) -> torch.Tensor:
    """(n, 3, h, w) float32 in [0, 1] from uint8 (n, h, w, 3) arrays (divided by 255) or tensors."""
    import torch

    if isinstance(images, torch.Tensor):
        return images.float()
    batch = torch.as_tensor(np.asarray(images))
    batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
    return batch.permute(0, 3, 1, 2).contiguous()


def resize(images, step: Resize, side: int | None = None):
    """Apply one :class:`Resize` to a batch.

    ``images`` : uint8 (n, h, w, 3) or float32 tensor (n, 3, h, w) in [0, 1]. ``side`` is used
    when ``step.size`` is None (the ground truth's own side). Returns float32 (n, 3, s, s) for a
    "tensor" step, uint8 (n, s, s, 3) for a "pil" step (PIL's own 8-bit output).
    """
    side = step.size if step.size is not None else side
    if step.backend == "pil":
        arrays = _as_uint8_arrays(images)
        return np.stack([
            np.asarray(PIL.Image.fromarray(a).resize((side, side), _PIL_FILTERS[step.interpolation])) for a in arrays
        ])
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize as tv_resize

    batch = as_float_tensor(images)
    if batch.shape[-2:] == (side, side):
        return batch
    mode = InterpolationMode.BILINEAR if step.interpolation == "bilinear" else InterpolationMode.BICUBIC
    # No clamp: torchvision's Resize on float tensors does not clamp either (bicubic can overshoot).
    return tv_resize(batch, [side, side], interpolation=mode, antialias=step.antialias)


def working_images(preset: ProtocolPreset, images: np.ndarray, *, ground_truth: bool):
    """Steps 1-2 of ``preset`` on a batch of uint8 (n, h, w, 3) images: float32 (n, 3, s, s) for
    a preset with a working resolution, else the uint8 images themselves."""
    if ground_truth and preset.ground_truth_resize is not None:
        images = resize(images, preset.ground_truth_resize)
    if ground_truth and preset.ground_truth_dtype == "float16":
        images = as_float_tensor(images).half().float()
    if preset.working_resize is not None:
        images = resize(images, preset.working_resize)
    return images


def pixel_images(preset: ProtocolPreset, truth, recon, truth_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 3's inputs from working images: both sets as (n, s, s, 3) arrays in [0, 1] of
    ``preset.pixel_dtype``. ``truth_side`` : the stimuli's own side (for a resize to it)."""
    step = preset.pixel_resize
    side = step.size if step.size is not None else truth_side

    def prepared(images, is_truth: bool) -> np.ndarray:
        already = (images.shape[-2:] if _is_tensor(images) else images.shape[1:3]) == (side, side)
        if not (is_truth and step.size is None) and not already:
            images = resize(images, step, side)
        if _is_tensor(images):
            return images.permute(0, 2, 3, 1).numpy().astype(preset.pixel_dtype)
        return images.astype(preset.pixel_dtype) / 255.0

    return prepared(truth, True), prepared(recon, False)


def network_inputs(entry: NetworkInput, images) -> torch.Tensor:
    """Step 4 for one network: the working images resized and normalised, float32 (n, 3, s, s)."""
    import torch

    resized = as_float_tensor(resize(images, entry.resize))
    mean, std = NORMALISATIONS[entry.normalisation]
    return (resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
