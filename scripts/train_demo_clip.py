"""Train the demo's miniature CLIP (text and image towers) on rendered scenes and their captions.

Recipe (seeded; CPU-feasible on one thread; resumable):

* data: every step draws ``--batch-size`` fresh scenes (:func:`havir.nsd.scenes.sample_scene`),
  renders each at 64 or 128 pixels (the demo's stimulus and reconstruction sides) and picks one
  of its captions (:func:`havir.nsd.scenes.describe_scene`); images go through CLIP's own
  preprocessing (bicubic resize to 224, centre crop, CLIP's mean and std);
* model: transformers' ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection`` at the
  sizes in :data:`TEXT_CONFIG` / :data:`VISION_CONFIG`: 77 text tokens, 257 image tokens
  (224-pixel images, 14-pixel patches), projection 32 = the ``tiny`` UNets' cross-attention width;
  the word-level tokenizer of :func:`havir.demo_world.clip.scene_tokenizer`;
* loss: CLIP's symmetric contrastive loss (:func:`contrastive_loss`) on the cosine
  similarities times a learned temperature (initialised at 1/0.07, capped at 100 as in CLIP);
* optimiser: AdamW (weight decay 0.1 on matrices, gradients clipped to norm 1), linear warm-up
  (5% of the steps) then cosine decay;
* every ``--checkpoint-every`` steps the models, optimiser, temperature and both random streams
  go to ``--checkpoint`` (safetensors + JSON), and a run started again with the same settings
  continues from there, so the run may be cut into pieces (``--max-minutes``);
* ``--init FOLDER`` starts a further stage from towers saved before (new seed, schedule and
  optimiser state); the shipped towers' ``training-clip.json`` nests each earlier stage's record;
* at the end the towers are saved in fp16 in the ``demo`` Versatile Diffusion layout
  (``tokenizer/``, ``image_feature_extractor/``, ``text_encoder/``, ``image_encoder/``) with
  ``training-clip.json``: the recipe, wall time, versions and the held-out image-to-caption retrieval
  top-1 among 100 candidates (scenes from another seed), measured on the fp16 weights as shipped.

    OMP_NUM_THREADS=1 python scripts/train_demo_clip.py [--steps 1500] [--batch-size 64] [--seed 0]

The shipped towers are three stages (one CPU thread shared with other work, load average 3-5;
46 minutes in all; held-out top-1 of each stage in its training-clip.json):

    python scripts/train_demo_clip.py --out stage1                                  # 1427 s, 0.732
    python scripts/train_demo_clip.py --init stage1 --seed 1 --steps 1200 --lr 1e-3 \
        --checkpoint ck2 --out stage2                                               #  756 s, 0.792
    python scripts/train_demo_clip.py --init stage2 --seed 2 --steps 600 --batch-size 128 \
        --lr 5e-4 --checkpoint ck3                                                  #  570 s, 0.812
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import havir  # noqa: F401  first: lets transformers import torchvision beside CPU torch (havir/_torchvision.py)
import numpy as np
import torch
from transformers import CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.utils import logging as transformers_logging

from havir.demo_world.clip import DEMO_CLIP, DemoClip, embed_images, embed_texts, image_pixels, load_demo_clip, retrieval_top1, scene_tokenizer, text_ids
from havir.demo_world.training import load_checkpoint, prefixed, save_checkpoint, unprefixed
from havir.io import package_versions, write_json
from havir.models.versatile import CONFIGS
from havir.nsd.scenes import describe_scene, render_scene, sample_scene

TEXT_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "projection_dim": 32, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
VISION_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "projection_dim": 32, "image_size": 224, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu"}
HELD_OUT_SEED = 10_000  # added to --seed: held-out scenes come from another stream
CANDIDATES = 100


def build_clip(seed: int) -> DemoClip:
    """Freshly initialised towers (weights drawn from ``seed``) with the scene tokenizer."""
    tokenizer = scene_tokenizer()
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(**TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    processor = CLIPImageProcessorPil(**json.loads((CONFIGS / "tiny" / "image_processor.json").read_text()))
    return DemoClip(tokenizer, processor, CLIPTextModelWithProjection(text_config), CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG)))


def scene_batch(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` fresh scenes: uint8 images rendered at 64 or 128 pixels, and one caption each."""
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [render_scene(scene, int(rng.choice([64, 128]))) for scene in scenes]
    captions = [describe_scene(scene, rng, n_captions=1)[0] for scene in scenes]
    return images, captions


def held_out_set(seed: int, groups: int) -> tuple[np.ndarray, list[str]]:
    """``groups`` x 100 held-out scenes at the demo stimulus side (64) and one caption each."""
    rng = np.random.default_rng(HELD_OUT_SEED + seed)
    scenes = [sample_scene(rng) for _ in range(groups * CANDIDATES)]
    return np.stack([render_scene(s, 64) for s in scenes]), [describe_scene(s, rng, n_captions=1)[0] for s in scenes]


