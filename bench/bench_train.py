"""Benchmark: training throughput of both decoders (``havir train``) against its FLOP floor.

Runs :func:`havir.train.fit_decoders` itself on random data of a given size (the data's content
does not change the cost), for a few epochs, and reads each epoch's wall time (training steps and
validation) and the checkpoint's time from the run's ``metrics.jsonl``. The floor:
FLOPs of one training step (forward and backward of both decoders, counted with
``torch.utils.flop_counter``) times the steps of an epoch, over the dense matmul rate measured
in the same run.

    python bench/bench_train.py --size tiny                 # CPU: tiny decoders, synthetic-NSD size
    python bench/bench_train.py --size realistic            # GPU: paper decoders, one real subject

Without ``--size`` it is ``realistic`` on CUDA and ``tiny`` without (the result file says which).
The first epoch is the warm-up; the others are the repetitions (their times come after the
epoch's losses are read back, so they are synchronised).

``realistic``: 15,724 structural and 15,724 semantic voxels (subject 1's nsdgeneral count for
each, an upper bound), 9,000 training images x 3 trials, targets of the released model
(4x64x64 latents, 257x768 and 77x768 tokens). Writes ``bench/results/train-<size>-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from _results import write_result
from havir.devices import matmul_rate, resolve_device
from havir.train import Decoders, Split, TrainConfig, TrainingData, _losses, _tensors, build_decoders, fit_decoders

SIZES = {
    # samples, structural voxels, semantic voxels, latent (c, s), tokens dim, preset
    "tiny": dict(images=180, trials=3, structural=1100, semantic=1100, latent=(4, 16), dim=32, preset="tiny", epochs=5),
    "realistic": dict(images=9000, trials=3, structural=15724, semantic=15724, latent=(4, 64), dim=768, preset="paper", epochs=3),
}


def random_split(n: int, size: dict, rng: np.random.Generator) -> Split:
    channels, side = size["latent"]

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    return Split(
        structural=normal(n, size["structural"]), semantic=normal(n, size["semantic"]),
        vae_latents=normal(n, channels, side, side), clip_image=normal(n, 257, size["dim"]) * 0.1,
        clip_text=normal(n, 77, size["dim"]) * 0.1, nsd_id=np.arange(n),
    )



def step_flops(data: TrainingData, config: TrainConfig, device: torch.device) -> int:
    """FLOPs of one training step (forward + backward, one batch) of both decoders."""
    structural, semantic = build_decoders(data, config)
    structural.to(device)
    semantic.to(device)
    batch = {k: v[: config.batch_size] for k, v in _tensors(data.val, device).items()}
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        losses = _losses(Decoders(structural, semantic), batch, config)
        (losses["structural"] + losses["semantic"]).backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default=None, help="default: realistic on CUDA, tiny without")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    size_name = args.size or ("realistic" if device.type == "cuda" else "tiny")
    size = SIZES[size_name]
    epochs = args.epochs or size["epochs"]
    config = TrainConfig(preset=size["preset"], epochs=epochs, batch_size=args.batch_size)

    rng = np.random.default_rng(0)
    n_fit = size["images"] * size["trials"]
    data = TrainingData(fit=random_split(n_fit, size, rng), val=random_split(max(64, size["images"] // 10), size, rng),
                        test=random_split(64, size, rng))
    rate = matmul_rate(device)
    flops = step_flops(data, config, device)
    steps_per_epoch = -(-n_fit // config.batch_size)
    with tempfile.TemporaryDirectory() as run:
        started = time.perf_counter()
        fit_decoders(data, config, Path(run), device, progress=False)
        total = time.perf_counter() - started
        epochs_run = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    steady = epochs_run[1:] or epochs_run  # the first epoch includes warm-up
    epoch_seconds = float(np.mean([e["seconds"] for e in steady]))
    checkpoint_seconds = float(np.mean([e["checkpoint_seconds"] for e in epochs_run if "checkpoint_seconds" in e]))
    floor = flops * steps_per_epoch / rate
    samples_per_second = n_fit / epoch_seconds
    result = {
        "benchmark": "train: both decoders, fit_decoders",
        "settings": {"size": size_name,
                     "size_chosen": "--size" if args.size else "default on CUDA" if device.type == "cuda" else "default without CUDA (CPU-sized)",
                     **{k: v for k, v in size.items() if k != "epochs"}, "epochs": epochs, "epochs_timed": len(steady),
                     "batch_size": config.batch_size, "fit_samples": n_fit, "precision": "bf16 autocast" if device.type == "cuda" else "fp32"},
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in zip(("structural", "semantic"), build_decoders(data, config))},
        "matmul_flops_per_second": rate,
        "flops_per_step": flops,
        "floor_seconds_per_epoch": floor,
        "seconds_per_epoch": epoch_seconds,
        "seconds_per_epoch_repeats": [e["seconds"] for e in steady],
        "checkpoint_seconds": checkpoint_seconds,
        "fraction_of_floor": floor / epoch_seconds,
        "samples_per_second": samples_per_second,
        # 40 epochs, plus a checkpoint every config.checkpoint_minutes and one at the end
        "projected_minutes_for_40_epochs": (40 * epoch_seconds * (1 + checkpoint_seconds / (60 * config.checkpoint_minutes)) + checkpoint_seconds) / 60,
        "wall_seconds": total,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions",)}, indent=1))
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = args.out or Path(__file__).parent / "results" / f"train-{size_name}-{tag}-{datetime.date.today()}.json"
    write_result(out, result, device)


if __name__ == "__main__":
    main()
