"""``havir features``: the training targets of every image a subject saw, from the backbone's
own encoders (:meth:`~havir.models.backbone.Backbone.encode_images` and ``encode_texts``).

With Versatile Diffusion (:mod:`havir.models.encoding`), three targets (the paper's two pathways):

* **VAE latent** (Structural Generator's target): ``vae.encode(2x - 1).latent_dist.mode()``
  times the VAE's scaling factor, on the stimulus resized to 512x512 -> (4, 64, 64) (the
  ``tiny`` model works at 128x128 -> (4, 16, 16), to stay fast on a CPU).
* **CLIP image tokens** (Semantic Extractor): the vision encoder's 257 tokens after its final
  LayerNorm and projection, each divided by the norm of the class token -> (257, D).
* **CLIP text tokens**: the text encoder's 77 projected tokens, each divided by the norm of the
  pooled token; averaged over the image's COCO captions -> (77, D).

The normalisations are exactly those of ``VersatileDiffusionDualGuidedPipeline``
(``_encode_image_prompt``, ``_encode_text_prompt``); a test proves equality on the ``tiny`` model.
Images go in as uint8 (or PIL): CLIP's processor rescales by 1/255 itself, so float images in
[0, 1] would be rescaled twice (a bug public reproductions shipped).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from havir.artifacts.features_cache import FEATURES_FORMAT, features_path
from havir.artifacts.prepared import FORMAT_VERSION as PREPARED_FORMAT
from havir.artifacts.prepared import prepared_record_path, reading_prepared, require_prepared
from havir.devices import resolve_device, resolve_dtype, smaller_batch_on_oom
from havir.distributed import processes
from havir.errors import InvalidInputError
from havir.io import MODEL_STACK, atomic_path, check_free_space, flush_h5, is_disk_full, open_h5, output_folder, package_versions
from havir.models.backbone import Backbone, checked_encoding, load_backbone
from havir.nsd.layout import check_subject
from havir.options import FEATURES_OPTIONS
from havir.nsd.stimuli import iter_stimuli
from havir.progress import track
from havir.targets import TARGET_NAMES, TARGETS, encoded_from, stored_bytes, target_shapes
from havir.validation import check_options, read_json

@dataclass(frozen=True)
class FeatureSettings:
    """What a features cache was computed with; a cache is resumed only with equal settings."""

    model: str
    dtype: str
    seed: int


def _read_prepared(data: Path, subject: int) -> tuple[np.ndarray, dict[int, list[str]], Path]:
    """All images the subject saw (sorted), their captions, and the NSD stimuli file."""
    prepared = require_prepared(data, subject, with_record=True)
    meta = read_json(prepared_record_path(data, subject), what="prepared subject's record", fix="run `havir prepare` again", keys=("nsd_root",))
    with reading_prepared(prepared) as h5:
        if h5.attrs.get("format_version") != PREPARED_FORMAT:
            raise InvalidInputError(
                f"{prepared} was written by another HAVIR version (format {h5.attrs.get('format_version')}, "
                f"this one reads {PREPARED_FORMAT}): run `havir prepare` again"
            )
        nsd_ids = np.union1d(h5["train/nsd_id"][()], h5["test/nsd_id"][()])
        caption_ids = h5["captions/nsd_id"][()]
        texts = h5["captions/text"].asstr()[()]
    captions: dict[int, list[str]] = {}
    for image, text in zip(caption_ids.tolist(), texts):
        captions.setdefault(image, []).append(text)
    uncaptioned = np.setdiff1d(nsd_ids, caption_ids)
    if uncaptioned.size:
        raise InvalidInputError(
            f"prepared file {prepared} has no caption for {uncaptioned.size} images (nsdId {uncaptioned[0]} first): "
            "run `havir prepare` again with complete COCO captions"
        )
    stimuli = Path(meta["nsd_root"]) / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    return nsd_ids, captions, stimuli


def compute_features(
    data: Path,
    subject: int,
    *,
    model: str = "shi-labs/versatile-diffusion",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 16,
    seed: int = 0,
    stimuli: Path | None = None,
    progress: bool = True,
) -> dict:
    """Compute and cache the targets of every image ``subject`` saw; returns the summary.

    The cache ``DATA/subjXX_features.h5`` holds ``nsd_id`` (n,), ``vae_latents`` (n, 4, 64, 64),
    ``clip_image`` (n, 257, D) and ``clip_text`` (n, 77, D), all float16, rows in ascending
    ``nsdId``. Work goes batch by batch into ``subjXX_features.h5.partial``; an interrupted run
    continues from the last finished batch (same settings) and the file is renamed when done.

    Parameters
    ----------
    data : folder written by ``havir prepare``.
    subject : NSD subject, 1..8.
    model : the backbone (see :func:`~havir.models.backbone.load_backbone`): a Versatile Diffusion
        folder or hub id, a built-in (``tiny``, ``demo``, ``full-random``), or another registered backbone.
    device : ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
    dtype : ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    batch_size : images per forward pass; lower it if the GPU runs out of memory.
    seed : seed of the random weights of the built-in models.
    stimuli : ``nsd_stimuli.hdf5`` (default: the one under the NSD root ``prepare`` read).
    """
    started = time.perf_counter()
    check_subject(subject)
    check_options(FEATURES_OPTIONS, batch_size=batch_size, seed=seed)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    nsd_ids, captions, default_stimuli = _read_prepared(data, subject)
    stimuli = Path(stimuli) if stimuli is not None else default_stimuli
    settings = FeatureSettings(model=str(model), dtype=str(torch_dtype).removeprefix("torch."), seed=seed)
    final = features_path(data, subject)
    partial = final.with_name(final.name + ".partial")
    if final.is_file() and _cached(final, settings, nsd_ids):
        return _summary(subject, nsd_ids, len(nsd_ids), settings, torch_device, final, started)
    backbone = load_backbone(model, device=torch_device, dtype=torch_dtype, seed=seed)
    launch = processes()
    row_bytes = stored_bytes(backbone.target_sizes)
    with output_folder(Path(data), lock=launch.is_main_process, scope=f"subj{subject:02d}"):
        try:
            resumed = _encode_into(partial, backbone, settings, subject, nsd_ids, captions, stimuli, batch_size, row_bytes, progress)
        except Exception as err:
            if is_disk_full(err):  # nothing to resume on a full disk: leave no partial file
                partial.unlink(missing_ok=True)
            raise
        if launch.is_main_process:
            with atomic_path(final) as temporary:
                partial.replace(temporary)
        launch.wait_for_everyone()
    return _summary(subject, nsd_ids, resumed, settings, torch_device, final, started)


def _cached(final: Path, settings: FeatureSettings, nsd_ids: np.ndarray) -> bool:
    """Whether ``final`` already holds these features (a damaged file does not: it is recomputed)."""
    try:
        with h5py.File(final, "r") as h5:
            return h5.attrs.get("settings") == json.dumps(settings.__dict__) and np.array_equal(h5["nsd_id"][()], nsd_ids)
    except (OSError, KeyError):
        return False


def _resumable(partial: Path, settings: FeatureSettings, nsd_ids: np.ndarray) -> bool:
    """Whether ``partial`` is an intact cache of these settings and images (else it is rebuilt).

    Every chunk of the finished rows is read, so a file damaged by a kill (a bad signature, a
    chunk that fails its checksum) is discarded instead of trusted.
    """
    try:
        with h5py.File(partial, "r") as h5:
            if h5.attrs.get("settings") != json.dumps(settings.__dict__) or not np.array_equal(h5["nsd_id"][()], nsd_ids):
                return False
            done = np.flatnonzero(h5["done"][()])
            for name in TARGET_NAMES:
                for start in range(0, len(done), 64):
                    h5[name][done[start : start + 64].tolist()]
        return True
    except (OSError, KeyError, ValueError):
        return False


def _encode_into(partial, backbone, settings, subject, nsd_ids, captions, stimuli, batch_size, row_bytes, progress) -> int:
    """Encode every image not yet done into ``partial``; returns how many were already done.

    The main process alone opens (and writes) the file; the others send it their batches.
    """
    launch = processes()
    todo = None
    if launch.is_main_process:
        if not _resumable(partial, settings, nsd_ids):
            partial.unlink(missing_ok=True)
        check_free_space(partial.parent, row_bytes * len(nsd_ids) - (partial.stat().st_size if partial.exists() else 0))
    with open_h5(partial, "a", needed=row_bytes * len(nsd_ids)) if launch.is_main_process else contextlib.nullcontext() as h5:
        if launch.is_main_process:
            if "done" not in h5:
                h5.attrs.update(settings=json.dumps(settings.__dict__), format_version=FEATURES_FORMAT, subject=subject,
                                versions=json.dumps(package_versions(*MODEL_STACK, "h5py")))
                h5["nsd_id"] = nsd_ids
                # Checksummed chunks: a chunk damaged by a kill fails its read instead of returning garbage.
                for name, shape in target_shapes(backbone.target_sizes).items():
                    h5.create_dataset(name, (len(nsd_ids), *shape), TARGETS[name].stored_dtype, chunks=(1, *shape), fletcher32=True)
                h5.create_dataset("done", (len(nsd_ids),), bool, fillvalue=False)
            todo = nsd_ids[~h5["done"][()]]
        todo = broadcast_object_list([todo])[0]
        # Each process encodes every N-th batch, exactly the batches one process would run (its
        # share is read as consecutive blocks of batch_size ids, all full but the very last).
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        share = iter_stimuli(stimuli, np.concatenate([todo[:0], *batches[launch.process_index :: launch.num_processes]]), block=batch_size)
        rounds = -(-len(batches) // launch.num_processes)
        for _ in track(range(rounds), f"subj{subject:02d}: features", total=rounds, enabled=progress and launch.is_main_process, unit="batches"):
            block = next(share, None)  # None: this process has no batch in the last round
            encoded = [] if block is None else [_encode_batch(backbone, *block, captions, batch_size)]
            written = []
            for ids, targets in gather_object(encoded):  # this round's batches, all processes'
                if launch.is_main_process:
                    rows = np.searchsorted(nsd_ids, ids).tolist()  # ascending, as h5py's fancy indexing requires
                    for name in TARGET_NAMES:
                        h5[name][rows] = targets[name]
                    written += rows
            if launch.is_main_process and written:
                flush_h5(h5)  # the rows reach the file before they are marked done
                h5["done"][sorted(written)] = True
                flush_h5(h5)
    return len(nsd_ids) - len(todo)


def _encode_batch(backbone: Backbone, ids: np.ndarray, images: np.ndarray, captions: dict[int, list[str]], batch_size: int):
    """(ids, {target: float16 array}) of one batch: the image targets of each image, and the text
    targets averaged over each image's captions."""
    texts = [text for image in ids.tolist() for text in captions[image]]
    with smaller_batch_on_oom(batch_size):
        encoded = checked_encoding(backbone, backbone.encode_images(images), "image", len(ids))
        per_caption = checked_encoding(backbone, backbone.encode_texts(texts), "text", len(texts))
    counts = torch.tensor([len(captions[image]) for image in ids.tolist()])
    owner = torch.repeat_interleave(torch.arange(len(ids)), counts)
    for name in encoded_from("text"):
        tokens = per_caption[name].float().cpu()
        mean = torch.zeros(len(ids), *tokens.shape[1:], dtype=torch.float32).index_add_(0, owner, tokens)
        encoded[name] = mean / counts.view(-1, *[1] * (tokens.dim() - 1))
    return ids, {name: encoded[name].float().cpu().numpy().astype(TARGETS[name].stored_dtype) for name in TARGET_NAMES}


def _summary(subject, nsd_ids, resumed, settings, device, path, started) -> dict:
    with h5py.File(path, "r") as h5:
        shapes = {name: list(h5[name].shape[1:]) for name in TARGET_NAMES}
    return {
        "subject": subject,
        "images": int(len(nsd_ids)),
        "resumed_from": int(resumed),
        "model": settings.model,
        "device": str(device),
        "dtype": settings.dtype,
        "shapes": shapes,
        "output": str(path),
        "seconds": round(time.perf_counter() - started, 3),
    }
