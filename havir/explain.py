"""``havir explain``: which voxels drive each pathway of a trained run.

For every target (:mod:`havir.targets`: ``vae_latents`` from the structural pathway,
``clip_image`` and ``clip_text`` from the semantic one) a map over every input voxel, of one of
two kinds (``method``), which answer different questions:

``"gradients"`` (the default): **what the model reads**, the backward view.

* **decoders** (``model = "havir"``): integrated gradients (Sundararajan et al. 2017, with
  Captum's :class:`~captum.attr.IntegratedGradients`) from a baseline response ``x'`` to each
  test image's voxels ``x``. The baselines are other test images' responses (each image against
  ``baselines`` others; IG averaged over baselines drawn from the data is "expected gradients",
  Erion et al. 2021), not the zero (training-mean) response: at ``x' = 0`` the decoders' first
  LayerNorm sees only the stem's bias (norm 0.26 against 11.6 at real responses, tiny preset),
  a singular point whose huge gradients dominate the path integral; on the synthetic NSD the
  zero baseline ranked informative voxels worse (ROC AUC 0.70 / 0.81 / 0.78 against 0.74 / 0.84
  / 0.81 for the three targets, ``tests/test_explain.py``'s run). A target is many numbers, so one scalar per pair is
  attributed: the projection of the prediction on the direction from the baseline's prediction
  to the image's, ``s(x) = <f(x), u>`` with ``u = (f(x) - f(x')) / ||f(x) - f(x')||`` held fixed
  (detached). By IG's completeness the attributions then sum to ``||f(x) - f(x')||``, how far
  the voxels move the prediction, and every output unit counts by how much it moved (a sum of
  squares would weigh units by their value, offsets included; per-unit attribution would take
  16,384 + 2 x 768 x 334 backward passes per image). A voxel's attribution is the mean of its
  absolute value over the test images and their baselines (signed values of images that push
  the prediction different ways would cancel).
* **ridge** (``model = "ridge"``): the absolute weights, per unit of the prepared (z-scored)
  input, averaged over the target's output units; every target reads every input voxel, so
  the ridge's one pathway is ``"ridge"``.

``"patterns"``: **where the decoded content is represented in the responses**, the forward view:
activation patterns (Haufe et al. 2014, "On the interpretation of weight vectors of linear models
in multivariate neuroimaging"), for decoders and ridge alike, from the model's predictions
``y_hat`` on the test images. Each output unit ``k`` is taken as a one-dimensional decoder, whose
pattern is Haufe's ``a_k = Cov(x, y_hat_k) / Var(y_hat_k)``: how much each voxel's response
changes per unit of the decoded value, the forward model the decoder implies (the full
``Cov(y_hat)^-1`` of Haufe's multi-output formula cannot be estimated from fewer test images than
output units). A voxel's value is the root mean square of its ``a_k`` over the target's units
(units the model predicts as constant are left out). Why a second kind: a decoder's weights, and
therefore its gradients, are not a map of where information lies. Among many redundant
informative voxels a decoder spreads its weight thin, and it gives weight to noise voxels to fit
or cancel noise. On the synthetic NSD's redundant early visual voxels, ridge's absolute weights
rank noise voxels *above* layout voxels (ROC AUC 0.25 at strength 1e3) and the tiny
decoder's integrated gradients reach 0.74, while the patterns rank layout voxels first (0.97 and 0.96;
``tests/test_explain.py``). Packages lack this: Captum attributes a model's output and nilearn's
decoders report weights; the pattern needs only predictions, so it is computed here.
What patterns do not show is that the model learnt anything: any function of the responses
covaries with the voxels that carry most of their variance, and a decoder trained on shuffled
voxel-image pairs has patterns much like the real one's. Judge what was learnt by the model's
scores against its null control (``--control shuffled``), then read the maps.

What it writes in ``OUT`` (``subjXX/`` per run):

======================================  ================================================================
``subjXX/<pathway>_<target>.nii.gz``    float32 attribution volume on the subject's functional grid
                                        (the ROI atlases' grid and affine); 0 outside the pathway's input
``subjXX/<pathway>_<target>.png``       the volume over the subject's mean volume (or its brain outline)
``attribution.json``                    per subject and target: share of the total attribution in each
                                        atlas ROI (``"atlas/label"``), and per pathway (mean of its targets'
                                        shares); per pathway the silencing table; the method, settings,
                                        protocol and versions
``roi_shares.png``                      with several runs: the subjects' shares side by side
======================================  ================================================================

Whichever the method, ``attribution.json`` also holds a **silencing** table, the one view that a
null control can check, because it scores the model against the true targets: for each atlas ROI
among a pathway's inputs, the two-way identification of each target on the test images with the
ROI **silenced** (its voxels set to their mean response, 0 in the prepared z-scored units) and
with the ROI **alone** (every other input silenced). A model trained on shuffled pairs identifies
at chance either way (``tests/test_explain.py``). Silencing shows what the model cannot do
without an ROI, and redundancy hides there (an ROI whose information others also carry costs
little); the ROI alone shows what the model can do with it.

Gradients say which voxels the decoder's output is sensitive to between one image's response and
another's; patterns say which voxels' responses go with the decoded content; silencing says what
the model's identification needs. Neither says which
voxels carry the information causally, nor what the brain does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import havir
from havir.artifacts.dataset import load_test_data, ridge_voxels
from havir.artifacts.prepared import load_voxel_coordinates, prepared_path, prepared_record_path, require_prepared
from havir.artifacts.run import load_decoders, load_ridge, read_finished_run
from havir.devices import resolve_device, smaller_batch_on_oom
from havir.errors import InvalidInputError, MissingInputError
from havir.io import MODEL_STACK, atomic_path, output_folder, package_versions, write_json
from havir.nsd.atlas import Atlas, read_atlas
from havir.nsd.layout import ATLASES, NSDLayout
from havir.progress import track
from havir.targets import TARGETS, targets_of
from havir.validation import Interval, OneOf, Rule, check_options, read_json

#: ``havir explain``'s options.
EXPLAIN_OPTIONS: dict[str, Rule] = {
    "method": OneOf("gradients", "patterns"),
    "steps": Interval(int, 2, 1000),
    "baselines": Interval(int, 1, 100),
    "batch_size": Interval(int, 1),
}

#: What the numbers in the volumes and the table are, for the record.
PROTOCOL = {
    "havir": "integrated gradients (Captum) from other test images' responses (baselines) to each test image's "
    "voxels, of the prediction's projection on its detached shift from the baseline's prediction; mean over "
    "the test images and baselines of the absolute attribution per voxel",
    "ridge": "absolute ridge weights per unit of z-scored input, mean over the target's output units",
    "patterns": "activation patterns (Haufe et al. 2014) of the model's predictions on the test images: per output "
    "unit Cov(voxel, prediction) / Var(prediction), root mean square over the target's output units",
    "silencing": "two-way identification (MindEye's) of each target's predictions against the true targets of the "
    "test images: intact; with every input voxel of one atlas ROI set to 0, the mean response in the prepared "
    "z-scored units (silenced); with every other input voxel set to 0 (alone)",
    "roi_share": "attribution summed over an atlas ROI's voxels / summed over all input voxels of the target; "
    "a pathway's share is the mean of its targets' shares",
}


def _projection_forward(decoder, target: str):
    """``s(x) = <f(x), u>`` per row: the prediction of ``target`` projected on ``u`` (batch, ...)."""

    def forward(voxels: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        return (decoder.predict(voxels)[target].flatten(1) * direction).sum(1)

    return forward


def decoder_attribution(decoder, voxels: np.ndarray, *, baselines: int = 4, steps: int = 32, batch_size: int = 16,
                        device: torch.device | str = "cpu", progress: bool = False) -> dict[str, np.ndarray]:
    """``{target: (n_voxels,) float64}``: mean absolute integrated gradients of each of
    ``decoder``'s targets over the rows of ``voxels`` (n_images, n_voxels), float32 z-scored
    betas (the module docstring says which scalar is attributed, from which baselines, and why).

    ``baselines`` : other images each image is attributed against (image ``i`` against images
    ``i + 1 .. i + baselines``, cyclically; at most ``n_images - 1``); ``steps`` : points of the
    path integral (Gauss-Legendre); ``batch_size`` : images per pass (``batch_size x steps`` inputs).
    """
    from captum.attr import IntegratedGradients

    inputs = torch.as_tensor(voxels, dtype=torch.float32, device=device)
    if len(inputs) < 2:
        raise InvalidInputError(f"attribution compares each test image with others, but the test set holds {len(inputs)} image")
    shifts = range(1, min(baselines, len(inputs) - 1) + 1)
    targets = targets_of(decoder.role)
    totals = {target: torch.zeros(inputs.shape[1], dtype=torch.float64, device=device) for target in targets}
    for start in track(range(0, len(inputs), batch_size), f"attribution ({decoder.role})", enabled=progress,
                       total=-(-len(inputs) // batch_size), unit="batches"):
        rows = torch.arange(start, min(start + batch_size, len(inputs)), device=device)
        batch = inputs[rows]
        with torch.no_grad():
            predicted = decoder.predict(batch)
        for shift in shifts:
            baseline = inputs[(rows + shift) % len(inputs)]
            with torch.no_grad():
                reference = decoder.predict(baseline)
            for target in targets:
                moved = (predicted[target] - reference[target]).flatten(1)
                direction = moved / moved.norm(dim=1, keepdim=True).clamp_min(1e-12)
                with smaller_batch_on_oom(batch_size):
                    attributions = IntegratedGradients(_projection_forward(decoder, target)).attribute(
                        batch, baselines=baseline, additional_forward_args=(direction,), n_steps=steps,
                    )
                totals[target] += attributions.abs().sum(0).double()
    return {target: (total / (len(inputs) * len(shifts))).cpu().numpy() for target, total in totals.items()}


def activation_patterns(voxels: np.ndarray, predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{target: (n_voxels,) float64}``: the root mean square over each target's output units of
    the units' activation patterns ``Cov(x, y_hat_k) / Var(y_hat_k)`` (module docstring).

    voxels : (n_images, n_voxels) the model's input on the test images (z-scored betas).
    predictions : ``{target: (n_images, ...)}`` what the model predicts from those rows.
    """
    x = np.asarray(voxels, dtype=np.float64)
    if len(x) < 2:
        raise InvalidInputError(f"activation patterns are covariances over test images, but the test set holds {len(x)} image")
    x = x - x.mean(0)
    patterns = {}
    for target, predicted in predictions.items():
        y = np.asarray(predicted, dtype=np.float64).reshape(len(x), -1)
        y = y - y.mean(0)
        variance = (y * y).sum(0) / (len(x) - 1)
        varying = variance > 1e-12 * variance.max() if variance.max() > 0 else np.zeros_like(variance, dtype=bool)
        if not varying.any():
            patterns[target] = np.zeros(x.shape[1])  # a constant prediction goes with no voxel
            continue
        covariance = x.T @ y[:, varying] / (len(x) - 1)  # (n_voxels, varying units)
        patterns[target] = np.sqrt(((covariance / variance[varying]) ** 2).mean(1))
    return patterns


