"""Benchmark: fitting an encoding model (``havir encode``) against its FLOP floor.

Times one banded-ridge fit (:func:`havir.encode.fit_banded_ridge`, the step ``havir encode`` runs ``folds + 1``
times) on random data of a subject's size: the data's content does not change the cost. The
floor: the fit's dominant floating-point work, counted analytically (below), over the dense
matmul rate measured in the same run.

With n images, p_s features in space s, v voxels, W weightings of the two spaces tried, F inner
folds, A regularisation strengths, and m = n (F - 1) / F images fitted per inner fold:

* kernels: 2 n^2 p_s per space;
* per weighting and inner fold: the eigendecomposition of the m x m kernel (about 9 m^3), the
  projection of the responses on its eigenvectors (2 m^2 v), and the validation predictions for
  every strength (2 (n - m) m v A);
* the refit at the best strength per voxel (2 n^2 v).

    python bench/bench_encode.py --size cpu          # 1,000 images, one realistic subject's voxels and features
    python bench/bench_encode.py --size realistic    # 9,000 images (the GPU's size)

``realistic``: 15,724 structural + 15,724 semantic voxels (subject 1's nsdgeneral count for each,
an upper bound), 9,000 training images, the released model's feature spaces (VAE latent 4x64x64 =
16,384, CLIP image embedding 768). Writes ``bench/results/encode-<size>-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np
import torch

from _results import write_result
from havir.devices import matmul_rate
from havir.encode import ALPHAS, SPACE_WEIGHTINGS, fit_banded_ridge

SIZES = {
    "smoke": dict(images=200, voxels=2000, vae_latents=1024, clip_image=32),
    "cpu": dict(images=1000, voxels=31448, vae_latents=16384, clip_image=768),
    "realistic": dict(images=9000, voxels=31448, vae_latents=16384, clip_image=768),
}
INNER_FOLDS = 5


def fit_flops(images: int, voxels: int, features: list[int], weightings: int = SPACE_WEIGHTINGS,
              alphas: int = len(ALPHAS), folds: int = INNER_FOLDS) -> dict[str, float]:
    """The fit's dominant FLOPs by part (see the module docstring)."""
    fitted = images * (folds - 1) / folds
    held = images - fitted
    return {
        "kernels": sum(2 * images**2 * p for p in features),
        "eigendecompositions": weightings * folds * 9 * fitted**3,
        "projections": weightings * folds * 2 * fitted**2 * voxels,
        "validation_predictions": weightings * folds * 2 * held * fitted * voxels * alphas,
        "refit": 2 * images**2 * voxels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    size = SIZES[args.size]
    device = torch.device("cpu")  # the fit runs on himalaya's numpy backend
    rng = np.random.default_rng(0)
    features = {space: rng.standard_normal((size["images"], size[space]), dtype=np.float32)
                for space in ("vae_latents", "clip_image")}
    responses = rng.standard_normal((size["images"], size["voxels"]), dtype=np.float32)
    started = time.perf_counter()
    fit_banded_ridge(features, responses, seed=0)
    seconds = time.perf_counter() - started
    flops = fit_flops(size["images"], size["voxels"], [size["vae_latents"], size["clip_image"]])
    rate = matmul_rate(device, torch.float64)
    floor = sum(flops.values()) / rate
    result = {
        "benchmark": "encode: one banded-ridge fit (havir.encode.fit_banded_ridge); havir encode runs folds + 1 of them",
        "size": {"name": args.size, **size},
        "settings": {"space_weightings": SPACE_WEIGHTINGS, "alphas": len(ALPHAS), "inner_folds": INNER_FOLDS},
        "seconds": round(seconds, 2),
        "flops": {part: float(value) for part, value in flops.items()},
        "matmul_rate_flops": rate,
        "floor_seconds": round(floor, 2),
        "fraction_of_floor": round(floor / seconds, 4),
        "encode_command_estimate_seconds": round(seconds * 6, 1),  # 5 cross-validation folds + the final fit
    }
    out = args.out or Path(__file__).parent / "results" / f"encode-{args.size}-{datetime.date.today()}.json"
    write_result(out, result, device)
    print(f"{args.size}: fit {seconds:.1f} s, floor {floor:.1f} s ({100 * floor / seconds:.0f}% of it); "
          f"havir encode ~{6 * seconds / 60:.1f} min; {out}")


if __name__ == "__main__":
    main()
