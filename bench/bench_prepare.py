"""Benchmark: HAVIR's masked betas reading against the naive whole-session read.

Times :func:`havir.nsd.betas.read_masked_betas` against the way public NSD code reads betas
(load the whole session, then index the mask) on full-size synthetic sessions: a (81, 104, 83)
grid x 750 trials of int16, in both release formats (gzip NIfTI and voxel-chunked HDF5), with a
15724-voxel mask (subject 1's ``nsdgeneral`` count). Each method runs in a fresh subprocess so
that its peak memory is its own; every method's output is checked against the others'.

    python bench/bench_prepare.py [--sessions 1] [--repeats 3] [--work bench/work] [--out FILE.json]

The synthetic sessions (about 1.4 GB per session for both formats) are written once under
``--work`` and reused. Files are read with a warm page cache: each is read once before it is
timed (the warm-up), so the figures are decoding and selection costs, not disk speed. Each method
reads each session ``--repeats`` times, each time in a fresh process, in rounds of every method
together with the floors' bare inflate passes (zlib's, and HAVIR's inflater's: python-isal's
when installed), so that each round sees the same load on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from nibabel.openers import Opener

import havir
from _results import write_result
from havir.io import atomic_path
from havir.nsd.betas import BETAS_SCALE, gzip_inflater, open_betas, read_masked_betas

BENCH_DIR = Path(__file__).resolve().parent

GRID = (81, 104, 83)  # NSD subject 1, 1.8 mm functional space: (X, Y, Z)
N_TRIALS = 750
N_MASK_VOXELS = 15724  # subject 1's nsdgeneral
VOXEL_MM = 1.8
SEED = 0
#: Trials drawn at a time while generating a session, to bound the float64 scratch memory.
GENERATION_BLOCK_TRIALS = 50

FORMATS = ("hdf5", "nifti")
FILE_SUFFIX = {"nifti": ".nii.gz", "hdf5": ".hdf5"}

GOAL_HDF5_SPEEDUP = 10.0
GOAL_NIFTI_SPEEDUP = 1.5
GOAL_PEAK_FRACTION = 0.25

MIB = 1024**2


# --- the methods timed --------------------------------------------------------------------------


def read_havir(path: Path, fmt: str, voxels: np.ndarray) -> np.ndarray:
    """HAVIR: open the header, read only what the mask needs."""
    return read_masked_betas(open_betas(path, fmt), voxels)


def read_naive_nifti(path: Path, voxels: np.ndarray) -> np.ndarray:
    """Public code's NIfTI read: the whole session as float64, then the mask."""
    data = nib.load(path).get_fdata()
    x, y, z = voxels.T
    return (data[x, y, z].T / BETAS_SCALE).astype(np.float32)


def read_naive_hdf5(path: Path, voxels: np.ndarray) -> np.ndarray:
    """Public code's HDF5 read: the whole (trials, Z, Y, X) dataset, then the mask."""
    with h5py.File(path, "r") as h5:
        data = h5["betas"][:]
    x, y, z = voxels.T
    return (data[:, z, y, x] / BETAS_SCALE).astype(np.float32)


def read_havir_zlib(path: Path, voxels: np.ndarray) -> np.ndarray:
    """HAVIR's NIfTI read with the standard library's zlib inflater, as without python-isal."""
    sys.modules["isal"] = None  # importing isal now fails: gzip_inflater() falls back
    if gzip_inflater().name != "zlib":
        raise RuntimeError("could not make HAVIR fall back to zlib")
    return read_havir(path, "nifti", voxels)


#: method name -> (format, reader taking (path, voxels)).
METHODS = {
    "havir-hdf5": ("hdf5", lambda path, voxels: read_havir(path, "hdf5", voxels)),
    "naive-hdf5": ("hdf5", read_naive_hdf5),
    "havir-nifti": ("nifti", lambda path, voxels: read_havir(path, "nifti", voxels)),
    "havir-nifti-zlib": ("nifti", read_havir_zlib),
    "naive-nifti": ("nifti", read_naive_nifti),
}