def _decoder_predictions(decoder, voxels: np.ndarray, *, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """``decoder``'s predictions of its targets for the rows of ``voxels``, float32 on the CPU."""
    inputs = torch.as_tensor(voxels, dtype=torch.float32)
    parts = {target: [] for target in targets_of(decoder.role)}
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            predicted = decoder.predict(inputs[start:start + batch_size].to(device))
            for target in parts:
                parts[target].append(predicted[target].float().cpu().numpy())
    return {target: np.concatenate(chunks) for target, chunks in parts.items()}


def silenced_identification(predict, voxels: np.ndarray, truth: dict[str, np.ndarray],
                            rois: dict[str, np.ndarray], *, progress: bool = False, what: str = "silencing") -> dict:
    """A model's two-way identification with each ROI silenced, and with each ROI alone.

    predict : ``voxels -> {target: (n, ...)}``, the model's predictions of its targets.
    voxels : (n_images, n_voxels) the model's input on the test images (z-scored betas).
    truth : ``{target: (n_images, ...)}`` the test images' true targets.
    rois : ``{"atlas/label": (n_voxels,) bool}`` which inputs each ROI holds.
    progress : report the ROIs done on stderr (and in the log file), as ``what``.

    Returns ``{"intact": {target: identification}, "rois": {roi: {"voxels": n, "silenced":
    {target: identification}, "alone": {target: identification}}}}``; silenced voxels are set
    to 0, their mean response. One pass per ROI and way, by hand: Captum's ``FeatureAblation``
    takes one partition of the inputs per call and scores per image, while atlases overlap and
    identification is a score of the whole test set.
    """
    from havir.metrics.scores import two_way_identification

    def identification(keep: np.ndarray) -> dict[str, float]:
        predicted = predict(np.where(keep, voxels, np.float32(0.0)))
        return {target: float(two_way_identification(truth[target], predicted[target]).mean()) for target in truth}

    table = {roi: {"voxels": int(inside.sum()), "silenced": identification(~inside), "alone": identification(inside)}
             for roi, inside in track(rois.items(), what, enabled=progress, total=len(rois), unit="ROIs")}
    return {"intact": identification(np.ones(voxels.shape[1], dtype=bool)), "rois": table}


def _input_rois(coordinates: np.ndarray, atlases: dict[str, Atlas]) -> dict[str, np.ndarray]:
    """``{"atlas/label": (n_inputs,) bool}``: the ROIs holding some but not all of the inputs at
    ``coordinates`` (n_inputs, 3) (an ROI with every input would silence the whole pathway)."""
    rois = {}
    for atlas in atlases.values():
        values = atlas.labels[tuple(coordinates.T)]
        for label, value in atlas.names.items():
            inside = values == value
            if 0 < inside.sum() < len(coordinates):
                rois[f"{atlas.name}/{label}"] = inside
    return rois


def ridge_attribution(ridge) -> dict[str, np.ndarray]:
    """``{target: (n_inputs,) float64}``: a fitted :class:`~havir.models.ridge.RidgeDecoder`'s
    absolute weights per unit of its (z-scored) input, mean over each target's output units."""
    return {target: (coef.abs().double() / ridge.x_scale_.double()[:, None]).mean(1).cpu().numpy()
            for target, coef in ridge.coef_.items()}


def _read_atlases(root: Path, subject: int, grid: tuple[int, ...]) -> dict[str, Atlas]:
    if not root.is_dir():
        raise MissingInputError(
            f"the NSD release subj{subject:02d} was prepared from, {root}, does not exist: pass --nsd-root (its ROI "
            "atlases give the grid, the affine and the ROIs)"
        )
    atlases = {name: read_atlas(NSDLayout(root), subject, name) for name in ATLASES}
    for atlas in atlases.values():
        if atlas.labels.shape != grid:
            raise InvalidInputError(
                f"ROI atlas {atlas.name} of subj{subject:02d} in {root} has grid {atlas.labels.shape}, but the prepared "
                f"voxels lie on {grid}: pass the --nsd-root the data were prepared from"
            )
    return atlases


def roi_shares(volume: np.ndarray, atlases: dict[str, Atlas]) -> dict[str, float]:
    """``{"atlas/label": share}``: the part of ``volume``'s total (non-negative attribution,
    (X, Y, Z)) inside each labelled ROI with any of it. Atlases overlap (floc regions lie in the
    streams), so shares add up to 1 within one atlas at most, not across atlases."""
    total = float(volume.sum())
    shares = {}
    for atlas in atlases.values():
        for label, value in atlas.names.items():
            inside = float(volume[atlas.labels == value].sum())
            if inside > 0:
                shares[f"{atlas.name}/{label}"] = inside / total
    return shares


def _plot_volume(volume: nib.Nifti1Image, background: nib.Nifti1Image, title: str, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    from nilearn import plotting

    data = np.asanyarray(volume.dataobj)
    slices = np.unique(np.nonzero(data)[2])
    picked = slices[np.linspace(0, len(slices) - 1, min(6, len(slices))).round().astype(int)]
    cut_coords = [float((volume.affine @ [0, 0, z, 1])[2]) for z in picked]
    display = plotting.plot_stat_map(volume, bg_img=background, display_mode="z", cut_coords=cut_coords, cmap="hot",
                                     vmin=0, threshold=1e-6 * float(data.max()), draw_cross=False,  # zeros (not inputs) transparent
                                     black_bg=True, title=title, colorbar=True)
    with atomic_path(out_png) as temporary:
        display.savefig(str(temporary), dpi=100)
    display.close()


def _background(root: Path, subject: int, atlases: dict[str, Atlas]) -> nib.Nifti1Image:
    """The subject's mean functional volume when the release has it, else the brain outline."""
    mean = NSDLayout(root).mean_volume(subject)
    if mean.is_file():
        return nib.load(mean)
    brain = atlases["nsdgeneral"]
    return nib.Nifti1Image((brain.labels >= 0).astype(np.float32), brain.affine)


def compared_rois(shares: Sequence[dict[str, float]]) -> list[str]:
    """The ROIs of several subjects' ``{"atlas/label": share}`` tables worth comparing, sorted:
    all but those holding every subject's whole attribution (nsdgeneral holds every input voxel)."""
    rois = sorted(set().union(*shares))
    return [roi for roi in rois if min(table.get(roi, 0.0) for table in shares) < 0.999]


def _plot_comparison(tables: dict[str, dict], out_png: Path) -> None:
    """The subjects' ROI shares side by side, one panel per pathway."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pathways = sorted({pathway for table in tables.values() for pathway in table["pathways"]})
    figure, axes = plt.subplots(1, len(pathways), figsize=(6 * len(pathways), 9), squeeze=False)
    for ax, pathway in zip(axes[0], pathways):
        subjects = [s for s in tables if pathway in tables[s]["pathways"]]
        rois = compared_rois([tables[s]["pathways"][pathway] for s in subjects])
        height = 0.8 / len(subjects)
        for k, subject in enumerate(subjects):
            shares = [tables[subject]["pathways"][pathway].get(roi, 0.0) for roi in rois]
            ax.barh(np.arange(len(rois)) + k * height, shares, height=height, label=subject)
        ax.set_yticks(np.arange(len(rois)) + 0.4 - height / 2, rois, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("share of the pathway's attribution")
        ax.set_title(f"{pathway} pathway")
        ax.legend()
    figure.tight_layout()
    with atomic_path(out_png) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


@dataclass
class _RunInputs:
    """What one run's attribution reads, checked before anything is written."""

    run: Path
    record: dict
    nsd_root: Path
    grid: tuple[int, ...]
    atlases: dict[str, Atlas]


def _run_inputs(run: Path, nsd_root: Path | None) -> _RunInputs:
    record = read_finished_run(run)
    subject, data = record["subject"], Path(record["data"])
    require_prepared(data, subject, with_record=True)
    prepared_record = read_json(prepared_record_path(data, subject), what="prepared record", fix="run `havir prepare` again",
                                keys=("masks", "nsd_root"))
    root = Path(nsd_root) if nsd_root is not None else Path(prepared_record["nsd_root"])
    grid = tuple(prepared_record["masks"]["grid"])
    return _RunInputs(Path(run), record, root, grid, _read_atlases(root, subject, grid))


def _attribute_run(inputs: _RunInputs, out: Path, *, method, baselines, steps, batch_size, device, progress) -> dict:
    """One run's volumes, figures and table (the entry of ``attribution.json`` for its subject)."""
    run, record, grid, atlases = inputs.run, inputs.record, inputs.grid, inputs.atlases
    subject, data = record["subject"], Path(record["data"])
    test = load_test_data(data, subject)
    coordinates = load_voxel_coordinates(prepared_path(data, subject))
    affine = atlases["nsdgeneral"].affine

    # {pathway: ((n_inputs, 3) coordinates, {target: (n_inputs,) attribution})}
    if record["model"] == "ridge":
        read = record.get("ridge", {}).get("inputs", "sets")  # which voxel sets the ridge reads (see ridge_voxels)
        sets = ("structural", "semantic", "other") if read == "nsdgeneral" else ("structural", "semantic")
        ridge_input = np.concatenate([coordinates[name] for name in sets])
        voxels = ridge_voxels(test, read)
        if len(ridge_input) != voxels.shape[1]:
            raise InvalidInputError(f"the ridge in {run} reads other voxels than {data} holds: run `havir train` again")
        ridge = load_ridge(run)
        if method == "patterns":
            attribution = activation_patterns(voxels, ridge.predict(voxels))
        else:
            attribution = ridge_attribution(ridge)
        pathways = {"ridge": (ridge_input, attribution)}
        silencing = {"ridge": silenced_identification(ridge.predict, voxels, _truth(test, attribution), _input_rois(ridge_input, atlases),
                                                      progress=progress, what="silencing ROIs (ridge)")}
    else:
        pathways, silencing = {}, {}
        for role, decoder in load_decoders(run, device).items():
            voxels = getattr(test, role)

            def predict(inputs, decoder=decoder):
                return _decoder_predictions(decoder, inputs, batch_size=batch_size, device=device)

            if method == "patterns":
                attribution = activation_patterns(voxels, predict(voxels))
            else:
                attribution = decoder_attribution(decoder, voxels, baselines=baselines, steps=steps, batch_size=batch_size,
                                                  device=device, progress=progress)
            pathways[role] = (coordinates[role], attribution)
            silencing[role] = silenced_identification(predict, voxels, _truth(test, attribution), _input_rois(coordinates[role], atlases),
                                                      progress=progress, what=f"silencing ROIs ({role})")

    folder = out / f"subj{subject:02d}"
    folder.mkdir(exist_ok=True)
    background = _background(inputs.nsd_root, subject, atlases)
    table = {"run": str(Path(run).resolve()), "model": record["model"], "method": method, "test_images": len(test.nsd_id),
             "targets": {}, "pathways": {}}
    for pathway, (voxels, attribution) in pathways.items():
        for target in attribution:  # the pathway's targets (all of them for ridge)
            volume = np.zeros(grid, dtype=np.float32)
            volume[tuple(voxels.T)] = attribution[target]
            image = nib.Nifti1Image(volume, affine)
            stem = folder / f"{pathway}_{target}"
            with atomic_path(stem.with_suffix(".nii.gz")) as temporary:
                nib.save(image, temporary)
            _plot_volume(image, background, f"subj{subject:02d} {pathway} -> {TARGETS[target].description} ({method})",
                         stem.with_suffix(".png"))
            table["targets"][target] = {"pathway": pathway, "voxels": len(voxels), "total": float(volume.sum()),
                                        "volume": str(stem.with_suffix(".nii.gz")), "rois": roi_shares(volume, atlases)}
        shares = [table["targets"][target]["rois"] for target in attribution]
        table["pathways"][pathway] = {roi: float(np.mean([s.get(roi, 0.0) for s in shares]))
                                      for roi in sorted(set().union(*shares))}
    table["silencing"] = silencing
    return table


def _truth(test, targets) -> dict[str, np.ndarray]:
    """The test images' true values of ``targets`` (:class:`~havir.artifacts.dataset.Split` fields)."""
    return {target: getattr(test, target) for target in targets}


def explain_run(
    run: Path | Sequence[Path],
    out: Path,
    *,
    nsd_root: Path | None = None,
    method: str = "gradients",
    baselines: int = 4,
    steps: int = 32,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Attribute each target of one run (or of several, one per subject) to its input voxels
    and write volumes, figures and the ROI table into ``out``; returns what ``--json`` prints.

    Parameters
    ----------
    run : a finished run folder of ``havir train`` (``model`` havir or ridge), or several, one
        per subject.
    out : output folder (see the module docstring for its files).
    nsd_root : the NSD release, for the ROI atlases and the mean volume (default: the one the
        run's data were prepared from, as their record says).
    method : ``"gradients"`` (what the model reads: integrated gradients, or ridge's weights) or
        ``"patterns"`` (where the decoded content lies: activation patterns); see the module docstring.
    baselines : other test images each image is attributed against (ignored for ridge runs).
    steps : integrated gradients' path points (ignored for ridge runs).
    batch_size : test images per attribution pass (each pass runs ``batch_size x steps`` inputs).
    device : ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    progress : report progress on stderr.
    """
    started = time.perf_counter()
    check_options(EXPLAIN_OPTIONS, method=method, baselines=baselines, steps=steps, batch_size=batch_size)
    torch_device = resolve_device(device)  # a bad option is refused before any file is read
    runs = [Path(run)] if isinstance(run, (str, Path)) else [Path(r) for r in run]
    if not runs:
        raise InvalidInputError("no run to explain: pass --run RUN (repeat it, one per subject, to compare subjects)")
    inputs = [_run_inputs(r, nsd_root) for r in runs]  # every run and its inputs checked before anything is written
    subjects = [run_inputs.record["subject"] for run_inputs in inputs]
    repeated = sorted({s for s in subjects if subjects.count(s) > 1})
    if repeated:
        raise InvalidInputError(
            f"several runs of subj{repeated[0]:02d} given: pass one run per subject (explain each run of a subject into its own --out)"
        )
    with output_folder(Path(out)) as out:
        tables = {f"subj{subject:02d}": _attribute_run(run_inputs, out, method=method, baselines=baselines, steps=steps,
                                                      batch_size=batch_size, device=torch_device, progress=progress)
                  for run_inputs, subject in zip(inputs, subjects)}
        figure = None
        if len(tables) > 1:
            figure = out / "roi_shares.png"
            _plot_comparison(tables, figure)
        result = {
            "subjects": tables,
            "comparison_figure": str(figure) if figure else None,
            "settings": {"method": method, "baselines": baselines, "steps": steps, "batch_size": batch_size,
                         "device": str(torch_device)},
            "protocol": PROTOCOL,
            "havir_version": havir.__version__,
            "versions": package_versions(*MODEL_STACK, "captum", "nibabel", "nilearn"),
            "seconds": round(time.perf_counter() - started, 3),
            "output": str(out),
        }
        write_json(out / "attribution.json", result)
    return result
