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
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from havir.devices import resolve_device
from havir.distributed import Shard, batch_shard, processes
from havir.errors import InvalidInputError, MissingInputError
from havir.features import FEATURES_FORMAT, features_path
from havir.io import atomic_path, output_folder, write_json
from havir.losses import info_nce, semantic_loss, structural_loss
from havir.metrics.scores import row_correlations, two_way_identification
from havir.models.decoders import PRESETS, SemanticExtractor, StructuralGenerator
from havir.models.ridge import DEFAULT_ALPHAS, RidgeDecoder
from havir.nsd.layout import check_subject
from havir.prepare import load_split, prepared_normalisation
from havir.progress import track
from havir.validation import AnyOf, Interval, ListOf, OneOf, Rule, check_options, check_values, read_json, reading_hdf5

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGETS = ("vae_latents", "clip_image", "clip_text")
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
_REPREPARE = "run `havir prepare` again (check the betas for NaN)"
_RECOMPUTE = "run `havir features` again (with --dtype fp32 if fp16 overflowed)"


@dataclass
class TrainConfig:
    """Settings of a training run (a TOML file holds any subset of them); checked on creation
    against :attr:`CONSTRAINTS`, so a bad value is refused before any data is read or written."""

    preset: str = "paper"  # decoder sizes: "paper" or "tiny"
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
class Split:
    """Inputs and targets of one part of the data (rows are samples).

    structural, semantic : float32 (n, voxels); vae_latents (n, 4, s, s), clip_image (n, 257, D),
    clip_text (n, 77, D) float32; nsd_id (n,); other : float32 (n, voxels), the nsdgeneral voxels
    in neither set (only the ridge baseline reads them).
    """

    structural: np.ndarray
    semantic: np.ndarray
    vae_latents: np.ndarray
    clip_image: np.ndarray
    clip_text: np.ndarray
    nsd_id: np.ndarray
    other: np.ndarray | None = None

    def targets(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in TARGETS}


@dataclass
class TrainingData:
    """The three parts a run uses: ``fit`` (trials or averages), ``val`` and ``test`` (averages)."""

    fit: Split
    val: Split
    test: Split