# --- synthetic data -----------------------------------------------------------------------------


def normalised_coordinates() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y, z of every voxel of ``GRID``, scaled to [-1, 1] along each axis (y = -1 is the back)."""
    axes = [(np.arange(n) - (n - 1) / 2) / (n / 2) for n in GRID]
    return tuple(np.meshgrid(*axes, indexing="ij"))


def brain_mask() -> np.ndarray:
    """The ellipsoid inscribed in ``GRID``: about 52% of the voxels."""
    x, y, z = normalised_coordinates()
    return x**2 + y**2 + z**2 <= 1.0


def nsdgeneral_like_mask() -> np.ndarray:
    """``N_MASK_VOXELS`` voxels shaped like ``nsdgeneral``, as an (n, 3) array of (x, y, z).

    A folded cortical ribbon (the outer 12% of the brain's radius, its inner edge waved like
    gyri, split by a midline fissure) is ranked from the back of the brain forward, reaching
    further forward dorsally and ventrally as the parietal and temporal extents of visual cortex
    do; the first ``N_MASK_VOXELS`` make one connected region per hemisphere. Rows are in
    C order of the grid, as ``np.argwhere`` gives them.
    """
    x, y, z = normalised_coordinates()
    radius = np.sqrt(x**2 + y**2 + z**2)
    azimuth, elevation = np.arctan2(z, x), np.arctan2(y, np.hypot(x, z))
    inner_edge = 0.88 + 0.06 * np.sin(7 * azimuth) * np.sin(7 * elevation)
    cortex = (radius <= 1.0) & (radius >= inner_edge) & (np.abs(x) > 0.03)
    posterior_rank = y - 0.25 * np.abs(z)
    chosen = np.zeros(GRID, dtype=bool)
    cortex_voxels = np.argwhere(cortex)
    first = np.argsort(posterior_rank[cortex], kind="stable")[:N_MASK_VOXELS]
    chosen[tuple(cortex_voxels[first].T)] = True
    if chosen.sum() != N_MASK_VOXELS:
        raise RuntimeError(f"the cortical ribbon has only {int(chosen.sum())} voxels; the mask needs {N_MASK_VOXELS}")
    return np.argwhere(chosen)


def x_runs(voxels: np.ndarray) -> int:
    """Number of runs of consecutive x (same y, z) in ``voxels``: the HDF5 selection's pieces."""
    x, y, z = voxels[np.lexsort((voxels[:, 0], voxels[:, 1], voxels[:, 2]))].T
    return 1 + int(np.count_nonzero((np.diff(x) != 1) | (np.diff(y) != 0) | (np.diff(z) != 0)))


def synthetic_session(session: int) -> np.ndarray:
    """One session's betas as (X, Y, Z, trials) int16 in Fortran order: N(0, 1.5) percent
    signal change x 300 inside the brain, 0 outside. Fortran order makes the NIfTI write one
    copy-free pass, and its transpose is the HDF5 layout (trials, Z, Y, X) in C order."""
    rng = np.random.default_rng([SEED, session])
    brain = brain_mask()
    n_brain = int(brain.sum())
    volume = np.zeros((*GRID, N_TRIALS), dtype=np.int16, order="F")
    info = np.iinfo(np.int16)
    for start in range(0, N_TRIALS, GENERATION_BLOCK_TRIALS):
        stop = min(start + GENERATION_BLOCK_TRIALS, N_TRIALS)
        betas = rng.normal(0.0, 1.5, size=(n_brain, stop - start)) * BETAS_SCALE
        volume[brain, start:stop] = np.clip(np.rint(betas), info.min, info.max)
    return volume


def session_paths(work: Path, session: int) -> dict[str, Path]:
    """Where session ``session``'s files live, per format; the folder names the settings."""
    folder = work / f"{'x'.join(map(str, GRID))}x{N_TRIALS}-seed{SEED}"
    return {fmt: folder / f"betas_session{session:02d}{FILE_SUFFIX[fmt]}" for fmt in FORMATS}


