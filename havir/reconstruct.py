"""Dual-guided image-to-image reconstruction (``havir reconstruct``).

The sampler drives Versatile Diffusion's dual-guided UNet, its scheduler and its VAE directly
(the diffusers pipeline has no image-to-image start and takes no precomputed embeddings):

1. ``latents = scheduler.add_noise(z_struct, noise, t_noise)``: the predicted structural latent
   noised (``sqrt(abar_t) z + sqrt(1 - abar_t) eps``), then the last ``int(steps * strength)``
   steps run (strength 0.75 of 50 DDIM steps: 37 steps, from t = 721). Where ``t_noise`` lies is
   the ``img2img_start`` setting: ``"diffusers"`` (img2img pipelines) noises to the first step
   that runs, t = 721; ``"brain-diffuser"`` (its ``stochastic_encode(z, 37)``) noises one step
   further, to ``ddim_timesteps[37]`` = 741 (abar 0.0604 against 0.0705), then denoises the same
   37 steps from t = 721. With strength 1 (or no structural latent) the start is pure noise.
   The scheduler never clips or thresholds its predicted clean latent unless a setting says so:
   released folders ship a PNDM config without ``clip_sample``, which DDIM would read as
   ``clip_sample=True`` and clamp every latent to [-1, 1]; Brain-Diffuser's sampler never clips.
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
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.image_processor import VaeImageProcessor
from safetensors import SafetensorError

import havir
from havir.artifacts.dataset import load_test_data, ridge_voxels
from havir.artifacts.features_cache import features_path, features_settings
from havir.artifacts.run import load_decoders, read_finished_run
from havir.devices import resolve_device, resolve_dtype, smaller_batch_on_oom
from havir.distributed import processes
from havir.errors import InvalidInputError
from havir.io import MODEL_STACK, atomic_path, output_folder, package_versions, write_json
from havir.options import MODES, RECONSTRUCT_OPTIONS, SAMPLER_NUMBERS
from havir.progress import progress_report
from havir.models.compat import set_text_share
from havir.models.encoding import encode_clip_images, encode_clip_texts
from havir.models.versatile import VersatileDiffusion, load_versatile_diffusion
from havir.targets import TARGET_NAMES
from havir.validation import OneOf, Rule, check_options, check_values, option_name

#: Written first into a reconstruction folder: what its PNGs are made with (checked on resume).
MADE_WITH = ".havir-reconstruct.json"
#: Schedulers the sampler can use, each built from the model's own scheduler config.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


#: Where an image-to-image start noises the structural latent (see the module docstring).
IMG2IMG_STARTS = ("diffusers", "brain-diffuser")


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
    img2img_start: str = "diffusers"  # where the structural latent is noised to: diffusers or brain-diffuser
    clip_sample: bool = False  # clamp the predicted clean latent to [-1, 1] (schedulers that can)
    thresholding: bool = False  # dynamic thresholding of the predicted clean latent (schedulers that can)

    #: Allowed values; named as ``havir reconstruct``'s options in messages.
    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        **SAMPLER_NUMBERS,
        "scheduler": OneOf(*SCHEDULERS),
        "img2img_start": OneOf(*IMG2IMG_STARTS),
        "clip_sample": OneOf(True, False),
        "thresholding": OneOf(True, False),
    }

    def __post_init__(self):
        check_values(asdict(self), self.CONSTRAINTS, name=option_name)


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


def build_scheduler(config, settings: SamplerSettings):
    """The sampler's scheduler from a model's scheduler ``config``, with clipping and thresholding
    as ``settings`` say (off by default), whatever the config says or omits."""
    scheduler_class = SCHEDULERS[settings.scheduler]
    accepted = inspect.signature(scheduler_class.__init__).parameters
    overrides = {name: getattr(settings, name) for name in ("clip_sample", "thresholding") if name in accepted}
    return scheduler_class.from_config(config, **overrides)


def img2img_timesteps(scheduler, settings: SamplerSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(timesteps that run, the timestep the start is noised to) of an image-to-image start.

    ``scheduler`` has had ``set_timesteps(settings.steps)``. The last ``int(steps * strength)``
    steps run (diffusers' img2img); ``"diffusers"`` noises to the first of them,
    ``"brain-diffuser"`` to the step before it (``stochastic_encode(z, t_enc)`` takes
    ``ddim_timesteps[t_enc]``, then ``decode`` runs ``ddim_timesteps[:t_enc]`` from the top).
    The noise timestep is None when no step runs.
    """
    n_run = min(int(settings.steps * settings.strength), settings.steps)
    first = settings.steps - n_run
    timesteps = scheduler.timesteps[first:]
    if n_run == 0:
        return timesteps, None
    noise_index = first - 1 if settings.img2img_start == "brain-diffuser" and first > 0 else first
    return timesteps, scheduler.timesteps[noise_index]


