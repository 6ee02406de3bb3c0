"""Versatile Diffusion's components, from wherever they are: one place that loads and saves them.

``load_versatile_diffusion(model)`` accepts

* a local folder in the diffusers layout (``tokenizer/``, ``image_feature_extractor/``,
  ``text_encoder/``, ``image_encoder/``, ``image_unet/``, ``text_unet/``, ``vae/``, ``scheduler/``);
* a hub id (default ``shi-labs/versatile-diffusion``), resolved through the Hugging Face cache;
  with ``HF_HUB_OFFLINE=1`` nothing is downloaded;
* ``"tiny"``: small random-weight components with the real token counts (77 text, 257 image
  tokens) and the VAE's 8x downsampling, for tests (seconds on a CPU);
* ``"demo"``: the demo world's Versatile Diffusion, every part trained on the synthetic scenes
  (VAE, miniature CLIP, dual UNet), shipped in ``weights/demo-vd`` in the release's layout and
  loaded exactly as a released folder is;
* ``"full-random"``: the released architecture (configs shipped in ``configs/full-random``) with
  random weights, for benchmarks.

Every component is loaded by its own class, so the legacy ``model_index.json`` entries of the
hub repository do not matter (see :mod:`havir.models.compat`). Only ``.safetensors`` weights are
read (``use_safetensors=True``): a folder holding pickled ``.bin`` weights alone is refused, never
unpickled. The scheduler is read as DDIM from whatever config the folder holds (the release ships
a ``PNDMScheduler`` one) with clipping and thresholding off (the sampler decides them again from
its settings). The side of the generated images is, in order: HAVIR's own ``_havir_image_side``
entry of ``model_index.json``, else the image UNet's ``sample_size`` times the VAE's
downsampling (how diffusers' pipelines choose their default height), else 512.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from havir.errors import InvalidInputError, MissingInputError
from havir.io import atomic_path
from havir.library_logging import quiet_model_libraries
from havir.models import sampling
from havir.models.backbone import Backbone, Images, SamplerSettings, register_backbone
from havir.models.compat import UNetFlatConditionModel, make_dual_unet
from havir.models.encoding import TEXT_TOKENS, encode_clip_images, encode_clip_texts, encode_vae_latents
from havir.targets import TargetSizes

DEFAULT_MODEL = "shi-labs/versatile-diffusion"
BUILT_IN = ("tiny", "demo", "full-random")
RANDOM_BUILT_IN = ("tiny", "full-random")
CONFIGS = Path(__file__).parent / "configs"
#: The demo world's Versatile Diffusion, in the release's diffusers layout (fp16): the VAE
#: (scripts/train_demo_vae.py), the miniature CLIP (scripts/train_demo_clip.py) and the dual UNet
#: (scripts/train_demo_unet.py), all trained on the synthetic scenes.
DEMO_VD = Path(__file__).parent / "weights" / "demo-vd"
DEMO_VAE = DEMO_VD / "vae"
#: Folders of a diffusers-layout Versatile Diffusion, and which files each must hold.
COMPONENTS = ("tokenizer", "image_feature_extractor", "text_encoder", "image_encoder", "image_unet", "text_unet", "vae", "scheduler")
#: The components holding weights: each must hold them as safetensors.
WEIGHTED = ("text_encoder", "image_encoder", "image_unet", "text_unet", "vae")
#: Side of the released model's images (VD was trained at 512x512).
RELEASED_IMAGE_SIDE = 512
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@register_backbone
@dataclass
class VersatileDiffusion(Backbone):
    """Versatile Diffusion as HAVIR's backbone (:class:`~havir.models.backbone.Backbone`).

    Its targets: the VAE latent, CLIP image tokens and CLIP text tokens
    (:mod:`havir.models.encoding`); it generates with the dual-guided sampler
    (:mod:`havir.models.sampling`). ``image_unet`` is already dual-guided: its transformers take
    the condition tokens [text (77) | image (257)]; ``text_unet`` shares those transformers and is
    kept only so the model can be saved in the release layout.
    """

    built_in: ClassVar[tuple[str, ...]] = BUILT_IN
    index_names: ClassVar[tuple[str, ...]] = ("VersatileDiffusionPipeline", "VersatileDiffusionDualGuidedPipeline")

    tokenizer: CLIPTokenizer
    image_processor: CLIPImageProcessorPil
    text_encoder: CLIPTextModelWithProjection
    image_encoder: CLIPVisionModelWithProjection
    image_unet: UNet2DConditionModel
    text_unet: UNetFlatConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler
    source: str = ""
    #: Side of the images it generates and encodes (512 for the released model; the VAE
    #: downsamples 8x, so latents are image_side / 8 square).
    image_side: int = 512
    #: The sampler's unconditional embeddings, computed once per device and dtype.
    _unconditional: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_pretrained(cls, model: str | Path = DEFAULT_MODEL, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, seed: int = 0) -> VersatileDiffusion:
        """:func:`load_versatile_diffusion` (``dtype`` None: float32)."""
        return load_versatile_diffusion(model, device=device, dtype=dtype or torch.float32, seed=seed)

    def encode_images(self, images: Images) -> dict[str, torch.Tensor]:
        """``vae_latents`` (n, 4, side / 8, side / 8) and ``clip_image`` (n, 257, D) of uint8 images."""
        return {"vae_latents": encode_vae_latents(self, images), "clip_image": encode_clip_images(self, images)}

    def encode_texts(self, texts) -> dict[str, torch.Tensor]:
        """``clip_text`` (n, 77, D), one row per text."""
        return {"clip_text": encode_clip_texts(self, texts)}

    def generate(self, predictions: dict[str, torch.Tensor], nsd_ids, *, mode: str, settings: SamplerSettings,
                 candidate: int = 0):
        """The dual-guided sampler (:func:`havir.models.sampling.generate`)."""
        key = (self.device, self.text_encoder.dtype)
        if key not in self._unconditional:
            self._unconditional[key] = sampling.unconditional_embeddings(self)
        return sampling.generate(self, predictions, nsd_ids, mode=mode, settings=settings, unconditional=self._unconditional[key],
                                 candidate=candidate)

    def generation_record(self, settings: SamplerSettings, mode: str) -> dict:
        return sampling.schedule_record(self, settings, mode)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in ("text_encoder", "image_encoder", "image_unet", "vae")}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VersatileDiffusion:
        for module in [*self.modules().values(), self.text_unet]:
            module.to(device=device)
            if dtype is not None and module.dtype != dtype:
                module.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def embedding_dim(self) -> int:
        """Width of the CLIP tokens the UNet is conditioned on (768 for the released model)."""
        return int(self.text_encoder.config.projection_dim)

    @property
    def target_sizes(self) -> TargetSizes:
        """Sizes of the training targets its encoders give (see :mod:`havir.targets`)."""
        latent_side = self.image_side // 2 ** (len(self.vae.config.block_out_channels) - 1)
        image_tokens = (self.image_encoder.config.image_size // self.image_encoder.config.patch_size) ** 2 + 1
        return TargetSizes(self.vae.config.latent_channels, latent_side, image_tokens, TEXT_TOKENS, self.embedding_dim)

    def save_pretrained(self, folder: Path) -> Path:
        """Write the diffusers layout that :func:`load_versatile_diffusion` reads back.

        The dual transformers are saved in their UNets, as in the release: the image UNet's
        own transformers in ``image_unet/``, the text ones in ``text_unet/``.
        """
        folder = Path(folder)
        plain_unet = _without_dual(self.image_unet)
        for name, component in (
            ("tokenizer", self.tokenizer),
            ("image_feature_extractor", self.image_processor),
            ("text_encoder", self.text_encoder),
            ("image_encoder", self.image_encoder),
            ("image_unet", plain_unet),
            ("text_unet", self.text_unet),
            ("vae", self.vae),
            ("scheduler", self.scheduler),
        ):
            component.save_pretrained(folder / name)
        index = {"_class_name": "VersatileDiffusionPipeline", "_havir_source": self.source, "_havir_image_side": self.image_side} | {
            name: ["diffusers" if name in ("image_unet", "vae", "scheduler") else "transformers", type(getattr(self, attr)).__name__]
            for name, attr in (("tokenizer", "tokenizer"), ("image_feature_extractor", "image_processor"),
                               ("text_encoder", "text_encoder"), ("image_encoder", "image_encoder"),
                               ("image_unet", "image_unet"), ("vae", "vae"), ("scheduler", "scheduler"))
        }
        index["text_unet"] = ["versatile_diffusion", "UNetFlatConditionModel"]
        with atomic_path(folder / "model_index.json") as temporary:
            temporary.write_text(json.dumps(index, indent=2) + "\n")
        return folder


def _without_dual(dual_unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain image UNet with ``dual_unet``'s weights (each block's image transformer)."""
    plain = UNet2DConditionModel.from_config({k: v for k, v in dual_unet.config.items() if k != "dual_cross_attention"})
    state = {}
    for key, value in dual_unet.state_dict().items():
        if ".transformers.1." in key:
            continue
        state[key.replace(".transformers.0.", ".")] = value
    plain.load_state_dict(state, strict=True)
    return plain.to(dtype=dual_unet.dtype)


