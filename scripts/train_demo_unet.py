"""Train the demo's miniature dual UNet (issue 20, item 2) and ship the demo Versatile Diffusion.

Recipe (seeded; CPU-feasible on one thread; resumable; docs/miniature-vd.md says why each choice):

* **bank**: ``--scenes`` fresh scenes (:func:`havir.nsd.scenes.sample_scene`), rendered at the
  synthetic NSD's 64-pixel stimulus side and encoded exactly as ``havir features`` encodes
  stimuli, with the demo VAE and the miniature CLIP: VAE latents (4, 16, 16), CLIP image tokens
  (257, 32), CLIP text tokens averaged over the scene's five captions (77, 32). Written once, in
  chunks, under ``--work``; a cut run keeps the chunks it finished.
* **model**: diffusers' ``UNet2DConditionModel`` made dual-guided with a text UNet
  (``UNetFlatConditionModel``) as the released model is (:func:`havir.models.compat.make_dual_unet`),
  at the ``tiny`` widths (32, 64) but with cross-attention on the 8x8 level only
  (:data:`IMAGE_UNET`): on one CPU thread attention over the 16x16 grid cost half of every step.
* **flows**: each step draws one of Versatile Diffusion's two flows or a mix: text-to-image
  (text share 1: only the text UNet's transformers contribute), image variation (share 0: only the
  image UNet's own), or both conditions at a share drawn uniformly in (0, 1) (the sampler mixes at
  0.4; Versatile Diffusion itself trained the two flows apart). The ResNets are shared by all.
* **condition dropout**: 10% of the images get exactly the sampler's unconditional condition
  (:func:`havir.models.sampling.unconditional_embeddings`: the tokens of "" and of a mid-grey image),
  so classifier-free guidance has the ``eps_u`` it will be given.
* **objective**: epsilon prediction, MSE, timesteps uniform over the scheduler's 1000 (the
  ``tiny`` scaled-linear betas); AdamW, linear warm-up then cosine decay, gradients clipped to 1;
  an exponential moving average of the weights (``--ema``) is what is evaluated and shipped.
* **checks**: every ``--eval-every`` steps, ``--eval-scenes`` held-out scenes (another seed) are
  generated from pure noise by the sampler HAVIR uses (:func:`havir.models.sampling.sample`, its
  default settings) for each flow, decoded, and read by the scene probe: background accuracy
  (chance 25%) and object-kind F1 against the true scenes. A line per flow is printed and kept in
  ``training.json``.
* **stages**: ``--init FOLDER`` starts a further stage from the UNets of a folder written before
  (new schedule and optimiser state); the shipped ``training-unet.json`` nests each stage's record.
* **ship**: the EMA weights in fp16 with the miniature CLIP and the demo VAE as one folder in the
  released model's diffusers layout, ``havir/models/weights/demo-vd`` (or ``--out``).

    OMP_NUM_THREADS=1 python scripts/train_demo_unet.py [--work demo-unet-work] [--steps 3000]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import havir  # noqa: F401  first: lets transformers import torchvision beside CPU torch (havir/_torchvision.py)
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from havir.demo_world.clip import load_demo_clip
from havir.demo_world.probe import content_scores, load_scene_probe, scene_labels
from havir.demo_world.training import load_checkpoint, prefixed, save_checkpoint, unprefixed
from havir.models.encoding import encode_clip_images, encode_clip_texts, encode_vae_latents
from havir.io import atomic_path, package_versions, write_json
from havir.models.compat import UNetFlatConditionModel, make_dual_unet, set_text_share
from havir.models.versatile import CONFIGS, DEMO_VAE, DEMO_VD, VersatileDiffusion, load_versatile_diffusion
from havir.nsd.scenes import describe_scene, render_scene, sample_scene
from havir.models.backbone import SamplerSettings
from havir.models.sampling import decode, sample, unconditional_embeddings

STIMULUS_SIDE = 64
CHUNK = 256
CONDITION_DROPOUT = 0.1
_TINY_UNET = json.loads((CONFIGS / "tiny" / "image_unet.json").read_text())
_TINY_TEXT_UNET = json.loads((CONFIGS / "tiny" / "text_unet.json").read_text())
#: The ``tiny`` image UNet with cross-attention on the 8x8 level only; 16x16 latents.
IMAGE_UNET = _TINY_UNET | {
    "sample_size": 16,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}
#: The text UNet whose transformers become the dual transformers' text branch.
TEXT_UNET = _TINY_TEXT_UNET | {
    "sample_size": 16,
    "down_block_types": ["DownBlockFlat", "CrossAttnDownBlockFlat"],
    "up_block_types": ["CrossAttnUpBlockFlat", "UpBlockFlat"],
}
#: Text shares of the evaluated flows: text-to-image, image variation, and the sampler's mix.
EVAL_FLOWS = {"text": 1.0, "image": 0.0, "mixed": SamplerSettings().text_share}


def demo_components() -> VersatileDiffusion:
    """The demo's trained VAE and miniature CLIP, with untrained UNets of :data:`IMAGE_UNET`."""
    vd = load_versatile_diffusion("tiny")
    clip = load_demo_clip()
    vd.tokenizer, vd.image_processor, vd.text_encoder, vd.image_encoder = clip.tokenizer, clip.image_processor, clip.text_encoder, clip.image_encoder
    vd.vae = AutoencoderKL.from_pretrained(DEMO_VAE, torch_dtype=torch.float32).eval()
    vd.text_unet = UNetFlatConditionModel(**TEXT_UNET)
    vd.image_unet = make_dual_unet(UNet2DConditionModel(**IMAGE_UNET), vd.text_unet)
    vd.source = "demo"
    return vd


