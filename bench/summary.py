"""Print one table of every benchmark's newest result: stage, figure, value, floor, goal, peak memory.

Usage::

    python bench/summary.py [--results bench/results]

A benchmark's results are the files ``<stage>-<configuration>-<YYYY-MM-DD>.json`` that share a name
before the date (``features-tiny-cpu``, ``prepare-vm``...); the newest of each is read. Each row is
one headline figure of it, beside its floor (the best the hardware allows, as the benchmark
measured it) and ``fraction of floor`` (floor / value for a time, value / floor for a rate: 1 is the
floor), and issue 19's goal where it sets one (:data:`GOALS`). Results written before the
benchmarks recorded peak memory show "—" there.
"""

from __future__ import annotations

import argparse
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATED_NAME = re.compile(r"^(?P<benchmark>.+)-(?P<date>\d{4}-\d{2}-\d{2})\.json$")
MISSING = "—"


@dataclass(frozen=True)
class Goal:
    """A figure's target: ``value <op> threshold``, checked only on a device whose name holds ``device``."""

    op: str  # "<", "<=" or ">="
    threshold: float
    text: str
    device: str = ""

    def met(self, value: float, device_name: str) -> bool | None:
        """True or False, or None where the goal is not for this device."""
        if self.device not in device_name:
            return None
        return {"<": operator.lt, "<=": operator.le, ">=": operator.ge}[self.op](value, self.threshold)


# Issue 19's goals, keyed by (stage, figure); figures without one show "—".
GOALS = {
    ("prepare", "NIfTI s/session (havir)"): Goal("<=", 2.0, "<= 2.0 s"),
    ("prepare", "HDF5 speedup over naive"): Goal(">=", 10.0, ">= 10x"),
    ("reconstruct", "min for 1000 images"): Goal("<=", 5.0, "<= 5 min on one H100", device="H100"),
    # on a CPU the eval figures are informational: the goal is checked on an NVIDIA GPU only
    ("eval", "s for 1000 images"): Goal("<", 60.0, "< 60 s on one GPU", device="NVIDIA"),
}


@dataclass(frozen=True)
class Figure:
    """One headline figure of a result: its value, its floor (or None) and which way is better."""

    name: str
    value: float
    floor: float | None = None
    lower_is_better: bool = True
    goal: Goal | None = None  # one the result file sets itself; GOALS' entry wins

    @property
    def fraction_of_floor(self) -> float | None:
        if self.floor is None:
            return None
        return self.floor / self.value if self.lower_is_better else self.value / self.floor


def _prepare(result: dict) -> list[Figure]:
    methods, floors = result["methods"], result["floors"]
    figures = [
        Figure("HDF5 s/session (havir)", methods["havir-hdf5"]["seconds_best"], floors["hdf5"]["floor_seconds"]),
        Figure("HDF5 speedup over naive", result["ratios"]["hdf5_speedup"], lower_is_better=False),
        # the floor of each NIfTI read is its own inflater's bare pass (timed since 2026-12-07)
        Figure("NIfTI s/session (havir)", methods["havir-nifti"]["seconds_best"],
               floors["nifti"].get("inflate_floor_seconds_best")),
    ]
    if "havir-nifti-zlib" in methods:
        figures.append(Figure("NIfTI s/session (havir, zlib)", methods["havir-nifti-zlib"]["seconds_best"],
                              floors["nifti"]["gunzip_seconds_best"]))
    return figures


def _prepare_workers(result: dict) -> list[Figure]:
    return [figure for workers, run in result["runs"].items() for figure in (
        Figure(f"s for {result['settings']['sessions']} sessions, --workers {workers}", run["seconds"]),
        Figure(f"peak tree RSS MiB, --workers {workers}", run["peak_tree_rss_mib"],
               goal=Goal("<=", run["bound_mib"], f"<= {workers} x peak(1)")),
    )]


# Each gzip reader and its floor, the same library's bare decompressobj pass (no file layer).
INFLATE_FLOORS = {
    "gzip (stdlib zlib)": "zlib decompressobj",
    "isal.igzip": "isal_zlib decompressobj",
    "zlib_ng.gzip_ng": "zlib_ng decompressobj",
    "indexed_gzip": None,
}


def _inflate(result: dict) -> list[Figure]:
    inflaters = result["inflaters"]
    return [Figure(f"{reader} s", inflaters[reader]["seconds_best"],
                   inflaters[floor]["seconds_best"] if floor in inflaters else None)
            for reader, floor in INFLATE_FLOORS.items() if reader in inflaters]


def _encode(result: dict) -> list[Figure]:
    return [Figure("s per banded-ridge fit", result["seconds"], result["floor_seconds"])]


