"""The backbone: the generative model whose conditioning the brain is decoded into.

The method needs three things of a backbone, and this interface is all the stages see of it
(``havir features`` and ``havir reconstruct`` never import a particular one):

1. it **declares its targets' sizes** (:attr:`Backbone.target_sizes`; the targets themselves,
   a structural latent and semantic image and text tokens, are :mod:`havir.targets`);
2. it **encodes** the images a subject saw and their captions into those targets
   (:meth:`Backbone.encode_images`, :meth:`Backbone.encode_texts`);
3. it **generates** images from predicted targets in each of the method's modes
   (:meth:`Backbone.generate`): ``structural`` (the latent alone, decoded), ``semantic`` (from
   noise, guided by the semantic tokens) and ``fused`` (image-to-image from the structural
   latent, guided by the semantic tokens: the method).

Like a diffusers pipeline, a backbone loads with ``from_pretrained`` and saves with
``save_pretrained``; a saved folder's ``model_index.json`` names its class (``_class_name``),
which is how :func:`load_backbone` knows which backbone reads it. Versatile Diffusion
(:mod:`havir.models.versatile`) is the one HAVIR ships and the default. Another backbone is one
class, decorated with :func:`register_backbone`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import PIL.Image

from havir.errors import InvalidInputError
from havir.validation import Interval, OneOf, Rule, check_values, option_name

if TYPE_CHECKING:
    import torch

    from havir.targets import TargetSizes

# torch and diffusers are imported where they are used, not here: the command line reads its
# defaults from SamplerSettings, and torch alone takes seconds to import.

#: The method's modes (the paper's ablations): ``fused`` is the method.
MODES = ("fused", "structural", "semantic")

#: The diffusers schedulers a sampler can use (see :data:`havir.models.sampling.SCHEDULERS`).
SCHEDULER_NAMES = ("ddim", "pndm", "dpmsolver", "euler")

#: Where an image-to-image start noises the structural latent (see :mod:`havir.models.sampling`).
IMG2IMG_STARTS = ("diffusers", "brain-diffuser")

#: Images as the encoders take them: uint8 (n, height, width, 3), or PIL images.
Images = np.ndarray | Sequence[PIL.Image.Image]


@dataclass(frozen=True)
class SamplerSettings:
    """Settings of image generation (Brain-Diffuser's defaults); a backbone uses those that apply to it."""

    steps: int = 50
    strength: float = 0.75
    guidance: float = 7.5
    text_share: float = 0.4
    eta: float = 0.0  # DDIM's stochasticity (0: deterministic); ignored by other schedulers
    seed: int = 0
    scheduler: str = "ddim"  # ddim, pndm, dpmsolver or euler
    img2img_start: str = "diffusers"  # where the structural latent is noised to: diffusers or brain-diffuser
    clip_sample: bool = False  # clamp the predicted clean latent to [-1, 1] (schedulers that can)
    thresholding: bool = False  # dynamic thresholding of the predicted clean latent (schedulers that can)

    #: Allowed values; named as ``havir reconstruct``'s options in messages.
    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "steps": Interval(int, 1, 1000),  # Versatile Diffusion was trained on 1000 noise levels
        "strength": Interval(float, 0, 1),
        "guidance": Interval(float, 0),
        "text_share": Interval(float, 0, 1),
        "eta": Interval(float, 0, 1),
        "seed": Interval(int, 0, 2**32 - 1),
        "scheduler": OneOf(*SCHEDULER_NAMES),
        "img2img_start": OneOf(*IMG2IMG_STARTS),
        "clip_sample": OneOf(True, False),
        "thresholding": OneOf(True, False),
    }

    def __post_init__(self):
        check_values(asdict(self), self.CONSTRAINTS, name=option_name)


