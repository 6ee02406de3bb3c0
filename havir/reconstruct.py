"""Dual-guided image-to-image reconstruction (``havir reconstruct``).

The sampler drives Versatile Diffusion's dual-guided UNet, its scheduler and its VAE directly
(the diffusers pipeline has no image-to-image start and takes no precomputed embeddings):

1. ``latents = scheduler.add_noise(z_struct, noise, t_start)``: the predicted structural latent
   noised to the step ``strength`` sets (strength 0.75 of 50 DDIM steps: the last 37 steps run);
   with strength 1 (or no structural latent) the start is pure noise.
2. For each remaining step ``t``: ``eps_u, eps_c = unet([x_t, x_t], t, [c_uncond, c])``, then
   ``eps = eps_u + guidance * (eps_c - eps_u)`` (classifier-free guidance), and
   ``x_{t-1} = scheduler.step(eps, t, x_t)``.
3. ``image = vae.decode(x_0 / scaling_factor)``.

Symbols: ``c`` = [text tokens (77) | image tokens (257)], the predicted embeddings; every dual
transformer mixes its text and image branches as ``text_share * text + (1 - text_share) * image``
(the pipeline's ``text_to_image_strength``); ``c_uncond`` = the embeddings of "" and of a
mid-grey image.

Modes (the paper's ablations): ``fused`` (the method), ``structural`` (VAE decode of the
predicted latent alone), ``semantic`` (no structural prior: strength 1 from noise).

Under ``accelerate launch`` the processes share out the batches (each batch is the one a single
process would run, and each image's noise comes from (seed, nsdId)), so the PNGs are those of a
single process; the main one writes the manifest once every image is written.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.image_processor import VaeImageProcessor

import havir
from havir.devices import resolve_device, resolve_dtype
from havir.distributed import processes
from havir.errors import InvalidInputError
from havir.features import encode_clip_images, encode_clip_texts, features_path
from havir.io import atomic_path, output_folder, write_json
from havir.models.compat import set_text_share
from havir.models.versatile import VersatileDiffusion, load_versatile_diffusion

MODES = ("fused", "structural", "semantic")
#: Written first into a reconstruction folder: what its PNGs are made with (checked on resume).
MADE_WITH = ".havir-reconstruct.json"
#: Schedulers the sampler can use, each built from the model's own scheduler config.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


@dataclass(frozen=True)
class SamplerSettings:
    """Settings of the sampler (Brain-Diffuser's defaults)."""

    steps: int = 50
    strength: float = 0.75
    guidance: float = 7.5
    text_share: float = 0.4
    eta: float = 0.0  # DDIM's stochasticity (0: deterministic); ignored by other schedulers
    seed: int = 0
    scheduler: str = "ddim"  # ddim, pndm, dpmsolver or euler

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def unconditional_embeddings(vd: VersatileDiffusion) -> tuple[torch.Tensor, torch.Tensor]:
    """(text (1, 77, D), image (1, 257, D)): the embeddings of "" and of a mid-grey image.

    The grey image is uint8 128, so CLIP's processor rescales it once. (The diffusers pipeline
    passes float 0.5, which its processor rescales a second time, to near black.)
    """
    grey = np.full((1, vd.image_side, vd.image_side, 3), 128, dtype=np.uint8)
    return encode_clip_texts(vd, [""]), encode_clip_images(vd, grey)


def image_noise(nsd_ids, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial noise of each image from (seed, nsdId) alone: float32 (n, *shape), the same
    whatever the batch, order or split of the work."""
    noises = []
    for nsd_id in np.asarray(nsd_ids).tolist():
        digest = hashlib.sha256(f"{seed}:{nsd_id}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        noises.append(torch.randn(shape, generator=generator))
    return torch.stack(noises)


@torch.no_grad()
def sample(
    vd: VersatileDiffusion,
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    noise: torch.Tensor,
    settings: SamplerSettings,
    start_latents: torch.Tensor | None = None,
    unconditional: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise to latents (n, 4, h, w), from ``start_latents`` noised per ``settings.strength``
    (or from ``noise`` alone when no start is given or strength is 1)."""
    device, dtype = vd.image_unet.device, vd.image_unet.dtype
    scheduler = SCHEDULERS[settings.scheduler].from_config(vd.scheduler.config)
    scheduler.set_timesteps(settings.steps, device=device)
    step_kwargs = {"eta": settings.eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    timesteps = scheduler.timesteps
    noise = noise.to(device=device, dtype=dtype)
    if start_latents is None or settings.strength >= 1.0:
        latents = noise * scheduler.init_noise_sigma
    else:
        n_run = min(int(settings.steps * settings.strength), settings.steps)  # as diffusers' img2img
        timesteps = timesteps[settings.steps - n_run :]
        start_latents = start_latents.to(device=device, dtype=dtype)
        if n_run == 0:
            return start_latents
        latents = scheduler.add_noise(start_latents, noise, timesteps[:1].repeat(len(noise)))
    text_uncond, image_uncond = unconditional if unconditional is not None else unconditional_embeddings(vd)
    n = len(noise)
    condition = torch.cat([text_embeds, image_embeds], dim=1).to(device=device, dtype=dtype)
    uncondition = torch.cat([text_uncond, image_uncond], dim=1).to(device=device, dtype=dtype).expand(n, -1, -1)
    embeddings = torch.cat([uncondition, condition])
    set_text_share(vd.image_unet, settings.text_share, text_embeds.shape[1], image_embeds.shape[1])
    for t in timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps_uncond, eps_cond = vd.image_unet(model_input, t, encoder_hidden_states=embeddings).sample.chunk(2)
        eps = eps_uncond + settings.guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents


@torch.no_grad()
def decode(vd: VersatileDiffusion, latents: torch.Tensor) -> np.ndarray:
    """VAE decode to uint8 images (n, side, side, 3)."""
    images = vd.vae.decode(latents.to(vd.vae.dtype) / vd.vae.config.scaling_factor).sample
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vd.vae.config.block_out_channels) - 1))
    return (processor.postprocess(images.float(), output_type="np") * 255).round().astype(np.uint8)


