"""Per-subject structural and semantic voxel masks, from NSD's ROI atlases.

HAVIR splits visual cortex in two, following the visual hierarchy: the *structural* set is early,
retinotopic cortex (V1-V3: small receptive fields that carry layout, colour and contrast) and
feeds the Structural Generator; the *semantic* set is higher visual cortex (ventral, lateral and
parietal streams, category-selective regions) and feeds the Semantic Extractor.

A mask definition (TOML, in ``masks/``) names atlas labels; nothing is hard-coded. Both sets are
limited to a ``within`` region (``nsdgeneral``, NSD's visual-cortex mask) and made disjoint by the
rule in ``overlap``: a voxel that both sets select goes to the set it names. ``subjXX.toml``
extends ``default.toml`` and may replace any table, so masks stay individual.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from havir.errors import InvalidInputError, MissingInputError
from havir.io import atomic_path, write_json
from havir.nsd.atlas import Atlas, read_atlas
from havir.nsd.layout import ATLASES, SUBJECTS, NSDLayout, check_subject

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_KEYS = {"description", "extends", "subject", "overlap", "within", "structural", "semantic"}
_OVERLAP_RULES = ("structural", "semantic")


def definitions_dir() -> Path:
    """The folder of shipped definitions: ``masks/`` in a checkout, packaged inside a wheel."""
    packaged = Path(__file__).parent / "_mask_definitions"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "masks"


@dataclass(frozen=True)
class RoiSelection:
    """Labels chosen from one atlas, e.g. ``RoiSelection("prf-visualrois", ("V1v", "V1d"))``."""

    atlas: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class MaskDefinition:
    """A resolved mask definition (``extends`` already applied).

    Attributes
    ----------
    name : file stem, e.g. ``"subj01"``.
    subject : the subject it is written for, or None for a template.
    within : region both sets are limited to.
    structural, semantic : the label selections whose union forms each set.
    overlap : the set that keeps a voxel selected by both.
    """

    name: str
    subject: int | None
    within: RoiSelection
    structural: tuple[RoiSelection, ...]
    semantic: tuple[RoiSelection, ...]
    overlap: str
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, content: dict) -> MaskDefinition:
        """The definition :meth:`to_dict` wrote (a prepared subject's record keeps it)."""

        def selection(entry: dict) -> RoiSelection:
            return RoiSelection(atlas=entry["atlas"], labels=tuple(entry["labels"]))

        return cls(
            name=content["name"], subject=content["subject"], within=selection(content["within"]),
            structural=tuple(map(selection, content["structural"])), semantic=tuple(map(selection, content["semantic"])),
            overlap=content["overlap"], description=content.get("description", ""),
        )

    def sha256(self) -> str:
        """Hash of what the definition selects (not of its file's formatting)."""
        selected = {k: v for k, v in self.to_dict().items() if k not in ("name", "description")}
        return hashlib.sha256(json.dumps(selected, sort_keys=True).encode()).hexdigest()

    def atlases(self) -> list[str]:
        used = [self.within.atlas] + [s.atlas for s in self.structural + self.semantic]
        return list(dict.fromkeys(used))


def _selection(entry: object, where: str) -> RoiSelection:
    if not isinstance(entry, dict) or set(entry) != {"atlas", "labels"}:
        raise InvalidInputError(f"{where} must be a table with exactly the keys 'atlas' and 'labels', got {entry!r}")
    atlas, labels = entry["atlas"], entry["labels"]
    if atlas not in ATLASES:
        raise InvalidInputError(f"{where}: unknown atlas {atlas!r}; NSD atlases are {', '.join(ATLASES)}")
    if isinstance(labels, str) or not labels or not all(isinstance(label, str) for label in labels):
        raise InvalidInputError(f"{where}: labels must be a non-empty list of label names, got {labels!r}")
    return RoiSelection(atlas=atlas, labels=tuple(labels))


def _read_toml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` with its ``extends`` chain applied; ``chain`` holds the files that extend it."""
    if not path.is_file():
        raise MissingInputError(f"mask definition not found: {path}")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InvalidInputError(f"mask definition {path} is not valid TOML ({err}): fix the file") from err
    unknown = set(data) - _KEYS
    if unknown:
        raise InvalidInputError(
            f"mask definition {path} has unknown keys {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_KEYS))}"
        )
    if "extends" in data:
        if not isinstance(data["extends"], str):
            raise InvalidInputError(f"mask definition {path}: extends must be a file name, got {data['extends']!r}")
        parent_path = path.parent / data["extends"]
        if not parent_path.is_file():
            raise MissingInputError(f"mask definition {path} extends {parent_path}, which is not a file: fix its extends")
        chain = (*chain, path.resolve())
        if parent_path.resolve() in chain:
            cycle = " -> ".join(p.name for p in (*chain, parent_path.resolve()))
            raise InvalidInputError(f"mask definition {path} extends itself through {cycle}: remove one of these extends")
        parent = _read_toml(parent_path, chain)
        parent.pop("subject", None)
        parent.pop("description", None)
        parent.update({k: v for k, v in data.items() if k != "extends"})
        data = parent
    return data


def load_definition(path: Path) -> MaskDefinition:
    """Read and validate a mask definition file (resolving ``extends``)."""
    path = Path(path)
    data = _read_toml(path)
    for key in ("within", "structural", "semantic"):
        if key not in data:
            raise InvalidInputError(f"mask definition {path} lacks [{key}] (nor does a file it extends give one)")
    overlap = data.get("overlap", "structural")
    if overlap not in _OVERLAP_RULES:
        raise InvalidInputError(f"mask definition {path}: overlap must be one of {_OVERLAP_RULES}, got {overlap!r}")
    sets = {}
    for key in ("structural", "semantic"):
        entries = data[key]
        if not isinstance(entries, list) or not entries:
            raise InvalidInputError(f"mask definition {path}: [[{key}]] must list at least one atlas selection")
        sets[key] = tuple(_selection(e, f"{path.name} [[{key}]]") for e in entries)
    subject = data.get("subject")
    if subject is not None and (isinstance(subject, bool) or subject not in SUBJECTS):
        raise InvalidInputError(f"mask definition {path}: subject must be one of 1..8, got {subject!r}: fix or remove it")
    return MaskDefinition(
        name=path.stem,
        subject=subject,
        within=_selection(data["within"], f"{path.name} [within]"),
        structural=sets["structural"],
        semantic=sets["semantic"],
        overlap=overlap,
        description=str(data.get("description", "")).strip(),
    )


def definition_for(subject: int, path: Path | None = None) -> MaskDefinition:
    """The definition to use for ``subject``: ``path`` if given, else the shipped ``subjXX.toml``."""
    check_subject(subject)
    if path is None:
        path = definitions_dir() / f"subj{subject:02d}.toml"
        if not path.is_file():
            path = definitions_dir() / "default.toml"
    definition = load_definition(path)
    if definition.subject is not None and definition.subject != subject:
        raise InvalidInputError(
            f"mask definition {path} is written for subject {definition.subject}, not subject {subject}: "
            f"use subj{subject:02d}.toml or a definition without 'subject'"
        )
    return definition


@dataclass(frozen=True)
class SubjectMasks:
    """The two voxel sets of one subject on its functional grid.

    Attributes
    ----------
    subject : NSD subject.
    definition : what the sets were built from.
    structural, semantic : bool arrays of shape (X, Y, Z); disjoint.
    affine : float array of shape (4, 4), from the atlases.
    roi_counts : ``{"structural": {"atlas/label": n}, "semantic": {...}}``, voxels of each label
        inside ``within`` before overlap resolution.
    overlap_resolved : voxels that both sets selected and ``overlap`` assigned to one of them.
    other : bool array of shape (X, Y, Z): the ``within`` voxels in neither set (with both sets,
        all of ``nsdgeneral``: the input of Brain-Diffuser's ridge baseline).
    roi_labels : int16 array of shape (X, Y, Z): 0 outside both sets, k in a voxel of the set's
        ROI ``roi_names[k - 1]`` (where ROIs of a set overlap, the one listed later, e.g. a floc
        ROI inside a stream, has the voxel).
    roi_names : ``"structural: atlas/label"`` or ``"semantic: atlas/label"``, in the definition's order.
    """

    subject: int
    definition: MaskDefinition
    structural: np.ndarray
    semantic: np.ndarray
    affine: np.ndarray
    roi_counts: dict[str, dict[str, int]]
    overlap_resolved: int
    other: np.ndarray | None = None
    roi_labels: np.ndarray | None = None
    roi_names: tuple[str, ...] = ()

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.structural.shape)

    def voxels(self, which: str) -> np.ndarray:
        """``(n, 3)`` int array of the ``(x, y, z)`` indices of ``which`` set, in C order."""
        mask = {"structural": self.structural, "semantic": self.semantic, "other": self.other}[which]
        return np.argwhere(mask)

    def summary(self) -> dict:
        """The JSON summary of ``havir masks build`` (keys fixed by the CLI contract)."""
        return {
            "subject": self.subject,
            "structural_voxels": int(self.structural.sum()),
            "semantic_voxels": int(self.semantic.sum()),
            "overlap_voxels": int((self.structural & self.semantic).sum()),
            "overlap_resolved": self.overlap_resolved,
            "overlap_rule": self.definition.overlap,
            "grid": list(self.grid),
            "roi_counts": self.roi_counts,
            "definition": self.definition.name,
            "definition_sha256": self.definition.sha256(),
        }


def _select(atlases: dict[str, Atlas], selections: tuple[RoiSelection, ...], within: np.ndarray, counts: dict):
    mask = np.zeros_like(within)
    for selection in selections:
        atlas = atlases[selection.atlas]
        for label in selection.labels:
            voxels = atlas.voxels(label) & within
            counts[f"{selection.atlas}/{label}"] = int(voxels.sum())
            mask |= voxels
    return mask


def build_masks(layout: NSDLayout, subject: int, definition: MaskDefinition) -> SubjectMasks:
    """Build the structural and semantic masks of ``subject`` from its NSD atlases."""
    check_subject(subject)
    layout.check_root()
    atlases = {name: read_atlas(layout, subject, name) for name in definition.atlases()}
    reference = atlases[definition.within.atlas]
    for atlas in atlases.values():
        if atlas.labels.shape != reference.labels.shape:
            raise InvalidInputError(
                f"ROI grid {atlas.labels.shape} of {atlas.name} does not match the grid "
                f"{reference.labels.shape} of {reference.name} for subj{subject:02d}: are all atlases "
                "from func1pt8mm of this subject?"
            )
    within = _select(atlases, (definition.within,), np.ones(reference.labels.shape, dtype=bool), {})
    counts: dict[str, dict[str, int]] = {"structural": {}, "semantic": {}}
    structural = _select(atlases, definition.structural, within, counts["structural"])
    semantic = _select(atlases, definition.semantic, within, counts["semantic"])
    both = structural & semantic
    if definition.overlap == "structural":
        semantic &= ~both
    else:
        structural &= ~both
    for name, mask in (("structural", structural), ("semantic", semantic)):
        if not mask.any():
            raise InvalidInputError(
                f"the {name} set of mask definition {definition.name} selects no voxels of subj{subject:02d} "
                f"inside {definition.within.atlas}: check its labels ({counts[name]})"
            )
    roi_labels = np.zeros(reference.labels.shape, dtype=np.int16)
    roi_names = []
    for name, mask in (("structural", structural), ("semantic", semantic)):
        for selection in getattr(definition, name):
            for label in selection.labels:
                roi_names.append(f"{name}: {selection.atlas}/{label}")
                roi_labels[atlases[selection.atlas].voxels(label) & mask] = len(roi_names)
    return SubjectMasks(
        subject=subject,
        definition=definition,
        structural=structural,
        semantic=semantic,
        affine=reference.affine,
        roi_counts=counts,
        overlap_resolved=int(both.sum()),
        other=within & ~structural & ~semantic,
        roi_labels=roi_labels,
        roi_names=tuple(roi_names),
    )


def save_masks(masks: SubjectMasks, out_dir: Path) -> dict[str, Path]:
    """Write both masks as NIfTI (uint8, the atlases' grid and affine) and the JSON summary."""
    stem = f"subj{masks.subject:02d}"
    paths = {
        "structural": out_dir / f"{stem}_structural.nii.gz",
        "semantic": out_dir / f"{stem}_semantic.nii.gz",
        "summary": out_dir / f"{stem}_masks.json",
    }
    for which in ("structural", "semantic"):
        image = nib.Nifti1Image(getattr(masks, which).astype(np.uint8), masks.affine)
        with atomic_path(paths[which]) as temporary:
            nib.save(image, temporary)
    write_json(paths["summary"], masks.summary() | {"definition_content": masks.definition.to_dict()})
    return paths


def mask_figure(masks: SubjectMasks, layout: NSDLayout) -> bytes:
    """PNG of every ROI of both sets over the subject's brain (nilearn), one colour per ROI:
    warm colours for the structural set's, cool ones for the semantic set's, named in a legend.

    Axial slices are cut through the sets, not through the whole head. The background is the
    subject's mean functional volume when the release folder has it, otherwise the brain outline
    taken from ``nsdgeneral`` (labels >= 0 are inside the brain).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from nilearn import plotting

    mean_path = layout.mean_volume(masks.subject)
    if mean_path.is_file():
        background = nib.load(mean_path)
    else:
        brain = read_atlas(layout, masks.subject, "nsdgeneral").labels >= 0
        background = nib.Nifti1Image(brain.astype(np.float32), masks.affine)
    structural = [i for i, name in enumerate(masks.roi_names) if name.startswith("structural")]
    colours = np.zeros((len(masks.roi_names), 4))
    colours[structural] = plt.cm.autumn(np.linspace(0, 0.85, len(structural)))
    semantic = [i for i in range(len(masks.roi_names)) if i not in structural]
    colours[semantic] = plt.cm.winter(np.linspace(0, 1, len(semantic)))
    slices = np.unique(np.nonzero(masks.roi_labels)[2])
    picked = slices[np.linspace(0, len(slices) - 1, min(6, len(slices))).round().astype(int)]
    cut_coords = [float((masks.affine @ [0, 0, z, 1])[2]) for z in picked]
    shown = [k for k in range(1, len(masks.roi_names) + 1) if (masks.roi_labels == k).any()]
    legend_rows = -(-len(shown) // 5)
    figure = plt.figure(figsize=(12, 3 + 0.25 * legend_rows), facecolor="k")
    share = 3 / (3 + 0.25 * legend_rows)  # of the height, for the slices; the legend goes below
    display = plotting.plot_roi(
        nib.Nifti1Image(masks.roi_labels, masks.affine),
        bg_img=background,
        cmap=ListedColormap(colours),
        vmin=1,
        vmax=len(masks.roi_names),
        display_mode="z",
        cut_coords=cut_coords,
        colorbar=False,
        draw_cross=False,
        black_bg=True,
        figure=figure,
        axes=(0, 1 - share, 1, share),
        title=(
            f"subj{masks.subject:02d}: structural {int(masks.structural.sum())} voxels (warm), "
            f"semantic {int(masks.semantic.sum())} voxels (cool)"
        ),
    )
    handles = [Patch(color=colours[k - 1], label=masks.roi_names[k - 1]) for k in shown]
    figure.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False, labelcolor="w")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="k")
    display.close()
    plt.close(figure)
    return buffer.getvalue()


def plot_masks(masks: SubjectMasks, layout: NSDLayout, out_png: Path) -> Path:
    """Write :func:`mask_figure` to ``out_png`` (committed whole, or not at all)."""
    figure = mask_figure(masks, layout)
    with atomic_path(out_png) as temporary:
        temporary.write_bytes(figure)
    return out_png
