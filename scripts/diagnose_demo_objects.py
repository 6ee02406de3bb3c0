"""Where the demo's miniature Versatile Diffusion loses the object kinds (issue 20; DEMO WORLD).

The shipped UNet generates the right background but not the right objects, even from the true
embeddings of held-out scenes. This script measures each stage a scene's object kinds pass
through, on scenes from a seed no training used, so the next change goes where the loss is
(docs/miniature-vd.md, "Where the objects are lost", has the figures it printed):

1. **readers**: the scene probe on the true stimuli (its ceiling), on demo-VAE round trips (the
   ceiling of anything decoded by that VAE), and a wrong scene's kinds (where chance lands);
2. **conditions**: a linear probe (logistic regression, fit on ``--fit`` scenes, scored on
   ``--scenes`` others) from each condition the UNet is given to the object kinds: does the
   mini-CLIP image / text conditioning carry them?
3. **VAE latent**: per-channel spread, posterior std and KL; each channel replaced by its mean, decoded and read by the
   probe (which channels carry the scene); the spatial smoothness of the informative channel
   inside objects and in the background (horizontal neighbour correlation);
4. **UNet**: its epsilon error on latent cells covered by objects and on background cells, at
   several noise levels, with the scene's own text condition, the unconditional one and another
   scene's: does the condition help it where the objects are?
5. **mini-CLIP identification ceilings**: re-rendered scenes that keep some attributes of each
   stimulus and redraw the rest, scored as ``havir demo`` scores reconstructions: what a
   reconstruction must get right to reach a given mini-CLIP identification;
6. **the sampler from the true latent**: fused mode's pass with a perfect structural latent and
   the true embeddings (the sampler's defaults, ``--generate`` scenes, 20 steps) at each strength,
   1 being the semantic mode; the own condition against another scene's, scored as in 5.

    OMP_NUM_THREADS=1 python scripts/diagnose_demo_objects.py [--out diagnosis.json]  # ~10 min, one thread
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import havir  # noqa: F401  first: lets transformers import torchvision beside CPU torch (havir/_torchvision.py)
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from havir.demo_world.clip import embed_images, load_demo_clip
from havir.demo_world.measures import demo_measures
from havir.demo_world.probe import kind_f1, load_scene_probe, scene_labels
from havir.models.compat import set_text_share
from havir.models.backbone import SamplerSettings
from havir.models.sampling import decode, sample, unconditional_embeddings
from havir.models.versatile import load_versatile_diffusion
from havir.nsd.scenes import BACKGROUNDS, render_scene, sample_scene

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_unet import encode_scenes  # noqa: E402  the bank's exact encoding

STIMULUS_SIDE = 64
#: Noise levels (of the scheduler's 1000) at which the UNet's error is measured.
TIMESTEPS = (50, 100, 300, 600)
#: Part 6: strength (the fraction of the denoising run, from the noised true latent) -> the conditions run.
STRENGTHS = {0.25: ("own",), 0.5: ("own", "another scene's"), 0.75: ("own", "another scene's"), 1.0: ("own", "another scene's")}


def readings(probe, labels, images) -> dict[str, float]:
    read = probe.read(images)
    return {"background": round(float((read.background == labels.background).mean()), 3),
            "object_kind_f1": round(float(kind_f1(labels.kinds, read.kinds).mean()), 3)}


def linear_kind_f1(features: torch.Tensor, labels, n_fit: int) -> float:
    """Object-kind F1 on the scenes after the first ``n_fit`` of a logistic regression per kind
    fit on those ``n_fit`` (features flattened and standardised on the fit scenes)."""
    x = features.reshape(len(features), -1).numpy()
    predicted = np.stack([make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
                          .fit(x[:n_fit], labels.kinds[:n_fit, kind]).predict(x[n_fit:]) for kind in range(labels.kinds.shape[1])], axis=1)
    return round(float(kind_f1(labels.kinds[n_fit:], predicted.astype(bool)).mean()), 3)


def object_cells(scene, cells: int) -> torch.Tensor:
    """(cells, cells) float mask: 1 where any pixel of the latent cell belongs to an object."""
    drawn = render_scene(scene, STIMULUS_SIDE).astype(int) != render_scene(dataclasses.replace(scene, objects=()), STIMULUS_SIDE).astype(int)
    pixels = torch.from_numpy(drawn.any(-1).astype(np.float32))[None, None]
    return torch.nn.functional.max_pool2d(pixels, STIMULUS_SIDE // cells)[0, 0]


def redrawn(scene, keep: set[str], rng: np.random.Generator):
    """``scene`` with every attribute not in ``keep`` drawn afresh (``count``: the objects themselves)."""
    if "count" not in keep:
        objects = sample_scene(rng).objects
    else:
        fresh = [sample_scene(rng).objects[0] for _ in scene.objects]
        objects = tuple(dataclasses.replace(o, **{f: getattr(n, f) for f in ("kind", "colour", "x", "y", "size") if f not in keep})
                        for o, n in zip(scene.objects, fresh))
    background = scene.background if "background" in keep else str(rng.choice(list(BACKGROUNDS)))
    return dataclasses.replace(scene, objects=objects, background=background)


#: Name -> attributes each re-rendered scene keeps from its stimulus.
KEPT = {
    "the same scene": {"background", "count", "kind", "colour", "x", "y", "size"},
    "background, kinds and colours (places, sizes redrawn)": {"background", "count", "kind", "colour"},
    "background, colours and places (kinds redrawn)": {"background", "count", "colour", "x", "y", "size"},
    "background and kinds (colours, places, sizes redrawn)": {"background", "count", "kind"},
    "background only (objects redrawn)": {"background"},
    "nothing (another scene)": set(),
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vd", default="demo", help="the Versatile Diffusion to diagnose (default: the shipped demo)")
    parser.add_argument("--fit", type=int, default=1024, help="scenes the linear probes are fit on")
    parser.add_argument("--scenes", type=int, default=256, help="held-out scenes everything is scored on")
    parser.add_argument("--generate", type=int, default=96, help="held-out scenes the sampler is run on (part 6)")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--out", type=Path, default=Path("diagnosis.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    vd, probe, clip = load_versatile_diffusion(args.vd), load_scene_probe(), load_demo_clip()
    rng = np.random.default_rng([args.seed, 1])
    scenes = [sample_scene(rng) for _ in range(args.fit + args.scenes)]
    labels = scene_labels(scenes)
    held = np.arange(args.fit, len(scenes))
    test_labels, test_scenes = labels.take(held), [scenes[i] for i in held]
    encoded = [encode_scenes(vd, scenes[start : start + 256], rng) for start in range(0, len(scenes), 256)]
    encoded = {name: torch.cat([part[name] for part in encoded]).float() for name in encoded[0]}
    stimuli = np.stack([render_scene(s, STIMULUS_SIDE) for s in test_scenes])
    latents = encoded["latents"][held]
    report: dict = {"vd": str(args.vd), "held_out_scenes": args.scenes, "seed": args.seed}

    report["readers"] = {
        "probe on the true stimuli": readings(probe, test_labels, stimuli),
        "probe on demo-VAE round trips": readings(probe, test_labels, decode(vd, latents)),
        "kinds of the next scene (chance)": round(float(kind_f1(test_labels.kinds, np.roll(test_labels.kinds, 1, axis=0)).mean()), 3),
        "object kinds per scene": round(float(test_labels.kinds.sum(1).mean()), 2),
    }
    print(json.dumps(report["readers"]), flush=True)

    image_embeds = embed_images(clip, np.stack([render_scene(s, STIMULUS_SIDE) for s in scenes]))
    report["linear_object_kind_f1"] = {
        "mini-CLIP pooled image embedding (what mini-CLIP identification compares)": linear_kind_f1(image_embeds, labels, args.fit),
        "image tokens: class token": linear_kind_f1(encoded["image_tokens"][:, 0], labels, args.fit),
        "image tokens: all 257": linear_kind_f1(encoded["image_tokens"], labels, args.fit),
        "text tokens: all 77 (caption-averaged)": linear_kind_f1(encoded["text_tokens"], labels, args.fit),
        "VAE latents": linear_kind_f1(encoded["latents"], labels, args.fit),
    }
    print(json.dumps(report["linear_object_kind_f1"]), flush=True)

    mean, spread = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    ablated = {}
    for channel in range(latents.shape[1]):
        flat = latents.clone()
        flat[:, channel] = mean[channel]
        ablated[f"channel {channel} set to its mean"] = readings(probe, test_labels, decode(vd, flat))
    informative = int(spread.argmax())
    cells = torch.stack([object_cells(s, latents.shape[-1]) for s in test_scenes]) > 0
    code = latents[:, informative]
    inside = cells[:, :, :-1] & cells[:, :, 1:]
    outside = ~cells[:, :, :-1] & ~cells[:, :, 1:]
    neighbour_r = lambda where: round(float(np.corrcoef(code[:, :, :-1][where], code[:, :, 1:][where])[0, 1]), 3)  # noqa: E731
    rendered = torch.from_numpy(np.stack([render_scene(s, vd.image_side) for s in test_scenes[:64]])).permute(0, 3, 1, 2)
    posterior = vd.vae.encode(rendered.to(vd.vae.dtype) / 127.5 - 1).latent_dist  # the VAE's own input range, [-1, 1]
    report["vae_latent"] = {
        "channel std": [round(float(s), 3) for s in spread], "channel mean": [round(float(m), 3) for m in mean],
        "posterior std per channel (unscaled)": [round(float(s), 3) for s in posterior.std.mean(dim=(0, 2, 3))],
        "KL per image (nats)": round(float(posterior.kl().mean()), 1),
        **ablated,
        "object cells (fraction of the latent)": round(float(cells.float().mean()), 3),
        f"channel {informative}: horizontal neighbour correlation inside objects": neighbour_r(inside),
        f"channel {informative}: horizontal neighbour correlation in the background": neighbour_r(outside),
    }
    print(json.dumps(report["vae_latent"]), flush=True)

    text_null, image_null = unconditional_embeddings(vd)
    text, image = encoded["text_tokens"][held], encoded["image_tokens"][held]
    conditions = {"own text": text, "unconditional": text_null.expand_as(text), "another scene's text": text.roll(1, 0)}
    set_text_share(vd.image_unet, 1.0)
    generator = torch.Generator().manual_seed(args.seed)
    unet_errors = {}
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        steps = torch.full((len(latents),), t)
        noisy = vd.scheduler.add_noise(latents, noise, steps)
        for name, condition in conditions.items():
            squared = (vd.image_unet(noisy, steps, encoder_hidden_states=torch.cat([condition, image_null.expand_as(image)], 1)).sample - noise) ** 2
            on = cells[:, None].expand_as(squared)
            unet_errors[f"t={t}, {name}"] = {"object cells": round(float(squared[on].mean()), 4), "background cells": round(float(squared[~on].mean()), 4),
                                              f"object cells, channel {informative}": round(float(squared[:, informative][cells].mean()), 4)}
    report["unet_epsilon_mse_text_flow"] = unet_errors
    print(json.dumps(unet_errors), flush=True)

    redraw_rng = np.random.default_rng([args.seed, 2])
    ceilings = {}
    for name, keep in KEPT.items():
        images = np.stack([render_scene(redrawn(s, keep, redraw_rng), 2 * STIMULUS_SIDE) for s in test_scenes])
        measures = demo_measures(stimuli, images, probe=probe, clip=clip)
        ceilings[name] = {measure: round(float(values.mean()), 3) for measure, values in measures.per_image.items()}
    report["mini_clip_identification_of_rerendered_scenes"] = ceilings
    print(json.dumps(ceilings), flush=True)

    few = slice(0, args.generate)
    start, noise = latents[few], torch.randn(latents[few].shape, generator=generator)
    scored = lambda images: {m: round(float(v.mean()), 3) for m, v in demo_measures(stimuli[few], images, probe=probe, clip=clip).per_image.items()}  # noqa: E731
    from_true = {"VAE round trip (strength 0)": scored(decode(vd, start))}
    for strength, orders in STRENGTHS.items():
        for order in orders:
            rows = np.arange(args.generate) if order == "own" else np.roll(np.arange(args.generate), 1)
            generated = sample(vd, text[few][rows], image[few][rows], noise, SamplerSettings(steps=20, strength=strength), start_latents=start)
            from_true[f"strength {strength}, {order} condition"] = scored(decode(vd, generated))
    report["sampler_from_the_true_latent_and_embeddings"] = from_true
    print(json.dumps(from_true), flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