def ensure_session(paths: dict[str, Path], session: int) -> None:
    """Write the session's files that are not there yet (each atomically, so a file that exists
    is complete)."""
    missing = [fmt for fmt, path in paths.items() if not path.exists()]
    if not missing:
        return
    print(f"generating session {session} ({', '.join(missing)}) under {paths[missing[0]].parent} ...", flush=True)
    volume = synthetic_session(session)
    for fmt in missing:
        paths[fmt].parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(paths[fmt]) as temporary:
            if fmt == "nifti":
                affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
                affine[:3, 3] = -VOXEL_MM * (np.asarray(GRID) - 1) / 2
                image = nib.Nifti1Image(volume, affine)
                image.header.set_data_dtype(np.int16)  # int16 data, int16 on disk: no scaling
                nib.save(image, temporary)
            else:
                with h5py.File(temporary, "w") as h5:  # one chunk is one voxel's trials
                    h5.create_dataset("betas", data=volume.T, chunks=(N_TRIALS, 1, 1, 1))


# --- measuring ----------------------------------------------------------------------------------


def proc_status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``...), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(method: str, betas_path: Path, mask_path: Path, save_path: Path) -> None:
    """Run one method once in this (fresh) process; print its figures as one JSON line and
    save its output to ``save_path`` for the parent's comparison.

    The peak is ``VmHWM``, the high-water RSS of this process's own address space. It is not
    ``getrusage().ru_maxrss``: Linux carries the launching process's high-water RSS over the
    exec into the child's ``ru_maxrss``, so every child would report at least the parent's
    peak (several GiB here, after generating a session).
    """
    baseline_rss_mib = proc_status_mib("VmRSS")  # after the imports, before any betas are read
    voxels = np.load(mask_path)
    _, reader = METHODS[method]
    start = time.perf_counter()
    out = reader(betas_path, voxels)
    seconds = time.perf_counter() - start
    peak_rss_mib = proc_status_mib("VmHWM")
    np.save(save_path, out)
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib, "baseline_rss_mib": baseline_rss_mib}))


