"""The ``havir`` command line: parse options, call the library, print the result.

Each command is a thin wrapper around a function a notebook can call too. User errors raised by
the library (:class:`~havir.errors.HavirError` and its subclasses) become one line on stderr and
exit status 2 here, in :func:`main`; ``--debug`` shows the traceback instead. Any other exception
is a bug: it keeps its traceback (exit status 1) and asks for a report.
"""

from __future__ import annotations

import contextlib
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

try:  # typer 0.2x carries its own click: its usage errors are this class, not the click package's
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover (older typer)
    from click.exceptions import UsageError

from havir.errors import HavirError, InvalidInputError
from havir.models.backbone import IMG2IMG_STARTS, MODES, SCHEDULER_NAMES, SamplerSettings
from havir.library_logging import holding_library_messages
from havir.progress import stderr_console
from havir.validation import Interval, check_options

_HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="HAVIR: reconstruct seen images from fMRI (Natural Scenes Dataset).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=_HELP_OPTIONS,
)
masks_app = typer.Typer(help="Build and view per-subject structural and semantic masks.", no_args_is_help=True,
                        context_settings=_HELP_OPTIONS)
app.add_typer(masks_app, name="masks")

stdout_console = Console(soft_wrap=True)


def _choices(name: str, *words: str) -> type[Enum]:
    """The words an option takes, as an enumeration: ``--help`` lists them, the shell completes
    them, and any other word is refused before the command runs. The library checks the same
    words itself (tests/test_cli.py keeps the two in step)."""
    return Enum(name, {word: word for word in words}, type=str)


Mode = _choices("Mode", *MODES)
Dtype = _choices("Dtype", "auto", "fp32", "bf16", "fp16")
Scheduler = _choices("Scheduler", *SCHEDULER_NAMES)
Img2ImgStart = _choices("Img2ImgStart", *IMG2IMG_STARTS)
TrainModel = _choices("TrainModel", "havir", "ridge")
PreparedBetas = _choices("PreparedBetas", "auto", "hdf5", "nifti")
SynthBetas = _choices("SynthBetas", "nifti", "hdf5", "both")
Normalisation = _choices("Normalisation", "training", "session")
Protocol = _choices("Protocol", "mindeye2", "brain-diffuser")
ExplainMethod = _choices("ExplainMethod", "gradients", "patterns")
TableFormat = _choices("TableFormat", "markdown", "csv", "latex")

# Options shared by several commands, defined once.
NSDRootOpt = Annotated[Path, typer.Option("--nsd-root", help="Folder mirroring the NSD release (holds nsddata/, nsddata_betas/, nsddata_stimuli/).")]
SubjectOpt = Annotated[int, typer.Option("--subject", help="NSD subject, 1..8.")]
DefinitionOpt = Annotated[Optional[Path], typer.Option("--definition", help="Mask definition TOML (default: masks/subjXX.toml).")]
VDOpt = Annotated[str, typer.Option("--vd", help="Versatile Diffusion: a local folder, a hub id (via the HF cache), tiny, demo or full-random.")]
# cuda:N names one GPU of several, so --device is not an enumeration; its metavar lists the forms.
DeviceOpt = Annotated[str, typer.Option("--device", metavar="<auto|cpu|cuda|cuda:N>", help="auto (CUDA when available), cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16.")]
# Flags show no value in --help (metavar ""), as they take none.
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object on stdout; progress stays on stderr.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (default: OMP_NUM_THREADS when set, else torch's default). Give each job sharing a machine its share.")]

#: Printed under the traceback of anything that is not a user error.
BUG_REPORT = "This is a bug in HAVIR, not in your input: please report it with the command and the traceback above."


def _print_version(asked: bool) -> None:
    if asked:
        from havir import __version__

        print(f"havir {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", metavar="", is_eager=True, callback=_print_version, help="Print HAVIR's version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show the traceback of an error instead of its one line (allowed anywhere on the line).")] = False,
) -> None:
    """HAVIR: reconstruct seen images from fMRI (Natural Scenes Dataset)."""
    # --debug is read (and removed) by main() before the command line is parsed; it is declared
    # here so that --help lists it.


