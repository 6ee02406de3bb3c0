"""Benchmark: training-target throughput (``havir features``) against its FLOP floor.

For batches of synthetic 425x425 stimuli with five captions each, times the three encoders that
``havir features`` runs per image (VAE latent at the model's image side, CLIP image tokens, CLIP
text tokens for five captions), separately and together, after a warm-up, with synchronised
timers. Next to each: the FLOPs one image costs (counted by ``torch.utils.flop_counter``) and
the floor those FLOPs set at the matrix-multiply rate measured in the same run (bf16 on CUDA,
fp32 on CPU). The CPU-side preprocessing (PIL resizes in the VAE and CLIP processors) is timed
on its own, since on a GPU it can become the bottleneck.

    python bench/bench_features.py [--model tiny|full-random] [--device auto] [--dtype auto]
                                   [--batch-sizes 16,64] [--repeats 3]

The model defaults to ``full-random`` (the released architecture) on CUDA and to ``tiny`` without
CUDA, where the full model would take hours; the result file says which and why.

Writes ``bench/results/features-<model>-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from _results import write_result
from havir.devices import matmul_rate, resolve_device, resolve_dtype, timed
from havir.models.encoding import _as_pil, encode_clip_images, encode_clip_texts, encode_vae_latents
from havir.models.versatile import load_versatile_diffusion

CAPTIONS_PER_IMAGE = 5
STIMULUS_SIDE = 425  # NSD's stimuli


def flops_per_image(stage, images, texts) -> int:
    with FlopCounterMode(display=False) as counter:
        stage(images[:1], texts[:CAPTIONS_PER_IMAGE])
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: full-random on CUDA, tiny without")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = args.model or ("full-random" if device.type == "cuda" else "tiny")
    vd = load_versatile_diffusion(model, device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    largest = max(int(b) for b in args.batch_sizes.split(","))
    images = rng.integers(0, 256, size=(largest, STIMULUS_SIDE, STIMULUS_SIDE, 3), dtype=np.uint8)
    texts = [f"A photo of {i} red balls and a blue car on a beach at night." for i in range(largest * CAPTIONS_PER_IMAGE)]

    stages = {
        "vae_latents": lambda im, tx: encode_vae_latents(vd, im),
        "clip_image": lambda im, tx: encode_clip_images(vd, im),
        "clip_text": lambda im, tx: encode_clip_texts(vd, tx),
    }
    stages["all"] = lambda im, tx: [stage(im, tx) for name, stage in stages.items() if name != "all"]
    rate = matmul_rate(device, dtype)
    flops = {name: flops_per_image(stage, images, texts) for name, stage in stages.items()}

    results = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        batch, batch_texts = images[:batch_size], texts[: batch_size * CAPTIONS_PER_IMAGE]
        row = {}
        for name, stage in stages.items():
            repeats = timed(lambda: stage(batch, batch_texts), device, args.repeats)
            seconds = min(repeats)
            floor = flops[name] * batch_size / rate
            row[name] = {
                "seconds_per_batch": seconds,
                "seconds_per_batch_repeats": repeats,
                "images_per_second": batch_size / seconds,
                "floor_seconds_per_batch": floor,
                "fraction_of_floor": floor / seconds,
            }
        row["cpu_preprocessing_seconds_per_batch"] = min(timed(
            lambda: (vd.image_processor(images=_as_pil(batch), return_tensors="pt"), _as_pil(batch)), torch.device("cpu"), args.repeats
        ))
        results[str(batch_size)] = row
        all_rate = row["all"]["images_per_second"]
        print(
            f"batch {batch_size:4d}: {all_rate:8.1f} images/s (all targets), floor {batch_size / row['all']['floor_seconds_per_batch']:9.1f} "
            f"images/s; 10,000 images in {10_000 / all_rate / 60:.1f} min"
        )
        for name in ("vae_latents", "clip_image", "clip_text"):
            print(f"    {name:12s} {row[name]['images_per_second']:9.1f} images/s  ({row[name]['fraction_of_floor']:.0%} of the FLOP floor)")

    result = {
        "benchmark": "features: training-target throughput",
        "settings": {
            "model": model, "model_chosen": "--model" if args.model else "default on CUDA" if device.type == "cuda" else "default without CUDA (CPU-sized)", "dtype": str(dtype), "image_side": vd.image_side, "stimulus_side": STIMULUS_SIDE,
            "captions_per_image": CAPTIONS_PER_IMAGE, "repeats": args.repeats, "timer": "best of repeats after a warm-up, synchronised",
        },
        "matmul_flops_per_second": rate,
        "flops_per_image": flops,
        "by_batch_size": results,
    }
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = args.out or Path(__file__).parent / "results" / f"features-{model}-{tag}-{datetime.date.today()}.json"
    write_result(out, result, device)


if __name__ == "__main__":
    main()
