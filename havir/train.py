"""``havir train``: fit the Structural Generator and the Semantic Extractor (or the ridge baseline).

Data protocol: the training images of the prepared subject are split by image (never by trial)
into fitting and validation images (``val_fraction``); the decoders fit single trials (or
repetition averages, ``use_trials = false``) of the fitting images; validation and the held-out
test scores use repetition averages, as the field reports them.

Both decoders train together, one AdamW optimiser and one one-cycle schedule, bf16 autocast on
CUDA. After every epoch: validation losses and scores go to ``metrics.jsonl``; a decoder whose
validation loss improved is kept (``structural/``, ``semantic/``, safetensors + config.json);
and a checkpoint (weights, optimiser, schedule, epoch) lets an interrupted run continue. Both are
written at most every ``checkpoint_minutes`` (a realistic checkpoint is 5 GB) and at the end.
Every epoch's shuffling and dropout are seeded by (seed, epoch), so a resumed run ends where an
uninterrupted one would.

Under ``accelerate launch`` (N processes, one per GPU) training is data-parallel: every process
holds the data, draws the same shuffled order, and takes its contiguous rows of each global batch
(``batch_size`` rows in all, whatever N); its losses are its share of the global batch's (see
:func:`_shard_losses`) and DDP sums the gradients, so N processes give the weights one process
gives (up to float rounding). The main process validates, keeps the best models and writes every
file; a resumed run may use another number of processes.

Cross-subject training (:func:`train_subjects`, MindEye2's scheme): one linear input layer per
subject and pathway into a shared space, shared decoders (:class:`SubjectDecoders`); each step
takes a sub-batch of every subject, and under ``accelerate launch`` each process its rows of each
sub-batch. :func:`train_subject` with ``init`` adapts such a model to one subject: new input
layers with the shared decoders frozen, then optionally everything (``finetune_epochs``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, reduce
from safetensors.torch import load_file, save_file

from havir.artifacts.dataset import (  # noqa: F401 (Split, load_test_data and ridge_voxels: also read here by their old path)
    RECOMPUTE,
    REPREPARE,
    Split,
    averaged,
    averaged_split,
    check_covered,
    check_finite,
    checked_inputs,
    load_test_data,
    ridge_voxels,
)
from havir.artifacts.features_cache import features_path, features_settings, features_shapes, reading_features
from havir.artifacts.prepared import load_split, prepared_normalisation, prepared_path
from havir.artifacts.run import (
    DECODER_ROLES,
    RUN_RECORD,
    SHARED,
    SUMMARY,
    load_decoders,
    load_shared_decoders,
    read_pooled_run,
    save_decoder,
    subject_folder_name,
    subject_run,
)
from havir.devices import resolve_device, smaller_batch_on_oom
from havir.distributed import Shard, batch_shard, processes
from havir.errors import InvalidInputError, MissingInputError
from havir.io import MODEL_STACK, atomic_path, output_folder, package_versions, write_json
from havir.losses import info_nce, semantic_loss, structural_loss
from havir.metrics.scores import row_correlations, two_way_identification
from havir.models.decoders import CROSS_SUBJECT, DECODERS, PRESETS, SemanticExtractor, StructuralGenerator
from havir.models.ridge import DEFAULT_ALPHAS, RidgeDecoder
from havir.options import check_subject_list
from havir.progress import track
from havir.targets import TARGET_NAMES, TargetSizes, targets_of
from havir.validation import AnyOf, Interval, KeyOf, ListOf, OneOf, Rule, check_options, check_values, read_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The ridge baseline's settings. ``search``: HAVIR's two voxel sets, the fit rows of the run
#: (trials or averages, ``use_trials``), each strength chosen from ``ridge_alphas`` on a split of
#: the training images. ``brain-diffuser``: its scripts/*_regression.py -- every nsdgeneral voxel,
#: repetition averages of every training image, voxels standardised (ddof 1), fixed strengths
#: (50,000 was its VDVAE latents', here the VAE latents'; 60,000 CLIP image; 100,000 CLIP text),
#: predictions re-scaled to the training targets' statistics.
RIDGE_PRESETS = {
    "search": {"inputs": "sets", "averages": False, "fixed_alphas": None, "standardise_inputs": False, "rescale": False},
    "brain-diffuser": {
        "inputs": "nsdgeneral", "averages": True, "fixed_alphas": {"vae_latents": 5e4, "clip_image": 6e4, "clip_text": 1e5},
        "standardise_inputs": True, "rescale": True,
    },
}


@dataclass
class TrainConfig:
    """Settings of a training run (a TOML file holds any subset of them); checked on creation
    against :attr:`CONSTRAINTS`, so a bad value is refused before any data is read or written."""

    preset: str = "paper"  # decoder sizes: "paper" or "tiny"
    structural_decoder: str = "StructuralGenerator"  # decoder architectures: registered classes (havir.models.decoders.DECODERS)
    semantic_decoder: str = "SemanticExtractor"
    semantic_rank: int | str = "preset"  # rank of the semantic token heads: "preset" (its own), "full" or a positive integer
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    use_trials: bool = True  # fit single trials; false: repetition averages
    val_fraction: float = 0.1
    edge_weight: float = 0.1  # structural: weight of the Sobel edge loss
    cosine_weight: float = 1.0  # semantic: weight of (1 - cosine)
    contrastive_weight: float = 0.0  # semantic: weight of InfoNCE on the pooled token
    shuffle_control: bool = False  # control run: pair each voxel pattern with a random image
    shared_width: int | str = "preset"  # multi-subject runs: width of the space each subject's input layer maps to ("preset": the decoder width)
    finetune_epochs: int = 0  # --init runs: epochs training everything after the `epochs` that fit the new input layers alone
    best_by: str = "loss"  # which epoch's decoders are kept: lowest validation "loss", or highest "identification"
    ridge_alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    ridge_preset: str = "search"  # ridge baseline: "search" or "brain-diffuser" (see RIDGE_PRESETS)
    checkpoint_minutes: float = 5.0  # write the checkpoint and best models at most this often (and at the end)
    seed: int = 0

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "preset": OneOf(*PRESETS),
        "structural_decoder": KeyOf(DECODERS),
        "semantic_decoder": KeyOf(DECODERS),
        "semantic_rank": AnyOf(OneOf("preset", "full"), Interval(int, 1)),
        "ridge_preset": OneOf(*RIDGE_PRESETS),
        "epochs": Interval(int, 1),
        "batch_size": Interval(int, 1),
        "learning_rate": Interval(float, 0, closed="right"),
        "weight_decay": Interval(float, 0),
        "use_trials": OneOf(True, False),
        "val_fraction": Interval(float, 0, 1, closed="neither"),
        "edge_weight": Interval(float, 0),
        "cosine_weight": Interval(float, 0),
        "contrastive_weight": Interval(float, 0),
        "shuffle_control": OneOf(True, False),
        "shared_width": AnyOf(OneOf("preset"), Interval(int, 1)),
        "finetune_epochs": Interval(int, 0),
        "best_by": OneOf("loss", "identification"),
        "ridge_alphas": ListOf(Interval(float, 0, closed="right")),
        "checkpoint_minutes": Interval(float, 0),
        "seed": Interval(int, 0, 2**32 - 1),
    }

    def __post_init__(self):
        check_values(dataclasses.asdict(self), self.CONSTRAINTS, fix="fix it in the training config (--config)")
        for role in ("structural", "semantic"):
            name = getattr(self, f"{role}_decoder")
            if DECODERS[name].role != role:
                raise InvalidInputError(
                    f"{role}_decoder = {name!r} is a {DECODERS[name].role} decoder: choose a {role} one "
                    f"({', '.join(n for n, c in DECODERS.items() if c.role == role)}) in the training config (--config)"
                )

    @classmethod
    def from_toml(cls, path: Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"training config not found: {path}: pass an existing TOML file to --config")
        try:
            values = tomllib.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise InvalidInputError(f"training config {path} is not valid TOML ({err}): fix the file") from err
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InvalidInputError(f"training config {path} has unknown keys {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        check_values(values, cls.CONSTRAINTS, fix=f"fix it in {path}")
        return cls(**values)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(dataclasses.asdict(self))

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class TrainingData:
    """The three parts a run uses: ``fit`` (trials or averages), ``val`` and ``test`` (averages)."""

    fit: Split
    val: Split
    test: Split


def load_training_data(data: Path, subject: int, config: TrainConfig) -> TrainingData:
    """Join a subject's prepared betas with its cached features and split them."""
    prepared, cache, feature_ids = checked_inputs(data, subject)
    with reading_features(cache) as h5:  # training needs nearly every row: read each target once
        features = {name: h5[name][()].astype(np.float32) for name in TARGET_NAMES}
    train, test = load_split(prepared, "train"), load_split(prepared, "test")
    check_covered(cache, feature_ids, np.union1d(train.nsd_id, test.nsd_id))
    check_finite(prepared, {f"{split}/{name}": getattr(part, name) for split, part in (("train", train), ("test", test))
                             for name in ("structural", "semantic", "other")}, REPREPARE)
    check_finite(cache, features, RECOMPUTE)

    rng = np.random.default_rng(config.seed)
    train_images = np.unique(train.nsd_id)
    n_val = max(2, int(round(config.val_fraction * len(train_images))))
    if n_val >= len(train_images):
        raise InvalidInputError(
            f"val_fraction {config.val_fraction} leaves none of the {len(train_images)} training images of {prepared} "
            "to fit: lower val_fraction in the training config"
        )
    val_images = rng.choice(train_images, size=n_val, replace=False)
    is_val = np.isin(train.nsd_id, val_images)
    fit_rows = ~is_val
    if config.use_trials:
        rows = np.searchsorted(feature_ids, train.nsd_id[fit_rows])
        fit = Split(train.structural[fit_rows], train.semantic[fit_rows], *(features[name][rows] for name in TARGET_NAMES),
                    train.nsd_id[fit_rows], other=train.other[fit_rows])
    else:
        fit = averaged_split(train.structural[fit_rows], train.semantic[fit_rows], train.nsd_id[fit_rows], features, feature_ids,
                              train.other[fit_rows])
    if config.shuffle_control:
        order = rng.permutation(len(fit.nsd_id))
        fit = dataclasses.replace(fit, **{name: value[order] for name, value in fit.targets().items()}, nsd_id=fit.nsd_id[order])
    return TrainingData(
        fit=fit,
        val=averaged_split(train.structural[is_val], train.semantic[is_val], train.nsd_id[is_val], features, feature_ids,
                            train.other[is_val]),
        test=averaged_split(test.structural, test.semantic, test.nsd_id, features, feature_ids, test.other),
    )


