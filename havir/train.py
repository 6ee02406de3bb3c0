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
from havir.artifacts.features_cache import features_path, features_settings, reading_features
from havir.artifacts.prepared import load_split, prepared_normalisation, prepared_path
from havir.artifacts.run import load_decoders, save_decoder
from havir.devices import resolve_device, smaller_batch_on_oom
from havir.distributed import Shard, batch_shard, processes
from havir.errors import InvalidInputError, MissingInputError
from havir.io import MODEL_STACK, atomic_path, output_folder, package_versions, write_json
from havir.losses import info_nce, semantic_loss, structural_loss
from havir.metrics.scores import row_correlations, two_way_identification
from havir.models.decoders import DECODERS, PRESETS, SemanticExtractor, StructuralGenerator
from havir.models.ridge import DEFAULT_ALPHAS, RidgeDecoder
from havir.progress import track
from havir.targets import TARGET_NAMES, TargetSizes
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


def build_decoders(data: TrainingData, config: TrainConfig) -> tuple[StructuralGenerator, SemanticExtractor]:
    """The config's decoder architectures, sized for ``data`` (voxel counts, target shapes) and
    the config's size preset."""
    fit = data.fit
    sizes = TargetSizes(latent_channels=fit.vae_latents.shape[1], latent_side=fit.vae_latents.shape[-1],
                        image_tokens=fit.clip_image.shape[1], text_tokens=fit.clip_text.shape[1], dim=fit.clip_image.shape[-1])
    decoders = []
    for role, name in (("structural", config.structural_decoder), ("semantic", config.semantic_decoder)):
        settings = {"rank": config.semantic_rank} if role == "semantic" and config.semantic_rank != "preset" else {}
        decoders.append(DECODERS[name].for_targets(getattr(fit, role).shape[1], sizes, config.preset, **settings))
    return tuple(decoders)


def _tensors(part: Split, device: torch.device) -> dict[str, torch.Tensor]:
    names = ("structural", "semantic", *TARGET_NAMES)
    return {name: torch.as_tensor(getattr(part, name), device=device) for name in names}


