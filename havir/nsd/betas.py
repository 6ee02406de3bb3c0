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

import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import h5py
import nibabel as nib
import numpy as np

from havir.errors import InvalidInputError

#: NSD stores betas as int16 percent signal change multiplied by this.
BETAS_SCALE = 300.0

#: Trials decoded per NIfTI read: bounds memory to this many volumes (1.4 MB each at 1.8 mm).
_NIFTI_BLOCK_TRIALS = 50


@dataclass(frozen=True)
class GzipInflater:
    """How gzip-compressed NIfTI betas are decompressed.

    Attributes
    ----------
    name : the library, as the prepared file's record names it (``"isal.igzip"`` or ``"gzip"``).
    open : ``open(path)`` -> binary stream of the decompressed bytes.
    errors : what it raises on damaged data, besides ``EOFError`` and ``OSError``.
    """

    name: str
    open: Callable[[Path], BinaryIO]
    errors: tuple[type[BaseException], ...]


def gzip_inflater() -> GzipInflater:
    """The fastest gzip inflater importable here: python-isal's ``igzip`` (Intel ISA-L), else the
    standard library's ``gzip`` (zlib). Both give the same bytes (DEFLATE is exact).

    Inflating is most of a NIfTI session's reading time; ISA-L inflates betas 2.2x faster than
    zlib, zlib-ng 1.5x, and ``indexed_gzip`` (nibabel's choice when installed) is 1.6x slower
    (``bench/bench_inflate.py``). HAVIR streams the data itself (see :func:`_read_nifti`), so the
    choice is made here, not through nibabel's openers.
    """
    try:
        from isal import igzip, isal_zlib
    except ImportError:
        return GzipInflater("gzip", lambda path: gzip.open(path, "rb"), (zlib.error,))
    return GzipInflater("isal.igzip", lambda path: igzip.open(path, "rb"), (isal_zlib.error,))


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
            with _open_nifti_stream(path) as stream:
                header = _nifti_image(stream).header
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


def _open_nifti_stream(path: Path) -> BinaryIO:
    """The NIfTI file's bytes, decompressed by :func:`gzip_inflater` if it is ``.gz``."""
    return gzip_inflater().open(path) if path.name.endswith(".gz") else open(path, "rb")


def _nifti_image(stream: BinaryIO) -> nib.Nifti1Image | nib.Nifti2Image:
    """The image nibabel parses from the header at the start of ``stream`` (no data read).

    Parsed from HAVIR's own stream rather than by ``nib.load``: nibabel opens ``.gz`` files with
    ``indexed_gzip`` when it is installed, which inflates 16 MB ahead (0.1 s) to read 352 bytes.
    """
    sizeof_hdr = stream.read(4)  # 348 for NIfTI-1, 540 for NIfTI-2, in the file's byte order
    is_nifti2 = 540 in (int.from_bytes(sizeof_hdr, "little"), int.from_bytes(sizeof_hdr, "big"))
    stream.seek(0)
    holder = nib.FileHolder(fileobj=stream)
    return (nib.Nifti2Image if is_nifti2 else nib.Nifti1Image).from_file_map({"header": holder, "image": holder})


def _read_nifti(betas: BetasFile, voxels: np.ndarray) -> np.ndarray:
    # nibabel parses the header; the data are streamed here because nibabel's array proxy would
    # either materialise the whole int16 session (1 GB) or re-decompress the gzip stream from the
    # start for every slice. One pass, a block of trial volumes at a time, keeps only masked voxels.
    x, y, z = voxels.T
    flat = np.ravel_multi_index((x, y, z), betas.grid, order="F")  # NIfTI data are Fortran order
    inflater = gzip_inflater()
    try:
        with _open_nifti_stream(betas.path) as stream:
            image = _nifti_image(stream)
            dtype = image.get_data_dtype()
            # The loaded header's vox_offset and scaling are reset; nibabel's array proxy keeps them.
            proxy = image.dataobj
            data_offset, slope, inter = proxy.offset, float(proxy.slope), float(proxy.inter)
            volume_bytes = int(np.prod(betas.grid)) * dtype.itemsize
            out = np.empty((betas.n_trials, len(voxels)), dtype=dtype)
            stream.seek(data_offset)  # forward from the header's end: no re-inflating
            for start in range(0, betas.n_trials, _NIFTI_BLOCK_TRIALS):
                n = min(_NIFTI_BLOCK_TRIALS, betas.n_trials - start)
                buffer = stream.read(volume_bytes * n)
                if len(buffer) != volume_bytes * n:
                    raise EOFError(f"file ends after trial {start + len(buffer) // volume_bytes}")
                block = np.frombuffer(buffer, dtype=dtype).reshape(n, -1)
                out[start : start + n] = block[:, flat]
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