def encode_scenes(vd: VersatileDiffusion, scenes, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """What ``havir features`` stores for each scene's 64-pixel stimulus, float16."""
    stimuli = np.stack([render_scene(scene, STIMULUS_SIDE) for scene in scenes])
    captions = [describe_scene(scene, rng) for scene in scenes]
    text = encode_clip_texts(vd, [c for group in captions for c in group]).view(len(scenes), len(captions[0]), -1, vd.embedding_dim)
    return {
        "latents": encode_vae_latents(vd, stimuli).half(),
        "image_tokens": encode_clip_images(vd, stimuli).half(),
        "text_tokens": text.float().mean(dim=1).half(),
    }


def build_bank(vd: VersatileDiffusion, folder: Path, scenes: int, seed: int) -> dict[str, torch.Tensor]:
    """Encode ``scenes`` scenes in chunks of :data:`CHUNK` (chunk k from seed (seed, k)); resumable."""
    folder.mkdir(parents=True, exist_ok=True)
    parts, started = [], time.perf_counter()
    for chunk in range(math.ceil(scenes / CHUNK)):
        path = folder / f"chunk-{chunk:05d}.safetensors"
        if not path.is_file():
            rng = np.random.default_rng([seed, chunk])
            encoded = encode_scenes(vd, [sample_scene(rng) for _ in range(CHUNK)], rng)
            with atomic_path(path) as temporary:
                save_file({name: tensor.contiguous() for name, tensor in encoded.items()}, str(temporary))
            print(f"bank chunk {chunk + 1}/{math.ceil(scenes / CHUNK)} ({time.perf_counter() - started:.0f} s)", flush=True)
        parts.append(load_file(path))
    return {name: torch.cat([p[name] for p in parts])[:scenes] for name in parts[0]}


def held_out(vd: VersatileDiffusion, n: int, seed: int):
    """``n`` scenes from a seed the bank never uses, their true labels and encodings."""
    rng = np.random.default_rng([seed, 10**6])
    scenes = [sample_scene(rng) for _ in range(n)]
    return scene_labels(scenes), encode_scenes(vd, scenes, rng)


@torch.no_grad()
def evaluate(vd: VersatileDiffusion, unet, probe, labels, encoded, seed: int) -> dict[str, dict[str, float]]:
    """Generate the held-out scenes from noise with each flow; the probe's agreement with the truth."""
    trained, vd.image_unet = vd.image_unet, unet
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(encoded["latents"].shape, generator=generator)
    results = {}
    try:
        for flow, share in EVAL_FLOWS.items():
            settings = SamplerSettings(text_share=share, seed=seed)
            latents = sample(vd, encoded["text_tokens"].float(), encoded["image_tokens"].float(), noise, settings)
            scores = content_scores(labels, probe.read(decode(vd, latents)))
            results[flow] = {name: round(float(values.mean()), 4) for name, values in scores.items()}
    finally:
        vd.image_unet = trained
    return results


def learning_rate(step: int, args) -> float:
    warmup = max(1, args.steps // 20)
    if step <= warmup:
        return args.lr * step / warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))


#: What this script writes into the demo folder (the VAE and CLIP scripts write the rest).
WRITTEN = ("image_unet", "text_unet", "scheduler", "model_index.json", "training-unet.json")


