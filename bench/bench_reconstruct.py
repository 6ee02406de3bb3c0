"""Benchmark: reconstruction throughput (``havir reconstruct``) against a per-image loop and the
FLOP floor.

Times Versatile Diffusion's :meth:`~havir.models.versatile.VersatileDiffusion.generate` in fused mode (50-step DDIM schedule, strength
0.75: 37 denoising steps, guidance 7.5, so two UNet passes per step, then the VAE decode) on a
batch of random predictions, and its two stages alone (the sampler, the VAE decode); then the
same reconstruction one image at a time, as a plain diffusers-style loop runs it. Each is the
best of ``--repeats`` after a warm-up, with synchronised timers. Next to each: its FLOPs per image
(counted with ``torch.utils.flop_counter``) and the floor they set at the dense matmul rate
measured in the same run.

    python bench/bench_reconstruct.py [--model tiny|full-random] [--batch-size 8] [--repeats 3]

The model defaults to ``full-random`` (the released architecture) on CUDA and to ``tiny`` without
CUDA; the result file says which. Writes ``bench/results/reconstruct-<model>-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from _results import write_result
from havir.devices import matmul_rate, resolve_device, resolve_dtype, timed
from havir.models.versatile import load_versatile_diffusion
from havir.models.backbone import SamplerSettings, image_noise
from havir.models.sampling import decode, sample, unconditional_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: full-random on CUDA, tiny without")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = args.model or ("full-random" if device.type == "cuda" else "tiny")
    vd = load_versatile_diffusion(model, device=device, dtype=dtype)
    settings = SamplerSettings()  # 50 steps, strength 0.75, guidance 7.5, text share 0.4
    side, dim, n = vd.image_side // 8, vd.embedding_dim, args.batch_size
    generator = torch.Generator().manual_seed(0)
    ids = np.arange(n)
    latents = torch.randn(n, 4, side, side, generator=generator)
    image_embeds = torch.randn(n, 257, dim, generator=generator) * 0.05
    text_embeds = torch.randn(n, 77, dim, generator=generator) * 0.05
    noise = image_noise(ids, (4, side, side), settings.seed)
    unconditional = unconditional_embeddings(vd)

    stages = {  # each reconstructs the images of `rows`
        "sample": lambda rows: sample(vd, text_embeds[rows], image_embeds[rows], noise[rows], settings,
                                      start_latents=latents[rows], unconditional=unconditional),
        "decode": lambda rows: decode(vd, latents[rows]),
        "all": lambda rows: vd.generate({"vae_latents": latents[rows], "clip_image": image_embeds[rows],
                                         "clip_text": text_embeds[rows]}, ids[rows], mode="fused", settings=settings),
    }
    rate = matmul_rate(device, dtype)
    figures = {}
    for name, stage in stages.items():
        with FlopCounterMode(display=False) as counter:
            stage(slice(0, 1))
        flops = counter.get_total_flops()
        repeats = timed(lambda: stage(slice(0, n)), device, args.repeats)
        figures[name] = {
            "flops_per_image": flops,
            "seconds_per_batch": min(repeats),
            "seconds_per_batch_repeats": repeats,
            "images_per_second": n / min(repeats),
            "floor_images_per_second": rate / flops,
            "fraction_of_floor": n / min(repeats) / (rate / flops),
        }
    loop = timed(lambda: stages["all"](slice(0, 1)), device, args.repeats)
    batched = figures["all"]["images_per_second"]
    result = {
        "benchmark": "reconstruct: fused dual-guided img2img",
        "settings": {"model": model,
                     "model_chosen": "--model" if args.model else "default on CUDA" if device.type == "cuda" else "default without CUDA (CPU-sized)",
                     "dtype": str(dtype), "image_side": vd.image_side, "sampler": asdict(settings), "batch_size": n,
                     "repeats": args.repeats, "timer": "best of repeats after a warm-up, synchronised"},
        "matmul_flops_per_second": rate,
        "stages": figures,
        "images_per_second_batched": batched,
        "images_per_second_per_image_loop": 1 / min(loop),
        "per_image_loop_seconds_repeats": loop,
        "speedup_vs_loop": batched * min(loop),
        "flops_per_image": figures["all"]["flops_per_image"],
        "floor_images_per_second": figures["all"]["floor_images_per_second"],
        "fraction_of_floor": figures["all"]["fraction_of_floor"],
        "minutes_for_1000_images": 1000 / batched / 60,
    }
    for name, stage in figures.items():
        print(f"{name:7s} {stage['images_per_second']:8.3g} images/s, floor {stage['floor_images_per_second']:8.3g} "
              f"({stage['fraction_of_floor']:.0%}), {stage['flops_per_image'] / 1e9:.3g} GFLOP per image")
    for key in ("images_per_second_per_image_loop", "speedup_vs_loop", "minutes_for_1000_images"):
        print(f"{key}: {result[key]:.4g}")
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = args.out or Path(__file__).parent / "results" / f"reconstruct-{model}-{tag}-{datetime.date.today()}.json"
    write_result(out, result, device)


if __name__ == "__main__":
    main()
