"""Train the demo's scene probe (background type and object kinds) on rendered scenes (minutes, 1 CPU thread).

The probe (:mod:`havir.demo_world.probe`) gives the demo its content accuracy and object-kind F1,
DEMO MEASURES, never protocol metrics. Recipe: every step draws a fresh batch of scenes
(:func:`havir.nsd.scenes.sample_scene`, so there is no training set to overfit), renders each at
64 or 128 pixels (the demo's stimulus and reconstruction sides), resizes it to the probe's 64
with antialiasing and degrades it as reconstructions are degraded (Gaussian blur of random width,
pixel noise, a small brightness and contrast change), then takes an AdamW step on three losses:
cross-entropy of the background; binary cross-entropy of each object kind, read as the maximum
of its logit map; and, so that the shape detectors are found in hundreds of steps rather than
thousands, binary cross-entropy of each kind's logit map against the cell holding each object's
centre (the generator knows where it drew them). One-cycle learning-rate schedule.
It is short enough not to need resuming: about 10 minutes on one free CPU thread (measured; see the
``training`` record in the saved config.json). The held-out accuracy on clean renders of
scenes from another seed, in fp16 as shipped, is written into the config.

    OMP_NUM_THREADS=1 python scripts/train_scene_probe.py [--steps 4000] [--batch-size 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import havir  # noqa: F401  first: lets torchvision import beside CPU torch (havir/_torchvision.py)
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from havir.demo_world.probe import KIND_NAMES, PROBE_WEIGHTS, SceneProbe, content_scores, scene_labels
from havir.io import package_versions
from havir.metrics.protocols import Resize, resize
from havir.nsd.scenes import render_scene, sample_scene

HELD_OUT_SEED = 10_000  # added to --seed: the held-out scenes come from another stream
#: Weight of an object's centre cell in the map loss: about one cell in 200 holds one.
CENTRE_WEIGHT = torch.tensor(30.0)


def object_maps(scenes, grid: int) -> torch.Tensor:
    """Where each kind's objects are: float (n, 8, grid, grid), 1 in the cell of each object's centre."""
    maps = torch.zeros(len(scenes), len(KIND_NAMES), grid, grid)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            maps[i, KIND_NAMES.index(obj.kind), min(int(obj.y * grid), grid - 1), min(int(obj.x * grid), grid - 1)] = 1.0
    return maps


def rendered_batch(rng: np.random.Generator, n: int, side: int, degrade: bool):
    """``n`` fresh scenes as pixels (n, 3, side, side) in [0, 1], their labels and the scenes."""
    scenes = [sample_scene(rng) for _ in range(n)]
    pixels = []
    for scene in scenes:
        rendered = render_scene(scene, int(rng.choice([64, 128])) if degrade else side)
        pixels.append(resize(np.array(rendered[None]), Resize(side, "tensor", antialias=True))[0])  # a writable copy for torch
    pixels = torch.stack(pixels)
    if degrade:
        for i in range(n):
            sigma = float(rng.uniform(0.01, 1.0))
            pixels[i] = gaussian_blur(pixels[i], kernel_size=7, sigma=sigma)
        gain = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1))).float()
        offset = torch.from_numpy(rng.uniform(-0.08, 0.08, (n, 1, 1, 1))).float()
        noise = torch.from_numpy(rng.normal(0, 1, pixels.shape) * rng.uniform(0, 0.05, (n, 1, 1, 1))).float()
        pixels = (pixels * gain + offset + noise).clamp(0, 1)
    return pixels, scene_labels(scenes), scenes


def held_out_scores(probe: SceneProbe, pixels: torch.Tensor, labels) -> dict:
    probe.eval()
    with torch.no_grad():
        read = probe.read(pixels.permute(0, 2, 3, 1).numpy())
    probe.train()
    scores = content_scores(labels, read)
    return {"background_accuracy": round(float(scores["background_correct"].mean()), 4),
            "object_kind_f1": round(float(scores["object_kind_f1"].mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=1000, help="held-out scenes to measure accuracy on")
    parser.add_argument("--out", type=Path, default=PROBE_WEIGHTS)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    probe = SceneProbe()
    side = probe.config["side"]
    held_pixels, held_labels, _ = rendered_batch(np.random.default_rng(HELD_OUT_SEED + args.seed), args.held_out, side, degrade=False)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    started = time.perf_counter()
    probe.train()
    for step in range(1, args.steps + 1):
        pixels, labels, scenes = rendered_batch(rng, args.batch_size, side, degrade=True)
        background_logits, kind_maps = probe(pixels)
        loss = (
            F.cross_entropy(background_logits, torch.from_numpy(labels.background))
            + F.binary_cross_entropy_with_logits(kind_maps.amax(dim=(2, 3)), torch.from_numpy(labels.kinds).float())
            + F.binary_cross_entropy_with_logits(kind_maps, object_maps(scenes, kind_maps.shape[-1]), pos_weight=CENTRE_WEIGHT)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            shown = min(200, args.held_out)
            scores = held_out_scores(probe, held_pixels[:shown], held_labels.take(np.arange(shown)))
            print(f"step {step}: loss {loss.item():.4f}, held-out ({shown}) {scores} ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    probe.eval()
    float32_scores = held_out_scores(probe, held_pixels, held_labels)
    probe.save_pretrained(args.out)
    shipped = SceneProbe.from_pretrained(args.out)  # fp16 weights read back as float32
    record = {
        "demo_measure": "DEMO MEASURE, not a protocol metric: reads synthetic scenes only",
        "training": {
            "script": "scripts/train_scene_probe.py", "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
            "device": "cpu", "versions": package_versions("torch", "numpy"),
        },
        "held_out": {
            "scenes": args.held_out, "seed": HELD_OUT_SEED + args.seed, "side": side, "degraded": False,
            "float32": float32_scores, "fp16_as_shipped": held_out_scores(shipped, held_pixels, held_labels),
        },
    }
    probe.save_pretrained(args.out, extra=record)
    print(f"saved to {args.out}: {record['held_out']}", flush=True)


if __name__ == "__main__":
    main()
