"""HAVIR's two decoders: voxels -> Versatile Diffusion's conditioning.

* :class:`StructuralGenerator`: early visual (structural) voxels -> a VAE latent (4x64x64 for
  the released VAE; the shape is a setting that follows the VAE in use). [paper] linear
  projection, LayerNorm, SiLU, Dropout, residual MLP blocks, then a projection to a
  low-resolution map, GroupNorm and convolutional upsampling (MindEye1's voxel-to-latent model).
* :class:`SemanticExtractor`: higher visual (semantic) voxels -> CLIP image tokens (257xD) and
  CLIP text tokens (77xD): a residual MLP backbone and one head per modality.

The heads are *token-factorised*: the backbone emits ``rank`` numbers per token, and one shared
``rank -> D`` map (plus a learned per-token offset) turns them into tokens, so every token's
image-dependent part lies in one shared ``rank``-dimensional subspace of the D dimensions. A
dense head from a 4096-wide backbone to 257x768 would hold 808M parameters; with rank 64 it holds
68M, and the 77 text tokens 20M more. ``rank="full"`` is that dense head (no shared subspace);
``bench/bench_semantic_rank.py`` measures how much of the targets' variance a rank keeps.

Both are diffusers ``ModelMixin``/``ConfigMixin`` models: constructor arguments are the config,
and ``save_pretrained``/``from_pretrained`` write and read ``config.json`` +
``diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

# nn.Dropout, whose masks also stay the same when a training batch is split across processes.
from havir.distributed import ShardDropout
from havir.errors import InvalidInputError
from havir.targets import TargetSizes, targets_of

#: Decoder classes by class name: the name diffusers writes as ``_class_name`` into each saved
#: decoder's ``config.json``, and the value of the training settings ``structural_decoder`` and
#: ``semantic_decoder``. Add one with :func:`register_decoder`.
DECODERS: dict[str, type] = {}


def register_decoder(cls: type) -> type:
    """Class decorator: make a decoder choosable in the training settings and loadable from a run.

    A decoder is a diffusers ``ModelMixin, ConfigMixin`` model with a class attribute ``role``
    (``"structural"`` or ``"semantic"``: which voxels it reads and which targets of
    :mod:`havir.targets` it predicts), a classmethod ``for_targets(n_voxels, sizes, preset,
    **settings)`` that builds it for a backbone's target sizes and a size preset, and
    ``predict(voxels) -> {target name: tensor}``.
    """
    if getattr(cls, "role", None) not in ("structural", "semantic"):
        raise TypeError(f"decoder {cls.__name__} must declare role = 'structural' or 'semantic'")
    DECODERS[cls.__name__] = cls
    return cls


class _ResidualMLP(nn.Module):
    """``x + Dropout(SiLU(LayerNorm(Linear(x))))``, repeated ``n_blocks`` times."""

    def __init__(self, width: int, n_blocks: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.SiLU(), ShardDropout(dropout))
            for _ in range(n_blocks)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return hidden


def _stem(n_voxels: int, width: int, dropout: float) -> nn.Sequential:
    """The paper's input stage: linear projection, LayerNorm, SiLU, Dropout."""
    return nn.Sequential(nn.Linear(n_voxels, width), nn.LayerNorm(width), nn.SiLU(), ShardDropout(dropout))