def _features(result: dict) -> list[Figure]:
    batch, row = max(result["by_batch_size"].items(), key=lambda item: int(item[0]))
    every = row["all"]
    return [Figure(f"s per batch of {batch} (all targets)", every["seconds_per_batch"], every["floor_seconds_per_batch"])]


def _train(result: dict) -> list[Figure]:
    return [Figure("s per epoch", result["seconds_per_epoch"], result["floor_seconds_per_epoch"])]


def _reconstruct(result: dict) -> list[Figure]:
    return [Figure("min for 1000 images", result["minutes_for_1000_images"],
                   1000 / result["floor_images_per_second"] / 60)]


def _eval(result: dict) -> list[Figure]:
    slowest = result["slowest_part"]
    return [
        Figure("images/s", result["images_per_second"], lower_is_better=False),
        Figure("s for 1000 images", result["seconds_for_1000_images"]),
        Figure(f"slowest: {slowest} (fraction of time)", result["parts"][slowest]["fraction_of_total"]),
        # on the CPU whatever the device: a GPU run's lower bound on this machine
        Figure("pixel metrics' s for 1000 images (CPU)", result["pixel_parts_seconds_for_1000_images"]),
    ]


def _semantic_rank(result: dict) -> list[Figure]:
    return [Figure("s (whole run)", result["seconds"])] if "seconds" in result else []


# The stage a result belongs to (the file name's start; the longest that matches) and its figures.
STAGES = {
    "prepare-workers": _prepare_workers,
    "prepare": _prepare,
    "inflate": _inflate,
    "encode": _encode,
    "features": _features,
    "train": _train,
    "reconstruct": _reconstruct,
    "semantic-rank": _semantic_rank,
    "eval": _eval,
}


def newest_results(results_dir: Path) -> dict[str, Path]:
    """``{benchmark: newest file}`` for the dated result files in ``results_dir``, sorted by name."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in results_dir.glob("*.json"):
        match = DATED_NAME.match(path.name)
        if match and (match["benchmark"] not in newest or match["date"] > newest[match["benchmark"]][0]):
            newest[match["benchmark"]] = (match["date"], path)
    return {benchmark: newest[benchmark][1] for benchmark in sorted(newest)}


def stage_of(benchmark: str) -> str | None:
    """The :data:`STAGES` key ``benchmark`` starts with (the longest), or None."""
    stages = [stage for stage in STAGES if benchmark == stage or benchmark.startswith(stage + "-")]
    return max(stages, key=len, default=None)


def device_name(result: dict) -> str:
    device = result.get("device", "")
    return device if isinstance(device, str) else f"{device.get('cpu_model', '')} x{device.get('nproc', '?')}"


def peak_memory_text(result: dict) -> str:
    """The result's ``peak_memory`` as "RSS 812 MiB, children 5,511 MiB, CUDA 3,210 MiB", or "—"."""
    peak = result.get("peak_memory")
    if not peak:
        return MISSING
    labels = {"rss_mib": "RSS", "children_rss_mib": "children", "cuda_max_allocated_mib": "CUDA"}
    return ", ".join(f"{label} {peak[key]:,.0f} MiB" for key, label in labels.items() if key in peak)


def summary_rows(results_dir: Path) -> list[dict]:
    """One dict per headline figure of each benchmark's newest result, in table order (strings)."""
    rows = []
    for benchmark, path in newest_results(results_dir).items():
        stage = stage_of(benchmark)
        if stage is None:
            continue
        result = json.loads(path.read_text())
        for figure in STAGES[stage](result):
            goal = GOALS.get((stage, figure.name), figure.goal)
            met = goal.met(figure.value, device_name(result)) if goal else None
            fraction = figure.fraction_of_floor
            rows.append({
                "stage": benchmark,
                "figure": figure.name,
                "value": f"{figure.value:.3g}",
                "floor": MISSING if figure.floor is None else f"{figure.floor:.3g}",
                "fraction of floor": MISSING if fraction is None else f"{fraction:.0%}",
                "goal": goal.text if goal else MISSING,
                "met": MISSING if met is None else "yes" if met else "no",
                "peak memory": peak_memory_text(result),
            })
    return rows


def print_summary(results_dir: Path, console: Console | None = None) -> None:
    rows = summary_rows(results_dir)
    table = Table(title=f"Benchmarks: newest result of each ({results_dir})")
    for column in ("stage", "figure", "value", "floor", "fraction of floor", "goal", "met", "peak memory"):
        table.add_column(column, justify="right" if column in ("value", "floor", "fraction of floor") else "left")
    for row in rows:
        table.add_row(*row.values())
    (console or Console()).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of result JSON files (default bench/results)")
    args = parser.parse_args(argv)
    print_summary(args.results)


if __name__ == "__main__":
    main()
