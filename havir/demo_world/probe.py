"""The scene probe: reads a synthetic scene's background (4 types) and object kinds (8, multi-label).

DEMO MEASURE, NOT A PROTOCOL METRIC. The probe is a small CNN trained on rendered scenes
(``scripts/train_scene_probe.py``); it gives the demo two numbers that say whether a
reconstruction shows the right *content*, which pixel scores cannot:

* **content accuracy**: the fraction of reconstructions whose background the probe reads as the
  stimulus's (chance: 25%, four equally likely backgrounds);
* **object-kind F1**: per image, the F1 between the set of object kinds the probe reads in the
  reconstruction and the set in the stimulus, averaged over images.

Both compare the probe's reading of the reconstruction with its reading of the stimulus (or with
the stimulus's true labels, when they are known): they need no fMRI and no protocol network, and
they mean something only on the synthetic scenes the probe was trained on.

The network is hand-rolled (a few strided convolutions): the field's libraries have no
classifier this small, and a torchvision ResNet would be 40x the weights for no gain here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from havir.errors import InvalidInputError, MissingInputError
from havir.io import atomic_path, write_json
from havir.metrics.protocols import Resize, resize
from havir.nsd.scenes import BACKGROUNDS, KINDS, Scene

#: The probe shipped with HAVIR (trained by scripts/train_scene_probe.py; fp16 safetensors).
PROBE_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "scene-probe"
BACKGROUND_NAMES = tuple(BACKGROUNDS)
KIND_NAMES = tuple(KINDS)
#: The note every output carrying these numbers must show.
DEMO_MEASURE_NOTE = (
    "Content accuracy and object-kind F1 are DEMO MEASURES read by a scene probe trained on the "
    "synthetic scenes (havir.demo_world.probe); they are not protocol metrics and mean nothing on NSD."
)


@dataclass(frozen=True)
class SceneLabels:
    """What scenes contain: ``background`` int (n,) indexing :data:`BACKGROUND_NAMES`, and
    ``kinds`` bool (n, 8), column j true when an object of kind :data:`KIND_NAMES` [j] is present."""

    background: np.ndarray
    kinds: np.ndarray

    def __len__(self) -> int:
        return len(self.background)

    def take(self, rows: np.ndarray) -> SceneLabels:
        """The labels of ``rows`` (e.g. a permutation, for a shuffled-pairs null control)."""
        return SceneLabels(self.background[rows], self.kinds[rows])


def scene_labels(scenes: Sequence[Scene]) -> SceneLabels:
    """The true labels of ``scenes`` (what the probe is trained to read)."""
    background = np.array([BACKGROUND_NAMES.index(s.background) for s in scenes], dtype=np.int64)
    kinds = np.array([[any(o.kind == k for o in s.objects) for k in KIND_NAMES] for s in scenes], dtype=bool)
    return SceneLabels(background, kinds.reshape(len(scenes), len(KIND_NAMES)))


class SceneProbe(nn.Module):
    """A small CNN: (n, 3, side, side) pixels in [0, 1] -> background logits (n, 4) and object-kind
    logits (n, 8).

    A stride-2 stem, then one stage per ``channels`` entry (two 3x3 convolutions, the second of
    stride 2 but in the last stage), leaving a (side / 8)-square map. The background is read
    from its spatial mean; each object kind from a 1x1 convolution's map, maximised over space
    (an object is present if it is somewhere: multiple-instance pooling).
    """

    def __init__(self, side: int = 64, stem: int = 16, channels: Sequence[int] = (32, 64, 96)):
        super().__init__()
        self.config = {"side": int(side), "stem": int(stem), "channels": [int(c) for c in channels]}
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, stride=2, padding=1), nn.BatchNorm2d(stem), nn.ReLU()]
        previous = stem
        for stage, width in enumerate(channels):
            stride = 1 if stage == len(channels) - 1 else 2
            layers += [
                nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride=stride, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.background_head = nn.Linear(previous, len(BACKGROUND_NAMES))
        self.kind_head = nn.Conv2d(previous, len(KIND_NAMES), 1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(background logits (n, 4), object-kind logit maps (n, 8, side / 8, side / 8)); an image's
        kind logits are its maps' maxima (:meth:`logits`)."""
        features = self.features(pixels)  # (n, C, side / 8, side / 8)
        return self.background_head(features.mean(dim=(2, 3))), self.kind_head(features)

    def logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(background logits (n, 4), object-kind logits (n, 8))."""
        background, kind_maps = self(pixels)
        return background, kind_maps.amax(dim=(2, 3))

    def save_pretrained(self, folder: Path, *, extra: dict | None = None) -> None:
        """Write ``config.json`` (architecture, plus ``extra`` such as the training record) and
        ``model.safetensors`` (fp16) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().to("cpu", torch.float16 if tensor.is_floating_point() else tensor.dtype).contiguous()
                 for name, tensor in self.state_dict().items()}
        with atomic_path(folder / "model.safetensors") as temporary:
            save_file(state, str(temporary))
        write_json(folder / "config.json", self.config | (extra or {}))

    @classmethod
    def from_pretrained(cls, folder: Path = PROBE_WEIGHTS) -> SceneProbe:
        """Load a probe saved by :meth:`save_pretrained` (float32, eval mode)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise MissingInputError(
                f"scene probe folder {folder} lacks config.json or model.safetensors: "
                "run scripts/train_scene_probe.py or pass the folder it wrote"
            )
        config = json.loads((folder / "config.json").read_text())
        probe = cls(side=config["side"], stem=config["stem"], channels=config["channels"])
        state = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in load_file(folder / "model.safetensors").items()}
        probe.load_state_dict(state, strict=True)
        return probe.eval()

    @torch.no_grad()
    def read(self, images: np.ndarray, batch_size: int = 256) -> SceneLabels:
        """The probe's reading of ``images`` (uint8 or float in [0, 1], (n, h, w, 3), any square
        side: resized to the probe's side with antialiasing)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidInputError(f"the scene probe reads images of shape (n, height, width, 3), got {images.shape}")
        backgrounds, kinds = [], []
        for start in range(0, len(images), batch_size):
            pixels = resize(images[start : start + batch_size], Resize(self.config["side"], "tensor", antialias=True))
            background_logits, kind_logits = self.logits(pixels.to(next(self.parameters()).device))
            backgrounds.append(background_logits.argmax(-1).cpu().numpy())
            kinds.append((kind_logits > 0).cpu().numpy())
        return SceneLabels(np.concatenate(backgrounds).astype(np.int64), np.concatenate(kinds).astype(bool))


