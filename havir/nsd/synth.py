"""A miniature Natural Scenes Dataset in the exact release layout, with a simulated brain.

Everything HAVIR reads from NSD is written here the way the release has it (1-based design
indices, int16 betas x 300 as NIfTI ``(X, Y, Z, trials)`` and HDF5 ``(trials, Z, Y, X)`` chunked
per voxel, ROI atlases with their ``.ctab``, ``imgBrick``, the stimulus CSV, COCO captions), only
smaller. Stimuli are procedural scenes (:mod:`havir.nsd.scenes`).

The simulated brain follows the visual hierarchy so that decoding is learnable and the
structural/semantic split matters:

* early visual voxels (V1-V3, hV4) have retinotopic receptive fields: a Gaussian window on the
  image whose size grows from V1 to hV4, weighting luminance, colour opponency and contrast;
* higher visual voxels (ventral, lateral and parietal streams, floc regions) respond nonlinearly
  to scene content: which objects, how many, of what category; floc regions prefer their category;
* every other voxel is noise;
* each showing of an image gets independent noise, and each session drifts in offset and gain.

Seeded and deterministic: the same arguments write the same bytes (but for file timestamps).

Beside the release (outside its layout) the generator writes its ground truth per voxel,
``OUT/havir-synth-truth/subjXX.npz``, for tests and ``havir explain`` checks to compare with: each
voxel's role and how strongly layout and content drive it (:func:`read_synth_truth`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io
from PIL import Image

from havir.errors import InvalidInputError, MissingInputError
from havir.io import atomic_path, ensure_output_dir, open_h5, write_json
from havir.nsd.betas import BETAS_SCALE
from havir.nsd.layout import ATLASES, FALLBACK_LABELS, NSDLayout, check_subject
from havir.nsd.scenes import CATEGORIES, KINDS, content_features, describe_scene, render_scene, sample_scene
from havir.validation import Interval, OneOf, Rule, check_options

#: Sessions each subject completed in the release, scaled down to ``sessions`` below.
RELEASE_SESSIONS = (40, 40, 32, 30, 40, 32, 40, 30)
_FEATURE_GRID = 16  # receptive fields are evaluated on the image resampled to 16x16

#: The sidecar folder (beside the release, not part of NSD's layout) and its format version.
TRUTH_FOLDER = "havir-synth-truth"
TRUTH_FORMAT = 1

#: Voxel roles of :attr:`SubjectTruth.roles` and the sidecar, by value.
ROLES = {0: "outside the brain", 1: "noise", 2: "early visual (layout-driven)", 3: "higher visual (content-driven)"}


@dataclass
class SubjectTruth:
    """What the generator knows about one subject, for tests to compare against.

    Counts are computed from the generator's own 0-based bookkeeping, not from the files.
    ``trial_nsd_id`` (0-based image id of each trial, in order) and ``roles`` (voxel role per
    atlas-grid voxel: 0 outside brain, 1 noise, 2 early visual, 3 higher visual) are arrays;
    ``layout_drive`` and ``content_drive`` (float32 (X, Y, Z), percent signal change) are how
    strongly each voxel is driven by the image's layout and by its content (see
    :class:`VoxelTruth`); ``affine`` (4, 4) is the grid's.
    """

    subject: int
    grid: tuple[int, int, int]
    sessions: int
    trials_per_session: int
    train_images: int
    test_images: int
    train_trials: int
    test_trials: int
    trial_nsd_id: np.ndarray = field(repr=False)
    roles: np.ndarray = field(repr=False)
    layout_drive: np.ndarray = field(repr=False)
    content_drive: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)

    def counts(self) -> dict:
        arrays = ("trial_nsd_id", "roles", "layout_drive", "content_drive", "affine")
        return {k: v for k, v in asdict(self).items() if k not in arrays}


@dataclass
class SynthTruth:
    """Ground truth of a synthetic NSD: settings, the shared (test) images' 0-based ids, each
    image's content vector (:func:`~havir.nsd.scenes.content_features`, what higher visual
    voxels encode) and one :class:`SubjectTruth` per subject."""

    images_per_subject: int
    shared_images: int
    total_images: int
    image_side: int
    seed: int
    shared_nsd_id: np.ndarray = field(repr=False)
    content: np.ndarray = field(repr=False)
    subjects: dict[int, SubjectTruth] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("subjects", "shared_nsd_id", "content")}
        data["shared_nsd_id"] = self.shared_nsd_id.tolist()
        data["subjects"] = {f"subj{s:02d}": t.counts() for s, t in self.subjects.items()}
        return data


def subject_grid(subject: int) -> tuple[int, int, int]:
    """A small functional grid per subject; each differs, as in the release."""
    return (20 + subject % 3, 25 + (2 * subject) % 5, 21 + subject % 2)


def _affine(grid: tuple[int, int, int]) -> np.ndarray:
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = -1.8 * (np.asarray(grid) - 1) / 2
    return affine


def _atlases(grid: tuple[int, int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Label volumes laid out like visual cortex: the back of the brain (low y) is early visual
    cortex, ventral (low z) below dorsal; streams run forward from it; floc ROIs are blobs."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in grid), indexing="ij")
    brain = x**2 + y**2 + z**2 <= 1.0
    depth = (y + 1) / 2  # 0 at the back of the brain, 1 at the front
    ventral, dorsal = z < 0, z >= 0
    atlases = {name: np.where(brain, 0, -1).astype(np.int16) for name in ATLASES}
    atlases["nsdgeneral"][brain & (depth < 0.5)] = 1
    bands = [(0.0, 0.12), (0.12, 0.2), (0.2, 0.28)]  # V1, V2, V3 by distance from the back
    for area, (lo, hi) in enumerate(bands):
        in_band = brain & (depth >= lo) & (depth < hi)
        atlases["prf-visualrois"][in_band & ventral] = 2 * area + 1
        atlases["prf-visualrois"][in_band & dorsal] = 2 * area + 2
    atlases["prf-visualrois"][brain & (depth >= 0.28) & (depth < 0.34) & (z < -0.2)] = 7  # hV4
    eccentricity = np.abs(x) + 0.5 * np.abs(z)
    early = atlases["prf-visualrois"] > 0
    edges = np.quantile(eccentricity[early], [0.2, 0.4, 0.6, 0.8])
    atlases["prf-eccrois"][early] = 1 + np.searchsorted(edges, eccentricity[early])
    streams = atlases["streams"]
    streams[brain & (depth < 0.28)] = 1
    middle = brain & (depth >= 0.28) & (depth < 0.36)
    streams[middle & (z < -0.3)], streams[middle & (z >= -0.3) & (z < 0.3)], streams[middle & (z >= 0.3)] = 2, 3, 4
    # The ventral stream starts inside V3v and the parietal one runs past nsdgeneral, so the
    # overlap rule and the nsdgeneral limit both have voxels to act on.
    high = brain & (depth >= 0.36) & (depth < 0.62)
    streams[brain & (depth >= 0.25) & (depth < 0.62) & (z < -0.3)] = 5
    streams[high & (z >= -0.3) & (z < 0.3)] = 6
    streams[high & (z >= 0.3)] = 7
    higher = brain & (depth >= 0.36) & (depth < 0.5)
    candidates = np.argwhere(higher)
    for atlas in ("floc-faces", "floc-bodies", "floc-places", "floc-words"):
        for value in range(1, len(FALLBACK_LABELS[atlas]) + 1):
            centre = candidates[rng.integers(len(candidates))]
            ball = sum((idx - c) ** 2 for idx, c in zip(np.indices(grid), centre)) <= 2.0
            free = ball & brain & (atlases[atlas] == 0)
            atlases[atlas][free] = value
    return atlases


def _layout_features(images: np.ndarray) -> np.ndarray:
    """Per image, the maps early visual cortex sees at 16x16: luminance, red-green,
    blue-yellow and local contrast. Returns float array (n_images, 4, 16, 16)."""
    maps = []
    for image in images:
        small = np.asarray(Image.fromarray(image).resize((_FEATURE_GRID,) * 2, Image.BOX), dtype=np.float64) / 255
        r, g, b = small[..., 0], small[..., 1], small[..., 2]
        luminance = 0.299 * r + 0.587 * g + 0.114 * b
        gy, gx = np.gradient(luminance)
        maps.append(np.stack([luminance, r - g, b - (r + g) / 2, np.hypot(gx, gy)]))
    return np.asarray(maps)


def _early_weights(atlases: dict[str, np.ndarray], voxels: np.ndarray, grid, rng) -> np.ndarray:
    """Receptive fields of early voxels: (n_voxels, 4 * 16 * 16) weights over the layout maps.

    Visual field position follows cortical position (x: left/right of the midline -> horizontal
    position; ventral -> upper field), with receptive fields growing V1 -> hV4."""
    area = atlases["prf-visualrois"][tuple(voxels.T)]  # 1..7
    xs = voxels[:, 0] / (grid[0] - 1)
    zs = voxels[:, 2] / (grid[2] - 1)
    centre_x = np.clip(xs + rng.normal(0, 0.05, len(voxels)), 0.05, 0.95)
    centre_y = np.clip(zs + rng.normal(0, 0.05, len(voxels)), 0.05, 0.95)
    sigma = np.array([0.06, 0.06, 0.09, 0.09, 0.12, 0.12, 0.18])[area - 1]
    pixel = (np.arange(_FEATURE_GRID) + 0.5) / _FEATURE_GRID
    window_y = np.exp(-((pixel[None, :] - centre_y[:, None]) ** 2) / (2 * sigma[:, None] ** 2))
    window_x = np.exp(-((pixel[None, :] - centre_x[:, None]) ** 2) / (2 * sigma[:, None] ** 2))
    window = window_y[:, :, None] * window_x[:, None, :]
    window /= window.sum(axis=(1, 2), keepdims=True)
    channel = rng.normal(0, 1, (len(voxels), 4)) + np.array([1.0, 0.0, 0.0, 1.0])  # luminance, contrast bias
    return (channel[:, :, None, None] * window[:, None]).reshape(len(voxels), -1)


def _higher_responses(atlases, voxels: np.ndarray, content: np.ndarray, rng) -> np.ndarray:
    """Responses (n_images, n_voxels) of higher visual voxels to scene content: a rectified mix
    of content variables plus a pairwise interaction; floc voxels add a preference for their
    category, saturating with the number of such objects."""
    n_features = content.shape[1]
    mix = rng.normal(0, 1, (n_features, len(voxels)))
    interaction = rng.normal(0, 1, (n_features, len(voxels))) * rng.normal(0, 1, (n_features, len(voxels)))
    drive = content @ mix
    response = np.maximum(drive, 0) + 0.5 * (content @ interaction) * np.tanh(drive)
    category_counts = content[:, len(KINDS) : len(KINDS) + len(CATEGORIES)]
    for index, category in enumerate(CATEGORIES):
        atlas = f"floc-{category}"
        if atlas in atlases:
            selective = atlases[atlas][tuple(voxels.T)] > 0
            response[:, selective] += 3.0 * np.tanh(category_counts[:, [index]])
    return response


def _standardise(responses: np.ndarray) -> np.ndarray:
    return (responses - responses.mean(0)) / (responses.std(0) + 1e-8)


#: ``havir synth-nsd``'s options: a tenth of ``images`` (at least 10) are shared, and the ids of
#: all eight subjects' images stay within NSD's 73,000; sessions and image side at most the release's.
SYNTH_OPTIONS: dict[str, Rule] = {
    "images": Interval(int, 20, 10_000),
    "seed": Interval(int, 0, 2**32 - 1),
    "image_side": Interval(int, 16, 1024),
    "sessions": Interval(int, 1, 40),
    "betas_format": OneOf("nifti", "hdf5", "both"),
    "signal": Interval(float, 0),
    "noise": Interval(float, 0),
}


def synthesize_nsd(
    out: Path,
    subjects: tuple[int, ...] = (1,),
    images: int = 200,
    seed: int = 0,
    *,
    image_side: int = 64,
    sessions: int = 4,
    betas_format: str = "both",
    signal: float = 1.5,
    noise: float = 1.5,
) -> SynthTruth:
    """Write a synthetic NSD under ``out`` and return its ground truth.

    Parameters
    ----------
    out : folder to create (the ``NSD_ROOT`` of the miniature release).
    subjects : subjects to write betas and ROIs for (1..8); the design covers all eight.
    images : images per subject (10,000 in the release); a tenth (at least 10) are shared.
    seed : seed of every random choice.
    image_side : side of the square stimuli in pixels (425 in the release).
    sessions : sessions of a subject who completed all of them (40 in the release); the others
        have proportionally fewer, as in the release (30/40 -> 3/4).
    betas_format : ``"nifti"``, ``"hdf5"`` or ``"both"``.
    signal, noise : standard deviations, in percent signal change, of a voxel's stimulus-driven
        response and of the independent noise on each trial.
    """
    check_options(SYNTH_OPTIONS, images=images, seed=seed, image_side=image_side, sessions=sessions,
                  betas_format=betas_format, signal=signal, noise=noise)
    for subject in subjects:
        check_subject(subject)
    repeated = sorted({subject for subject in subjects if list(subjects).count(subject) > 1})
    if repeated:  # the second would overwrite the first's files with the same simulation
        raise InvalidInputError(f"subj{repeated[0]:02d} is named twice: name each subject once")
    out = ensure_output_dir(Path(out))
    layout = NSDLayout(out)
    rng = np.random.default_rng(seed)

    # --- Design: shared images first in every subject's list, three showings each ---------------
    n_shared = max(10, images // 10)
    n_total = n_shared + 8 * (images - n_shared)
    pool = rng.permutation(n_total)  # 0-based 73k-style ids
    shared = np.sort(pool[:n_shared])
    own = pool[n_shared:].reshape(8, images - n_shared)
    subject_images = np.concatenate([np.broadcast_to(shared, (8, n_shared)), own], axis=1)  # 0-based
    trials_per_session = 3 * images // sessions
    ordering = rng.permutation(np.repeat(np.arange(images), 3))[: sessions * trials_per_session]  # 0-based k
    design_path = layout.expdesign
    design_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(design_path) as temporary:
        scipy.io.savemat(
            temporary,
            {
                "masterordering": (ordering + 1)[None, :].astype(np.float64),
                "subjectim": (subject_images + 1).astype(np.float64),
                "sharedix": (shared + 1)[None, :].astype(np.float64),
            },
        )

    # --- Stimuli and captions ---------------------------------------------------------------------
    scenes = [sample_scene(rng) for _ in range(n_total)]
    stimuli = np.stack([render_scene(scene, image_side) for scene in scenes])
    layout.stimuli.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.stimuli) as temporary, open_h5(temporary, "w") as h5:
        h5.create_dataset("imgBrick", data=stimuli, chunks=(1, image_side, image_side, 3))
    coco_ids = 100_000 + rng.choice(900_000, size=n_total, replace=False)
    coco_split = np.where(rng.random(n_total) < 0.8, "train2017", "val2017")
    layout.annotations_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train2017", "val2017"):
        members = np.flatnonzero(coco_split == split)
        annotations = [
            {"image_id": int(coco_ids[i]), "id": int(coco_ids[i]) * 10 + j, "caption": caption}
            for i in members
            for j, caption in enumerate(describe_scene(scenes[i], rng))
        ]
        write_json(
            layout.annotations_dir / f"captions_{split}.json",
            {
                "info": {"description": "HAVIR synthetic NSD captions (COCO format)"},
                "licenses": [],
                "images": [
                    {"id": int(coco_ids[i]), "file_name": f"{coco_ids[i]:012d}.jpg", "height": image_side, "width": image_side}
                    for i in members
                ],
                "annotations": annotations,
            },
        )

    subject_sessions = {s: max(1, round(sessions * RELEASE_SESSIONS[s - 1] / 40)) for s in range(1, 9)}
    table = pd.DataFrame(
        {
            "cocoId": coco_ids,
            "cocoSplit": coco_split,
            "cropBox": "(0, 0, 0, 0)",
            "loss": 0.0,
            "nsdId": np.arange(n_total),
            "flagged": False,
            "BOLD5000": False,
            "shared1000": np.isin(np.arange(n_total), shared),
        }
    )
    for s in range(1, 9):
        table[f"subject{s}"] = np.isin(np.arange(n_total), subject_images[s - 1]).astype(int)
    for s in range(1, 9):
        n_trials = subject_sessions[s] * trials_per_session
        repetitions = np.zeros((n_total, 3), dtype=np.int64)
        shown = np.zeros(n_total, dtype=np.int64)
        for t, k in enumerate(ordering[:n_trials]):
            image = subject_images[s - 1, k]
            repetitions[image, shown[image]] = t + 1  # 1-based trial number
            shown[image] += 1
        for r in range(3):
            table[f"subject{s}_rep{r}"] = repetitions[:, r]
    layout.stim_info.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.stim_info) as temporary:
        table.to_csv(temporary, index=True)  # the release has the unnamed index column too

    # --- Colour tables ------------------------------------------------------------------------
    for atlas in ATLASES:
        ctab = layout.ctab_file(atlas)
        ctab.parent.mkdir(parents=True, exist_ok=True)
        lines = ["0 Unknown 0 0 0 0"] + [
            f"{value} {name} {rng.integers(256)} {rng.integers(256)} {rng.integers(256)} 0"
            for value, name in enumerate(FALLBACK_LABELS[atlas], start=1)
        ]
        with atomic_path(ctab) as temporary:
            temporary.write_text("\n".join(lines) + "\n")

    # --- Subjects: atlases, simulated responses, betas --------------------------------------------
    layout_maps = _layout_features(stimuli).reshape(n_total, -1)
    content = np.stack([content_features(scene) for scene in scenes])
    truths = {}
    for subject in subjects:
        truths[subject] = _write_subject(
            layout, subject, rng, subject_images[subject - 1], ordering, n_shared, subject_sessions[subject],
            trials_per_session, layout_maps, content, betas_format, signal, noise,
        )
    truth = SynthTruth(
        images_per_subject=images,
        shared_images=n_shared,
        total_images=n_total,
        image_side=image_side,
        seed=seed,
        shared_nsd_id=shared,
        content=content,
        subjects=truths,
    )
    write_json(out / "synth_truth.json", truth.to_json())
    _write_truth_sidecar(out, truth, signal, noise)
    return truth


@dataclass(frozen=True)
class VoxelTruth:
    """The simulation's ground truth for every voxel of one subject's functional grid.

    Attributes
    ----------
    subject : NSD subject.
    roles : int8 (X, Y, Z): 0 outside the brain, 1 noise, 2 early visual (driven by layout:
        retinotopic receptive fields), 3 higher visual (driven by content); see :data:`ROLES`.
    layout_drive, content_drive : float32 (X, Y, Z), percent signal change: the standard
        deviation, over the subject's images, of the voxel's response to the image's layout
        (respectively its content) before session gain and trial noise; 0 where the simulation
        does not drive it that way. Each driven voxel's response is standardised then scaled by
        ``signal``, so a driven voxel's drive is ``signal`` (0 if its response happened to be
        constant): the roles say *whether*, the drives *how strongly* in the betas' unit.
    affine : float (4, 4), the grid's voxel-to-scanner transform (as the ROI atlases').
    signal, noise : the release's settings (percent signal change): drive scale, trial noise sd.
    """

    subject: int
    roles: np.ndarray
    layout_drive: np.ndarray
    content_drive: np.ndarray
    affine: np.ndarray
    signal: float
    noise: float


def truth_path(root: Path, subject: int) -> Path:
    """Where :func:`synthesize_nsd` writes ``subject``'s ground truth under the release ``root``."""
    return Path(root) / TRUTH_FOLDER / f"subj{subject:02d}.npz"


