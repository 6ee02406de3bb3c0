"""Benchmark: how much of the CLIP targets' variance a rank-r semantic head can represent.

The Semantic Extractor's token heads (:mod:`havir.models.decoders`) emit each token as a learned
per-token offset plus one shared ``rank -> D`` map of ``rank`` numbers: every token's
image-dependent part lies in one shared ``rank``-dimensional subspace. Whatever the backbone
learns, the best such subspace keeps, of the targets' variance across images, the share of the
top ``rank`` eigenvalues of the pooled covariance of the per-token-centred tokens (each token
minus its mean over the images, which the offset absorbs; all tokens and images pooled, (n x T, D)).
This benchmark computes that share for each rank, for the image (257 x D) and text (77 x D)
targets, and the share of the tokens' second moment the offsets alone carry.

Targets: Versatile Diffusion's own CLIP encoders, normalised as ``havir features`` does, on
synthetic scenes (:mod:`havir.nsd.scenes`) and their captions. No released CLIP weights can be
had offline: ``full-random`` is CLIP ViT-L/14's architecture (D = 768) with *random* weights, so
its tokens are not real CLIP's and the figures bound nothing about real CLIP; they show how the
measure behaves at the real shapes. Run it on the released weights (``--model`` a folder or hub
id) to choose the rank from real targets.

    python bench/bench_semantic_rank.py                               # full-random, 96 scenes
    python bench/bench_semantic_rank.py --model tiny --images 256     # D = 32, seconds
    python bench/bench_semantic_rank.py --model /path/to/versatile-diffusion

Writes ``bench/results/semantic-rank-<model>-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _results import write_result
from havir.devices import resolve_device
from havir.models.encoding import encode_clip_images, encode_clip_texts
from havir.models.decoders import variance_kept_by_rank
from havir.models.versatile import BUILT_IN, _config, clip_byte_tokenizer, load_versatile_diffusion
from havir.nsd.scenes import describe_scene, render_scene, sample_scene
from transformers import (  # after havir's imports, which set transformers up
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

SCENE_SIDE = 224  # CLIP's input side: the processor would resize to it anyway


def clip_encoders(model: str, seed: int, device: torch.device) -> SimpleNamespace:
    """The two CLIP encoders of ``model`` with what :func:`encode_clip_images` and
    :func:`encode_clip_texts` read; a built-in one without its UNets and VAE (not needed here)."""
    if model not in BUILT_IN:
        vd = load_versatile_diffusion(model, device=device)
        return SimpleNamespace(tokenizer=vd.tokenizer, image_processor=vd.image_processor, text_encoder=vd.text_encoder,
                               image_encoder=vd.image_encoder)
    configs = "tiny" if model == "demo" else model
    tokenizer = clip_byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = CLIPTextModelWithProjection(CLIPTextConfig(**_config(configs, "text_encoder"), bos_token_id=tokenizer.bos_token_id,
                                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        image = CLIPVisionModelWithProjection(CLIPVisionConfig(**_config(configs, "image_encoder")))
    return SimpleNamespace(tokenizer=tokenizer, image_processor=CLIPImageProcessorPil(**_config(configs, "image_processor")),
                           text_encoder=text.eval().to(device), image_encoder=image.eval().to(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="full-random", help="tiny, full-random, or a Versatile Diffusion folder / hub id")
    parser.add_argument("--images", type=int, default=96, help="synthetic scenes encoded")
    parser.add_argument("--ranks", default="4,8,16,32,64,128,256,384,512")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    started = time.perf_counter()
    encoders = clip_encoders(args.model, args.seed, device)
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.images)]
    images, texts = [], []
    for start in range(0, len(scenes), args.batch_size):
        batch = scenes[start : start + args.batch_size]
        pixels = np.stack([render_scene(scene, SCENE_SIDE) for scene in batch])
        images.append(encode_clip_images(encoders, pixels).float().cpu().numpy())
        captions = [describe_scene(scene, rng, n_captions=1)[0] for scene in batch]
        texts.append(encode_clip_texts(encoders, captions).float().cpu().numpy())
    targets = {"clip_image": np.concatenate(images), "clip_text": np.concatenate(texts)}
    dim = targets["clip_image"].shape[-1]
    ranks = sorted({r for r in (int(x) for x in args.ranks.split(",")) if r < dim} | {dim})
    results = {name: variance_kept_by_rank(tokens, ranks) for name, tokens in targets.items()}
    for name, result in results.items():
        kept = ", ".join(f"{r}: {share:.3f}" for r, share in result["kept_by_rank"].items())
        print(f"{name:10s} variance kept by rank ({kept}); effective rank {result['effective_rank']:.1f}; "
              f"offsets {result['offset_share_of_second_moment']:.2f} of the second moment")

    result = {
        "benchmark": "semantic rank: variance of the CLIP targets a rank-r token head keeps",
        "settings": {
            "model": args.model, "weights": "random (seed %d), not real CLIP" % args.seed if args.model in BUILT_IN else "from the folder",
            "targets": "synthetic scenes (havir.nsd.scenes) at 224 px and one caption each, normalised as havir features does",
            "images": args.images, "ranks": ranks, "measure": "top-r eigenvalue share of the pooled per-token-centred tokens",
        },
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    tag = "cuda" if device.type == "cuda" else "cpu"
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", args.model).strip("-")
    out = args.out or Path(__file__).parent / "results" / f"semantic-rank-{name}-{tag}-{datetime.date.today()}.json"
    write_result(out, result, device)


if __name__ == "__main__":
    main()
