"""A reconstruction folder: one ``<nsdId>.png`` per test image, written by ``havir reconstruct``
or by any other method, read by ``havir eval`` and the report.

``havir reconstruct`` writes ``.havir-reconstruct.json`` first (what its PNGs are made with:
mode, sampler settings, backbone, run; checked when more images are added), then the PNGs, each
under a temporary name then renamed, and ``manifest.json`` last, once every image is there
(the same record plus the images, the schedule that ran and the versions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import PIL.Image

from havir.errors import InvalidInputError, MissingInputError
from havir.io import atomic_path, write_json
from havir.validation import read_json

#: Written last by ``havir reconstruct``: the folder is complete.
MANIFEST = "manifest.json"
#: Written first by ``havir reconstruct``: what the folder's PNGs are made with.
MADE_WITH = ".havir-reconstruct.json"

_PNG_NAME = re.compile(r"^(\d+)\.png$")
_CANONICAL = re.compile(r"^(0|[1-9]\d*)\.png$")


def require_reconstructions(folder: Path) -> Path:
    """``folder`` if it is a folder (of reconstructions), or one line saying what to pass."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"reconstruction folder {folder} does not exist: pass the --out folder of `havir reconstruct`")
    return folder


def reconstruction_ids(folder: Path) -> set[int]:
    """The nsdIds of the ``<nsdId>.png`` files in ``folder``.

    Names are strict: one canonical name per image, the decimal nsdId without leading zeros
    (``12.png``). ``0012.png`` would be a second name for the same image (and ``12.png`` and
    ``0012.png`` side by side would score only one of them), so any such name is refused.
    """
    numbered = [path.name for path in Path(folder).iterdir() if _PNG_NAME.match(path.name)]
    odd = sorted(name for name in numbered if not _CANONICAL.match(name))
    if odd:
        example = f"{int(odd[0][:-4])}.png"
        raise InvalidInputError(
            f"{folder} holds {len(odd)} reconstruction(s) with leading zeros in the name (e.g. {odd[0]}): name each "
            f"image <nsdId>.png without leading zeros ({odd[0]} -> {example}), one file per image"
        )
    return {int(name[:-4]) for name in numbered}


def read_reconstruction(path: Path) -> np.ndarray:
    """One reconstruction as uint8 (h, w, 3).

    8-bit images of any PIL mode are converted to RGB. 16-bit grayscale PNGs are scaled by
    255/65535 (PIL's RGB conversion would clip them to white); 16-bit colour PNGs are refused
    (PIL keeps only their high byte). An image over PIL's decompression-bomb limit is refused.
    """
    try:
        with PIL.Image.open(path) as image:
            rawmode = image.tile[0].args if image.tile else ""
            if image.mode.startswith("I;16"):
                levels = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
                gray = np.rint(levels).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=2)
            if image.mode in ("I", "F"):
                raise InvalidInputError(
                    f"{path} is a {image.mode} (32-bit) image: save reconstructions as 8-bit RGB PNGs"
                )
            if isinstance(rawmode, str) and ";16" in rawmode:
                raise InvalidInputError(
                    f"{path} is a 16-bit colour PNG ({rawmode}), which PIL reads only to 8 bits by truncation: "
                    "save reconstructions as 8-bit RGB PNGs"
                )
            return np.asarray(image.convert("RGB"))
    except PIL.Image.DecompressionBombError as err:
        raise InvalidInputError(
            f"{path} is too large to be a reconstruction ({err}): save it at the stimulus size (425 or 512 px)"
        ) from None
    except PIL.UnidentifiedImageError:
        raise InvalidInputError(f"{path} is not an image PIL can read: write reconstructions as PNG files") from None


def load_reconstructions(folder: Path, nsd_ids: np.ndarray, *, exact: bool = True) -> np.ndarray:
    """The reconstructions ``<nsdId>.png`` in ``folder`` for ``nsd_ids``, as uint8 (n, h, w, 3).

    With ``exact`` (scoring) the folder must hold exactly these images: a missing or an extra
    id is an error naming them, so that two methods are never compared on different image sets.
    """
    present = reconstruction_ids(require_reconstructions(folder))
    wanted = {int(i) for i in nsd_ids}

    def listed(ids: set[int]) -> str:
        shown = ", ".join(str(i) for i in sorted(ids)[:5])
        return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    if wanted - present:
        raise MissingInputError(
            f"{folder} lacks {len(wanted - present)} of the {len(wanted)} test images (nsdId {listed(wanted - present)}): "
            "reconstruct all of them (`havir reconstruct` without --limit) before scoring"
        )
    if exact and present - wanted:
        raise InvalidInputError(
            f"{folder} holds {len(present - wanted)} images that are not this subject's test images "
            f"(nsdId {listed(present - wanted)}): is it another subject's folder?"
        )
    images = [read_reconstruction(folder / f"{int(nsd_id)}.png") for nsd_id in nsd_ids]
    if len({image.shape for image in images}) > 1:
        raise InvalidInputError(f"the reconstructions in {folder} have different sizes: {sorted({i.shape for i in images})}")
    return np.stack(images)


def is_havir_reconstruction(folder: Path) -> bool:
    """Whether ``havir reconstruct`` completed ``folder`` (it holds a manifest)."""
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    """The manifest of a folder ``havir reconstruct`` completed (mode, settings, run, model...);
    a missing or damaged one is one :class:`~havir.errors.HavirError` line."""
    return read_json(Path(folder) / MANIFEST, what="reconstruction manifest",
                     fix="run `havir reconstruct` again into this folder to rewrite it")


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest: the last file, once every image is in ``folder``."""
    write_json(Path(folder) / MANIFEST, manifest)


def begin_reconstruction(folder: Path, made_with: dict, *, record: bool = True) -> None:
    """Check ``folder`` can take PNGs made with ``made_with`` and, with ``record``, write it there
    before any PNG is added.

    A folder whose PNGs were made with other settings is refused (the kept PNGs and the new ones
    would be mixed under one manifest): each key of ``made_with`` that its record holds must be equal.
    """
    folder = Path(folder)
    held_in = next((p for p in (folder / MADE_WITH, folder / MANIFEST) if p.is_file()), None)
    if held_in is not None and any(folder.glob("*.png")):
        held = json.loads(held_in.read_text())
        differs = sorted(key for key in made_with if key in held and held[key] != made_with[key])
        if differs:
            raise InvalidInputError(
                f"{folder} holds reconstructions made with another {', '.join(differs)}: choose another --out, "
                "or delete its PNGs to make them again"
            )
    if record:
        write_json(folder / MADE_WITH, made_with)


def write_reconstructions(folder: Path, nsd_ids, images: np.ndarray) -> None:
    """One PNG per image, ``<nsdId>.png``, each written under a temporary name then renamed."""
    for nsd_id, image in zip(np.asarray(nsd_ids).tolist(), images):
        with atomic_path(Path(folder) / f"{nsd_id}.png") as temporary:
            PIL.Image.fromarray(image).save(temporary, format="PNG")


def abandon_if_empty(folder: Path) -> None:
    """After a failed start: a folder with no PNG keeps no record of what it was to hold."""
    if not any(Path(folder).glob("*.png")):
        (Path(folder) / MADE_WITH).unlink(missing_ok=True)