@register_decoder
class StructuralGenerator(ModelMixin, ConfigMixin):
    """Structural voxels -> VAE latent.

    Parameters
    ----------
    n_voxels : number of structural voxels (inputs).
    latent_channels, latent_size : the VAE latent to predict, (4, 64) for Versatile Diffusion.
    width, n_blocks : the residual MLP backbone.
    input_dropout, block_dropout : dropout after the stem and inside each block (0.5 / 0.25).
    map_channels, map_size : the low-resolution map the backbone is projected to (64x16x16);
        ``latent_size / map_size`` must be a power of two (one 2x upsampling stage per factor).
    groups : GroupNorm groups.
    """

    role = "structural"
    #: What :meth:`predict` returns (see :mod:`havir.targets`).
    targets = targets_of("structural")

    @register_to_config
    def __init__(
        self,
        n_voxels: int,
        latent_channels: int = 4,
        latent_size: int = 64,
        width: int = 4096,
        n_blocks: int = 4,
        input_dropout: float = 0.5,
        block_dropout: float = 0.25,
        map_channels: int = 64,
        map_size: int = 16,
        groups: int = 8,
    ):
        super().__init__()
        stages = latent_size // map_size
        if map_size * stages != latent_size or stages & (stages - 1):
            raise InvalidInputError(f"latent_size / map_size must be a power of two, got {latent_size} / {map_size}")
        self.stem = _stem(n_voxels, width, input_dropout)
        self.backbone = _ResidualMLP(width, n_blocks, block_dropout)
        self.to_map = nn.Linear(width, map_channels * map_size * map_size)
        self.map_norm = nn.GroupNorm(groups, map_channels)
        upsampling = []
        for _ in range(int(math.log2(stages))):
            upsampling += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(map_channels, map_channels, 3, padding=1),
                nn.GroupNorm(groups, map_channels),
                nn.SiLU(),
            ]
        self.upsample = nn.Sequential(*upsampling, nn.Conv2d(map_channels, latent_channels, 3, padding=1))

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        """``voxels`` (batch, n_voxels) -> latents (batch, latent_channels, latent_size, latent_size)."""
        config = self.config
        hidden = self.backbone(self.stem(voxels))
        low = self.to_map(hidden).view(-1, config.map_channels, config.map_size, config.map_size)
        return self.upsample(self.map_norm(low))

    @classmethod
    def for_targets(cls, n_voxels: int, sizes: TargetSizes, preset: str, **settings) -> StructuralGenerator:
        """Sized for ``sizes``' VAE latent and the ``preset`` of :data:`PRESETS` (``settings`` override it)."""
        return cls(n_voxels=n_voxels, latent_channels=sizes.latent_channels, latent_size=sizes.latent_side,
                   map_size=max(1, sizes.latent_side // 4), **PRESETS[preset]["structural"] | settings)

    def predict(self, voxels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"vae_latents": latents}`` of ``voxels`` (batch, n_voxels)."""
        return dict(zip(self.targets, (self(voxels),), strict=True))


class _TokenHead(nn.Module):
    """Backbone features -> (n_tokens, dim) through ``rank`` numbers per token (``"full"``: a
    dense map straight to the n_tokens x dim numbers)."""

    def __init__(self, width: int, n_tokens: int, dim: int, rank: int | str):
        super().__init__()
        full = rank == "full"
        self.n_tokens, self.rank = n_tokens, dim if full else rank
        self.per_token = nn.Linear(width, n_tokens * self.rank)
        self.to_dim = nn.Identity() if full else nn.Linear(rank, dim, bias=False)
        self.token_offset = nn.Parameter(torch.zeros(n_tokens, dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        factors = self.per_token(hidden).view(-1, self.n_tokens, self.rank)
        return self.to_dim(factors) + self.token_offset


def check_rank(rank: int | str) -> int | str:
    """``rank`` if it is a positive integer or ``"full"``; else a ValueError saying so."""
    if rank == "full" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        return rank
    raise InvalidInputError(f"the semantic heads' rank must be a positive integer or \"full\", got {rank!r}")


@register_decoder
class SemanticExtractor(ModelMixin, ConfigMixin):
    """Semantic voxels -> CLIP image tokens and CLIP text tokens.

    Parameters
    ----------
    n_voxels : number of semantic voxels (inputs).
    dim : CLIP token width (768 for Versatile Diffusion).
    image_tokens, text_tokens : 257 and 77 for Versatile Diffusion.
    width, n_blocks, input_dropout, block_dropout : the residual MLP backbone.
    rank : numbers per token in the token-factorised heads, or ``"full"`` (dense heads).
    """

    role = "semantic"
    #: What :meth:`predict` returns (see :mod:`havir.targets`).
    targets = targets_of("semantic")

    @register_to_config
    def __init__(
        self,
        n_voxels: int,
        dim: int = 768,
        image_tokens: int = 257,
        text_tokens: int = 77,
        width: int = 4096,
        n_blocks: int = 4,
        input_dropout: float = 0.5,
        block_dropout: float = 0.25,
        rank: int | str = 64,
    ):
        super().__init__()
        check_rank(rank)
        self.stem = _stem(n_voxels, width, input_dropout)
        self.backbone = _ResidualMLP(width, n_blocks, block_dropout)
        self.image_head = _TokenHead(width, image_tokens, dim, rank)
        self.text_head = _TokenHead(width, text_tokens, dim, rank)

    def forward(self, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``voxels`` (batch, n_voxels) -> (image tokens (batch, 257, dim), text tokens (batch, 77, dim))."""
        hidden = self.backbone(self.stem(voxels))
        return self.image_head(hidden), self.text_head(hidden)

    @classmethod
    def for_targets(cls, n_voxels: int, sizes: TargetSizes, preset: str, **settings) -> SemanticExtractor:
        """Sized for ``sizes``' CLIP tokens and the ``preset`` of :data:`PRESETS` (``settings``, e.g. ``rank``, override it)."""
        return cls(n_voxels=n_voxels, dim=sizes.dim, image_tokens=sizes.image_tokens, text_tokens=sizes.text_tokens,
                   **PRESETS[preset]["semantic"] | settings)

    def predict(self, voxels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"clip_image": image tokens, "clip_text": text tokens}`` of ``voxels`` (batch, n_voxels)."""
        return dict(zip(self.targets, self(voxels), strict=True))


class _CrossSubject(ModelMixin, ConfigMixin):
    """One subject's decoder in a cross-subject model (MindEye2's scheme): a linear input layer
    from this subject's voxels to a space shared by every subject, then a decoder shared by them.

    Subjects differ in grid and voxel count; only the input layer is theirs, so a model trained
    on several subjects adapts to a new one by fitting a new input layer (``havir train --init``).
    Saved alone, it is a complete decoder of this subject's voxels, loaded by class like any other.

    Parameters
    ----------
    n_voxels : this subject's voxels of the pathway (inputs).
    shared_width : width of the shared space (the input layer's outputs, the shared decoder's inputs).
    decoder : class name of the shared decoder (:data:`DECODERS`, of the same role).
    decoder_config : its settings (its ``n_voxels`` is ``shared_width``).
    """

    @register_to_config
    def __init__(self, n_voxels: int, shared_width: int, decoder: str, decoder_config: dict):
        super().__init__()
        shared = DECODERS.get(decoder)
        if shared is None or shared.role != self.role or issubclass(shared, _CrossSubject):
            raise InvalidInputError(f"the shared decoder of a {type(self).__name__} must be a {self.role} decoder, got {decoder!r}")
        self.input = nn.Linear(n_voxels, shared_width)
        self.shared = shared.from_config(dict(decoder_config))

    @classmethod
    def around(cls, input_layer: nn.Linear, shared) -> _CrossSubject:
        """The decoder made of ``input_layer`` and ``shared`` themselves (not copies): what one
        subject's part of a cross-subject model is, for saving it or scoring it alone."""
        with torch.device("meta"):  # the layers built here are replaced at once: allocate nothing
            model = cls(n_voxels=input_layer.in_features, shared_width=input_layer.out_features,
                        decoder=type(shared).__name__, decoder_config=settings_of(shared))
        model.input, model.shared = input_layer, shared
        return model

    @classmethod
    def for_targets(cls, n_voxels: int, sizes: TargetSizes, preset: str, *, decoder: str | None = None,
                    shared_width: int | None = None, **settings) -> _CrossSubject:
        """A shared ``decoder`` (default: the role's HAVIR decoder) sized for ``sizes`` and
        ``preset``, behind an input layer to a shared space of ``shared_width`` (default: the
        preset's decoder width)."""
        shared_width = shared_width or PRESETS[preset][cls.role]["width"]
        name = decoder or {"structural": "StructuralGenerator", "semantic": "SemanticExtractor"}[cls.role]
        return cls.around(nn.Linear(n_voxels, shared_width), DECODERS[name].for_targets(shared_width, sizes, preset, **settings))

    def predict(self, voxels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The shared decoder's predictions from this subject's ``voxels`` (batch, n_voxels)."""
        return self.shared.predict(self.input(voxels))


def settings_of(decoder) -> dict:
    """A decoder's constructor settings (its config without diffusers' bookkeeping keys)."""
    return {key: value for key, value in decoder.config.items() if not key.startswith("_")}


@register_decoder
class CrossSubjectStructural(_CrossSubject):
    """A subject's structural voxels -> a shared space -> a shared structural decoder."""

    role = "structural"
    targets = targets_of("structural")


@register_decoder
class CrossSubjectSemantic(_CrossSubject):
    """A subject's semantic voxels -> a shared space -> a shared semantic decoder."""

    role = "semantic"
    targets = targets_of("semantic")


#: The cross-subject decoder class of each role.
CROSS_SUBJECT = {"structural": CrossSubjectStructural, "semantic": CrossSubjectSemantic}


def variance_kept_by_rank(tokens: np.ndarray, ranks: list[int]) -> dict:
    """What a rank-r token head can represent of ``tokens`` (n images, T tokens, D).

    A head's image-dependent part lies in one shared r-dimensional subspace (its offsets take
    each token's mean over the images), so the best it can keep of the across-image variance is
    the share of the top r eigenvalues of the pooled covariance of the per-token-centred tokens
    ((n x T, D), float64). Returns ``kept_by_rank`` {r: share}, ``rank_for_share`` {share: the
    smallest r keeping it}, ``effective_rank`` (participation ratio of the eigenvalues) and
    ``offset_share_of_second_moment`` (what the per-token means alone carry).
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    offsets = tokens.mean(0)
    varying = (tokens - offsets).reshape(-1, tokens.shape[-1])
    eigenvalues = np.sort(np.linalg.eigvalsh(varying.T @ varying / len(varying)))[::-1].clip(min=0)
    total = eigenvalues.sum()
    cumulative = np.cumsum(eigenvalues) / total
    return {
        "kept_by_rank": {str(r): float(cumulative[min(r, len(cumulative)) - 1]) for r in ranks},
        "rank_for_share": {str(share): int(np.searchsorted(cumulative, share) + 1) for share in (0.5, 0.8, 0.9, 0.95, 0.99)},
        "effective_rank": float(total**2 / (eigenvalues**2).sum()),
        "offset_share_of_second_moment": float((offsets**2).sum() * len(tokens) / (tokens**2).sum()),
        "dim": int(tokens.shape[-1]),
        "tokens": int(tokens.shape[1]),
    }


#: Size presets: ``paper`` is the spec's default (MindEye1-sized), ``tiny`` runs in seconds on a CPU.
#: Each semantic rank is the smallest power of two keeping at least 90% of both CLIP targets'
#: across-image variance (bench/bench_semantic_rank.py, random-weight encoders, real shapes):
#: full-random 64 keeps 99.3% (image) / 93.1% (text), 32 only 86% of text; tiny 8 keeps 98.0% / 92.9%.
PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        "structural": {"width": 4096, "n_blocks": 4, "map_channels": 64, "groups": 8},
        "semantic": {"width": 4096, "n_blocks": 4, "rank": 64},
    },
    "tiny": {
        "structural": {"width": 256, "n_blocks": 2, "map_channels": 16, "groups": 4},
        "semantic": {"width": 256, "n_blocks": 2, "rank": 8},
    },
}