def held_out_retrieval(clip: DemoClip, images: np.ndarray, captions: list[str]) -> float:
    """Mean image-to-caption retrieval top-1 over groups of 100 candidates."""
    image_embeds, text_embeds = embed_images(clip, images), embed_texts(clip, captions)
    groups = range(0, len(captions), CANDIDATES)
    return float(np.mean([retrieval_top1(image_embeds[g : g + CANDIDATES], text_embeds[g : g + CANDIDATES]) for g in groups]))


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on (n texts, n images) logits, pair i on the diagonal: the mean of the
    text-to-image and image-to-text cross-entropies. transformers has it as an internal function
    whose name changes between versions (``clip_loss``, ``image_text_contrastive_loss``)."""
    targets = torch.arange(len(logits), device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2


def learning_rate(step: int, args) -> float:
    warmup = max(1, args.steps // 20)
    if step <= warmup:
        return args.lr * step / warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))


def save_state(folder: Path, step: int, clip: DemoClip, logit_scale, optimizer, rng, settings: dict) -> None:
    tensors = prefixed("text", clip.text_encoder) | prefixed("image", clip.image_encoder) | {"logit_scale": logit_scale.detach()}
    save_checkpoint(folder, step, tensors, optimizer, rng, settings)


def load_state(folder: Path, clip: DemoClip, logit_scale, optimizer, rng, settings: dict) -> int:
    """Restore a checkpoint written with the same ``settings``; returns its step (0: none)."""
    step, tensors = load_checkpoint(folder, optimizer, rng, settings)
    if step:
        clip.text_encoder.load_state_dict(unprefixed("text", tensors))
        clip.image_encoder.load_state_dict(unprefixed("image", tensors))
        with torch.no_grad():
            logit_scale.copy_(tensors["logit_scale"])
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out-groups", type=int, default=5, help="groups of 100 held-out scenes")
    parser.add_argument("--checkpoint", type=Path, default=Path("demo-clip-checkpoint"))
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--max-minutes", type=float, default=60.0, help="checkpoint and stop after this long")
    parser.add_argument("--init", type=Path, help="start from the towers saved in this folder (a further stage)")
    parser.add_argument("--out", type=Path, default=DEMO_CLIP)
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    settings = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "text": TEXT_CONFIG, "vision": VISION_CONFIG, "init": str(args.init) if args.init else None}
    clip = load_demo_clip(args.init) if args.init else build_clip(args.seed)
    clip.text_encoder.train()
    clip.image_encoder.train()
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    matrices = [p for m in (clip.text_encoder, clip.image_encoder) for p in m.parameters() if p.ndim >= 2]
    others = [p for m in (clip.text_encoder, clip.image_encoder) for p in m.parameters() if p.ndim < 2] + [logit_scale]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    step = load_state(args.checkpoint, clip, logit_scale, optimizer, rng, settings)
    held_images, held_captions = held_out_set(args.seed, args.held_out_groups)
    started = time.perf_counter()
    if step:
        print(f"resuming at step {step} from {args.checkpoint}", flush=True)
    while step < args.steps:
        step += 1
        images, captions = scene_batch(rng, args.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        image_embeds = clip.image_encoder(image_pixels(clip, images)).image_embeds
        text_embeds = clip.text_encoder(text_ids(clip, captions)).text_embeds
        similarity = torch.nn.functional.normalize(text_embeds, dim=-1) @ torch.nn.functional.normalize(image_embeds, dim=-1).T
        loss = contrastive_loss(similarity * logit_scale.exp().clamp(max=100))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(matrices + others, 1.0)
        optimizer.step()
        out_of_time = time.perf_counter() - started > 60 * args.max_minutes
        if step % args.checkpoint_every == 0 or step == args.steps or out_of_time:
            save_state(args.checkpoint, step, clip, logit_scale, optimizer, rng, settings)
            clip.text_encoder.eval(), clip.image_encoder.eval()
            top1 = held_out_retrieval(clip, held_images[:CANDIDATES], held_captions[:CANDIDATES])
            clip.text_encoder.train(), clip.image_encoder.train()
            print(f"step {step}: loss {loss.item():.3f}, held-out top-1 (100) {top1:.2f}, "
                  f"temperature {logit_scale.exp().item():.1f} ({time.perf_counter() - started:.0f} s this run)", flush=True)
        if out_of_time and step < args.steps:
            print(f"stopping at step {step}: --max-minutes reached; run again to continue", flush=True)
            return
    clip.text_encoder.eval(), clip.image_encoder.eval()
    clip.save_pretrained(args.out)
    shipped = load_demo_clip(args.out)
    record = {
        "recipe": "scripts/train_demo_clip.py", "settings": settings, "torch_threads": torch.get_num_threads(),
        "device": "cpu", "seconds_last_run": round(time.perf_counter() - started, 1),
        "held_out": {"seed": HELD_OUT_SEED + args.seed, "scenes": len(held_captions), "candidates": CANDIDATES, "side": 64,
                     "image_to_caption_top1_fp16": round(held_out_retrieval(shipped, held_images, held_captions), 4)},
        "versions": package_versions("torch", "transformers", "numpy"),
        "previous_stage": json.loads((args.init / "training-clip.json").read_text()) if args.init else None,
    }
    write_json(args.out / "training-clip.json", record)
    print(f"saved to {args.out}: {record['held_out']}", flush=True)


if __name__ == "__main__":
    main()