def measure_in_subprocess(method: str, betas_path: Path, mask_path: Path, save_path: Path) -> dict:
    """Run :func:`measure` in a fresh Python process and return its figures."""
    command = [sys.executable, str(Path(__file__).resolve()), "measure", method, str(betas_path), str(mask_path), str(save_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed on {betas_path} (exit status {result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def read_whole_file(path: Path) -> float:
    """Read the file sequentially, discarding it; the seconds it took. Run once, it puts the
    file in the page cache for every method; run again, it measures the page cache's bandwidth."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as stream:
        while stream.read(16 * MIB):
            pass
    return time.perf_counter() - start


def time_inflate(path: Path, decompressobj) -> tuple[float, int]:
    """Decompress the whole gzip stream in one ``decompressobj`` pass of 1 MiB pieces, discarding
    the output (the bare inflate, no file object): (seconds, bytes out)."""
    decompressor = decompressobj(wbits=16 + zlib.MAX_WBITS)
    n_out = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as stream:
        while piece := stream.read(MIB):
            n_out += len(decompressor.decompress(piece))
    n_out += len(decompressor.flush())
    return time.perf_counter() - start, n_out


def check_outputs(outputs: dict[str, Path], n_voxels: int) -> None:
    """Fail loudly unless HAVIR's output equals the naive one for each format, and the two
    formats agree with each other."""
    arrays = {method: np.load(path) for method, path in outputs.items()}
    for method, array in arrays.items():
        if array.shape != (N_TRIALS, n_voxels) or array.dtype != np.float32:
            raise AssertionError(f"{method} returned {array.dtype} {array.shape}; expected float32 {(N_TRIALS, n_voxels)}")
    for fmt in FORMATS:
        np.testing.assert_allclose(
            arrays[f"havir-{fmt}"], arrays[f"naive-{fmt}"], rtol=1e-6, atol=0,
            err_msg=f"HAVIR's {fmt} output differs from the naive read",
        )
    np.testing.assert_array_equal(arrays["havir-hdf5"], arrays["havir-nifti"], err_msg="HAVIR's two formats disagree")
    np.testing.assert_array_equal(arrays["havir-nifti"], arrays["havir-nifti-zlib"], err_msg="HAVIR's two inflaters disagree")


# --- the report ---------------------------------------------------------------------------------


def _version_or_none(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of everything that decides the figures."""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "nibabel": nib.__version__,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "gzip_inflater": gzip_inflater().name,
        "isal": _version_or_none("isal"),
        "havir": havir.__version__,
    }


def print_report(result: dict) -> None:
    """The result as tables on stdout."""
    # rich is imported here, not at the top, to keep it out of the measured children's memory.
    from rich.console import Console
    from rich.table import Table

    console = Console()
    settings, methods, ratios, floors = result["settings"], result["methods"], result["ratios"], result["floors"]
    console.print(
        f"[bold]Masked betas reading[/bold]: grid {tuple(settings['grid'])} x {settings['trials']} trials int16, "
        f"{settings['n_voxels']} voxels in {settings['mask_x_runs']} x-runs, {settings['sessions']} session(s), warm page cache"
    )

    table = Table(title="Per method (each in a fresh process)")
    for column in ("method", "best s/session", "mean s/session", "peak RSS MiB", "RSS after imports MiB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, figures in methods.items():
        table.add_row(
            name, f"{figures['seconds_best']:.3f}", f"{figures['seconds_mean']:.3f}",
            f"{figures['peak_rss_mib']:.0f}", f"{figures['baseline_rss_mib']:.0f}",
        )
    console.print(table)

    table = Table(title="HAVIR vs naive (best times, peak RSS)")
    for column in ("figure", "measured", "goal", "met"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    met = result["goals_met"]
    rows = [
        ("speedup from HDF5", f"{ratios['hdf5_speedup']:.1f}x", f">= {GOAL_HDF5_SPEEDUP:g}x", met["hdf5_speedup"]),
        ("speedup from NIfTI", f"{ratios['nifti_speedup']:.2f}x", f">= {GOAL_NIFTI_SPEEDUP:g}x", met["nifti_speedup"]),
    ]
    for fmt in FORMATS:
        fraction = ratios[f"{fmt}_peak_fraction"]
        rows.append((f"peak memory, {fmt}", f"{fraction:.3f} of naive", f"<= {GOAL_PEAK_FRACTION:g}", met[f"{fmt}_peak_fraction"]))
    for figure, measured, goal, goal_met in rows:
        table.add_row(figure, measured, goal, "[green]yes[/green]" if goal_met else "[red]no[/red]")
    console.print(table)

    hdf5, nifti = floors["hdf5"], floors["nifti"]
    table = Table(title="Floors: what must be read")
    for column in ("format", "file MiB", "must read MiB", "floor"):
        table.add_column(column, justify="left" if column in ("format", "floor") else "right")
    table.add_row(
        "hdf5", f"{hdf5['file_bytes'] / MIB:.0f}", f"{hdf5['masked_bytes'] / MIB:.1f}",
        f"the masked voxels' chunks at {hdf5['page_cache_read_mib_per_s']:.0f} MiB/s (page cache): {hdf5['floor_seconds']:.3f} s;\n"
        f"HAVIR takes {hdf5['havir_over_floor']:.0f}x that",
    )
    table.add_row(
        "nifti (gzip)",
        f"{nifti['compressed_bytes'] / MIB:.0f}",
        f"{nifti['uncompressed_bytes'] / MIB:.0f}",
        f"zlib pass {nifti['gunzip_seconds_best']:.2f} s, {nifti['gunzip_uncompressed_mib_per_s']:.0f} MiB/s out;\n"
        f"{nifti['inflater']} pass {nifti['inflate_floor_seconds_best']:.2f} s: HAVIR takes "
        f"{nifti['havir_over_inflate_floor']:.2f}x its inflater's pass",
    )
    console.print(table)


# --- driver -------------------------------------------------------------------------------------


def time_sessions(n_sessions: int, repeats: int, work: Path, voxels: np.ndarray) -> dict:
    """Time every method on each session, checking their outputs agree; the raw figures."""
    work.mkdir(parents=True, exist_ok=True)
    mask_path = work / "mask.npy"
    np.save(mask_path, voxels)
    raw = {
        "methods": {method: {"seconds": [], "peak_rss_mib": [], "baseline_rss_mib": []} for method in METHODS},
        "file_bytes": {fmt: [] for fmt in FORMATS},
        "gunzip_seconds": [],
        "inflate_floor_seconds": [],
        "uncompressed_bytes": [],
        "hdf5_read_seconds": [],
    }
    for session in range(1, n_sessions + 1):
        paths = session_paths(work, session)
        ensure_session(paths, session)
        for fmt in FORMATS:
            read_whole_file(paths[fmt])
            raw["file_bytes"][fmt].append(paths[fmt].stat().st_size)
        raw["hdf5_read_seconds"].append(read_whole_file(paths["hdf5"]))
        outputs = {method: work / f"out-{method}.npy" for method in METHODS}
        # Round after round of every method and floor pass: on a shared machine each round sees
        # about the same load, so best-of figures and their floors stay comparable.
        for _ in range(repeats):
            seconds, uncompressed_bytes = time_inflate(paths["nifti"], zlib.decompressobj)
            raw["gunzip_seconds"].append(seconds)
            seconds, _ = time_inflate(paths["nifti"], gzip_inflater().decompressobj)
            raw["inflate_floor_seconds"].append(seconds)
            print(f"session {session} floors: zlib pass {raw['gunzip_seconds'][-1]:.3f} s, "
                  f"{gzip_inflater().name} pass {seconds:.3f} s", flush=True)
            for method, (fmt, _) in METHODS.items():
                figures = measure_in_subprocess(method, paths[fmt], mask_path, outputs[method])
                for name, value in figures.items():
                    raw["methods"][method][name].append(value)
                print(f"session {session} {method}: {figures['seconds']:.3f} s, peak {figures['peak_rss_mib']:.0f} MiB", flush=True)
        raw["uncompressed_bytes"].append(uncompressed_bytes)
        check_outputs(outputs, len(voxels))
        for path in outputs.values():
            path.unlink()
    return raw


def build_result(raw: dict, voxels: np.ndarray, n_sessions: int, repeats: int) -> dict:
    """The result file's content: where and how it ran, each method's figures, the ratios
    against the goals, and the floors."""
    methods = {
        method: {
            "format": fmt,
            "seconds_per_session": raw["methods"][method]["seconds"],
            "seconds_best": min(raw["methods"][method]["seconds"]),
            "seconds_mean": float(np.mean(raw["methods"][method]["seconds"])),
            "peak_rss_mib": max(raw["methods"][method]["peak_rss_mib"]),
            "baseline_rss_mib": max(raw["methods"][method]["baseline_rss_mib"]),
        }
        for method, (fmt, _) in METHODS.items()
    }
    ratios = {}
    for fmt in FORMATS:
        havir_figures, naive_figures = methods[f"havir-{fmt}"], methods[f"naive-{fmt}"]
        ratios[f"{fmt}_speedup"] = naive_figures["seconds_best"] / havir_figures["seconds_best"]
        ratios[f"{fmt}_speedup_mean"] = naive_figures["seconds_mean"] / havir_figures["seconds_mean"]
        ratios[f"{fmt}_peak_fraction"] = havir_figures["peak_rss_mib"] / naive_figures["peak_rss_mib"]
    best_gunzip = min(raw["gunzip_seconds"])
    masked_bytes = len(voxels) * N_TRIALS * np.dtype(np.int16).itemsize
    hdf5_bytes = max(raw["file_bytes"]["hdf5"])
    read_bytes_per_s = hdf5_bytes / min(raw["hdf5_read_seconds"])
    compressed_bytes, uncompressed_bytes = max(raw["file_bytes"]["nifti"]), max(raw["uncompressed_bytes"])
    return {
        "benchmark": "prepare: masked betas reading",
        "versions": versions(),
        "settings": {
            "grid": list(GRID),
            "trials": N_TRIALS,
            "n_voxels": len(voxels),
            "mask_x_runs": x_runs(voxels),
            "sessions": n_sessions,
            "repeats": repeats,
            "seed": SEED,
            "page_cache": "warm",
            "nifti_compresslevel": Opener.default_compresslevel,
            "hdf5_chunks": [N_TRIALS, 1, 1, 1],
        },
        "methods": methods,
        "ratios": ratios,
        "goals": {
            "hdf5_speedup_min": GOAL_HDF5_SPEEDUP,
            "nifti_speedup_min": GOAL_NIFTI_SPEEDUP,
            "peak_fraction_max": GOAL_PEAK_FRACTION,
        },
        "goals_met": {
            "hdf5_speedup": ratios["hdf5_speedup"] >= GOAL_HDF5_SPEEDUP,
            "nifti_speedup": ratios["nifti_speedup"] >= GOAL_NIFTI_SPEEDUP,
            "hdf5_peak_fraction": ratios["hdf5_peak_fraction"] <= GOAL_PEAK_FRACTION,
            "nifti_peak_fraction": ratios["nifti_peak_fraction"] <= GOAL_PEAK_FRACTION,
        },
        "floors": {
            "hdf5": {
                "masked_bytes": masked_bytes,
                "file_bytes": hdf5_bytes,
                "page_cache_read_mib_per_s": read_bytes_per_s / MIB,
                # the masked voxels' bytes at the page cache's sequential read rate
                "floor_seconds": masked_bytes / read_bytes_per_s,
                "havir_over_floor": methods["havir-hdf5"]["seconds_best"] / (masked_bytes / read_bytes_per_s),
            },
            "nifti": {
                "compressed_bytes": compressed_bytes,
                "uncompressed_bytes": uncompressed_bytes,
                "gunzip_seconds_per_pass": raw["gunzip_seconds"],
                "gunzip_seconds_best": best_gunzip,
                "gunzip_uncompressed_mib_per_s": uncompressed_bytes / MIB / best_gunzip,
                "gunzip_compressed_mib_per_s": compressed_bytes / MIB / best_gunzip,
                # HAVIR's own inflater (python-isal's when installed) in a bare pass: the floor
                # of the havir-nifti read, as zlib's pass is of havir-nifti-zlib
                "inflater": gzip_inflater().name,
                "inflate_floor_seconds_per_pass": raw["inflate_floor_seconds"],
                "inflate_floor_seconds_best": min(raw["inflate_floor_seconds"]),
                "havir_over_inflate_floor": methods["havir-nifti"]["seconds_best"] / min(raw["inflate_floor_seconds"]),
            },
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1, help="synthetic sessions to time (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed reads of each session per method (default 3)")
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="where the synthetic sessions are cached (default bench/work)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/prepare-<hostname>-<date>.json)")
    commands = parser.add_subparsers(dest="command")
    child = commands.add_parser("measure", help="(internal) run one method in this process; the benchmark starts it")
    child.add_argument("method", choices=list(METHODS))
    child.add_argument("betas", type=Path)
    child.add_argument("mask", type=Path)
    child.add_argument("save", type=Path)
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.repeats < 1:
        parser.error("--sessions and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "measure":
        measure(args.method, args.betas, args.mask, args.save)
        return
    out = args.out or BENCH_DIR / "results" / f"prepare-{socket.gethostname()}-{datetime.date.today().isoformat()}.json"
    voxels = nsdgeneral_like_mask()
    raw = time_sessions(args.sessions, args.repeats, args.work, voxels)
    result = build_result(raw, voxels, args.sessions, args.repeats)
    print_report(result)
    write_result(out, result, children=True)  # the reads run in child processes


if __name__ == "__main__":
    main()