def reconstruct_batch(
    vd: VersatileDiffusion,
    mode: str,
    settings: SamplerSettings,
    nsd_ids: np.ndarray,
    latents: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    unconditional: tuple[torch.Tensor, torch.Tensor],
) -> np.ndarray:
    """Images (n, side, side, 3) uint8 for one batch of predictions, in ``mode``."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "structural":
        return decode(vd, latents)
    noise = image_noise(nsd_ids, tuple(latents.shape[1:]), settings.seed)
    start = latents if mode == "fused" else None
    out = sample(vd, text_embeds, image_embeds, noise, settings, start_latents=start, unconditional=unconditional)
    return decode(vd, out)


def write_images(out: Path, nsd_ids, images: np.ndarray) -> None:
    """One PNG per image, ``<nsdId>.png``, each written under a temporary name then renamed."""
    for nsd_id, image in zip(np.asarray(nsd_ids).tolist(), images):
        with atomic_path(out / f"{nsd_id}.png") as temporary:
            PIL.Image.fromarray(image).save(temporary, format="PNG")


def reconstruct(
    vd: VersatileDiffusion,
    predictions: dict[str, torch.Tensor],
    nsd_ids: np.ndarray,
    out: Path,
    *,
    mode: str = "fused",
    settings: SamplerSettings | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    provenance: dict | None = None,
) -> dict:
    """Reconstruct every image not already in ``out``; returns the ``--json`` summary.

    ``predictions`` holds ``vae_latents`` (n, 4, h, w), ``clip_image`` (n, 257, D) and
    ``clip_text`` (n, 77, D) for ``nsd_ids``; existing ``<nsdId>.png`` files are kept (resume).
    Under ``accelerate launch``, each process runs every N-th batch.
    """
    settings = settings or SamplerSettings()
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    launch = processes()
    order = np.argsort(nsd_ids)[: limit if limit is not None else None]
    # Batches are cut from the whole ordered list, not from what is left to do: a resumed run
    # computes every image in the batch it had in an uninterrupted run (same shapes, same float
    # rounding), so its PNGs are bit-identical; a batch with any image missing runs whole.
    batches = [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]
    unconditional = unconditional_embeddings(vd)
    made_with = {"mode": mode, "settings": asdict(settings), "vd": vd.source} | (provenance or {})
    with output_folder(Path(out), lock=launch.is_main_process) as out:
        _check_made_with(out, made_with)
        if launch.is_main_process:
            write_json(out / MADE_WITH, made_with)
        missing = {i for i in order.tolist() if not (out / f"{int(nsd_ids[i])}.png").exists()}
        launch.wait_for_everyone()  # every process has listed the images to do before any is written
        started = time.perf_counter()
        todo = [rows for rows in batches if missing.intersection(rows)]
        try:
            for rows in todo[launch.process_index :: launch.num_processes]:
                images = reconstruct_batch(
                    vd, mode, settings, nsd_ids[rows],
                    *(torch.as_tensor(predictions[name][rows]) for name in ("vae_latents", "clip_image", "clip_text")),
                    unconditional,
                )
                kept = [k for k, row in enumerate(rows) if row in missing]
                write_images(out, nsd_ids[rows][kept], images[kept])
        except BaseException:
            if launch.is_main_process and not any(out.glob("*.png")):  # nothing made: leave nothing
                (out / MADE_WITH).unlink(missing_ok=True)
            raise
        launch.wait_for_everyone()
        seconds = time.perf_counter() - started
        if launch.is_main_process:
            write_json(out / "manifest.json", {
                "mode": mode, "settings": asdict(settings), "images": [int(nsd_ids[i]) for i in order.tolist()],
                "batch_size": batch_size, "vd": vd.source, "havir_version": havir.__version__, "torch": torch.__version__,
            } | (provenance or {}))
    return {
        "n_images": len(order), "reconstructed": len(missing), "mode": mode, "seconds": round(seconds, 3),
        "images_per_second": round(len(missing) / seconds, 3) if missing and seconds > 0 else None,
        "output": str(out),
    }


def _check_made_with(out: Path, made_with: dict) -> None:
    """Refuse to add images to a folder whose PNGs were made with other settings (the kept PNGs
    and the new ones would be mixed under one manifest)."""
    record = next((p for p in (out / MADE_WITH, out / "manifest.json") if p.is_file()), None)
    if record is None or not any(out.glob("*.png")):
        return
    held = json.loads(record.read_text())
    differs = sorted(key for key in made_with if key in held and held[key] != made_with[key])
    if differs:
        raise InvalidInputError(
            f"{out} holds reconstructions made with another {', '.join(differs)}: choose another --out, "
            "or delete its PNGs to make them again"
        )


def predict_test_set(run: Path, device: torch.device) -> tuple[np.ndarray, dict[str, torch.Tensor], dict]:
    """Predictions of a trained run for its subject's test images (repetition averages).

    Returns (nsd_ids (n,), {"vae_latents", "clip_image", "clip_text"} tensors, the run's record).
    """
    from havir.models.decoders import SemanticExtractor, StructuralGenerator
    from havir.models.ridge import RidgeDecoder
    from havir.train import load_test_data

    record_path = Path(run) / "summary.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{run} holds no finished training run (no summary.json): run `havir train` first")
    record = json.loads(record_path.read_text()) | json.loads((Path(run) / "run.json").read_text())
    test = load_test_data(Path(record["data"]), record["subject"])
    with torch.no_grad():
        if record["model"] == "ridge":
            ridge = RidgeDecoder.from_pretrained(Path(run) / "ridge", device=str(device))
            predicted = ridge.predict(np.concatenate([test.structural, test.semantic], axis=1))
            predictions = {name: torch.as_tensor(value) for name, value in predicted.items()}
        else:
            structural = StructuralGenerator.from_pretrained(Path(run) / "structural", use_safetensors=True).to(device).eval()
            semantic = SemanticExtractor.from_pretrained(Path(run) / "semantic", use_safetensors=True).to(device).eval()
            image_tokens, text_tokens = semantic(torch.as_tensor(test.semantic, device=device))
            predictions = {
                "vae_latents": structural(torch.as_tensor(test.structural, device=device)).float().cpu(),
                "clip_image": image_tokens.float().cpu(),
                "clip_text": text_tokens.float().cpu(),
            }
    return test.nsd_id, predictions, record


def reconstruct_run(
    run: Path,
    out: Path,
    *,
    mode: str = "fused",
    settings: SamplerSettings | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Reconstruct a trained run's test images into ``out`` (``<nsdId>.png`` + ``manifest.json``).

    The Versatile Diffusion used is the one the run's features came from (same weights seed).
    """
    torch_device = resolve_device(device)
    nsd_ids, predictions, record = predict_test_set(run, torch_device)
    with h5py.File(features_path(Path(record["data"]), record["subject"]), "r") as h5:
        features = json.loads(h5.attrs["settings"])
    vd = load_versatile_diffusion(features["model"], device=torch_device, dtype=resolve_dtype(dtype, torch_device), seed=features["seed"])
    return reconstruct(
        vd, predictions, nsd_ids, Path(out), mode=mode, settings=settings, batch_size=batch_size, limit=limit,
        provenance={"run": str(Path(run).resolve()), "subject": record["subject"], "model": record["model"]},
    )