def image_noise(nsd_ids, shape: tuple[int, ...], seed: int, candidate: int = 0) -> torch.Tensor:
    """Initial noise of each image from (seed, nsdId) alone: float32 (n, *shape), the same
    whatever the batch, order or split of the work. ``candidate`` k > 0 draws the k-th other
    sample of the image (from (seed, nsdId, k)); candidate 0 is the image's one sample."""
    import torch

    noises = []
    for nsd_id in np.asarray(nsd_ids).tolist():
        key = f"{seed}:{nsd_id}" + (f":{candidate}" if candidate else "")
        digest = hashlib.sha256(key.encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        noises.append(torch.randn(shape, generator=generator))
    return torch.stack(noises)


class Backbone(ABC):
    """What HAVIR asks of a generative backbone (see the module docstring).

    Class attributes a backbone sets: ``built_in``, names :func:`load_backbone` gives to this
    class without a folder (e.g. ``"tiny"``); ``index_names``, the ``_class_name`` values of
    ``model_index.json`` in folders it reads. An instance has ``source`` (where it was loaded
    from, recorded in every file made with it) and ``image_side`` (side of the images it
    generates, in pixels).
    """

    built_in: ClassVar[tuple[str, ...]] = ()
    index_names: ClassVar[tuple[str, ...]] = ()
    source: str
    image_side: int

    @classmethod
    @abstractmethod
    def from_pretrained(cls, model: str | Path, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, seed: int = 0) -> Backbone:
        """Load from a folder (or a built-in name, or a hub id where the backbone has one) onto
        ``device`` in ``dtype`` (None: float32); ``seed`` seeds the weights of random built-ins."""

    @abstractmethod
    def save_pretrained(self, folder: Path) -> Path:
        """Write a folder that :meth:`from_pretrained` (and :func:`load_backbone`) reads back."""

    @property
    @abstractmethod
    def target_sizes(self) -> TargetSizes:
        """The sizes the targets' shapes follow (see :mod:`havir.targets`)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the backbone's modules live."""

    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Backbone:
        """Move to ``device`` and cast to ``dtype``; returns self."""

    @abstractmethod
    def encode_images(self, images: Images) -> dict[str, torch.Tensor]:
        """``{target: (n, *shape)}`` for every target encoded from images."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{target: (n, *shape)}`` for every target encoded from text, one row per text."""

    @abstractmethod
    def generate(self, predictions: dict[str, torch.Tensor], nsd_ids: np.ndarray, *, mode: str,
                 settings: SamplerSettings, candidate: int = 0) -> np.ndarray:
        """uint8 images (n, side, side, 3) from predicted targets in ``mode`` (one of
        :data:`MODES`); the noise of each image comes from (``settings.seed``, its nsdId,
        ``candidate``) alone (:func:`image_noise`), so a batch's images do not depend on its
        other images, and candidates 1, 2... are other samples of the same predictions."""

    def generation_record(self, settings: SamplerSettings, mode: str) -> dict:
        """What :meth:`generate` runs with ``settings`` in ``mode``, for the reconstruction's manifest."""
        return {}


#: Backbone classes by class name; add one with :func:`register_backbone`.
BACKBONES: dict[str, type[Backbone]] = {}
#: The backbone of folders without a ``model_index.json`` and of hub ids.
DEFAULT_BACKBONE = "VersatileDiffusion"


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make a :class:`Backbone` loadable by :func:`load_backbone` (its
    ``built_in`` names, and folders whose ``model_index.json`` has one of its ``index_names``)."""
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise TypeError(f"{cls!r} is not a Backbone subclass")
    taken = {name: other.__name__ for other in BACKBONES.values() if other.__name__ != cls.__name__
             for name in (*other.built_in, *other.index_names)}
    clashes = sorted(set(cls.built_in + cls.index_names) & set(taken))
    if clashes:
        raise TypeError(f"backbone {cls.__name__} claims {', '.join(clashes)}, already {taken[clashes[0]]}'s")
    BACKBONES[cls.__name__] = cls
    return cls


def backbone_class(model: str | Path) -> type[Backbone]:
    """The registered backbone class that loads ``model`` (a built-in name, a folder or a hub id)."""
    from havir.models import versatile  # noqa: F401  (registers the default backbone)

    name = str(model)
    for cls in BACKBONES.values():
        if name in cls.built_in:
            return cls
    index = Path(name).expanduser() / "model_index.json"
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise InvalidInputError(f"{index} is not a model index (JSON with a _class_name): {err}") from err
        for cls in BACKBONES.values():
            if class_name in cls.index_names:
                return cls
        if class_name is not None:
            known = ", ".join(f"{n} ({c.__name__})" for c in BACKBONES.values() for n in c.index_names)
            raise InvalidInputError(
                f"{index.parent} holds a {class_name}, which no HAVIR backbone reads (they read {known}): "
                "import the module that registers its backbone, or pass another folder"
            )
    return BACKBONES[DEFAULT_BACKBONE]


def load_backbone(model: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  seed: int = 0) -> Backbone:
    """Load the backbone ``model`` names: ``backbone_class(model).from_pretrained(model, ...)``."""
    return backbone_class(model).from_pretrained(model, device=device, dtype=dtype, seed=seed)


def checked_encoding(backbone: Backbone, encoded: dict[str, torch.Tensor], source: str, n: int) -> dict[str, torch.Tensor]:
    """``encoded`` after checking it holds each target ``backbone`` encodes from ``source``, as
    (n, *shape): a backbone breaking its contract is a bug (exit 1), named here rather than as a
    shape error in the features file."""
    from havir.targets import encoded_from, target_shapes

    shapes = target_shapes(backbone.target_sizes)
    expected = {name: (n, *shapes[name]) for name in encoded_from(source)}
    got = {name: tuple(value.shape) for name, value in encoded.items()}
    if got != expected:
        raise RuntimeError(f"backbone {type(backbone).__name__} encoded {source}s as {got}; its targets are {expected}")
    return encoded