def _write_truth_sidecar(out: Path, truth: SynthTruth, signal: float, noise: float) -> None:
    """One ``.npz`` per subject (plain arrays, read back with ``allow_pickle=False``)."""
    (out / TRUTH_FOLDER).mkdir(exist_ok=True)
    for subject, facts in truth.subjects.items():
        with atomic_path(truth_path(out, subject)) as temporary, open(temporary, "wb") as file:
            np.savez_compressed(
                file, format_version=np.int64(TRUTH_FORMAT), subject=np.int64(subject), roles=facts.roles,
                layout_drive=facts.layout_drive, content_drive=facts.content_drive, affine=facts.affine,
                signal=np.float64(signal), noise=np.float64(noise),
            )


def read_synth_truth(root: Path, subject: int) -> VoxelTruth:
    """The ground truth :func:`synthesize_nsd` wrote beside a synthetic release for ``subject``."""
    path = truth_path(root, subject)
    if not path.is_file():
        raise MissingInputError(
            f"no synthetic ground truth for subj{subject:02d}: {path} does not exist (only `havir synth-nsd` "
            "writes one, beside a synthetic release): pass the --out folder of `havir synth-nsd`, or write it again"
        )
    try:
        with np.load(path, allow_pickle=False) as stored:
            if int(stored["format_version"]) != TRUTH_FORMAT:
                raise InvalidInputError(
                    f"{path} is ground truth of format {int(stored['format_version'])}, this HAVIR reads format "
                    f"{TRUTH_FORMAT}: write the synthetic release again with `havir synth-nsd`"
                )
            return VoxelTruth(
                subject=int(stored["subject"]), roles=stored["roles"], layout_drive=stored["layout_drive"],
                content_drive=stored["content_drive"], affine=stored["affine"], signal=float(stored["signal"]),
                noise=float(stored["noise"]),
            )
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, InvalidInputError):
            raise
        raise InvalidInputError(f"cannot read synthetic ground truth {path} ({err}): write the release again with `havir synth-nsd`") from err


