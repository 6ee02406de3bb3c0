"""Benchmark: ``havir eval``'s eight metrics (PixCorr, SSIM, AlexNet 2 and 5, Inception, CLIP,
EffNet-B, SwAV) on N image pairs, their throughput and the slowest.

Scores N random 256-px reconstructions against N random 256-px ground truths under the MindEye2
preset with :func:`havir.metrics.evaluate.score_images`, the function ``havir eval`` runs, with
every protocol network at its real architecture and input size but random weights (nothing is
downloaded; the cost of a network does not depend on its weights). Network loading and a warm-up
on a few images are not timed; the timed run includes the bootstrap intervals.

    python bench/bench_eval.py [--images 16] [--batch-size 32] [--device auto] [--out FILE.json]
    python bench/bench_eval.py --images 1000 --batch-size 100 --device cuda   # the GPU goal

Reports images/s overall and per part (each pixel metric; each network, whose part holds its
images' preparation, features and scores: AlexNet's holds both of its metrics), the slowest
part, and the time for 1,000 images extrapolated linearly from N (the per-image work dominates;
the identification matrices grow as N^2 but are 1000 x 1000 at most), and the same for the pixel
metrics' parts alone, which run on the CPU (numpy, scikit-image) whatever the device, so bound
a GPU's time from below. Issue 19's goal: 1,000 images in under 60 s on one GPU; on a CPU the
figure is informational.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from _results import write_result  # noqa: E402

from havir.devices import resolve_device  # noqa: E402
from havir.metrics.evaluate import score_images  # noqa: E402
from havir.metrics.networks import load_protocol_network  # noqa: E402
from havir.metrics.protocols import MINDEYE2  # noqa: E402

NETWORKS = ("alexnet", "inception", "clip", "effnet", "swav")
SIDE = 256
SEED = 0
WARMUP_IMAGES = 2
GOAL_SECONDS_FOR_1000 = 60.0


def image_pairs(n: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, reconstructions), uint8 (n, side, side, 3): smooth random colour fields, each
    reconstruction its ground truth with noise added (so no correlation is degenerate)."""
    rng = np.random.default_rng(SEED)
    coarse = rng.random((n, 8, 8, 3)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(side, side),
                                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
    truth = np.clip(smooth * 255, 0, 255).astype(np.uint8)
    recon = np.clip(smooth * 255 + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)
    return truth, recon


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="image pairs scored (default 16; 1000 on a GPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per network batch, as `havir eval --batch-size` (default 32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/eval-<device>-<date>.json)")
    args = parser.parse_args(argv)
    if args.images < 2 or args.batch_size < 1:
        parser.error("--images must be at least 2 (identification compares pairs) and --batch-size at least 1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    started = time.perf_counter()
    networks = {name: load_protocol_network(name, random_weights=True) for name in NETWORKS}
    load_seconds = time.perf_counter() - started
    truth, recon = image_pairs(args.images, SIDE)
    score = dict(networks=networks, preset=MINDEYE2, metrics=MINDEYE2.metrics, device=device, batch_size=args.batch_size)
    score_images(truth[:WARMUP_IMAGES], recon[:WARMUP_IMAGES], **score)  # first-call costs (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timings: dict[str, float] = {}
    started = time.perf_counter()
    scores = score_images(truth, recon, timings=timings, **score)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if len(scores) != 8:
        raise AssertionError(f"expected the eight metrics, got {sorted(scores)}")

    metrics_of = {name: [m.name for m in MINDEYE2.metrics if m.network == name] for name in NETWORKS}
    parts = {
        part: {"seconds": t, "fraction_of_total": t / seconds, "images_per_second": args.images / t,
               "metrics": metrics_of.get(part, [part] if part in scores else [])}
        for part, t in sorted(timings.items(), key=lambda item: -item[1])
    }
    slowest = next(iter(parts))
    # PixCorr, SSIM and their resizes run on the CPU with numpy and scikit-image whatever the
    # device: on a GPU they remain, and bound the time for 1,000 images from below.
    cpu_seconds = sum(timings[part] for part in timings if part not in networks)
    print(f"{args.images} images at {SIDE} px on {device}: {seconds:.1f} s, {args.images / seconds:.3g} images/s; "
          f"1000 images ~ {1000 * seconds / args.images:.0f} s", flush=True)
    print(f"  of which the pixel metrics and their resizes (on the CPU whatever the device): "
          f"{cpu_seconds:.1f} s, 1000 images ~ {1000 * cpu_seconds / args.images:.0f} s")
    for part, figures in parts.items():
        print(f"  {part:13s} {figures['seconds']:8.2f} s  {figures['fraction_of_total']:6.1%}  "
              f"{figures['images_per_second']:8.3g} images/s  {', '.join(figures['metrics'])}")

    result = {
        "benchmark": "eval: the eight metrics of the MindEye2 preset, random-weight networks at their real sizes",
        "settings": {
            "images": args.images,
            "side": SIDE,
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "preset": MINDEYE2.name,
            "networks": {name: f"{net.label}, input {net.resize.size} px" for name, net in networks.items()},
            "warmup_images": WARMUP_IMAGES,
            "bootstrap_resamples": 1000,
        },
        "seconds": seconds,
        "images_per_second": args.images / seconds,
        "seconds_for_1000_images": 1000 * seconds / args.images,
        "extrapolated_from_images": args.images,
        "network_load_seconds": load_seconds,
        "parts": parts,
        "slowest_part": slowest,
        "pixel_parts_seconds_for_1000_images": 1000 * cpu_seconds / args.images,
        "goal": {"seconds_for_1000_images_max": GOAL_SECONDS_FOR_1000, "on": "one GPU",
                 "met": (1000 * seconds / args.images < GOAL_SECONDS_FOR_1000) if device.type == "cuda" else None},
    }
    out = args.out or BENCH_DIR / "results" / f"eval-{device.type}-{datetime.date.today().isoformat()}.json"
    write_result(out, result, device=device)


if __name__ == "__main__":
    main()
