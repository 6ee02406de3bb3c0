"""Versatile Diffusion's dual-guided sampler: how :class:`~havir.models.versatile.VersatileDiffusion`
generates images from predicted targets.

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
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.image_processor import VaeImageProcessor

from havir.errors import InvalidInputError
from havir.models.backbone import MODES, SCHEDULER_NAMES, SamplerSettings, image_noise
from havir.models.compat import set_text_share
from havir.models.encoding import encode_clip_images, encode_clip_texts

if TYPE_CHECKING:
    from havir.models.versatile import VersatileDiffusion

#: The schedulers the sampler can use (``SamplerSettings.scheduler``), each built from the model's own scheduler config.
SCHEDULERS = dict(zip(SCHEDULER_NAMES, (DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler)))


def unconditional_embeddings(vd: VersatileDiffusion) -> tuple[torch.Tensor, torch.Tensor]:
    """(text (1, 77, D), image (1, 257, D)): the embeddings of "" and of a mid-grey image.

    The grey image is uint8 128, so CLIP's processor rescales it once. (The diffusers pipeline
    passes float 0.5, which its processor rescales a second time, to near black.)
    """
    grey = np.full((1, vd.image_side, vd.image_side, 3), 128, dtype=np.uint8)
    return encode_clip_texts(vd, [""]), encode_clip_images(vd, grey)


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


def generate(
    vd: VersatileDiffusion,
    predictions: dict[str, torch.Tensor],
    nsd_ids: np.ndarray,
    *,
    mode: str,
    settings: SamplerSettings,
    unconditional: tuple[torch.Tensor, torch.Tensor] | None = None,
    candidate: int = 0,
) -> np.ndarray:
    """Images (n, side, side, 3) uint8 from one batch of predicted targets, in ``mode``."""
    if mode not in MODES:
        raise InvalidInputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    latents = predictions["vae_latents"]
    if mode == "structural":
        return decode(vd, latents)
    noise = image_noise(nsd_ids, tuple(latents.shape[1:]), settings.seed, candidate)
    start = latents if mode == "fused" else None
    out = sample(vd, predictions["clip_text"], predictions["clip_image"], noise, settings, start_latents=start,
                 unconditional=unconditional)
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