def _write_subject(
    layout: NSDLayout, subject: int, rng, images0: np.ndarray, ordering: np.ndarray, n_shared: int,
    n_sessions: int, trials_per_session: int, layout_maps: np.ndarray, content: np.ndarray,
    betas_format: str, signal: float, noise: float,
) -> SubjectTruth:
    grid = subject_grid(subject)
    affine = _affine(grid)
    atlases = _atlases(grid, rng)
    for name, labels in atlases.items():
        path = layout.roi_file(subject, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            nib.save(nib.Nifti1Image(labels, affine), temporary)

    brain = atlases["nsdgeneral"] >= 0
    early = atlases["prf-visualrois"] > 0
    higher = np.isin(atlases["streams"], (5, 6, 7)) | np.any(
        [atlases[a] > 0 for a in ("floc-faces", "floc-bodies", "floc-places", "floc-words")], axis=0
    )
    higher &= ~early
    roles = np.where(brain, 1, 0).astype(np.int8)
    roles[early] = 2
    roles[higher] = 3
    early_voxels, higher_voxels = np.argwhere(early), np.argwhere(higher)

    # Stimulus-driven response of each voxel to each image of this subject (images x voxels).
    early_response = _standardise(layout_maps[images0] @ _early_weights(atlases, early_voxels, grid, rng).T)
    higher_response = _standardise(_higher_responses(atlases, higher_voxels, content[images0], rng))
    brain_voxels = np.argwhere(brain)
    baseline = rng.normal(0.0, 0.5, len(brain_voxels))
    where = {tuple(v): i for i, v in enumerate(brain_voxels.tolist())}
    early_index = np.array([where[tuple(v)] for v in early_voxels.tolist()])
    higher_index = np.array([where[tuple(v)] for v in higher_voxels.tolist()])

    folder = layout.betas_dir(subject)
    folder.mkdir(parents=True, exist_ok=True)
    for session in range(1, n_sessions + 1):
        k = ordering[(session - 1) * trials_per_session : session * trials_per_session]
        driven = np.zeros((trials_per_session, len(brain_voxels)))
        driven[:, early_index] = early_response[k]
        driven[:, higher_index] = higher_response[k]
        gain = 1.0 + rng.normal(0.0, 0.1)
        offset = rng.normal(0.0, 0.3, len(brain_voxels))
        betas = gain * signal * driven + baseline + offset + rng.normal(0.0, noise, driven.shape)
        stored = np.clip(np.rint(betas * BETAS_SCALE), -32768, 32767).astype(np.int16)
        volume = np.zeros((trials_per_session, *grid), dtype=np.int16)  # (trials, X, Y, Z)
        volume[:, brain] = stored
        if betas_format in ("nifti", "both"):
            image = nib.Nifti1Image(np.moveaxis(volume, 0, -1), affine)
            image.header.set_data_dtype(np.int16)
            with atomic_path(layout.betas_file(subject, session, "nifti")) as temporary:
                nib.save(image, temporary)
        if betas_format in ("hdf5", "both"):
            with atomic_path(layout.betas_file(subject, session, "hdf5")) as temporary, open_h5(temporary, "w") as h5:
                # h5py shows MATLAB's (X, Y, Z, trials) reversed; one chunk is one voxel's trials.
                h5.create_dataset("betas", data=volume.transpose(0, 3, 2, 1), chunks=(trials_per_session, 1, 1, 1))

    drive = {}  # sd over the subject's images of each voxel's stimulus-driven response, % signal change
    for name, voxels, response in (("layout", early_voxels, early_response), ("content", higher_voxels, higher_response)):
        drive[name] = np.zeros(grid, dtype=np.float32)
        drive[name][tuple(voxels.T)] = signal * response.std(0)
    n_trials = n_sessions * trials_per_session
    k_read = ordering[:n_trials]
    test = k_read < n_shared
    return SubjectTruth(
        subject=subject,
        grid=grid,
        sessions=n_sessions,
        trials_per_session=trials_per_session,
        train_images=len(np.unique(k_read[~test])),
        test_images=len(np.unique(k_read[test])),
        train_trials=int((~test).sum()),
        test_trials=int(test.sum()),
        trial_nsd_id=images0[k_read],
        roles=roles,
        layout_drive=drive["layout"],
        content_drive=drive["content"],
        affine=affine,
    )