class Decoders(torch.nn.Module):
    """Both decoders as one module: they train on one loss, and DDP syncs one module's gradients.

    ``decoders(structural_voxels, semantic_voxels)`` -> ``{target name: prediction}``, every
    target of :mod:`havir.targets`.
    """

    def __init__(self, structural: StructuralGenerator, semantic: SemanticExtractor):
        super().__init__()
        self.structural, self.semantic = structural, semantic

    def forward(self, structural_voxels: torch.Tensor, semantic_voxels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.structural.predict(structural_voxels) | self.semantic.predict(semantic_voxels)


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
    local = {name: value[shard.rows] for name, value in batch.items()}
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
    return torch.cat([whole[: shard.start], rows, whole[shard.rows.stop :]])


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


def _check_run_folder(run: Path, subject: int, model: str, config: TrainConfig) -> bool:
    """True when ``run`` holds an unfinished or finished run of exactly this training (resume).

    A folder with nothing committed in it (no ``run.json``), or only what a run that failed
    before its first checkpoint left (its settings), is free to use.
    """
    record = run / "run.json"
    if not record.is_file():  # config.toml is written first: alone, it is a start that stopped there
        if run.exists() and any(p.name != "config.toml" and not p.name.startswith(".") for p in run.iterdir()):
            raise InvalidInputError(f"run folder {run} is not empty and holds no HAVIR run: choose another --out")
        return False
    held = read_json(record, what="run record", fix="delete the run folder or choose another --out")
    if (held.get("subject"), held.get("model"), held.get("config_sha256")) != (subject, model, config.sha256()):
        if not _has_results(run):
            return False  # a run that stopped before its first checkpoint: start this one instead
        raise InvalidInputError(
            f"run folder {run} holds another run (subject {held.get('subject')}, model {held.get('model')}, "
            f"config {str(held.get('config_sha256'))[:12]}): choose another --out or delete it"
        )
    return True


#: ``havir train``'s own options (the training settings are :attr:`TrainConfig.CONSTRAINTS`).
TRAIN_OPTIONS: dict[str, Rule] = {"model": OneOf("havir", "ridge")}


def _has_results(run: Path) -> bool:
    """Whether a run folder holds anything trained (a checkpoint, a model, a summary)."""
    return any((run / name).exists() for name in ("checkpoint", "structural", "semantic", "ridge", "summary.json"))


def train_subject(
    data: Path,
    subject: int,
    run: Path,
    *,
    model: str = "havir",
    config: TrainConfig | None = None,
    vd: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Train ``model`` (``"havir"`` or ``"ridge"``) for ``subject``; returns the summary.

    ``vd``, when given, must be the Versatile Diffusion the cached features were computed with:
    decoders trained on one model's targets are meaningless for another.
    """
    # 1. Check every option, setting and input (NaN included) while nothing is written yet, so
    #    a corrected rerun is never refused by a run folder that a refused run created.
    check_options(TRAIN_OPTIONS, model=model)
    config = config or TrainConfig()
    torch_device = resolve_device(device)
    launch = processes()
    resuming = _check_run_folder(Path(run), subject, model, config)
    dataset = load_training_data(data, subject, config)
    features_vd = features_settings(features_path(data, subject), keys=("model",))["model"]
    normalisation = prepared_normalisation(prepared_path(data, subject))  # recorded with the results
    if vd is not None and vd != features_vd:
        raise InvalidInputError(f"the features in {data} were computed with --vd {features_vd}, not {vd}: run `havir features --vd {vd}` first")
    # 2. Only now create the run folder and write into it.
    launch.wait_for_everyone()  # every process has checked the run folder before the main one writes into it
    # The main process locks it.
    with output_folder(Path(run), lock=launch.is_main_process) as run:
        if launch.is_main_process and not resuming:
            for stale in ("metrics.jsonl", "summary.json"):  # a previous start's, never committed
                (run / stale).unlink(missing_ok=True)
            with atomic_path(run / "config.toml") as temporary:
                temporary.write_text(config.to_toml())
            write_json(run / "run.json", {"subject": subject, "model": model, "config_sha256": config.sha256(), "data": str(Path(data).resolve())})
        started = time.perf_counter()
        if model == "ridge":  # closed form: the main process fits it alone
            summary = _train_ridge(dataset, config, run, torch_device) if launch.is_main_process else None
        else:
            summary = fit_decoders(dataset, config, run, torch_device, progress=progress)
        if launch.is_main_process:
            summary = {"subject": subject, "model": model, "vd": features_vd, "normalisation": normalisation,
                       "train_seconds": round(time.perf_counter() - started, 3),
                       "versions": package_versions(*MODEL_STACK, "accelerate")} | summary
            write_json(run / "summary.json", summary)
        return broadcast_object_list([summary])[0]  # every process returns it, once it is written


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
    launch = processes()
    main, world = launch.is_main_process, launch.num_processes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the initial weights
        structural, semantic = build_decoders(dataset, config)
    structural.to(device)
    semantic.to(device)
    parameters = list(structural.parameters()) + list(semantic.parameters())
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )
    fit = _tensors(dataset.fit, device)  # kept on the device: a realistic subject fits on one GPU
    n_fit = len(dataset.fit.nsd_id)
    steps_per_epoch = -(-n_fit // config.batch_size)
    schedule = one_cycle(optimizer, config.learning_rate, config.epochs * steps_per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    checkpoint = run / "checkpoint"
    state = {"epoch": 0, "best": {"structural": float("inf"), "semantic": float("inf")}, "best_epoch": {}}
    if (checkpoint / "state.json").is_file():
        state = _load_checkpoint(checkpoint, structural, semantic, optimizer, schedule, device)
    metrics_path = run / "metrics.jsonl"
    if main:  # the epochs after the checkpoint are trained again: their lines go
        kept = metrics_path.read_text().splitlines()[: state["epoch"]] if metrics_path.is_file() else []
        if state["epoch"] and len(kept) == state["epoch"] - 1:  # killed between the checkpoint and its line
            kept.append(json.dumps(state["last"]))
        with atomic_path(metrics_path) as temporary:
            temporary.write_text("".join(line + "\n" for line in kept))
    decoders = Decoders(structural, semantic)
    if world > 1:  # accelerate's DDP: averages the gradients across the processes during the backward pass
        decoders = Accelerator(mixed_precision="no", device_placement=False).prepare_model(decoders)  # autocast is ours

    models = {"structural": structural, "semantic": semantic}
    unsaved_best: dict[str, dict[str, torch.Tensor]] = {}  # best weights not yet on disk (CPU copies)
    checkpointed_epoch, last_checkpoint = state["epoch"], time.perf_counter()
    epochs = range(state["epoch"], config.epochs)
    shown: dict[str, dict] = {}  # the last epoch's losses, shown beside the progress
    for epoch in track(epochs, "training", total=len(epochs), enabled=progress and main, unit="epochs",
                       status=lambda: _loss_status(shown)):
        epoch_started = time.perf_counter()
        structural.train()
        semantic.train()
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout of this epoch
        order = torch.randperm(n_fit, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)).to(device)
        totals = torch.zeros(2, device=device)  # summed on the device: no host sync per step
        for step in range(steps_per_epoch):
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = {name: value[rows] for name, value in fit.items()}
            shard = Shard.of(len(rows), launch.process_index, world) if world > 1 else None
            with smaller_batch_on_oom(config.batch_size, "batch_size = {} in the --config TOML"):
                with autocast:
                    losses = _losses(decoders, batch, config, shard)
                optimizer.zero_grad(set_to_none=True)
                # The processes' shares sum to the batch's loss, and DDP averages their gradients: hence x world.
                ((losses["structural"] + losses["semantic"]) * world).backward()
            optimizer.step()
            schedule.step()
            totals += torch.stack([losses["structural"].detach(), losses["semantic"].detach()]).float() * (len(rows) / n_fit)
        if world > 1:
            totals = reduce(totals, reduction="sum")
        train_loss = dict(zip(models, totals.tolist()))
        if not all(np.isfinite(list(train_loss.values()))):
            raise InvalidInputError(
                f"the training loss became {train_loss} at epoch {epoch + 1}: lower learning_rate (now "
                f"{config.learning_rate}) in the config; the last good checkpoint (epoch {checkpointed_epoch}) is in {checkpoint}"
            )
        if not main:  # the main process validates, keeps the best models and writes; the others go on
            continue
        with torch.no_grad(), autocast:
            structural.eval()
            semantic.eval()
            val_losses = {k: v.item() for k, v in _losses(Decoders(structural, semantic), _tensors(dataset.val, device), config).items()}
        val_scores = evaluate(structural, semantic, dataset.val, device)
        for name, model in models.items():
            if val_losses[name] < state["best"][name]:
                state["best"][name] = val_losses[name]
                state["best_epoch"][name] = epoch + 1
                unsaved_best[name] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_losses, "val_scores": val_scores,
                  "seconds": round(time.perf_counter() - epoch_started, 3)}
        state["epoch"] = epoch + 1
        state["last"] = record
        shown.update(train=train_loss, val=val_losses)
        if time.perf_counter() - last_checkpoint >= 60 * config.checkpoint_minutes or epoch + 1 == config.epochs:
            saving_started = time.perf_counter()
            for name, weights in unsaved_best.items():
                save_decoder(models[name], weights, run / name)
            unsaved_best.clear()
            _save_checkpoint(checkpoint, structural, semantic, optimizer, schedule, state)
            checkpointed_epoch, last_checkpoint = epoch + 1, time.perf_counter()
            record["checkpoint_seconds"] = round(last_checkpoint - saving_started, 3)
        with open(metrics_path, "a") as metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            os.fsync(metrics.fileno())

    summary = None
    if main:
        best = load_decoders(run, device)
        summary = {
            "epochs": config.epochs,
            "final_train_loss": state["last"]["train_loss"],
            "final_val_loss": state["last"]["val_loss"],
            "best_epoch": state["best_epoch"],
            "test_scores": evaluate(best["structural"], best["semantic"], dataset.test, device),
        }
    return broadcast_object_list([summary])[0]


def _loss_status(losses: dict[str, dict]) -> str:
    """``"loss structural 0.412/0.450, semantic 0.903/0.951 (train/val)"``, or ``""`` before the first epoch."""
    if not losses:
        return ""
    pairs = ", ".join(f"{name} {losses['train'][name]:.4g}/{losses['val'][name]:.4g}" for name in losses["train"])
    return f"loss {pairs} (train/val)"


def _save_checkpoint(folder: Path, structural, semantic, optimizer, schedule, state: dict) -> None:
    """Write the checkpoint as one folder committed by one rename: weights, optimiser and schedule
    always belong to the epoch ``state.json`` names. Tensors go to safetensors, the rest to JSON
    (nothing is pickled)."""
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        for name, model in (("structural", structural), ("semantic", semantic)):
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, temporary / f"{name}.safetensors")
        tensors, layout = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, temporary / "optimizer.safetensors")
        (temporary / "optimizer.json").write_text(json.dumps(layout))
        (temporary / "schedule.json").write_text(json.dumps(schedule.state_dict()))
        (temporary / "state.json").write_text(json.dumps(state, indent=2))


def _load_checkpoint(folder: Path, structural, semantic, optimizer, schedule, device: torch.device) -> dict:
    """Load a checkpoint written by :func:`_save_checkpoint` into the models, optimiser and
    schedule; returns its training state."""
    if not (folder / "optimizer.safetensors").is_file():
        raise InvalidInputError(
            f"{folder} is a checkpoint of an older HAVIR (pickled optimiser state, no longer read): "
            "delete it to train this run again from the start, or finish it with the HAVIR that wrote it"
        )
    structural.load_state_dict(load_file(folder / "structural.safetensors", device=str(device)))
    semantic.load_state_dict(load_file(folder / "semantic.safetensors", device=str(device)))
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
