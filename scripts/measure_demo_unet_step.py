"""Measure one training step of the demo's dual UNet on CPU: the sizing run of docs/miniature-vd.md.

Not the training script (that is the next slice of issue 20): it runs a few steps of the planned
recipe, so that its cost is measured, not guessed. Each step draws fresh scenes, encodes them as
``havir.features`` does (demo VAE latents of the 128-pixel render; miniature-CLIP image tokens of
the 64-pixel stimulus, text tokens of one caption), then trains one flow, alternating:
text-to-image (``set_text_share 1``: text tokens, the null image) and image variation (share 0:
image tokens, the null text), with the condition replaced by the sampler's unconditional
embeddings (``havir.models.sampling.unconditional_embeddings``) for 10% of the images; epsilon
prediction, MSE, timesteps uniform over the scheduler's 1000. Prints the mean seconds per batch
for the data (VAE + CLIP) and for the UNet step.

    OMP_NUM_THREADS=1 python scripts/measure_demo_unet_step.py [--steps 60] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

import havir  # noqa: F401  first: lets transformers import torchvision beside CPU torch (havir/_torchvision.py)
import numpy as np
import torch
import torch.nn.functional as F

from havir.demo_world.clip import load_demo_clip
from havir.models.encoding import encode_clip_images, encode_clip_texts, encode_vae_latents
from havir.models.compat import set_text_share
from havir.models.versatile import load_versatile_diffusion
from havir.nsd.scenes import describe_scene, render_scene, sample_scene
from havir.models.sampling import unconditional_embeddings

CONDITION_DROPOUT = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vd = load_versatile_diffusion("demo")
    clip = load_demo_clip()
    vd.tokenizer, vd.image_processor, vd.text_encoder, vd.image_encoder = clip.tokenizer, clip.image_processor, clip.text_encoder, clip.image_encoder
    text_null, image_null = unconditional_embeddings(vd)
    unet = vd.image_unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    data_seconds = unet_seconds = 0.0
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        scenes = [sample_scene(rng) for _ in range(args.batch_size)]
        with torch.no_grad():
            latents = encode_vae_latents(vd, np.stack([render_scene(s, vd.image_side) for s in scenes]))
            image = encode_clip_images(vd, np.stack([render_scene(s, 64) for s in scenes]))
            text = encode_clip_texts(vd, [describe_scene(s, rng, n_captions=1)[0] for s in scenes])
        encoded = time.perf_counter()
        text_flow = step % 2 == 0
        dropped = torch.from_numpy(rng.random(args.batch_size) < CONDITION_DROPOUT).view(-1, 1, 1)
        if text_flow:
            text, image = torch.where(dropped, text_null, text), image_null.expand_as(image)
        else:
            text, image = text_null.expand_as(text), torch.where(dropped, image_null, image)
        set_text_share(unet, 1.0 if text_flow else 0.0)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, vd.scheduler.config.num_train_timesteps, (args.batch_size,))
        noisy = vd.scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=torch.cat([text, image], dim=1)).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        data_seconds += encoded - started
        unet_seconds += time.perf_counter() - encoded
        if step % 10 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f}; data {data_seconds / step:.2f} s/batch, "
                  f"UNet {unet_seconds / step:.2f} s/step (batch {args.batch_size}, {torch.get_num_threads()} thread)", flush=True)


if __name__ == "__main__":
    main()
