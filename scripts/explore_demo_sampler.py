"""Measure the demo measures of a trained demo run under other sampler settings (measurement only).

Reads the predictions of a finished ``havir demo`` (its ``run/`` or ``run-null/``) once, loads the
demo Versatile Diffusion once, and for each sampler setting given reconstructs the test images in
memory (the backbone's ``generate``, batches of 8 as ``havir demo``; nothing written)
in the semantic and fused modes, then prints one line per setting and mode with the demo measures
(``havir.demo_world.measures``, means with 95% bootstrap intervals over test images) and the seconds
it took. The structural mode does not depend on the sampler: it is printed once. Settings are
``name=value`` pairs of ``havir.models.backbone.SamplerSettings`` separated by commas, one argument per
setting; the defaults of ``havir demo`` (20 steps, seed 0) apply to what a setting does not name.

    OMP_NUM_THREADS=1 python scripts/explore_demo_sampler.py demo-out/run guidance=7.5 guidance=3,text_share=0.7

Used for issue 20's question whether another sampler setting makes the semantic mode's mini-CLIP
identification reach 0.75 and fusion beat the structural mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import havir  # noqa: F401  first: lets transformers import torchvision beside CPU torch (havir/_torchvision.py)
import numpy as np
import torch

from havir.artifacts.features_cache import features_path, features_settings
from havir.demo_world.clip import load_demo_clip
from havir.demo_world.measures import demo_measures, summarise
from havir.demo_world.probe import load_scene_probe
from havir.metrics.evaluate import load_ground_truth
from havir.models.versatile import load_versatile_diffusion
from havir.models.backbone import SamplerSettings
from havir.reconstruct import predict_test_set
from havir.targets import TARGET_NAMES

BATCH = 8  # havir demo's batch size


def parse_setting(text: str) -> SamplerSettings:
    """``"guidance=3,text_share=0.7"`` -> the demo's settings (20 steps, seed 0) with those changed."""
    fields = {field.name: field.type for field in dataclasses.fields(SamplerSettings)}
    values = {}
    for pair in filter(None, text.split(",")):
        name, value = pair.split("=")
        values[name] = {"int": int, "float": float, "bool": lambda v: v == "True"}.get(fields[name], str)(value)
    return SamplerSettings(**({"steps": 20, "seed": 0} | values))


def reconstruct_all(vd, mode, settings, nsd_ids, predictions) -> np.ndarray:
    batches = [np.arange(start, min(start + BATCH, len(nsd_ids))) for start in range(0, len(nsd_ids), BATCH)]
    order = np.argsort(nsd_ids)  # as havir reconstruct: batches cut from the ids in order
    images = np.zeros((len(nsd_ids), vd.image_side, vd.image_side, 3), np.uint8)
    with torch.no_grad():
        for rows in batches:
            rows = order[rows]
            batch = {name: torch.as_tensor(predictions[name][rows]) for name in TARGET_NAMES}
            images[rows] = vd.generate(batch, nsd_ids[rows], mode=mode, settings=settings)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished demo run folder (demo-out/run or demo-out/run-null)")
    parser.add_argument("settings", nargs="+", help="name=value[,name=value...] per setting")
    parser.add_argument("--modes", default="semantic,fused")
    args = parser.parse_args()
    nsd_ids, predictions, record = predict_test_set(args.run, torch.device("cpu"))
    features = features_settings(features_path(Path(record["data"]), record["subject"]))
    vd = load_versatile_diffusion(features["model"], seed=features["seed"])
    truth_ids, stimuli, _ = load_ground_truth(Path(record["data"]), record["subject"])
    position = {int(nsd_id): k for k, nsd_id in enumerate(truth_ids)}
    stimuli = stimuli[[position[int(nsd_id)] for nsd_id in nsd_ids]]  # row i is what reconstruction i reconstructs
    probe, clip = load_scene_probe(), load_demo_clip()

    def report(label: str, images: np.ndarray, seconds: float) -> None:
        summary = summarise(demo_measures(stimuli, images, probe=probe, clip=clip))
        cells = "  ".join(f"{name} {value['mean']:.3f} [{value['interval'][0]:.3f}, {value['interval'][1]:.3f}]"
                          for name, value in summary.items())
        print(f"{label:<60} {cells}  ({seconds:.0f} s)", flush=True)
        print(json.dumps({"setting": label, "measures": summary, "seconds": round(seconds, 1)}), flush=True)

    started = time.perf_counter()
    report("structural", reconstruct_all(vd, "structural", SamplerSettings(), nsd_ids, predictions), time.perf_counter() - started)
    for text in args.settings:
        settings = parse_setting(text)
        for mode in args.modes.split(","):
            started = time.perf_counter()
            images = reconstruct_all(vd, mode, settings, nsd_ids, predictions)
            report(f"{mode} {text or 'demo defaults'}", images, time.perf_counter() - started)


if __name__ == "__main__":
    main()
