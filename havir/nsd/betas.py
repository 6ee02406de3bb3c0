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
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from havir.errors import InvalidInputError

#: NSD stores betas as int16 percent signal change multiplied by this.
BETAS_SCALE = 300.0

#: Trials decoded per NIfTI read: bounds memory to this many volumes (1.4 MB each at 1.8 mm).
_NIFTI_BLOCK_TRIALS = 50


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
            header = nib.load(path).header
        except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib.error...
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


def _read_nifti(betas: BetasFile, voxels: np.ndarray) -> np.ndarray:
    # nibabel parses the header; the data are streamed here because nibabel's array proxy would
    # either materialise the whole int16 session (1 GB) or re-decompress the gzip stream from the
    # start for every slice. One pass, a block of trial volumes at a time, keeps only masked voxels.
    image = nib.load(betas.path)
    dtype = image.get_data_dtype()
    # The loaded header's vox_offset and scaling are reset; nibabel's array proxy keeps them.
    proxy = image.dataobj
    data_offset, slope, inter = proxy.offset, float(proxy.slope), float(proxy.inter)
    x, y, z = voxels.T
    flat = np.ravel_multi_index((x, y, z), betas.grid, order="F")  # NIfTI data are Fortran order
    volume_bytes = int(np.prod(betas.grid)) * dtype.itemsize
    out = np.empty((betas.n_trials, len(voxels)), dtype=dtype)
    opener = gzip.open if betas.path.name.endswith(".gz") else open
    try:
        with opener(betas.path, "rb") as stream:
            stream.seek(data_offset)
            for start in range(0, betas.n_trials, _NIFTI_BLOCK_TRIALS):
                n = min(_NIFTI_BLOCK_TRIALS, betas.n_trials - start)
                buffer = stream.read(volume_bytes * n)
                if len(buffer) != volume_bytes * n:
                    raise EOFError(f"file ends after trial {start + len(buffer) // volume_bytes}")
                block = np.frombuffer(buffer, dtype=dtype).reshape(n, -1)
                out[start : start + n] = block[:, flat]
    except (EOFError, OSError, zlib.error) as err:
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