def noised_start(scheduler, settings: SamplerSettings, start_latents: torch.Tensor, noise: torch.Tensor):
    """(timesteps that run, the first latents): ``start_latents`` noised per ``settings``."""
    timesteps, noise_timestep = img2img_timesteps(scheduler, settings)
    if noise_timestep is None:
        return timesteps, start_latents
    return timesteps, scheduler.add_noise(start_latents, noise, noise_timestep.repeat(len(noise)))


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
    scheduler = build_scheduler(vd.scheduler.config, settings)
    scheduler.set_timesteps(settings.steps, device=device)
    step_kwargs = {"eta": settings.eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    noise = noise.to(device=device, dtype=dtype)
    if start_latents is None or settings.strength >= 1.0:
        timesteps = scheduler.timesteps
        latents = noise * scheduler.init_noise_sigma
    else:
        start_latents = start_latents.to(device=device, dtype=dtype)
        timesteps, latents = noised_start(scheduler, settings, start_latents, noise)
        if len(timesteps) == 0:
            return start_latents
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
        raise InvalidInputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "structural":
        return decode(vd, latents)
    noise = image_noise(nsd_ids, tuple(latents.shape[1:]), settings.seed)
    start = latents if mode == "fused" else None
    out = sample(vd, text_embeds, image_embeds, noise, settings, start_latents=start, unconditional=unconditional)
    return decode(vd, out)


def schedule_record(vd: VersatileDiffusion, settings: SamplerSettings, mode: str) -> dict:
    """What the sampler ran, for the manifest: scheduler class and clipping, timesteps, the
    image-to-image start (noised to which timestep, first denoising timestep)."""
    if mode == "structural":
        return {"denoising_steps": 0}
    scheduler = build_scheduler(vd.scheduler.config, settings)
    scheduler.set_timesteps(settings.steps)
    record = {"scheduler": type(scheduler).__name__, "clip_sample": bool(scheduler.config.get("clip_sample", False)),
              "thresholding": bool(scheduler.config.get("thresholding", False))}
    if mode == "semantic" or settings.strength >= 1.0:
        return record | {"start": "noise", "denoising_steps": len(scheduler.timesteps),
                         "first_timestep": int(scheduler.timesteps[0])}
    timesteps, noise_timestep = img2img_timesteps(scheduler, settings)
    return record | {
        "start": settings.img2img_start, "denoising_steps": len(timesteps),
        "noised_to_timestep": None if noise_timestep is None else int(noise_timestep),
        "first_timestep": int(timesteps[0]) if len(timesteps) else None,
    }


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
    progress: bool = True,
) -> dict:
    """Reconstruct every image not already in ``out``; returns the ``--json`` summary.

    ``predictions`` holds ``vae_latents`` (n, 4, h, w), ``clip_image`` (n, 257, D) and
    ``clip_text`` (n, 77, D) for ``nsd_ids``; existing ``<nsdId>.png`` files are kept (resume).
    Under ``accelerate launch``, each process runs every N-th batch. ``progress`` reports the
    images done on stderr (see :func:`havir.progress.progress_report`).
    """
    settings = settings or SamplerSettings()
    check_options(RECONSTRUCT_OPTIONS, mode=mode, limit=limit, batch_size=batch_size)
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
        mine = todo[launch.process_index :: launch.num_processes]
        try:
            with progress_report(f"{mode} reconstructions", sum(map(len, mine)), unit="images",
                                 enabled=progress and launch.is_main_process) as report:
                for rows in mine:
                    with smaller_batch_on_oom(batch_size):
                        images = reconstruct_batch(
                            vd, mode, settings, nsd_ids[rows],
                            *(torch.as_tensor(predictions[name][rows]) for name in TARGET_NAMES),
                            unconditional,
                        )
                    kept = [k for k, row in enumerate(rows) if row in missing]
                    write_images(out, nsd_ids[rows][kept], images[kept])
                    report.advance(len(rows))
        except BaseException:
            if launch.is_main_process and not any(out.glob("*.png")):  # nothing made: leave nothing
                (out / MADE_WITH).unlink(missing_ok=True)
            raise
        launch.wait_for_everyone()
        seconds = time.perf_counter() - started
        if launch.is_main_process:
            write_json(out / "manifest.json", {
                "mode": mode, "settings": asdict(settings), "schedule": schedule_record(vd, settings, mode),
                "images": [int(nsd_ids[i]) for i in order.tolist()],
                "batch_size": batch_size, "vd": vd.source, "havir_version": havir.__version__, "torch": torch.__version__,
                "versions": package_versions(*MODEL_STACK, "pillow"), "threads": torch.get_num_threads(),
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

    Returns (nsd_ids (n,), {target name: tensor} for every target of :mod:`havir.targets`, the run's record).
    """
    from havir.models.ridge import RidgeDecoder

    fix = "run `havir train` again into a new --out"
    record = read_finished_run(run)
    test = load_test_data(Path(record["data"]), record["subject"])
    with torch.no_grad():
        if record["model"] == "ridge":
            try:
                ridge = RidgeDecoder.from_pretrained(Path(run) / "ridge", device=str(device))
            except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:  # missing, damaged or not JSON
                raise InvalidInputError(
                    f"ridge decoder in {Path(run) / 'ridge'} cannot be loaded ({type(err).__name__}: {err}): {fix}"
                ) from err
            predicted = ridge.predict(ridge_voxels(test, record.get("ridge", {}).get("inputs", "sets")))
            predictions = {name: torch.as_tensor(value) for name, value in predicted.items()}
        else:
            decoders = load_decoders(run, device)
            predicted = {}
            for role, decoder in decoders.items():  # each reads its own voxels (see havir.targets)
                predicted |= decoder.predict(torch.as_tensor(getattr(test, role), device=device))
            predictions = {name: value.float().cpu() for name, value in predicted.items()}
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
    progress: bool = True,
) -> dict:
    """Reconstruct a trained run's test images into ``out`` (``<nsdId>.png`` + ``manifest.json``).

    The Versatile Diffusion used is the one the run's features came from (same weights seed).
    """
    check_options(RECONSTRUCT_OPTIONS, mode=mode, limit=limit, batch_size=batch_size)  # before any work
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    nsd_ids, predictions, record = predict_test_set(run, torch_device)
    features = features_settings(features_path(Path(record["data"]), record["subject"]))
    vd = load_versatile_diffusion(features["model"], device=torch_device, dtype=torch_dtype, seed=features["seed"])
    return reconstruct(
        vd, predictions, nsd_ids, Path(out), mode=mode, settings=settings, batch_size=batch_size, limit=limit,
        provenance={"run": str(Path(run).resolve()), "subject": record["subject"], "model": record["model"]},
        progress=progress,
    )
