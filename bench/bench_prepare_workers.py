"""Benchmark: ``havir prepare --workers N``, its time and the peak memory of its process tree.

Runs ``havir prepare`` on one synthetic subject with NIfTI betas (``havir.nsd.synth``, scaled up
by ``--images``: 3 x images / sessions trials per session) once per worker count, each in a fresh
process, sampling the resident memory (RSS) of the command and all its children with psutil
every 10 ms; the peak of that sum is the figure. Every count's output must equal one worker's,
dataset by dataset, else the benchmark fails.

    python bench/bench_prepare_workers.py [--workers 1,2] [--images 4000] [--sessions 4] [--out FILE.json]

The bound checked against (issue 19): peak(N) <= N x one session's working set, where one
session's working set is the one-worker run's peak (the interpreter, its imports and one
session). The synthetic release is written once under ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from _results import write_result  # noqa: E402

from havir.io import package_versions  # noqa: E402
from havir.nsd.synth import synthesize_nsd  # noqa: E402

MIB = 1024**2
SAMPLE_SECONDS = 0.01
SEED = 0


def tree_rss(process: psutil.Process) -> int:
    """Bytes resident in ``process`` and all its descendants (0 for those already gone)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_prepare(root: Path, out: Path, workers: int) -> dict:
    """``havir prepare`` in a fresh process: its seconds and its tree's peak RSS."""
    command = [sys.executable, "-m", "havir", "prepare", "--nsd-root", str(root), "--subject", "1",
               "--out", str(out), "--betas-format", "nifti", "--workers", str(workers), "--json"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process, peak, max_processes = psutil.Process(child.pid), 0, 1
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(process))
            max_processes = max(max_processes, 1 + len(process.children(recursive=True)))
        except psutil.NoSuchProcess:
            break
        time.sleep(SAMPLE_SECONDS)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"prepare --workers {workers} failed (exit status {child.returncode}):\n{stderr}")
    return {"seconds": seconds, "peak_tree_rss_mib": peak / MIB, "max_processes": max_processes,
            "summary": json.loads(stdout)}


def datasets(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with h5py.File(path) as h5:
        h5.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated; the first must be 1 (default 1,2)")
    parser.add_argument("--images", type=int, default=4000, help="images of the synthetic subject (default 4000)")
    parser.add_argument("--sessions", type=int, default=4, help="its sessions (default 4)")
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="where the synthetic release is cached")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/prepare-workers-<host>-<date>.json)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    if counts[0] != 1:
        parser.error("--workers must start with 1: the other counts are compared with it")

    root = args.work / f"nsd-images{args.images}-sessions{args.sessions}-seed{SEED}"
    if not (root / "done").exists():
        print(f"writing the synthetic release under {root} ...", flush=True)
        synthesize_nsd(root, subjects=(1,), images=args.images, seed=SEED, sessions=args.sessions, betas_format="nifti")
        (root / "done").touch()

    runs, reference = {}, None
    for workers in counts:
        out = args.work / f"prepared-workers{workers}"
        figures = run_prepare(root, out, workers)
        arrays = datasets(out / "subj01.h5")
        if reference is None:
            reference = arrays
        elif arrays.keys() != reference.keys() or any(not np.array_equal(arrays[k], reference[k]) for k in arrays):
            raise AssertionError(f"--workers {workers} wrote other arrays than --workers 1")
        runs[workers] = figures
        print(f"--workers {workers}: {figures['seconds']:.2f} s, peak tree RSS {figures['peak_tree_rss_mib']:.0f} MiB, "
              f"{figures['max_processes']} processes", flush=True)

    one = runs[1]
    summary = one["summary"]
    masked_mib = 4 * (summary["train_trials"] + summary["test_trials"]) / summary["sessions"] * (
        summary["structural_voxels"] + summary["semantic_voxels"] + summary["other_voxels"]) / MIB
    result = {
        "benchmark": "prepare --workers: time and peak memory of the process tree",
        "versions": package_versions("numpy", "h5py", "nibabel", "psutil"),
        "settings": {
            "images": args.images, "sessions": args.sessions, "betas_format": "nifti", "seed": SEED,
            "trials_per_session": (summary["train_trials"] + summary["test_trials"]) // summary["sessions"],
            "masked_mib_per_session": masked_mib,
            "rss_sampling_seconds": SAMPLE_SECONDS,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "identical_output": "every count's datasets equal --workers 1's (checked)",
        },
        "runs": {
            str(workers): {key: value for key, value in figures.items() if key != "summary"}
            | {"bound_mib": workers * one["peak_tree_rss_mib"],
               "within_bound": figures["peak_tree_rss_mib"] <= workers * one["peak_tree_rss_mib"]}
            for workers, figures in runs.items()
        },
        "bound": "peak(N) <= N x peak(1): one worker's peak is one session's working set with the interpreter",
    }
    out = args.out or BENCH_DIR / "results" / f"prepare-workers-{socket.gethostname()}-{datetime.date.today().isoformat()}.json"
    write_result(out, result, children=True)  # the reads run in child processes


if __name__ == "__main__":
    main()