def _config(name: str, component: str) -> dict:
    return json.loads((CONFIGS / name / f"{component}.json").read_text())


def clip_byte_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over bytes only (no BPE merges), built offline.

    The built-in architectures need a tokenizer but may not download CLIP's vocabulary. This
    one has CLIP's byte alphabet (each byte, and each byte ending a word) and its two special
    tokens, so text is tokenised character by character into the same 77-token layout.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP byte alphabet

    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = Path(scratch, "vocab.json"), Path(scratch, "merges.txt")
        vocab_file.write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TEXT_TOKENS)


def build_random(name: str, seed: int = 0) -> VersatileDiffusion:
    """Build a random-weight built-in architecture (``tiny``, ``full-random``) from ``seed``."""
    if name not in RANDOM_BUILT_IN:
        raise InvalidInputError(f"unknown random-weight model {name!r}; choose one of {', '.join(RANDOM_BUILT_IN)}")
    configs = name
    tokenizer = clip_byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = CLIPTextConfig(
            **_config(configs, "text_encoder"),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModelWithProjection(text_config)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_config(configs, "image_encoder")))
        image_unet = UNet2DConditionModel(**_config(configs, "image_unet"))
        text_unet = UNetFlatConditionModel(**_config(configs, "text_unet"))
        vae = AutoencoderKL(**_config(configs, "vae"))
    return VersatileDiffusion(
        tokenizer=tokenizer,
        image_processor=CLIPImageProcessorPil(**_config(configs, "image_processor")),
        text_encoder=text_encoder.eval(),
        image_encoder=image_encoder.eval(),
        image_unet=make_dual_unet(image_unet, text_unet).eval(),
        text_unet=text_unet.eval(),
        vae=vae.eval(),
        scheduler=DDIMScheduler(**_config(configs, "scheduler")),
        source=name,
        image_side=_config(configs, "havir")["image_side"],
    )


