"""Train the demo's small AutoencoderKL on the synthetic scene generator (minutes on one GPU).

With random weights the ``tiny`` Versatile Diffusion's VAE decodes latents into noise, so a
newcomer's demo pictures would mean nothing. This trains a 128x128, 8x-downsampling
AutoencoderKL (4x16x16 latents) on freshly rendered procedural scenes (:mod:`havir.nsd.scenes`),
with an L1 + MSE reconstruction loss and a small KL term, then sets its scaling factor to
1 / std of its latents (as Stable Diffusion's 0.18215 was chosen) and saves it in fp16
(diffusers layout) under ``havir/models/weights/demo-vd/vae``.

    python scripts/train_demo_vae.py [--steps 1500] [--batch-size 16] [--seed 0] [--max-minutes 60]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import havir  # noqa: F401  first: lets transformers import torchvision beside CPU torch (havir/_torchvision.py)
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from havir.nsd.scenes import render_scene, sample_scene

SIDE = 128
OUT = Path(__file__).resolve().parent.parent / "havir/models/weights/demo-vd/vae"


def batch_of_scenes(rng: np.random.Generator, n: int) -> torch.Tensor:
    images = np.stack([render_scene(sample_scene(rng), SIDE) for _ in range(n)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [-1, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=60.0, help="stop early (and save) after this long")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=SIDE,
    ).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    held_out = batch_of_scenes(np.random.default_rng(10_000 + args.seed), 32).to(device)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        images = batch_of_scenes(rng, args.batch_size).to(device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + args.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                mse = F.mse_loss(vae.decode(vae.encode(held_out).latent_dist.mode()).sample, held_out).item()
            print(f"step {step}: loss {loss.item():.4f}, held-out MSE {mse:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if time.perf_counter() - started > 60 * args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    with torch.no_grad():
        latents = torch.cat([vae.encode(batch_of_scenes(rng, 32).to(device)).latent_dist.mode() for _ in range(4)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 4))
    vae.to("cpu", torch.float16).save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out} (scaling factor {vae.config.scaling_factor}, held-out MSE {mse:.4f})")


if __name__ == "__main__":
    main()
