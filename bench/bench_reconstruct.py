"""Benchmark: reconstruction throughput (``havir reconstruct``) against a per-image loop and the
FLOP floor.

Times :func:`havir.reconstruct.reconstruct_batch` in fused mode (50-step DDIM schedule, strength
0.75: 37 denoising steps, guidance 7.5, so two UNet passes per step, then the VAE decode) on
random predictions, batched, and the same sampler run one image at a time as a plain
diffusers-style loop does, in the same run. The floor: FLOPs of one image's reconstruction
(counted with ``torch.utils.flop_counter``) over the dense matmul rate measured in the run.

    python bench/bench_reconstruct.py [--model tiny|full-random] [--images 16] [--batch-size 16]

Writes ``bench/results/reconstruct-<model>-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import havir
from havir.devices import matmul_rate, resolve_device, resolve_dtype, synchronise
from havir.io import write_json
from havir.models.versatile import load_versatile_diffusion
from havir.reconstruct import SamplerSettings, reconstruct_batch, unconditional_embeddings




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loop-images", type=int, default=2, help="images timed in the per-image loop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    vd = load_versatile_diffusion(args.model, device=device, dtype=dtype)
    settings = SamplerSettings()  # 50 steps, strength 0.75, guidance 7.5, text share 0.4
    side, dim = vd.image_side // 8, vd.embedding_dim
    generator = torch.Generator().manual_seed(0)
    ids = np.arange(args.images)
    latents = torch.randn(args.images, 4, side, side, generator=generator)
    image_embeds = torch.randn(args.images, 257, dim, generator=generator) * 0.05
    text_embeds = torch.randn(args.images, 77, dim, generator=generator) * 0.05
    unconditional = unconditional_embeddings(vd)

    def run(rows):
        return reconstruct_batch(vd, "fused", settings, ids[rows], latents[rows], image_embeds[rows], text_embeds[rows], unconditional)

    run([0])  # warm-up
    synchronise(device)
    start = time.perf_counter()
    for first in range(0, args.images, args.batch_size):
        run(list(range(first, min(first + args.batch_size, args.images))))
    synchronise(device)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for row in range(args.loop_images):
        run([row])
    synchronise(device)
    loop = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        run([0])
    flops = counter.get_total_flops()
    rate = matmul_rate(device, dtype)
    result = {
        "benchmark": "reconstruct: fused dual-guided img2img",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"havir": havir.__version__, "torch": torch.__version__},
        "settings": {"model": args.model, "dtype": str(dtype), "image_side": vd.image_side, "sampler": asdict(settings),
                     "images": args.images, "batch_size": args.batch_size, "loop_images": args.loop_images},
        "images_per_second_batched": args.images / batched,
        "images_per_second_per_image_loop": args.loop_images / loop,
        "speedup_vs_loop": (args.images / batched) / (args.loop_images / loop),
        "flops_per_image": flops,
        "matmul_flops_per_second": rate,
        "floor_images_per_second": rate / flops,
        "fraction_of_floor": (args.images / batched) / (rate / flops),
        "minutes_for_1000_images": 1000 / (args.images / batched) / 60,
    }
    for key in ("images_per_second_batched", "images_per_second_per_image_loop", "speedup_vs_loop", "flops_per_image",
                "floor_images_per_second", "fraction_of_floor", "minutes_for_1000_images"):
        print(f"{key}: {result[key]:.4g}")
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = args.out or Path(__file__).parent / "results" / f"reconstruct-{args.model}-{tag}-{datetime.date.today()}.json"
    write_json(out, result)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