def _deprecated(old: str, new: str) -> None:
    """One line on stderr for a form that still works but will go."""
    stderr_console.print(f"warning: {old} is deprecated: write {new}", markup=False, highlight=False, soft_wrap=True)


def _check_data(data: Path, subject: int, *, features: bool = False) -> None:
    """The prepared data (and, with ``features``, its features cache) a command reads, checked
    before torch and the models are imported (seconds): a missing input is said at once."""
    from havir.artifacts.features_cache import require_features
    from havir.artifacts.prepared import require_prepared
    from havir.nsd.layout import check_subject

    check_subject(subject)
    require_prepared(data, subject)
    if features:
        require_features(data, subject)


def _check_machine_options(threads: int | None, device: str) -> None:
    """Check ``--threads`` and how ``--device`` is written with the other options, before any
    file is looked at (whether the GPU is there is checked once torch is imported)."""
    from havir.options import DEVICE_OPTIONS

    check_options({"threads": Interval(int, 1, optional=True)} | DEVICE_OPTIONS, threads=threads, device=device)


def _use_threads(threads: int | None) -> None:
    """Apply the checked ``--threads`` (this imports torch)."""
    from havir.devices import use_threads

    use_threads(threads)


def _emit(result: dict, as_json: bool, title: str) -> None:
    """Print a command's result: one JSON object with ``--json``, else a table for people.

    Under ``accelerate launch`` only the main process prints, so ``--json`` stays one object.
    """
    from havir.distributed import processes

    if not processes().is_main_process:
        return
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=title, show_header=False, title_justify="left")

    def shown(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return ", ".join(f"{k}: {shown(v)}" for k, v in value.items())
        return str(value)

    for key, value in result.items():
        table.add_row(key, shown(value))
    stdout_console.print(table)


@app.command("synth-nsd")
def synth_nsd(
    out_argument: Annotated[Optional[Path], typer.Argument(hidden=True, help="Deprecated: use --out.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write the miniature NSD release into.")] = None,
    subject: Annotated[Optional[list[int]], typer.Option("--subject", metavar="<int>", help="Subject to simulate, 1..8; repeat it for several (--subject 1 --subject 2); default 1.")] = None,
    subjects: Annotated[Optional[str], typer.Option("--subjects", hidden=True, help="Deprecated: comma-separated subjects; use --subject once per subject.")] = None,
    images: Annotated[int, typer.Option("--images", help="Images per subject (a tenth are the shared test images).")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random choice.")] = 0,
    image_side: Annotated[int, typer.Option("--image-side", help="Side of the square stimuli in pixels.")] = 64,
    sessions: Annotated[int, typer.Option("--sessions", help="Sessions of a subject who did them all (others have fewer, as in NSD).")] = 4,
    betas_format: Annotated[SynthBetas, typer.Option("--betas-format", help="nifti, hdf5 or both.")] = "both",
    as_json: JsonOpt = False,
) -> None:
    """Write a miniature NSD in the release layout, with a simulated brain that encodes the images."""
    from havir.io import output_folder
    from havir.nsd.synth import SYNTH_OPTIONS, synthesize_nsd

    # Before the output folder (and any parent of it) is made.
    check_options(SYNTH_OPTIONS, images=images, seed=seed, image_side=image_side, sessions=sessions)
    if out_argument is not None:
        if out is not None and out != out_argument:
            raise InvalidInputError(f"two output folders given, {out_argument} and --out {out}: give only --out")
        _deprecated(f"the positional OUT ({out_argument})", f"--out {out_argument}")
        out = out_argument
    if out is None:
        raise InvalidInputError("no output folder: pass --out FOLDER (the miniature NSD is written there)")
    subject_list = tuple(subject or ())
    if subjects is not None:
        if subject:
            raise InvalidInputError("give the subjects once, as --subject N (repeated), not with --subjects too")
        try:
            subject_list = tuple(int(s) for s in subjects.split(","))
        except ValueError:
            raise InvalidInputError(f"--subjects must be comma-separated numbers such as 1,2, got {subjects!r}") from None
        _deprecated(f"--subjects {subjects}", " ".join(f"--subject {s}" for s in subject_list))
    with output_folder(out, recursive=True), stderr_console.status("writing the synthetic NSD"):
        truth = synthesize_nsd(
            out, subject_list or (1,), images, seed, image_side=image_side, sessions=sessions, betas_format=betas_format.value
        )
    _emit(truth.to_json() | {"nsd_root": str(out)}, as_json, f"synthetic NSD written to {out}")


@masks_app.command("build")
def masks_build(
    nsd_root: NSDRootOpt,
    subject: SubjectOpt,
    definition: DefinitionOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the NIfTI masks and summary.")] = Path("havir-masks"),
    as_json: JsonOpt = False,
) -> None:
    """Build a subject's structural and semantic masks (NIfTI) and count voxels per ROI."""
    from havir.io import output_folder
    from havir.masks import build_masks, definition_for, save_masks
    from havir.nsd.layout import NSDLayout

    masks = build_masks(NSDLayout(nsd_root), subject, definition_for(subject, definition))
    with output_folder(out) as folder:  # locked; a failed write (a full disk) leaves no folder it created
        paths = save_masks(masks, folder)
    summary = masks.summary() | {"files": {k: str(v) for k, v in paths.items()}}
    if as_json:
        _emit(summary, as_json, "")
        return
    rois = Table("set", "atlas/label", "voxels", title=f"subj{subject:02d} voxels per ROI (inside {masks.definition.within.atlas})")
    for which, counts in summary.pop("roi_counts").items():
        for roi, count in counts.items():
            rois.add_row(which, roi, str(count))
    stdout_console.print(rois)
    _emit(summary, as_json, f"masks of subj{subject:02d}")


@masks_app.command("show")
def masks_show(
    nsd_root: NSDRootOpt,
    subject: SubjectOpt,
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    definition: DefinitionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Plot both masks on the subject's brain (nilearn) into a PNG."""
    from havir.io import ensure_output_dir
    from havir.masks import build_masks, definition_for, plot_masks
    from havir.nsd.layout import NSDLayout, check_subject

    if out.suffix.lower() != ".png":
        raise InvalidInputError(f"--out must name a .png file, got {out}")
    check_subject(subject)  # before the output folder is made
    ensure_output_dir(out.parent)
    layout = NSDLayout(nsd_root)
    masks = build_masks(layout, subject, definition_for(subject, definition))
    plot_masks(masks, layout, out)
    if as_json:
        _emit(masks.summary() | {"png": str(out)}, as_json, "")
        return
    stdout_console.print(str(out))


@app.command()
def prepare(
    nsd_root: NSDRootOpt,
    subject: SubjectOpt,
    out: Annotated[Path, typer.Option("--out", help="Output folder (receives subjXX.h5 and subjXX.json).")],
    sessions: Annotated[Optional[int], typer.Option("--sessions", help="Read sessions 1..K (default: all on disk).")] = None,
    definition: DefinitionOpt = None,
    betas_format: Annotated[PreparedBetas, typer.Option("--betas-format", help="auto (HDF5 where present), hdf5 or nifti.")] = "auto",
    captions_dir: Annotated[Optional[Path], typer.Option("--captions-dir", help="Folder with COCO's captions_*2017.json.")] = None,
    normalisation: Annotated[Normalisation, typer.Option("--normalisation", help="training (z-score with all training trials) or session (with each session's training trials).")] = "training",
    workers: Annotated[int, typer.Option("--workers", help="Processes reading sessions side by side (same output for any count).")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Mask, normalise and split one subject's betas into a training-ready file."""
    from havir.nsd.layout import NSDLayout, check_subject
    from havir.options import PREPARE_OPTIONS

    check_subject(subject)
    check_options(PREPARE_OPTIONS, sessions=sessions, workers=workers)
    NSDLayout(nsd_root).check_root()  # before h5py, nibabel and the mask code are imported
    from havir.prepare import prepare_subject

    summary = prepare_subject(
        nsd_root, subject, out, sessions=sessions, definition=definition, betas_format=betas_format.value,
        captions_dir=captions_dir, normalisation=normalisation.value, workers=workers,
    )
    _emit(summary, as_json, f"prepared subj{subject:02d}")


@app.command()
def features(
    data: Annotated[Path, typer.Option("--data", help="Folder written by havir prepare.")],
    subject: SubjectOpt,
    vd: VDOpt = "shi-labs/versatile-diffusion",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 16,
    stimuli: Annotated[Optional[Path], typer.Option("--stimuli", help="nsd_stimuli.hdf5, if not under the NSD root prepare read.")] = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compute and cache the training targets: VAE latents, CLIP image tokens, CLIP text tokens."""
    from havir.options import FEATURES_OPTIONS

    check_options(FEATURES_OPTIONS, batch_size=batch_size)
    _check_machine_options(threads, device)
    _check_data(data, subject)
    _use_threads(threads)
    from havir.features import compute_features

    summary = compute_features(
        data, subject, model=vd, device=device, dtype=dtype.value, batch_size=batch_size, stimuli=stimuli,
    )
    _emit(summary, as_json, f"features of subj{subject:02d}")


Control = _choices("Control", "shuffled")


@app.command()
def encode(
    data: Annotated[Path, typer.Option("--data", help="Folder written by havir prepare and havir features.")],
    subject: SubjectOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for the encoding model (encoder.json, encoder.safetensors, accuracy map).")],
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds (split by image) for each voxel's accuracy.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the folds, the search and the control.")] = 0,
    control: Annotated[Optional[Control], typer.Option("--control", help="shuffled: the null model (features paired with other images' responses).")] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit a voxel-wise encoding model: the backbone's image features -> each voxel's response."""
    from havir.options import ENCODE_OPTIONS

    check_options(ENCODE_OPTIONS, folds=folds, seed=seed, control=control.value if control else None)
    _check_machine_options(threads, device)
    _check_data(data, subject, features=True)
    _use_threads(threads)
    from havir.encode import fit_encoder

    summary = fit_encoder(data, subject, out, folds=folds, seed=seed, control=control.value if control else None, device=device)
    _emit(summary, as_json, f"encoding model of subj{subject:02d}")


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Folder written by havir prepare and havir features.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (an unfinished run there is resumed).")],
    subject: Annotated[Optional[int], typer.Option("--subject", help="NSD subject, 1..8.")] = None,
    subjects: Annotated[Optional[str], typer.Option("--subjects", help="Train one model on several subjects (comma-separated, such as 1,2,5,7): an input layer per subject, shared decoders.")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Adapt a multi-subject run (havir train --subjects --out) to --subject: a new input layer, then --finetune-epochs of everything.")] = None,
    finetune_epochs: Annotated[Optional[int], typer.Option("--finetune-epochs", help="With --init: epochs fine-tuning everything after the new input layer's (finetune_epochs in the config; default 0).")] = None,
    vd: Annotated[Optional[str], typer.Option("--vd", help="Versatile Diffusion the features were computed with (checked).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Training settings (TOML); see havir.train.TrainConfig.")] = None,
    model: Annotated[TrainModel, typer.Option("--model", help="havir (both decoders) or ridge (the baseline).")] = "havir",
    control: Annotated[Optional[Control], typer.Option("--control", help="shuffled: the null run, trained on shuffled voxel-image pairs (shuffle_control = true).")] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the Structural Generator and the Semantic Extractor (or the ridge baseline), for one
    subject or shared by several."""
    _check_machine_options(threads, device)
    subject_list = _train_subjects(subject, subjects, init, finetune_epochs, model.value)
    for each in subject_list:
        _check_data(data, each, features=True)
    if init is not None:
        from havir.artifacts.run import read_pooled_run

        read_pooled_run(init)  # before torch and the models are imported (seconds)
    _use_threads(threads)
    import dataclasses

    from havir.train import TrainConfig, train_subject, train_subjects

    settings = TrainConfig.from_toml(config) if config else TrainConfig()
    if control is not None:
        settings = dataclasses.replace(settings, shuffle_control=True)
    if finetune_epochs is not None:
        settings = dataclasses.replace(settings, finetune_epochs=finetune_epochs)
    if subjects is not None:
        summary = train_subjects(data, subject_list, out, config=settings, vd=vd, device=device)
        _emit(summary, as_json, f"trained subjects {subjects} ({model.value})")
        return
    summary = train_subject(data, subject, out, model=model.value, config=settings, vd=vd, init=init, device=device)
    _emit(summary, as_json, f"trained subj{subject:02d} ({model.value})")


def _train_subjects(subject: int | None, subjects: str | None, init: Path | None, finetune_epochs: int | None,
                    model: str) -> tuple[int, ...]:
    """The subjects ``havir train`` trains, from ``--subject`` or ``--subjects``, checked with
    the options that go with them before any file is read."""
    from havir.nsd.layout import check_subject
    from havir.options import check_subject_list

    check_options({"finetune_epochs": Interval(int, 0, optional=True)}, finetune_epochs=finetune_epochs)
    if (subject is None) == (subjects is None):
        raise InvalidInputError("give --subject N (one subject, or the new subject of --init) or --subjects N,M,... "
                                "(one model for several), not " + ("both" if subject is not None else "neither"))
    if subjects is None:
        if finetune_epochs is not None and init is None:
            raise InvalidInputError("--finetune-epochs fine-tunes a model adapted with --init RUN: give --init too, or drop it")
        check_subject(subject)
        return (subject,)
    for option, value in (("--init", init), ("--finetune-epochs", finetune_epochs)):
        if value is not None:
            raise InvalidInputError(f"{option} adapts a multi-subject run to one --subject: it does not go with --subjects")
    if model != "havir":
        raise InvalidInputError(f"--subjects trains one HAVIR model for several subjects; --model {model} is trained one --subject at a time")
    try:
        subject_list = tuple(int(s) for s in subjects.split(","))
    except ValueError:
        raise InvalidInputError(f"--subjects must be comma-separated numbers such as 1,2,5,7, got {subjects!r}") from None
    check_subject_list(subject_list)
    return subject_list


#: ``havir reconstruct``'s sampler defaults, read from the settings class.
_SAMPLER = SamplerSettings()


@app.command()
def reconstruct(
    run: Annotated[Path, typer.Option("--run", help="Folder written by havir train.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <nsdId>.png and manifest.json (existing PNGs are kept).")],
    mode: Annotated[Mode, typer.Option("--mode", help="fused (the method), structural or semantic.")] = "fused",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first K test images (by nsdId).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps of the full schedule.")] = _SAMPLER.steps,
    strength: Annotated[float, typer.Option("--strength", help="How far the structural latent is noised (0..1).")] = _SAMPLER.strength,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = _SAMPLER.guidance,
    text_share: Annotated[float, typer.Option("--text-share", help="Text share of the dual guidance (image: 1 - this).")] = _SAMPLER.text_share,
    seed: Annotated[int, typer.Option("--seed", help="Run seed; each image's noise comes from it and the nsdId.")] = _SAMPLER.seed,
    scheduler: Annotated[Scheduler, typer.Option("--scheduler", help="ddim, pndm, dpmsolver or euler.")] = _SAMPLER.scheduler,
    img2img_start: Annotated[Img2ImgStart, typer.Option("--img2img-start", help="Where the structural latent is noised to: diffusers (t = 721 at 50 steps, strength 0.75) or brain-diffuser (t = 741).")] = _SAMPLER.img2img_start,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 8,
    candidates: Annotated[int, typer.Option("--candidates", help="Samples per image; with --encoder, keep the one whose predicted brain activity best matches the measured.")] = 1,
    encoder: Annotated[Optional[Path], typer.Option("--encoder", help="Encoding model of the run's subject (havir encode --out), which chooses among --candidates.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reconstruct the test images of a trained run with dual-guided Versatile Diffusion."""
    from havir.artifacts.run import read_finished_run
    from havir.options import RECONSTRUCT_OPTIONS

    settings = SamplerSettings(  # checks the sampler's settings (a light module: no torch yet)
        steps=steps, strength=strength, guidance=guidance, text_share=text_share, seed=seed, scheduler=scheduler.value,
        img2img_start=img2img_start.value,
    )
    check_options(RECONSTRUCT_OPTIONS, limit=limit, batch_size=batch_size, candidates=candidates)
    _check_machine_options(threads, device)
    read_finished_run(run)  # before torch and the models are imported (seconds)
    _use_threads(threads)
    from havir.reconstruct import reconstruct_run

    summary = reconstruct_run(run, out, mode=mode.value, settings=settings, limit=limit, batch_size=batch_size, device=device,
                              dtype=dtype.value, candidates=candidates, encoder=encoder)
    _emit(summary, as_json, f"reconstructions in {out}")


@app.command()
def explain(
    run: Annotated[list[Path], typer.Option("--run", help="Folder written by havir train; repeat it, one run per subject, to compare subjects.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the attribution volumes (NIfTI), their figures and attribution.json.")],
    nsd_root: Annotated[Optional[Path], typer.Option("--nsd-root", help="NSD release holding the ROI atlases (default: the one the data were prepared from).")] = None,
    method: Annotated[ExplainMethod, typer.Option("--method", help="gradients: what the model reads (integrated gradients; ridge weights); patterns: where the decoded content lies (activation patterns, Haufe et al. 2014).")] = "gradients",
    baselines: Annotated[int, typer.Option("--baselines", help="Other test images each image is attributed against (decoders, gradients only).")] = 4,
    steps: Annotated[int, typer.Option("--steps", help="Integrated gradients' path points (decoders, gradients only).")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Test images per attribution pass.")] = 16,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Attribute each target to the input voxels: maps on the subject's grid and shares per ROI."""
    _check_machine_options(threads, device)
    _use_threads(threads)
    _refuse_launch("explain")
    from havir.explain import explain_run

    result = explain_run(run, out, nsd_root=nsd_root, method=method.value, baselines=baselines, steps=steps, batch_size=batch_size,
                         device=device)
    if as_json:
        _emit(result, as_json, "")
        return
    for subject, table in result["subjects"].items():
        for pathway, shares in table["pathways"].items():
            top = sorted(shares.items(), key=lambda item: -item[1])[:8]
            rows = Table("ROI", "share", title=f"{subject}: {pathway} pathway, largest shares ({table['method']})", title_justify="left")
            for roi, share in top:
                rows.add_row(roi, f"{share:.3f}")
            stdout_console.print(rows)
            silencing = table["silencing"][pathway]
            targets = list(silencing["intact"])
            rows = Table("ROI", "voxels", *(f"{target} alone / without" for target in targets),
                         title=f"{subject}: {pathway} pathway, two-way identification by ROI (intact: "
                         + ", ".join(f"{target} {value:.3f}" for target, value in silencing["intact"].items()) + ")",
                         title_justify="left")
            ranked = sorted(silencing["rois"].items(), key=lambda item: -sum(item[1]["alone"].values()))
            for roi, scores in ranked[:8]:
                rows.add_row(roi, str(scores["voxels"]),
                             *(f"{scores['alone'][target]:.3f} / {scores['silenced'][target]:.3f}" for target in targets))
            stdout_console.print(rows)
    stdout_console.print(f"maps and attribution.json in {result['output']}", markup=False, highlight=False)


def _refuse_launch(command: str) -> None:
    """``command`` is not split across processes: under ``accelerate launch`` say so instead of running N copies."""
    from havir.distributed import processes

    if processes().num_processes > 1:
        raise InvalidInputError(f"havir {command} runs in one process: run it without accelerate launch")


#: ``havir eval``'s numeric option checked here (the evaluation checks its folders itself).
_EVAL_OPTIONS = {"batch_size": Interval(int, 1)}


@app.command("eval")
def eval_command(
    recon: Annotated[Path, typer.Option("--recon", help="Folder of <nsdId>.png reconstructions (any method).")],
    data: Annotated[Path, typer.Option("--data", help="Folder written by havir prepare (holds the test stimuli).")],
    subject: SubjectOpt,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for eval.json, per_image.csv, report.html (default RECON/eval).")] = None,
    weights_dir: Annotated[Optional[Path], typer.Option("--weights-dir", help="Folder holding the feature networks' weight files (looked in first).")] = None,
    skip_missing: Annotated[bool, typer.Option("--skip-missing", metavar="", help="Score what the weights on this machine allow; list the rest under skipped.")] = False,
    protocol: Annotated[Protocol, typer.Option("--protocol", help="Evaluation preset: mindeye2 (the published table) or brain-diffuser (its own paper).")] = "mindeye2",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass of a feature network.")] = 32,
    encoder: Annotated[Optional[Path], typer.Option("--encoder", help="Encoding model of this subject (havir encode --out): adds the brain correlations.")] = None,
    null: Annotated[Optional[Path], typer.Option("--null", help="The null run's reconstructions (havir train --control shuffled): adds method vs null.")] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score reconstructions with the field's eight metrics; write per-image CSV and an HTML report."""
    from havir.artifacts.reconstruction import require_reconstructions

    check_options(_EVAL_OPTIONS, batch_size=batch_size)
    _check_machine_options(threads, device)
    _check_data(data, subject)
    require_reconstructions(recon)
    _use_threads(threads)
    _refuse_launch("eval")
    from havir.devices import resolve_device
    from havir.metrics.evaluate import evaluate_folder
    from havir.metrics.protocols import get_preset

    preset = get_preset(protocol.value)
    resolve_device(device)  # a bad --device or --protocol is refused before any image is read
    from havir.io import output_folder

    # Locked like every output folder (the evaluation reads RECON, which must exist, and writes OUT).
    with output_folder(out or recon / "eval") if recon.is_dir() else contextlib.nullcontext():
        evaluation = evaluate_folder(
            recon, data, subject, protocol=preset, out=out, weights_dir=weights_dir, skip_missing=skip_missing,
            device=device, batch_size=batch_size, encoder=encoder, null=null,
        )
    summary = evaluation.summary()
    if as_json:
        _emit(summary, as_json, "")
        return
    table = Table("metric", "mean", "95% CI", "network", title=f"{summary['n']} reconstructions of subj{subject:02d} ({protocol.value} preset)", title_justify="left")
    for name, score in evaluation.scores.items():
        table.add_row(name, f"{score.mean:.4f}", f"[{score.interval[0]:.4f}, {score.interval[1]:.4f}]", score.network)
    stdout_console.print(table)
    for name, reason in evaluation.skipped.items():
        stdout_console.print(f"skipped {name}: {reason}", markup=False, highlight=False)
    for note in evaluation.notes:
        stdout_console.print(f"note: {note}", markup=False, highlight=False)
    stdout_console.print(f"report: {evaluation.outputs['report']}", markup=False, highlight=False)


@app.command("table")
def table_command(
    evals: Annotated[list[Path], typer.Argument(help="eval.json files (or their folders), one per subject.")],
    method: Annotated[Optional[str], typer.Option("--method", help="Name of the method in the printed row (default: the recorded one).")] = None,
    style: Annotated[Optional[TableFormat], typer.Option("--format", help="markdown, csv or latex (default: a terminal table).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Average several subjects' eval.json into the published-style row, beside the published rows of its preset."""
    from havir.metrics.table import render, subject_table, table_rows

    table = subject_table(evals, method=method)
    if as_json:
        _emit(table.to_json(), as_json, "")
        return
    if style is not None:
        sys.stdout.write(render(table, style.value))
        return
    header, rows = table_rows(table)
    view = Table(title=f"{table.preset} preset: published rows and the mean over subjects {', '.join(map(str, table.subjects))}",
                 title_justify="left")
    view.add_column(header[0], no_wrap=True)
    for title in header[1:-1]:
        view.add_column(title, justify="right")
    for row in rows:
        view.add_row(*row[:-1])  # the protocol column is printed below: the table fits a terminal
    # Numbers are never cut to fit 80 columns: a narrow terminal wraps the lines instead.
    Console(width=max(stdout_console.width, 110)).print(view)
    lines = [f"{row[0]}: {row[-1]}" for row in rows]
    if table.missing:
        lines.append(f"left out (not computed for every subject): {', '.join(table.missing)}")
    lines += [f"not comparable, {reason}: {row.method}" for row, reason in table.other_presets]
    for line in lines:
        stdout_console.print(line, markup=False, highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for every stage's output (the synthetic NSD, data, run, reconstructions, report).")] = Path("demo-out"),
    images: Annotated[int, typer.Option("--images", help="Images of the synthetic subject (a tenth are held out for testing).")] = 200,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs of the tiny decoders.")] = 20,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps of the fused and semantic reconstructions.")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data, the training and the sampling.")] = 0,
    null_runs: Annotated[int, typer.Option("--null-runs", help="Null-brain runs (each on its own shuffle of the pairs) averaged.")] = 3,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on a synthetic NSD with small models, offline, ending in an HTML report."""
    _check_machine_options(threads, device)
    _use_threads(threads)
    _refuse_launch("demo")
    from havir.demo import run_demo

    summary = run_demo(out, images=images, epochs=epochs, fused_steps=steps, seed=seed, null_runs=null_runs, device=device)
    if as_json:
        _emit(summary, as_json, "")
        return
    measures = next(iter(summary["demo_measures"]["method"].values()))
    table = Table("run", "mode", *next(iter(summary["modes"].values())), *measures,
                  title=f"demo: {summary['test_images']} held-out synthetic images (last three columns: demo measures)", title_justify="left")
    for run, modes in (("method", summary["modes"]), ("null brain", summary["null_modes"])):
        for mode, metrics in modes.items():
            demo_values = summary["demo_measures"]["method" if run == "method" else "null"][mode]
            table.add_row(run, mode, *(f"{value:.3f}" for value in metrics.values()), *(f"{demo_values[m]['mean']:.3f}" for m in measures))
    Console(width=max(stdout_console.width, 150)).print(table)  # numbers are never cut to fit a terminal
    stdout_console.print(f"finished in {summary['seconds']:.0f} s; open the report: {summary['report']}", markup=False, highlight=False)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit status 2.

    Bad options and usage (typer's, e.g. ``--limit abc``) and the user errors the library
    raises (:class:`~havir.errors.HavirError`) are each one line ``error: ...`` on stderr and
    exit status 2. Anything else is a bug: it propagates with its traceback and a note asking for
    a report (exit status 1). Library log messages and warnings are printed after a successful
    command or a bug, dropped after a user error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    held: list[str] = []
    try:
        with contextlib.nullcontext() if debug else holding_library_messages(held):
            status = app(args=args, prog_name="havir", standalone_mode=False)
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `havir` or `havir masks` alone: the help is the answer
            stderr_console.print(err.ctx.get_help(), markup=False, highlight=False)
            sys.exit(2)
        where = f"havir {err.ctx.command_path.removeprefix('havir').strip()}".strip() if err.ctx else "havir"
        stderr_console.print(f"error: {_one_line(err.format_message())} (see `{where} --help`)",
                             markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(1)
    except HavirError as err:
        if debug:
            raise
        stderr_console.print(f"error: {_one_line(err)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as err:  # a bug: what the libraries said may explain it; Python prints the traceback, exit 1
        _print_lines(held)
        if hasattr(err, "add_note"):  # Python >= 3.11: printed after the traceback
            err.add_note(BUG_REPORT)
        else:
            _print_lines([BUG_REPORT])
        raise
    except BaseException:  # Ctrl-C (or a SystemExit): not a bug
        _print_lines(held)
        raise
    _print_lines(held)
    sys.exit(status if isinstance(status, int) else 0)


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        stderr_console.print(line, markup=False, highlight=False, soft_wrap=True)