def _averaged(betas: np.ndarray, nsd_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, inverse = np.unique(nsd_id, return_inverse=True)
    sums = np.zeros((len(images), betas.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, betas)
    return (sums / np.bincount(inverse)[:, None]).astype(np.float32), images


def _inputs(data: Path, subject: int) -> tuple[Path, Path, np.ndarray]:
    """The subject's prepared file, its features cache and the cache's image ids, checked."""
    check_subject(subject)
    prepared = Path(data) / f"subj{subject:02d}.h5"
    if not prepared.is_file():
        raise FileNotFoundError(f"no prepared data for subj{subject:02d} in {data}: run `havir prepare` first")
    cache = features_path(data, subject)
    if not cache.is_file():
        raise FileNotFoundError(f"no features for subj{subject:02d} in {data}: run `havir features` first")
    with _reading_features(cache) as h5:
        if h5.attrs.get("subject") != subject or h5.attrs.get("format_version") != FEATURES_FORMAT:
            raise ValueError(
                f"{cache} holds features of subject {h5.attrs.get('subject')} (format {h5.attrs.get('format_version')}), "
                f"not of subj{subject:02d} in format {FEATURES_FORMAT}: run `havir features` again"
            )
        nsd_id = h5["nsd_id"][()]
        for name in TARGETS:
            if h5[name].ndim < 3 or h5[name].shape[0] != len(nsd_id) or h5[name].dtype.kind != "f":
                raise InvalidInputError(
                    f"features cache {cache}: {name} is {h5[name].dtype} {h5[name].shape}, expected float rows for its "
                    f"{len(nsd_id)} images: delete it and run `havir features` again"
                )
        return prepared, cache, nsd_id


def _reading_features(cache: Path):
    """Open a features cache; damage or a missing dataset is one line naming it and the fix."""
    return reading_hdf5(cache, what="features cache", fix="delete it and run `havir features` again")


def _check_finite(path: Path, arrays: dict[str, np.ndarray], fix: str) -> None:
    """Refuse NaN or infinite inputs before training: they would surface epochs later as a
    non-finite loss, which looks like a learning rate too high."""
    for name, values in arrays.items():
        finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if not finite.all():
            raise InvalidInputError(
                f"{path} holds NaN or infinite values in {name} ({int((~finite).sum())} of {len(values)} rows): {fix}"
            )


def _check_covered(cache: Path, feature_ids: np.ndarray, nsd_ids: np.ndarray) -> None:
    missing = np.setdiff1d(nsd_ids, feature_ids)
    if missing.size:
        raise ValueError(f"{cache} lacks features of {missing.size} images of the prepared data: run `havir features` again")


def _averaged_split(structural, semantic, nsd_id, features: dict[str, np.ndarray], feature_ids, other=None) -> Split:
    """Repetition averages of each image, with its targets (``features`` rows by ``feature_ids``)."""
    averaged_structural, ids = _averaged(structural, nsd_id)
    rows = np.searchsorted(feature_ids, ids)
    return Split(averaged_structural, _averaged(semantic, nsd_id)[0], *(features[name][rows] for name in TARGETS), ids,
                 other=None if other is None else _averaged(other, nsd_id)[0])


def load_test_data(data: Path, subject: int) -> Split:
    """The test images of a subject (repetition averages) with their targets, reading only their rows."""
    prepared, cache, feature_ids = _inputs(data, subject)
    test = load_split(prepared, "test")
    _check_covered(cache, feature_ids, test.nsd_id)
    ids = np.unique(test.nsd_id)
    with _reading_features(cache) as h5:
        rows = np.searchsorted(feature_ids, ids).tolist()  # ascending, as h5py's fancy reads require
        features = {name: h5[name][rows].astype(np.float32) for name in TARGETS}
    _check_finite(prepared, {f"test/{name}": getattr(test, name) for name in ("structural", "semantic", "other")}, _REPREPARE)
    _check_finite(cache, features, _RECOMPUTE)
    return _averaged_split(test.structural, test.semantic, test.nsd_id, features, ids, test.other)


def load_training_data(data: Path, subject: int, config: TrainConfig) -> TrainingData:
    """Join a subject's prepared betas with its cached features and split them."""
    prepared, cache, feature_ids = _inputs(data, subject)
    with _reading_features(cache) as h5:  # training needs nearly every row: read each target once
        features = {name: h5[name][()].astype(np.float32) for name in TARGETS}
    train, test = load_split(prepared, "train"), load_split(prepared, "test")
    _check_covered(cache, feature_ids, np.union1d(train.nsd_id, test.nsd_id))
    _check_finite(prepared, {f"{split}/{name}": getattr(part, name) for split, part in (("train", train), ("test", test))
                             for name in ("structural", "semantic", "other")}, _REPREPARE)
    _check_finite(cache, features, _RECOMPUTE)

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
        fit = Split(train.structural[fit_rows], train.semantic[fit_rows], *(features[name][rows] for name in TARGETS),
                    train.nsd_id[fit_rows], other=train.other[fit_rows])
    else:
        fit = _averaged_split(train.structural[fit_rows], train.semantic[fit_rows], train.nsd_id[fit_rows], features, feature_ids,
                              train.other[fit_rows])
    if config.shuffle_control:
        order = rng.permutation(len(fit.nsd_id))
        fit = dataclasses.replace(fit, **{name: value[order] for name, value in fit.targets().items()}, nsd_id=fit.nsd_id[order])
    return TrainingData(
        fit=fit,
        val=_averaged_split(train.structural[is_val], train.semantic[is_val], train.nsd_id[is_val], features, feature_ids,
                            train.other[is_val]),
        test=_averaged_split(test.structural, test.semantic, test.nsd_id, features, feature_ids, test.other),
    )


def build_decoders(data: TrainingData, config: TrainConfig) -> tuple[StructuralGenerator, SemanticExtractor]:
    """Decoders sized for ``data`` (voxel counts, target shapes) and the config's preset."""
    preset = PRESETS[config.preset]
    latent_channels, latent_size = data.fit.vae_latents.shape[1], data.fit.vae_latents.shape[-1]
    structural = StructuralGenerator(
        n_voxels=data.fit.structural.shape[1], latent_channels=latent_channels, latent_size=latent_size,
        map_size=max(1, latent_size // 4), **preset["structural"],
    )
    semantic_sizes = preset["semantic"] | ({} if config.semantic_rank == "preset" else {"rank": config.semantic_rank})
    semantic = SemanticExtractor(
        n_voxels=data.fit.semantic.shape[1], dim=data.fit.clip_image.shape[-1],
        image_tokens=data.fit.clip_image.shape[1], text_tokens=data.fit.clip_text.shape[1], **semantic_sizes,
    )
    return structural, semantic


def _tensors(part: Split, device: torch.device) -> dict[str, torch.Tensor]:
    names = ("structural", "semantic", *TARGETS)
    return {name: torch.as_tensor(getattr(part, name), device=device) for name in names}


class Decoders(torch.nn.Module):
    """Both decoders as one module: they train on one loss, and DDP syncs one module's gradients.

    ``decoders(structural_voxels, semantic_voxels)`` -> (latents, image tokens, text tokens).
    """

    def __init__(self, structural: StructuralGenerator, semantic: SemanticExtractor):
        super().__init__()
        self.structural, self.semantic = structural, semantic

    def forward(self, structural_voxels: torch.Tensor, semantic_voxels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.structural(structural_voxels), *self.semantic(semantic_voxels))


def _losses(decoders, batch: dict[str, torch.Tensor], config: TrainConfig, shard: Shard | None = None) -> dict[str, torch.Tensor]:
    """Both pathways' losses on ``batch``; with ``shard``, this process's share of them."""
    if shard is not None:
        return _shard_losses(decoders, batch, config, shard)
    latents, image_tokens, text_tokens = (t.float() for t in decoders(batch["structural"], batch["semantic"]))
    s = structural_loss(latents, batch["vae_latents"], config.edge_weight)
    i = semantic_loss(image_tokens, batch["clip_image"], config.cosine_weight, config.contrastive_weight)
    t = semantic_loss(text_tokens, batch["clip_text"], config.cosine_weight, config.contrastive_weight)
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
        latents, image_tokens, text_tokens = (t.float() for t in decoders(local["structural"], local["semantic"]))
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
    latents = structural(tensors["structural"]).float()
    image_tokens, text_tokens = (t.float() for t in semantic(tensors["semantic"]))
    return scores({"vae_latents": latents, "clip_image": image_tokens, "clip_text": text_tokens}, tensors)


def scores(predicted: dict, target: dict) -> dict[str, float]:
    """Per target: mean per-image correlation and two-way identification (chance 0.5)."""
    out = {}
    for name in TARGETS:
        p, t = (torch.as_tensor(x).flatten(1).float().cpu().numpy() for x in (predicted[name], target[name]))
        out[f"{name}_correlation"] = float(row_correlations(p, t).mean())
        out[f"{name}_identification"] = float(two_way_identification(t, p).mean())
    return out


def _save_decoder(model, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``weights`` in ``model``'s save_pretrained layout (config.json + safetensors), as one
    folder committed by one rename, so a crash never leaves half a model."""
    with atomic_path(folder) as temporary:
        model.save_config(temporary)
        save_file({k: v.contiguous() for k, v in weights.items()}, temporary / SAFETENSORS_WEIGHTS_NAME)


def load_decoder(cls: type[StructuralGenerator] | type[SemanticExtractor], folder: Path):
    """``cls.from_pretrained(folder)`` that works in any folder: safetensors' file loader takes
    only UTF-8 paths (a run folder named in Latin-1 could not reload its own model), so the
    weights are read here as bytes."""
    try:
        model = cls.from_config(cls.load_config(folder))
        model.load_state_dict(load((Path(folder) / SAFETENSORS_WEIGHTS_NAME).read_bytes()))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # missing, damaged or mismatched
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidInputError(f"decoder in {folder} cannot be loaded ({reason}): run `havir train` again into a new --out") from err
    return model.eval()


def _check_run_folder(run: Path, subject: int, model: str, config: TrainConfig) -> bool:
    """True when ``run`` holds an unfinished or finished run of exactly this training (resume).

    A folder with nothing committed in it (no ``run.json``), or only what a run that failed
    before its first checkpoint left (its settings), is free to use.
    """
    record = run / "run.json"
    if not record.is_file():  # config.toml is written first: alone, it is a start that stopped there
        if run.exists() and any(p.name != "config.toml" and not p.name.startswith(".") for p in run.iterdir()):
            raise ValueError(f"run folder {run} is not empty and holds no HAVIR run: choose another --out")
        return False
    held = read_json(record, what="run record", fix="delete the run folder or choose another --out")
    if (held.get("subject"), held.get("model"), held.get("config_sha256")) != (subject, model, config.sha256()):
        if not _has_results(run):
            return False  # a run that stopped before its first checkpoint: start this one instead
        raise ValueError(
            f"run folder {run} holds another run (subject {held.get('subject')}, model {held.get('model')}, "
            f"config {str(held.get('config_sha256'))[:12]}): choose another --out or delete it"
        )
    return True


#: ``havir train``'s own options (the training settings are :attr:`TrainConfig.CONSTRAINTS`).
TRAIN_OPTIONS: dict[str, Rule] = {"model": OneOf("havir", "ridge")}


def _features_model(cache: Path) -> str:
    """The Versatile Diffusion a features cache was computed with (its ``settings`` attribute)."""
    with _reading_features(cache) as h5:
        settings = h5.attrs["settings"]
    try:
        return json.loads(settings)["model"]
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidInputError(f"features cache {cache} has no valid settings record ({err}): run `havir features` again") from err


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
    features_vd = _features_model(features_path(data, subject))
    normalisation = prepared_normalisation(Path(data) / f"subj{subject:02d}.h5")  # recorded with the results
    if vd is not None and vd != features_vd:
        raise ValueError(f"the features in {data} were computed with --vd {features_vd}, not {vd}: run `havir features --vd {vd}` first")
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
                       "train_seconds": round(time.perf_counter() - started, 3)} | summary
            write_json(run / "summary.json", summary)
        return broadcast_object_list([summary])[0]  # every process returns it, once it is written


def ridge_voxels(part: Split, inputs: str) -> np.ndarray:
    """The ridge's input (n, v): HAVIR's two sets (``"sets"``), or with the other nsdgeneral
    voxels too (``"nsdgeneral"``: all of them, as Brain-Diffuser reads them)."""
    sets = [part.structural, part.semantic] + ([part.other] if inputs == "nsdgeneral" else [])
    return np.concatenate(sets, axis=1)


def _image_averages(part: Split) -> Split:
    """``part`` with its rows averaged by image (its targets are per image already)."""
    ids, first = np.unique(part.nsd_id, return_index=True)
    voxels = {name: _averaged(getattr(part, name), part.nsd_id)[0] for name in ("structural", "semantic", "other")}
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
            raise ValueError(
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
                _save_decoder(models[name], weights, run / name)
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
        best_structural = load_decoder(StructuralGenerator, run / "structural").to(device)
        best_semantic = load_decoder(SemanticExtractor, run / "semantic").to(device)
        summary = {
            "epochs": config.epochs,
            "final_train_loss": state["last"]["train_loss"],
            "final_val_loss": state["last"]["val_loss"],
            "best_epoch": state["best_epoch"],
            "test_scores": evaluate(best_structural, best_semantic, dataset.test, device),
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