def load_scene_probe(folder: Path = PROBE_WEIGHTS) -> SceneProbe:
    """The scene probe shipped with HAVIR (or the one in ``folder``)."""
    return SceneProbe.from_pretrained(folder)


def kind_f1(reference: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-image F1 between two sets of object kinds, bool (n, 8) each -> float (n,).

    F1 = 2 |R & P| / (|R| + |P|); 1 when both sets are empty (they agree), 0 when one is.
    """
    reference, predicted = np.asarray(reference, dtype=bool), np.asarray(predicted, dtype=bool)
    if reference.shape != predicted.shape:
        raise InvalidInputError(f"kind sets differ in shape: {reference.shape} vs {predicted.shape}")
    both = (reference & predicted).sum(-1)
    sizes = reference.sum(-1) + predicted.sum(-1)
    return np.where(sizes == 0, 1.0, 2.0 * both / np.maximum(sizes, 1))


def content_scores(reference: SceneLabels, predicted: SceneLabels) -> dict[str, np.ndarray]:
    """Per-image demo measures: ``background_correct`` (n,) float 0/1 (its mean is the *content
    accuracy*) and ``object_kind_f1`` (n,). Row i of ``predicted`` is compared with row i of
    ``reference``."""
    if len(reference) != len(predicted):
        raise InvalidInputError(f"{len(reference)} reference labels but {len(predicted)} predicted ones")
    return {
        "background_correct": (reference.background == predicted.background).astype(np.float64),
        "object_kind_f1": kind_f1(reference.kinds, predicted.kinds),
    }


def content_agreement(
    stimuli: np.ndarray | SceneLabels, reconstructions: np.ndarray, probe: SceneProbe | None = None
) -> dict[str, np.ndarray]:
    """DEMO MEASURE: :func:`content_scores` between each reconstruction and its stimulus.

    ``stimuli``: the stimulus images (read by the probe too) or their true :class:`SceneLabels`;
    ``reconstructions``: (n, h, w, 3) images, row i reconstructing stimulus i.
    """
    probe = probe or load_scene_probe()
    reference = stimuli if isinstance(stimuli, SceneLabels) else probe.read(stimuli)
    return content_scores(reference, probe.read(reconstructions))