def export(vd: VersatileDiffusion, ema, out: Path, record: dict) -> Path:
    """Write ``ema``'s weights (fp16) into the demo folder beside its CLIP and VAE: the release layout.

    A fresh dual UNet is loaded with the EMA weights, so its text UNet's transformers (shared with
    the dual transformers' text branch) are the trained ones when saved to ``text_unet/``. The whole
    model is saved to a staging folder first, then the parts this script owns replace the old ones.
    """
    torch.manual_seed(0)  # the text UNet's flat ResNets are saved for the layout but never run
    text_unet = UNetFlatConditionModel(**TEXT_UNET)
    image_unet = make_dual_unet(UNet2DConditionModel(**IMAGE_UNET), text_unet)
    image_unet.load_state_dict(ema.state_dict(), strict=True)
    shipped = copy.copy(vd)
    shipped.image_unet, shipped.text_unet = image_unet, text_unet
    shipped.scheduler = DDIMScheduler.from_config(vd.scheduler.config)
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    shipped.to(dtype=torch.float16).save_pretrained(staging)
    write_json(staging / "training-unet.json", record)
    out.mkdir(parents=True, exist_ok=True)
    for name in WRITTEN:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        (staging / name).rename(out / name)
    shutil.rmtree(staging)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("demo-unet-work"), help="checkpoint folder (and the bank's, by default)")
    parser.add_argument("--bank", type=Path, help="bank folder (default WORK/bank; a further stage may reuse the first's)")
    parser.add_argument("--bank-seed", type=int, default=0, help="seed of the bank's scenes (chunk k: (bank seed, k))")
    parser.add_argument("--out", type=Path, default=DEMO_VD)
    parser.add_argument("--scenes", type=int, default=6144)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="start from the UNets of this folder (a further stage)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-scenes", type=int, default=64)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--max-minutes", type=float, default=60.0, help="checkpoint and stop after this long")
    args = parser.parse_args()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in ("work", "bank", "out", "eval_every", "eval_scenes", "checkpoint_every", "max_minutes")}
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    vd = demo_components()
    bank = build_bank(vd, args.bank or args.work / "bank", args.scenes, args.bank_seed)
    labels, encoded = held_out(vd, args.eval_scenes, args.bank_seed)
    probe = load_scene_probe()
    text_null, image_null = unconditional_embeddings(vd)
    null_condition = torch.cat([text_null, image_null], dim=1)

    if args.init:
        vd.image_unet.load_state_dict(load_versatile_diffusion(args.init).image_unet.state_dict())
    unet = vd.image_unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    decay = [p for n, p in unet.named_parameters() if p.ndim > 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": [p for p in unet.parameters() if p.ndim <= 1], "weight_decay": 0.0}], lr=args.lr)
    rng = np.random.default_rng(args.seed)
    step, tensors = load_checkpoint(args.work / "checkpoint", optimizer, rng, settings)
    history = []
    if step:
        unet.load_state_dict(unprefixed("unet", tensors))
        ema.load_state_dict(unprefixed("ema", tensors))
        history = json.loads((args.work / "checkpoint" / "history.json").read_text())
        print(f"resuming at step {step}", flush=True)
    scheduler = vd.scheduler
    n_train = scheduler.config.num_train_timesteps
    losses = []
    while step < args.steps:
        step += 1
        rows = torch.from_numpy(rng.integers(0, args.scenes, args.batch_size))
        latents = bank["latents"][rows].float()
        condition = torch.cat([bank["text_tokens"][rows], bank["image_tokens"][rows]], dim=1).float()
        dropped = torch.from_numpy(rng.random(args.batch_size) < CONDITION_DROPOUT).view(-1, 1, 1)
        condition = torch.where(dropped, null_condition, condition)
        flow = rng.integers(3)
        set_text_share(unet, (1.0, 0.0, float(rng.uniform()))[flow])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, n_train, (args.batch_size,))
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=condition).sample
        loss = F.mse_loss(prediction, noise)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - args.ema)
        losses.append(loss.item())
        out_of_time = time.perf_counter() - started > args.max_minutes * 60
        if step % args.eval_every == 0 or step == args.steps:
            scores = evaluate(vd, ema, probe, labels, encoded, args.seed)
            history.append({"step": step, "loss": round(float(np.mean(losses[-100:])), 4), "held_out": scores})
            print(json.dumps(history[-1]), flush=True)
        elif step % 50 == 0:
            print(f"step {step}: loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps or out_of_time:
            save_checkpoint(args.work / "checkpoint", step, prefixed("unet", unet) | prefixed("ema", ema), optimizer, rng, settings)
            write_json(args.work / "checkpoint" / "history.json", history)
        if out_of_time and step < args.steps:
            print(f"stopped at step {step} after {args.max_minutes} minutes; run again to continue", flush=True)
            return
    record = {
        "recipe": "scripts/train_demo_unet.py",
        "settings": settings,
        "image_unet": IMAGE_UNET,
        "text_unet": TEXT_UNET,
        "miniature_clip": "training-clip.json (scripts/train_demo_clip.py)",
        "torch_threads": torch.get_num_threads(),
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "history": history,
        "previous_stage": json.loads((args.init / "training-unet.json").read_text()) if args.init else None,
        "versions": package_versions(),
        "note": "DEMO WORLD: trained on procedural scenes; says nothing about NSD, brains or the released model.",
    }
    print(f"shipped {export(vd, ema, args.out, record)}", flush=True)


if __name__ == "__main__":
    main()