def _resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot of ``repo_id`` in the Hugging Face cache (downloading if allowed)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    patterns = [f"{c}/*.json" for c in COMPONENTS] + [f"{c}/*.safetensors" for c in COMPONENTS] + ["tokenizer/*.txt", "model_index.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise MissingInputError(
            f"Versatile Diffusion weights {repo_id!r} are not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
            + (" and HF_HUB_OFFLINE is set" if offline else " and could not be downloaded")
            + f": run `hf download {repo_id}` where there is internet (about 8 GB), "
            "then copy the cache here or pass --vd /path/to/versatile-diffusion"
        ) from err


@quiet_model_libraries()  # the libraries' per-file progress bars and notes would drown HAVIR's own progress
def load_versatile_diffusion(
    model: str | Path = DEFAULT_MODEL,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> VersatileDiffusion:
    """Load Versatile Diffusion from a folder, a hub id, or a built-in architecture.

    Parameters
    ----------
    model : ``"tiny"``, ``"demo"``, ``"full-random"``, a local folder in the diffusers layout, or a hub id.
    device, dtype : where and in what precision the modules live (bf16 or fp16 on CUDA).
    seed : seed of the random weights of ``tiny`` and ``full-random``.
    """
    name = str(model)
    if name == "demo":
        components = _load_folder(DEMO_VD)
        components.source = "demo"
    elif name in BUILT_IN:
        components = build_random(name, seed)
    else:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            if not _HUB_ID.fullmatch(name):
                raise MissingInputError(f"Versatile Diffusion folder {folder} does not exist (nor is it a hub id)")
            folder = _resolve_hub_id(name)
        components = _load_folder(folder)
    return components.to(device=device, dtype=dtype)


def _load_folder(folder: Path) -> VersatileDiffusion:
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise MissingInputError(
            f"Versatile Diffusion folder {folder} lacks {', '.join(missing)}: expected the diffusers layout "
            f"({', '.join(COMPONENTS)}), e.g. a download of {DEFAULT_MODEL}"
        )
    pickled_only = [c for c in WEIGHTED if not any((folder / c).glob("*.safetensors"))]
    if pickled_only:
        raise MissingInputError(
            f"Versatile Diffusion folder {folder} has no .safetensors weights in {', '.join(pickled_only)} "
            "(HAVIR never unpickles .bin files): download the safetensors files "
            f"(`hf download {DEFAULT_MODEL} --include '*.safetensors' '*.json' '*.txt'`) "
            "or convert the .bin files to safetensors where you trust them"
        )
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    try:
        image_unet = UNet2DConditionModel.from_pretrained(folder / "image_unet", use_safetensors=True)
        text_unet = UNetFlatConditionModel.from_pretrained(folder / "text_unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
        return VersatileDiffusion(
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            image_processor=CLIPImageProcessorPil.from_pretrained(folder / "image_feature_extractor"),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", use_safetensors=True).eval(),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", use_safetensors=True).eval(),
            image_unet=make_dual_unet(image_unet, text_unet).eval(),
            text_unet=text_unet.eval(),
            vae=vae.eval(),
            scheduler=DDIMScheduler.from_pretrained(folder / "scheduler", clip_sample=False, thresholding=False),
            source=str(folder),
            image_side=_image_side(index, image_unet, vae),
        )
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"cannot load Versatile Diffusion from {folder}: {err}") from err


def _image_side(index: dict, image_unet: UNet2DConditionModel, vae: AutoencoderKL) -> int:
    """Side of the images a folder's model generates (see the module docstring)."""
    if "_havir_image_side" in index:
        return int(index["_havir_image_side"])
    latent_side = image_unet.config.sample_size
    if isinstance(latent_side, int):
        return latent_side * 2 ** (len(vae.config.block_out_channels) - 1)
    return RELEASED_IMAGE_SIDE