def build_decoders(data: TrainingData, config: TrainConfig, n_voxels: dict[str, int] | None = None) -> tuple[StructuralGenerator, SemanticExtractor]:
    """The config's decoder architectures, sized for ``data`` (voxel counts, target shapes) and
    the config's size preset; ``n_voxels`` ({role: inputs}) instead of ``data``'s voxel counts
    for decoders shared across subjects (their inputs are the shared space)."""
    fit = data.fit
    sizes = TargetSizes(latent_channels=fit.vae_latents.shape[1], latent_side=fit.vae_latents.shape[-1],
                        image_tokens=fit.clip_image.shape[1], text_tokens=fit.clip_text.shape[1], dim=fit.clip_image.shape[-1])
    decoders = []
    for role, name in (("structural", config.structural_decoder), ("semantic", config.semantic_decoder)):
        settings = {"rank": config.semantic_rank} if role == "semantic" and config.semantic_rank != "preset" else {}
        inputs = n_voxels[role] if n_voxels else getattr(fit, role).shape[1]
        decoders.append(DECODERS[name].for_targets(inputs, sizes, config.preset, **settings))
    return tuple(decoders)


def _tensors(part: Split, device: torch.device) -> dict[str, torch.Tensor]:
    names = ("structural", "semantic", *TARGET_NAMES)
    return {name: torch.as_tensor(getattr(part, name), device=device) for name in names}


