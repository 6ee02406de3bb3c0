"""Single-trial betas of one NSD session, read for the masked voxels only.

A session is 750 trials on the subject's functional grid, stored as int16 percent signal change
x 300. As NIfTI it is ``(X, Y, Z, trials)`` in Fortran order, gzip-compressed, so one trial's
volume is one contiguous run of bytes; as HDF5 it is the dataset ``betas`` that h5py shows as
``(trials, Z, Y, X)``, chunked one voxel (all its trials) per chunk.

Either way HAVIR never holds the session as float64 (4 GiB) nor, for HDF5, reads voxels outside
the mask. Voxels are addressed as an ``(n_voxels, 3)`` array of ``(x, y, z)`` indices, and returned
in that order whichever format they came from.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from havir.errors import InvalidInputError

#: NSD stores betas as int16 percent signal change multiplied by this.
BETAS_SCALE = 300.0

@dataclass(frozen=True)
class GzipInflater:
    """How gzip-compressed NIfTI betas are decompressed.

    Attributes
    ----------
    name : the library, as the prepared file's record names it (``"isal_zlib"`` or ``"zlib"``).
    decompressobj : ``decompressobj(wbits=...)`` of that library, with ``zlib``'s interface.
    errors : what it raises on damaged data.
    """

    name: str
    decompressobj: Callable[..., object]
    errors: tuple[type[BaseException], ...]


def gzip_inflater() -> GzipInflater:
    """The fastest gzip inflater importable here: python-isal's ``isal_zlib`` (Intel ISA-L), else
    the standard library's ``zlib``. Both give the same bytes (DEFLATE is exact).

    Inflating is most of a NIfTI session's reading time; ISA-L inflates betas 2.2x faster than
    zlib, zlib-ng 1.5x, and ``indexed_gzip`` (nibabel's choice when installed) is 1.6x slower
    (``bench/bench_inflate.py``). HAVIR streams the data itself (see :func:`_nifti_bytes`), so the
    choice is made here, not through nibabel's openers.
    """
    try:
        from isal import isal_zlib
    except ImportError:
        return GzipInflater("zlib", zlib.decompressobj, (zlib.error,))
    return GzipInflater("isal_zlib", isal_zlib.decompressobj, (isal_zlib.error,))


@dataclass(frozen=True)
class BetasFile:
    """Header facts of one session's betas file.

    Attributes
    ----------
    path : the file.
    fmt : ``"nifti"`` or ``"hdf5"``.
    grid : (X, Y, Z), the spatial shape in NIfTI axis order whatever the format.
    n_trials : number of trials (750 in the release).
    """

    path: Path
    fmt: str
    grid: tuple[int, int, int]
    n_trials: int


def _corrupt(path: Path, err: BaseException) -> ValueError:
    return InvalidInputError(f"betas file {path} is truncated or corrupt ({err}); delete it and download it again")


def open_betas(path: Path, fmt: str) -> BetasFile:
    """Read the header of a betas file (``fmt`` is ``"nifti"`` or ``"hdf5"``) without its data."""
    if fmt == "nifti":
        try:
            with closing(_nifti_bytes(path, gzip_inflater())) as pieces:
                header = _nifti_header(pieces)[0].header
        except Exception as err:  # nibabel raises HeaderDataError, EOFError, zlib.error...
            raise _corrupt(path, err) from err
        shape = tuple(int(n) for n in header.get_data_shape())
        if len(shape) != 4:
            raise InvalidInputError(f"betas file {path} has shape {shape}; expected (X, Y, Z, trials)")
        return BetasFile(path=path, fmt=fmt, grid=shape[:3], n_trials=shape[3])
    if fmt == "hdf5":
        try:
            with h5py.File(path, "r") as h5:
                if "betas" not in h5:
                    raise InvalidInputError(f"betas file {path} has no dataset 'betas' (found {', '.join(h5)})")
                shape = h5["betas"].shape
        except OSError as err:  # h5py reports a damaged or non-HDF5 file as OSError
            raise _corrupt(path, err) from err
        if len(shape) != 4:
            raise InvalidInputError(f"betas file {path} has shape {shape}; expected (trials, Z, Y, X)")
        return BetasFile(path=path, fmt=fmt, grid=(shape[3], shape[2], shape[1]), n_trials=shape[0])
    raise InvalidInputError(f"unknown betas format {fmt!r}; expected 'nifti' or 'hdf5'")


def read_masked_betas(betas: BetasFile, voxels: np.ndarray) -> np.ndarray:
    """Read the betas of ``voxels`` for every trial of the session.

    Parameters
    ----------
    betas : the session's file, from :func:`open_betas`.
    voxels : int array of shape (n_voxels, 3), ``(x, y, z)`` indices on ``betas.grid``.

    Returns
    -------
    float32 array of shape (n_trials, n_voxels): percent signal change (stored value / 300).
    """
    voxels = np.asarray(voxels, dtype=np.int64)
    if voxels.ndim != 2 or voxels.shape[1] != 3:
        raise InvalidInputError(f"voxels must have shape (n_voxels, 3), got {voxels.shape}")
    reader = _read_nifti if betas.fmt == "nifti" else _read_hdf5
    raw = reader(betas, voxels)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw)).any(axis=0).sum())
        raise InvalidInputError(
            f"betas file {betas.path} holds NaN or inf values in {bad} masked voxels; NSD betas are "
            "finite int16: re-create the file from the release, or drop those voxels from the mask"
        )
    out = raw.astype(np.float32)
    out /= BETAS_SCALE
    return out


#: Compressed bytes fed to the inflater per call: 32 KiB in, about 70 KiB of betas out, so each
#: piece's output is still in the CPU cache when it is copied into the volume buffer.
_NIFTI_PIECE_BYTES = 32 * 1024


def _nifti_bytes(path: Path, inflater: GzipInflater) -> Iterator[bytes]:
    """The NIfTI file's bytes in order, in pieces, inflated by ``inflater`` if it is ``.gz``.

    One ``decompressobj`` pass, not a gzip file object: the file layer's buffering and copies made
    ISA-L's reading of a session 17% slower than a bare pass (``bench/bench_inflate.py``: 353 against
    412 MiB/s out), and its 65 MB reads held 50 volumes at once. A ``.gz`` file may hold
    several gzip members one after the other (as ``cat a.gz b.gz`` makes, and ``gzip`` reads);
    zero bytes between members are padding, as ``gzip`` treats them. Raises ``EOFError`` if the
    file ends inside a member.
    """
    with open(path, "rb", buffering=0) as stream:
        if not path.name.endswith(".gz"):
            while piece := stream.read(_NIFTI_PIECE_BYTES):
                yield piece
            return
        decompressor, fed = inflater.decompressobj(wbits=16 + zlib.MAX_WBITS), False
        while piece := stream.read(_NIFTI_PIECE_BYTES):
            while piece:
                if not fed:  # a member starts here: skip padding before it
                    piece = piece.lstrip(b"\0")
                    if not piece:
                        break
                fed = True
                yield decompressor.decompress(piece)
                if not decompressor.eof:
                    break
                # The member ended inside this piece: the rest of it starts the next member.
                piece = decompressor.unused_data
                decompressor, fed = inflater.decompressobj(wbits=16 + zlib.MAX_WBITS), False
        if fed:
            raise EOFError("the compressed stream ends inside a gzip member")


def _nifti_header(pieces: Iterator[bytes]) -> tuple[nib.Nifti1Image | nib.Nifti2Image, bytearray]:
    """The image nibabel parses from the header at the start of ``pieces`` (the file's bytes, from
    :func:`_nifti_bytes`), and the bytes after the header that were already taken from ``pieces``
    (the data's start: ``image.dataobj.offset`` of the file).

    Parsed from HAVIR's own stream rather than by ``nib.load``: nibabel opens ``.gz`` files with
    ``indexed_gzip`` when it is installed, which inflates 16 MB ahead (0.1 s) to read 352 bytes.
    """
    prefix = bytearray()
    for piece in pieces:
        prefix += piece
        if len(prefix) < 4:
            continue
        # sizeof_hdr: 348 for NIfTI-1, 540 for NIfTI-2, in the file's byte order
        is_nifti2 = 540 in (int.from_bytes(prefix[:4], "little"), int.from_bytes(prefix[:4], "big"))
        header_class = nib.Nifti2Header if is_nifti2 else nib.Nifti1Header
        if len(prefix) < header_class.template_dtype.itemsize:
            continue
        header = header_class(bytes(prefix[: header_class.template_dtype.itemsize]), check=False)
        if len(prefix) < int(header["vox_offset"]):  # the extensions lie between header and data
            continue
        holder = nib.FileHolder(fileobj=io.BytesIO(prefix))
        image = (nib.Nifti2Image if is_nifti2 else nib.Nifti1Image).from_file_map({"header": holder, "image": holder})
        return image, prefix[image.dataobj.offset :]
    raise EOFError("the file ends inside its NIfTI header")


def _read_nifti(betas: BetasFile, voxels: np.ndarray) -> np.ndarray:
    # nibabel parses the header; the data are streamed here because nibabel's array proxy would
    # either materialise the whole int16 session (1 GB) or re-decompress the gzip stream from the
    # start for every slice. One pass copies the inflated pieces into a one-volume buffer and keeps
    # the masked voxels of each volume as it completes (a volume may span many pieces, and a piece
    # may end several volumes).
    x, y, z = voxels.T
    flat = np.ravel_multi_index((x, y, z), betas.grid, order="F")  # NIfTI data are Fortran order
    inflater = gzip_inflater()
    try:
        with closing(_nifti_bytes(betas.path, inflater)) as pieces:
            image, start = _nifti_header(pieces)
            dtype = image.get_data_dtype()
            # The loaded header's scaling is reset; nibabel's array proxy keeps it.
            slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
            volume = np.empty(int(np.prod(betas.grid)), dtype=dtype)
            volume_bytes = volume.view(np.uint8)
            out = np.empty((betas.n_trials, len(voxels)), dtype=dtype)
            trial, filled = 0, 0
            for piece in chain([start], pieces):
                piece = np.frombuffer(piece, dtype=np.uint8)
                while len(piece) and trial < betas.n_trials:
                    taken = min(len(piece), len(volume_bytes) - filled)
                    volume_bytes[filled : filled + taken] = piece[:taken]
                    piece, filled = piece[taken:], filled + taken
                    if filled == len(volume_bytes):
                        out[trial] = volume[flat]
                        trial, filled = trial + 1, 0
            # The loop reads the stream to its end even after the last trial: the gzip trailer's
            # checksum is verified only there.
            if trial < betas.n_trials:
                raise EOFError(f"file ends after trial {trial}")
    except (EOFError, OSError, *inflater.errors) as err:
        raise _corrupt(betas.path, err) from err
    if (slope, inter) != (1.0, 0.0):  # NSD's files have no scaling; others may
        out = out.astype(np.float32) * np.float32(slope) + np.float32(inter)
    return out


def _read_hdf5(betas: BetasFile, voxels: np.ndarray) -> np.ndarray:
    # One chunk holds one voxel's trials, so reading only the masked voxels touches only their
    # chunks. Voxels are grouped into runs along X and each run is one read. (A single HDF5 union
    # selection of all runs was 100x slower and took 2.6 GB: bench/bench_prepare.py.)
    x, y, z = voxels.T
    order = np.lexsort((x, y, z))  # by z, then y, then x: the file's row-major order
    xs, ys, zs = x[order], y[order], z[order]
    breaks = np.flatnonzero((np.diff(xs) != 1) | (np.diff(ys) != 0) | (np.diff(zs) != 0)) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    stops = starts[1:] + [len(xs)]
    try:
        with h5py.File(betas.path, "r") as h5:
            dataset = h5["betas"]
            out = np.empty((betas.n_trials, len(voxels)), dtype=dataset.dtype)
            for start, stop in zip(starts, stops):
                z0, y0, x0 = int(zs[start]), int(ys[start]), int(xs[start])
                out[:, order[start:stop]] = dataset[:, z0, y0, x0 : x0 + stop - start]
    except (OSError, KeyError) as err:
        raise _corrupt(betas.path, err) from err
    return out