class Decoders(torch.nn.Module):
    """Both decoders as one module: they train on one loss, and DDP syncs one module's gradients.

    ``decoders(structural_voxels, semantic_voxels)`` -> ``{target name: prediction}``, every
    target of :mod:`havir.targets`. The methods after ``forward`` are what the training loop
    (:func:`_fit`) asks of a model, here and in :class:`SubjectDecoders`.
    """

    def __init__(self, structural: StructuralGenerator, semantic: SemanticExtractor):
        super().__init__()
        self.structural, self.semantic = structural, semantic

    def forward(self, structural_voxels: torch.Tensor, semantic_voxels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.structural.predict(structural_voxels) | self.semantic.predict(semantic_voxels)

    def parts(self) -> dict[str, torch.nn.Module]:
        """The modules a checkpoint saves, one file each."""
        return {"structural": self.structural, "semantic": self.semantic}

    def batch(self, fits: list[dict[str, torch.Tensor]], rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training batch of the fitting rows ``rows[0]`` (of the one subject)."""
        return {name: value[rows[0]] for name, value in fits[0].items()}

    def subject_decoders(self) -> list[tuple]:
        """Each subject's (structural, semantic) decoder, as validation scores them."""
        return [(self.structural, self.semantic)]

    def role_weights(self, role: str) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of what ``role``'s best model is made of."""
        return {role: _copy(getattr(self, role))}

    def save_role(self, role: str, weights: dict[str, dict[str, torch.Tensor]], run: Path) -> None:
        """Write ``role``'s best model (:meth:`role_weights`) into ``run``."""
        save_decoder(getattr(self, role), weights[role], run / role)

    def freeze_shared(self, frozen: bool) -> None:
        """Nothing is shared with other subjects here."""

    def decoder_runs(self, run: Path) -> list[Path]:
        """The run folder of each subject's saved decoders."""
        return [run]


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class SubjectDecoders(torch.nn.Module):
    """Decoders shared by several subjects, each subject's voxels entering through its own linear
    input layer per pathway (MindEye2's scheme; subjects differ in grid and voxel count).

    ``decoders(structural, semantic)``: one tensor of voxels per subject in each tuple, the rows
    of each subject (a sub-batch) in subject order; each subject's rows pass its input layers,
    and the shared decoders take every subject's rows together -> ``{target: prediction}`` over
    the concatenated rows.

    ``pooled``: a multi-subject run (``havir train --subjects``), saved as one folder per subject
    plus the shared decoders; otherwise a run adapted to one subject (``--init``), saved as a
    single-subject run.
    """

    def __init__(self, structural, semantic, voxels: dict[int, tuple[int, int]], *, pooled: bool):
        super().__init__()
        self.structural, self.semantic, self.pooled = structural, semantic, pooled
        self.subjects = tuple(voxels)
        self.inputs = torch.nn.ModuleDict({
            subject_folder_name(subject): torch.nn.ModuleDict({
                role: torch.nn.Linear(n, getattr(self, role).config.n_voxels) for role, n in zip(DECODER_ROLES, counts)
            })
            for subject, counts in voxels.items()
        })

    def forward(self, structural: tuple[torch.Tensor, ...], semantic: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        shared = {}
        for role, voxels in zip(DECODER_ROLES, (structural, semantic)):
            shared[role] = torch.cat([layers[role](x) for layers, x in zip(self.inputs.values(), voxels, strict=True)])
        return self.structural.predict(shared["structural"]) | self.semantic.predict(shared["semantic"])

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"structural": self.structural, "semantic": self.semantic, "inputs": self.inputs}

    def batch(self, fits: list[dict[str, torch.Tensor]], rows: list[torch.Tensor]) -> dict:
        """Every subject's sub-batch (``rows[i]`` of subject i, all of one size): voxels per
        subject, targets concatenated in subject order."""
        batch = {role: tuple(fit[role][r] for fit, r in zip(fits, rows, strict=True)) for role in DECODER_ROLES}
        return batch | {name: torch.cat([fit[name][r] for fit, r in zip(fits, rows)]) for name in TARGET_NAMES}

    def subject_decoders(self) -> list[tuple]:
        return [tuple(self.decoder_of(subject, role) for role in DECODER_ROLES) for subject in self.subjects]

    def decoder_of(self, subject: int, role: str):
        """``subject``'s decoder of ``role``: its input layer and the shared decoder (the modules themselves)."""
        return CROSS_SUBJECT[role].around(self.inputs[subject_folder_name(subject)][role], getattr(self, role))

    def role_weights(self, role: str) -> dict[str, dict[str, torch.Tensor]]:
        return {"shared": _copy(getattr(self, role))} | {
            subject_folder_name(subject): _copy(self.inputs[subject_folder_name(subject)][role]) for subject in self.subjects
        }

    def save_role(self, role: str, weights: dict[str, dict[str, torch.Tensor]], run: Path) -> None:
        """Each subject's decoder (a complete one, the shared weights included) into its folder
        and, for a pooled run, the shared decoder alone into ``shared/`` (what ``--init`` reads)."""
        shared = {f"shared.{k}": v for k, v in weights["shared"].items()}
        for subject in self.subjects:
            name = subject_folder_name(subject)
            folder = subject_run(run, subject) if self.pooled else run
            folder.mkdir(exist_ok=True)
            own = {f"input.{k}": v for k, v in weights[name].items()}
            save_decoder(self.decoder_of(subject, role), own | shared, folder / role)  # complete: reconstruct reads it alone
        if self.pooled:
            (run / SHARED).mkdir(exist_ok=True)
            save_decoder(getattr(self, role), weights["shared"], run / SHARED / role)

    def decoder_runs(self, run: Path) -> list[Path]:
        return [subject_run(run, subject) for subject in self.subjects] if self.pooled else [run]

    def freeze_shared(self, frozen: bool) -> None:
        """Train the input layers alone (the shared decoders frozen), or everything."""
        for role in DECODER_ROLES:
            getattr(self, role).requires_grad_(not frozen)


def _losses(decoders, batch: dict[str, torch.Tensor], config: TrainConfig, shard: Shard | None = None) -> dict[str, torch.Tensor]:
    """Both pathways' losses on ``batch``; with ``shard``, this process's share of them."""
    if shard is not None:
        return _shard_losses(decoders, batch, config, shard)
    predicted = {name: value.float() for name, value in decoders(batch["structural"], batch["semantic"]).items()}
    s = structural_loss(predicted["vae_latents"], batch["vae_latents"], config.edge_weight)
    i = semantic_loss(predicted["clip_image"], batch["clip_image"], config.cosine_weight, config.contrastive_weight)
    t = semantic_loss(predicted["clip_text"], batch["clip_text"], config.cosine_weight, config.contrastive_weight)
    return {"structural": s["total"], "semantic": i["total"] + t["total"]}


def _shard_losses(decoders, batch: dict[str, torch.Tensor], config: TrainConfig, shard: Shard) -> dict[str, torch.Tensor]:
    """This process's share of the losses of the global ``batch``, computed on its rows alone:
    summed over the processes, the values and their gradients are those of the whole batch.

    A mean over the batch is the sum of each shard's mean weighed by its share of the rows (so
    uneven shards are fine). InfoNCE contrasts each row with the whole batch: every process
    computes it on the whole batch's pooled predictions, of which only its own rows carry
    gradients, and keeps its share of the value.
    """
    local = {name: tuple(v[shard.block_rows] for v in value) if isinstance(value, tuple) else value[shard.rows]
             for name, value in batch.items()}  # per-subject voxels: this process's rows of each subject
    with batch_shard(shard):
        latents, image_tokens, text_tokens = (
            t.float() for t in decoders(local["structural"], local["semantic"]).values()  # in TARGET_NAMES order
        )
    if shard.size:
        s = shard.weight * structural_loss(latents, local["vae_latents"], config.edge_weight)["total"]
        m = shard.weight * (semantic_loss(image_tokens, local["clip_image"], config.cosine_weight, 0.0)["total"]
                            + semantic_loss(text_tokens, local["clip_text"], config.cosine_weight, 0.0)["total"])
    else:  # no rows of a short last batch: zero losses that still reach every parameter, as DDP needs
        s, m = 0 * latents.sum(), 0 * (image_tokens.sum() + text_tokens.sum())
    if config.contrastive_weight > 0:
        for tokens, name in ((image_tokens, "clip_image"), (text_tokens, "clip_text")):
            # info_nce pools its (n, tokens, D) inputs by their mean token: pass the pooled rows as one token
            c = info_nce(_whole_batch(tokens.mean(1), shard)[:, None], batch[name].mean(1)[:, None])
            m = m + config.contrastive_weight * (c + (shard.weight - 1) * c.detach())  # gradient of c, value shard.weight * c
    return {"structural": s, "semantic": m}


def _whole_batch(rows: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The global batch (total, ...) from every process's ``rows``; this process's rows keep their gradients."""
    placed = rows.new_zeros((shard.total, *rows.shape[1:]))
    placed[shard.rows] = rows.detach()
    whole = reduce(placed, reduction="sum")  # every other process adds zeros there: exact
    index = torch.arange(shard.total, device=rows.device)[shard.rows]
    return whole.index_put((index,), rows)


@torch.no_grad()
def evaluate(structural, semantic, part: Split, device: torch.device) -> dict[str, float]:
    """Held-out scores of both decoders on ``part``: latent correlation, two-way identification."""
    structural.eval()
    semantic.eval()
    tensors = _tensors(part, device)
    predicted = structural.predict(tensors["structural"]) | semantic.predict(tensors["semantic"])
    return scores({name: value.float() for name, value in predicted.items()}, tensors)


def scores(predicted: dict, target: dict) -> dict[str, float]:
    """Per target: mean per-image correlation and two-way identification (chance 0.5)."""
    out = {}
    for name in TARGET_NAMES:
        p, t = (torch.as_tensor(x).flatten(1).float().cpu().numpy() for x in (predicted[name], target[name]))
        out[f"{name}_correlation"] = float(row_correlations(p, t).mean())
        out[f"{name}_identification"] = float(two_way_identification(t, p).mean())
    return out


def _check_run_folder(run: Path, identity: dict, config: TrainConfig) -> bool:
    """True when ``run`` holds an unfinished or finished run of exactly this training (resume):
    the same ``identity`` (subject or subjects, model, the run adapted from) and settings.

    A folder with nothing committed in it (no ``run.json``), or only what a run that failed
    before its first checkpoint left (its settings), is free to use.
    """
    record = run / RUN_RECORD
    if not record.is_file():  # config.toml is written first: alone, it is a start that stopped there
        if run.exists() and any(p.name != "config.toml" and not p.name.startswith(".") for p in run.iterdir()):
            raise InvalidInputError(f"run folder {run} is not empty and holds no HAVIR run: choose another --out")
        return False
    held = read_json(record, what="run record", fix="delete the run folder or choose another --out")
    if any(held.get(key) != value for key, value in identity.items()) or held.get("config_sha256") != config.sha256():
        if not _has_results(run):
            return False  # a run that stopped before its first checkpoint: start this one instead
        what = ", ".join(f"{key} {held.get(key)}" for key in ("subjects" if "subjects" in held else "subject", "model", "init")
                         if key in held)
        raise InvalidInputError(
            f"run folder {run} holds another run ({what}, config {str(held.get('config_sha256'))[:12]}): "
            "choose another --out or delete it"
        )
    return True


#: ``havir train``'s own options (the training settings are :attr:`TrainConfig.CONSTRAINTS`).
TRAIN_OPTIONS: dict[str, Rule] = {"model": OneOf("havir", "ridge")}


def _has_results(run: Path) -> bool:
    """Whether a run folder holds anything trained (a checkpoint, a model, a summary)."""
    return any((run / name).exists() for name in ("checkpoint", "structural", "semantic", "ridge", SHARED, SUMMARY))


def _features_of(data: Path, subject: int, vd: str | None) -> dict:
    """What ``subject``'s features cache was computed with (``model``) and its targets' ``shapes``;
    refused if it is not the ``vd`` asked for."""
    cache = features_path(data, subject)
    model = features_settings(cache, keys=("model",))["model"]
    if vd is not None and vd != model:
        raise InvalidInputError(f"the features in {data} were computed with --vd {model}, not {vd}: run `havir features --vd {vd}` first")
    return {"model": model, "shapes": features_shapes(cache)}


def _write_run(run: Path, record: dict, config: TrainConfig, resuming: bool, fit, head: dict) -> dict:
    """Create (or resume) the run folder, record the run, call ``fit(run)`` and write the summary
    (``head`` + the time taken and package versions + what ``fit`` returned) last."""
    launch = processes()
    launch.wait_for_everyone()  # every process has checked the run folder before the main one writes into it
    # The main process locks it.
    with output_folder(Path(run), lock=launch.is_main_process) as run:
        if launch.is_main_process and not resuming:
            for stale in ("metrics.jsonl", SUMMARY):  # a previous start's, never committed
                (run / stale).unlink(missing_ok=True)
            with atomic_path(run / "config.toml") as temporary:
                temporary.write_text(config.to_toml())
            write_json(run / RUN_RECORD, record | {"config_sha256": config.sha256()})
        started = time.perf_counter()
        summary = fit(run)
        if launch.is_main_process:
            summary = head | {"train_seconds": round(time.perf_counter() - started, 3),
                              "versions": package_versions(*MODEL_STACK, "accelerate")} | summary
            write_json(run / SUMMARY, summary)
        return broadcast_object_list([summary])[0]  # every process returns it, once it is written


def train_subject(
    data: Path,
    subject: int,
    run: Path,
    *,
    model: str = "havir",
    config: TrainConfig | None = None,
    vd: str | None = None,
    init: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Train ``model`` (``"havir"`` or ``"ridge"``) for ``subject``; returns the summary.

    ``vd``, when given, must be the Versatile Diffusion the cached features were computed with:
    decoders trained on one model's targets are meaningless for another.

    ``init``: a multi-subject run (:func:`train_subjects`) to adapt to ``subject``: a new input
    layer per pathway is fitted for ``config.epochs`` epochs with the shared decoders frozen,
    then everything for ``config.finetune_epochs`` more (0: none). The architecture is the
    pretrained one (the config's decoder settings do not apply); the run folder is a
    single-subject run whose decoders are :class:`~havir.models.decoders.CrossSubjectStructural`
    and :class:`~havir.models.decoders.CrossSubjectSemantic`.
    """
    # 1. Check every option, setting and input (NaN included) while nothing is written yet, so
    #    a corrected rerun is never refused by a run folder that a refused run created.
    check_options(TRAIN_OPTIONS, model=model)
    config = config or TrainConfig()
    if init is not None and model != "havir":
        raise InvalidInputError(f"--init adapts a multi-subject HAVIR model, it cannot train --model {model}: drop one of them")
    if init is None and config.finetune_epochs:
        raise InvalidInputError(f"finetune_epochs = {config.finetune_epochs} fine-tunes a model adapted with --init: "
                                "give --init RUN, or set finetune_epochs = 0")
    pretrained = read_pooled_run(init) if init is not None else None
    torch_device = resolve_device(device)
    identity = {"subject": subject, "model": model} | ({"init": str(Path(init).resolve())} if init is not None else {})
    resuming = _check_run_folder(Path(run), identity, config)
    checked_inputs(data, subject)
    features = _features_of(data, subject, vd)
    if pretrained is not None and features != pretrained["features"]:
        raise InvalidInputError(
            f"{init} was trained on the features of --vd {pretrained['features']['model']} (targets {pretrained['features']['shapes']}), "
            f"subj{subject:02d}'s in {data} are of --vd {features['model']} (targets {features['shapes']}): "
            f"run `havir features --vd {pretrained['features']['model']}` for it, or pretrain on these features"
        )
    dataset = load_training_data(data, subject, config)
    normalisation = prepared_normalisation(prepared_path(data, subject))  # recorded with the results

    # 2. Only now create the run folder and write into it.
    def fit(run: Path) -> dict:
        if model == "ridge":  # closed form: the main process fits it alone
            return _train_ridge(dataset, config, run, torch_device) if processes().is_main_process else None
        if init is None:
            return fit_decoders(dataset, config, run, torch_device, progress=progress)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the new input layers
            shared = load_shared_decoders(init)
            adapted = SubjectDecoders(shared["structural"], shared["semantic"], {subject: _voxel_counts(dataset)}, pooled=False)
            for layer in adapted.inputs.parameters():
                # From zero, not a random draw: a random layer sends every unseen voxel pattern to a random
                # point of the shared space, which the frozen decoders never learnt to read; from zero the
                # layer holds only what the subject's training trials taught it (as ridge's least norm).
                torch.nn.init.zeros_(layer)
        return _fit(adapted, [dataset], config, run, torch_device, frozen_epochs=config.epochs, progress=progress)

    head = {"subject": subject, "model": model, "vd": features["model"], "normalisation": normalisation}
    if init is not None:
        head |= {"init": identity["init"], "init_subjects": pretrained["subjects"]}
    return _write_run(run, identity | {"data": str(Path(data).resolve())}, config, resuming, fit, head)


def _voxel_counts(dataset: TrainingData) -> tuple[int, int]:
    """(structural, semantic) voxels of a subject."""
    return dataset.fit.structural.shape[1], dataset.fit.semantic.shape[1]


def train_subjects(
    data: Path,
    subjects: tuple[int, ...],
    run: Path,
    *,
    config: TrainConfig | None = None,
    vd: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Train one model on several subjects (MindEye2's scheme): each subject's voxels enter
    through its own linear input layer per pathway (to a space of ``shared_width``), and the
    Structural Generator and the Semantic Extractor (``structural_decoder``,
    ``semantic_decoder``) are shared. Returns the summary.

    ``run`` receives one single-subject run per subject (``subjXX/``: what ``havir reconstruct``
    and ``havir eval`` take), the shared decoders alone (``shared/``, what ``--init`` adapts to a
    new subject), and the run's records (the subjects, the features they were trained on).
    """
    subjects = tuple(subjects)
    check_subject_list(subjects)
    for subject in subjects:
        checked_inputs(data, subject)  # every subject's prepared data and features are there
    config = config or TrainConfig()
    if config.finetune_epochs:
        raise InvalidInputError(f"finetune_epochs = {config.finetune_epochs} fine-tunes a model adapted with --init, "
                                "not a multi-subject run: set finetune_epochs = 0")
    for role in DECODER_ROLES:
        name = getattr(config, f"{role}_decoder")
        if name == CROSS_SUBJECT[role].__name__:
            raise InvalidInputError(f"{role}_decoder = {name!r} is the per-subject wrapper of a multi-subject run, "
                                    "not a decoder to share: choose another in the training config (--config)")
    if config.batch_size < len(subjects):
        raise InvalidInputError(f"batch_size = {config.batch_size} is split between {len(subjects)} subjects: "
                                f"set it to at least {len(subjects)} in the training config (--config)")
    torch_device = resolve_device(device)
    features = {subject: _features_of(data, subject, vd) for subject in subjects}
    if len({json.dumps(f, sort_keys=True) for f in features.values()}) > 1:
        raise InvalidInputError(f"the subjects' features in {data} come from different models or target shapes "
                                f"({features}): run `havir features` with one --vd for all of them")
    identity = {"subjects": list(subjects), "model": "havir"}
    resuming = _check_run_folder(Path(run), identity, config)
    datasets = [load_training_data(data, subject, config) for subject in subjects]
    normalisation = {subject: prepared_normalisation(prepared_path(data, subject)) for subject in subjects}

    def fit(run: Path) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the initial weights
            structural, semantic = build_decoders(datasets[0], config, n_voxels=_shared_widths(config))
            model = SubjectDecoders(structural, semantic, {s: _voxel_counts(d) for s, d in zip(subjects, datasets)}, pooled=True)
        summary = _fit(model, datasets, config, run, torch_device, progress=progress)
        scores = dict(zip(subjects, summary.pop("test_scores")))
        if processes().is_main_process:  # each subject's folder becomes a finished single-subject run
            for subject in subjects:
                folder = subject_run(run, subject)
                write_json(folder / RUN_RECORD, {"subject": subject, "model": "havir", "data": str(Path(data).resolve()),
                                                 "multi_subject": {"run": "..", "subjects": list(subjects)}})
                write_json(folder / SUMMARY, {"subject": subject, "model": "havir", "vd": features[subject]["model"],
                                              "normalisation": normalisation[subject], "test_scores": scores[subject],
                                              "multi_subject": {"run": "..", "subjects": list(subjects)}} | summary)
        return summary | {"test_scores": {subject_folder_name(s): v for s, v in scores.items()}}

    head = {"subjects": list(subjects), "model": "havir", "vd": features[subjects[0]]["model"],
            "normalisation": {subject_folder_name(s): v for s, v in normalisation.items()}}
    record = identity | {"data": str(Path(data).resolve()), "features": features[subjects[0]]}
    return _write_run(run, record, config, resuming, fit, head)


def _shared_widths(config: TrainConfig) -> dict[str, int]:
    """Width of the shared space of each pathway: ``shared_width``, or the preset's decoder width."""
    return {role: PRESETS[config.preset][role]["width"] if config.shared_width == "preset" else config.shared_width
            for role in DECODER_ROLES}


def _image_averages(part: Split) -> Split:
    """``part`` with its rows averaged by image (its targets are per image already)."""
    ids, first = np.unique(part.nsd_id, return_index=True)
    voxels = {name: averaged(getattr(part, name), part.nsd_id)[0] for name in ("structural", "semantic", "other")}
    return Split(**voxels, **{name: value[first] for name, value in part.targets().items()}, nsd_id=ids)


def _train_ridge(dataset: TrainingData, config: TrainConfig, run: Path, device: torch.device) -> dict:
    preset = RIDGE_PRESETS[config.ridge_preset]
    fit = dataset.fit
    if preset["averages"]:  # fixed strengths need no validation images: fit every training image's average
        parts = [_image_averages(dataset.fit), dataset.val]
        fit = Split(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Split)})
    ridge = RidgeDecoder(alphas=config.ridge_alphas, fixed_alphas=preset["fixed_alphas"], val_fraction=config.val_fraction,
                         seed=config.seed, standardise_inputs=preset["standardise_inputs"], rescale=preset["rescale"],
                         device=str(device))
    ridge.fit(ridge_voxels(fit, preset["inputs"]), fit.targets(), groups=fit.nsd_id)
    with atomic_path(run / "ridge") as temporary:  # weights and config.json committed together
        ridge.save_pretrained(temporary)
    predicted = {name: torch.as_tensor(p) for name, p in ridge.predict(ridge_voxels(dataset.test, preset["inputs"])).items()}
    return {"epochs": 0, "alpha": ridge.alpha_, "ridge": {"preset": config.ridge_preset, **preset, "fit_rows": len(fit.nsd_id)},
            "test_scores": scores(predicted, dataset.test.targets())}


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The one-cycle learning-rate schedule over ``total_steps`` optimiser steps: a warm-up of
    about a tenth of the steps (at least one) to ``max_lr``, then cosine annealing.

    torch's ``OneCycleLR`` divides by zero when its warm-up ends exactly on step 0 or on the
    last step (``pct_start * total_steps - 1`` in {0, total_steps - 1}: 10 steps at
    ``pct_start = 0.1``, the valid ``epochs = 2, batch_size = 100``); the warm-up here ends on a
    whole step strictly inside the run, and is torch's 10% exactly when ``total_steps`` is a
    multiple of 10 from 20 on. A run of one or two steps (no room for both phases) keeps ``max_lr``.
    """
    if total_steps < 3:
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    peak = min(max(1, round(0.1 * total_steps) - 1), total_steps - 2)  # step at which the rate is max_lr
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=(peak + 1) / total_steps
    )


def fit_decoders(dataset: TrainingData, config: TrainConfig, run: Path, device: torch.device, progress: bool = True) -> dict:
    """Train both decoders on ``dataset`` into ``run`` (resuming a checkpoint found there).

    Under ``accelerate launch``, data-parallel across the processes; every process returns the summary.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the initial weights
        model = Decoders(*build_decoders(dataset, config))
    return _fit(model, [dataset], config, run, device, progress=progress)


def _epoch_orders(sizes: list[int], positions: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Each subject's fitting rows in this epoch's order, ``positions`` long: seeded permutations
    drawn one after another (a subject with fewer rows than ``positions`` sees them again)."""
    orders = []
    for size in sizes:
        drawn = [torch.randperm(size, generator=generator) for _ in range(-(-positions // size))]
        orders.append(torch.cat(drawn)[:positions])
    return orders


def _fit(model, datasets: list[TrainingData], config: TrainConfig, run: Path, device: torch.device, *,
         frozen_epochs: int = 0, progress: bool = True) -> dict:
    """Train ``model`` (:class:`Decoders`, or :class:`SubjectDecoders` with ``datasets`` in its
    subjects' order) into ``run``, resuming a checkpoint found there; every process returns the
    summary (its ``test_scores`` one dict per dataset).

    Batches: each step takes the same number of rows from every subject (``batch_size`` split
    evenly between them), so every input layer and the shared decoders learn from every subject
    at every step, the subjects weigh alike in the loss, and under DDP every parameter has a
    gradient on every process. An epoch is one pass over the subject with most fitting rows.
    The first ``frozen_epochs`` train the input layers alone (the shared decoders frozen);
    ``config.epochs + config.finetune_epochs`` epochs in all, under one one-cycle schedule.
    """
    launch = processes()
    main, world = launch.is_main_process, launch.num_processes
    model.to(device)
    optimizer = torch.optim.AdamW(  # frozen parameters have no gradient: AdamW leaves them alone
        list(model.parameters()), lr=config.learning_rate, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )
    fits = [_tensors(dataset.fit, device) for dataset in datasets]  # kept on the device: a realistic subject fits on one GPU
    sizes = [len(dataset.fit.nsd_id) for dataset in datasets]
    per_subject = config.batch_size // len(datasets)
    positions = max(sizes)
    steps_per_epoch = -(-positions // per_subject)
    total_epochs = config.epochs + config.finetune_epochs
    schedule = one_cycle(optimizer, config.learning_rate, total_epochs * steps_per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    checkpoint = run / "checkpoint"
    state = {"epoch": 0, "best": {"structural": float("inf"), "semantic": float("inf")}, "best_epoch": {}}
    if (checkpoint / "state.json").is_file():
        state = _load_checkpoint(checkpoint, model, optimizer, schedule, device)
    metrics_path = run / "metrics.jsonl"
    if main:  # the epochs after the checkpoint are trained again: their lines go
        kept = metrics_path.read_text().splitlines()[: state["epoch"]] if metrics_path.is_file() else []
        if state["epoch"] and len(kept) == state["epoch"] - 1:  # killed between the checkpoint and its line
            kept.append(json.dumps(state["last"]))
        with atomic_path(metrics_path) as temporary:
            temporary.write_text("".join(line + "\n" for line in kept))

    unsaved_best: dict[str, dict] = {}  # best weights not yet on disk (CPU copies), by role
    checkpointed_epoch, last_checkpoint = state["epoch"], time.perf_counter()
    epochs = range(state["epoch"], total_epochs)
    shown: dict[str, dict] = {}  # the last epoch's losses, shown beside the progress
    decoders, frozen = None, None
    for epoch in track(epochs, "training", total=len(epochs), enabled=progress and main, unit="epochs",
                       status=lambda: _loss_status(shown)):
        epoch_started = time.perf_counter()
        if frozen != (epoch < frozen_epochs):  # first epoch, or the shared decoders thaw
            frozen = epoch < frozen_epochs
            model.freeze_shared(frozen)
            decoders = None  # DDP syncs the parameters that needed gradients when it wrapped the model: wrap it again
            # accelerate's DDP: averages the gradients across the processes during the backward pass
            decoders = Accelerator(mixed_precision="no", device_placement=False).prepare_model(model) if world > 1 else model  # autocast is ours
        model.train()
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout of this epoch
        orders = _epoch_orders(sizes, positions, torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        totals = torch.zeros(2, device=device)  # summed on the device: no host sync per step
        for step in range(steps_per_epoch):
            span = slice(step * per_subject, (step + 1) * per_subject)
            batch = model.batch(fits, [order[span].to(device) for order in orders])
            rows = len(orders[0][span])
            shard = Shard.of(rows * len(datasets), launch.process_index, world, blocks=len(datasets)) if world > 1 else None
            with smaller_batch_on_oom(config.batch_size, "batch_size = {} in the --config TOML"):
                with autocast:
                    losses = _losses(decoders, batch, config, shard)
                optimizer.zero_grad(set_to_none=True)
                # The processes' shares sum to the batch's loss, and DDP averages their gradients: hence x world.
                ((losses["structural"] + losses["semantic"]) * world).backward()
            optimizer.step()
            schedule.step()
            totals += torch.stack([losses["structural"].detach(), losses["semantic"].detach()]).float() * (rows / positions)
        if world > 1:
            totals = reduce(totals, reduction="sum")
        train_loss = dict(zip(DECODER_ROLES, totals.tolist()))
        if not all(np.isfinite(list(train_loss.values()))):
            raise InvalidInputError(
                f"the training loss became {train_loss} at epoch {epoch + 1}: lower learning_rate (now "
                f"{config.learning_rate}) in the config; the last good checkpoint (epoch {checkpointed_epoch}) is in {checkpoint}"
            )
        if not main:  # the main process validates, keeps the best models and writes; the others go on
            continue
        val_losses, val_scores = _validate(model, [dataset.val for dataset in datasets], config, device, autocast)
        for role in DECODER_ROLES:
            criterion = val_losses[role] if config.best_by == "loss" else -float(np.mean(  # lower is better
                [scores[f"{target}_identification"] for scores in val_scores for target in targets_of(role)]))
            if criterion < state["best"][role]:
                state["best"][role] = criterion
                state["best_epoch"][role] = epoch + 1
                unsaved_best[role] = model.role_weights(role)
        mean_scores = val_scores[0] if len(val_scores) == 1 else _mean_scores(val_scores)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_losses, "val_scores": mean_scores,
                  "seconds": round(time.perf_counter() - epoch_started, 3)}
        if len(val_scores) > 1:
            record["val_scores_by_subject"] = dict(zip(map(subject_folder_name, model.subjects), val_scores))
        state["epoch"] = epoch + 1
        state["last"] = record
        shown.update(train=train_loss, val=val_losses)
        if time.perf_counter() - last_checkpoint >= 60 * config.checkpoint_minutes or epoch + 1 == total_epochs:
            saving_started = time.perf_counter()
            for role, weights in unsaved_best.items():
                model.save_role(role, weights, run)
            unsaved_best.clear()
            _save_checkpoint(checkpoint, model, optimizer, schedule, state)
            checkpointed_epoch, last_checkpoint = epoch + 1, time.perf_counter()
            record["checkpoint_seconds"] = round(last_checkpoint - saving_started, 3)
        with open(metrics_path, "a") as metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            os.fsync(metrics.fileno())

    summary = None
    if main:
        test_scores = []
        for folder, dataset in zip(model.decoder_runs(run), datasets, strict=True):
            best = load_decoders(folder, device)
            test_scores.append(evaluate(best["structural"], best["semantic"], dataset.test, device))
        summary = {
            "epochs": total_epochs,
            "final_train_loss": state["last"]["train_loss"],
            "final_val_loss": state["last"]["val_loss"],
            "best_epoch": state["best_epoch"],
            "test_scores": test_scores[0] if len(test_scores) == 1 else test_scores,
        }
    return broadcast_object_list([summary])[0]


def _validate(model, vals: list[Split], config: TrainConfig, device: torch.device, autocast) -> tuple[dict, list[dict]]:
    """Validation losses (mean over the subjects) and each subject's validation scores."""
    losses, scores_by_subject = [], []
    for (structural, semantic), val in zip(model.subject_decoders(), vals, strict=True):
        with torch.no_grad(), autocast:
            structural.eval()
            semantic.eval()
            losses.append({k: v.item() for k, v in _losses(Decoders(structural, semantic), _tensors(val, device), config).items()})
        scores_by_subject.append(evaluate(structural, semantic, val, device))
    return {role: float(np.mean([loss[role] for loss in losses])) for role in DECODER_ROLES}, scores_by_subject


def _mean_scores(scores_by_subject: list[dict]) -> dict[str, float]:
    return {key: float(np.mean([scores[key] for scores in scores_by_subject])) for key in scores_by_subject[0]}


def _loss_status(losses: dict[str, dict]) -> str:
    """``"loss structural 0.412/0.450, semantic 0.903/0.951 (train/val)"``, or ``""`` before the first epoch."""
    if not losses:
        return ""
    pairs = ", ".join(f"{name} {losses['train'][name]:.4g}/{losses['val'][name]:.4g}" for name in losses["train"])
    return f"loss {pairs} (train/val)"


def _save_checkpoint(folder: Path, model, optimizer, schedule, state: dict) -> None:
    """Write the checkpoint as one folder committed by one rename: weights, optimiser and schedule
    always belong to the epoch ``state.json`` names. Tensors go to safetensors (one file per
    part of the model), the rest to JSON (nothing is pickled)."""
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        for name, part in model.parts().items():
            save_file({k: v.contiguous() for k, v in part.state_dict().items()}, temporary / f"{name}.safetensors")
        tensors, layout = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, temporary / "optimizer.safetensors")
        (temporary / "optimizer.json").write_text(json.dumps(layout))
        (temporary / "schedule.json").write_text(json.dumps(schedule.state_dict()))
        (temporary / "state.json").write_text(json.dumps(state, indent=2))


def _load_checkpoint(folder: Path, model, optimizer, schedule, device: torch.device) -> dict:
    """Load a checkpoint written by :func:`_save_checkpoint` into the model, optimiser and
    schedule; returns its training state."""
    if not (folder / "optimizer.safetensors").is_file():
        raise InvalidInputError(
            f"{folder} is a checkpoint of an older HAVIR (pickled optimiser state, no longer read): "
            "delete it to train this run again from the start, or finish it with the HAVIR that wrote it"
        )
    for name, part in model.parts().items():
        part.load_state_dict(load_file(folder / f"{name}.safetensors", device=str(device)))
    tensors = load_file(folder / "optimizer.safetensors", device=str(device))
    optimizer.load_state_dict(_join_optimizer_state(tensors, json.loads((folder / "optimizer.json").read_text())))
    schedule.load_state_dict(json.loads((folder / "schedule.json").read_text()))
    return json.loads((folder / "state.json").read_text())


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's ``state_dict`` as (tensors named ``<parameter>.<key>``, JSON-able rest)."""
    tensors = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimiser state {key!r} is a {type(value).__name__}, not a tensor")
            tensors[f"{index}.{key}"] = value.contiguous()
    return tensors, {"param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    """The inverse of :func:`_split_optimizer_state`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": layout["param_groups"]}
