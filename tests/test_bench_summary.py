"""bench/_results.py records peak memory; bench/summary.py tabulates the newest result of each benchmark."""

from __future__ import annotations

import importlib.util
import io
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    """Import ``bench/<name>.py`` (bench/ is scripts, not a package) as ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


results_module = _load("_results")
summary = _load("summary")


def _prepare_result(nifti_seconds: float, peak_memory: dict | None = None) -> dict:
    """A minimal prepare result, shaped as bench_prepare.py writes it."""
    result = {
        "benchmark": "prepare: masked betas reading",
        "device": {"hostname": "vm", "cpu_model": "Xeon", "nproc": 2, "ram_gib": 23.5},
        "methods": {
            "havir-hdf5": {"seconds_best": 0.25},
            "havir-nifti": {"seconds_best": nifti_seconds},
            "havir-nifti-zlib": {"seconds_best": 6.0},
        },
        "ratios": {"hdf5_speedup": 8.0},
        "floors": {"hdf5": {"floor_seconds": 0.05}, "nifti": {"gunzip_seconds_best": 4.5}},
    }
    return result | ({"peak_memory": peak_memory} if peak_memory else {})


def _reconstruct_result(device: str, minutes: float) -> dict:
    return {"benchmark": "reconstruct: fused dual-guided img2img", "device": device,
            "minutes_for_1000_images": minutes, "floor_images_per_second": 10.0}


def _write(folder: Path, name: str, result: dict) -> None:
    (folder / name).write_text(json.dumps(result))


def test_summary_rows_newest_result_floors_and_goals(tmp_path):
    _write(tmp_path, "prepare-vm-2026-01-01.json", _prepare_result(nifti_seconds=1.0))  # older: ignored
    _write(tmp_path, "prepare-vm-2026-01-02.json", _prepare_result(3.0, {"rss_mib": 812.4, "children_rss_mib": 5511.0}))
    _write(tmp_path, "reconstruct-full-cuda-h100-2026-01-01.json", _reconstruct_result("NVIDIA H100 80GB HBM3", 4.0))
    _write(tmp_path, "reconstruct-tiny-cpu-2026-01-01.json", _reconstruct_result("cpu: x86_64, 2 threads", 4.0))
    _write(tmp_path, "notes.json", {"benchmark": "undated"})  # not a dated result file
    _write(tmp_path, "unknown-stage-2026-01-01.json", {"benchmark": "no summary rule"})

    rows = {(row["stage"], row["figure"]): row for row in summary.summary_rows(tmp_path)}

    assert set(rows) == {
        ("prepare-vm", "HDF5 s/session (havir)"), ("prepare-vm", "HDF5 speedup over naive"),
        ("prepare-vm", "NIfTI s/session (havir)"), ("prepare-vm", "NIfTI s/session (havir, zlib)"),
        ("reconstruct-full-cuda-h100", "min for 1000 images"), ("reconstruct-tiny-cpu", "min for 1000 images"),
    }
    nifti = rows["prepare-vm", "NIfTI s/session (havir)"]
    assert (nifti["value"], nifti["goal"], nifti["met"]) == ("3", "<= 2.0 s", "no")  # the newer file's 3.0 s
    assert nifti["peak memory"] == "RSS 812 MiB, children 5,511 MiB"
    assert rows["prepare-vm", "HDF5 speedup over naive"]["met"] == "no"  # 8x < 10x
    hdf5 = rows["prepare-vm", "HDF5 s/session (havir)"]
    assert (hdf5["floor"], hdf5["fraction of floor"], hdf5["goal"]) == ("0.05", "20%", "—")  # 0.05 / 0.25
    zlib = rows["prepare-vm", "NIfTI s/session (havir, zlib)"]
    assert zlib["fraction of floor"] == "75%"  # 4.5 / 6.0
    on_h100 = rows["reconstruct-full-cuda-h100", "min for 1000 images"]
    # floor: 1000 images at 10 images/s = 1.67 min
    assert (on_h100["floor"], on_h100["met"], on_h100["peak memory"]) == ("1.67", "yes", "—")
    assert rows["reconstruct-tiny-cpu", "min for 1000 images"]["met"] == "—"  # the goal is for an H100


def _eval_result(device: str, seconds_for_1000: float) -> dict:
    """A minimal eval result, shaped as bench_eval.py writes it."""
    return {"benchmark": "eval", "device": device, "images_per_second": 1000 / seconds_for_1000,
            "seconds_for_1000_images": seconds_for_1000, "slowest_part": "clip", "pixel_parts_seconds_for_1000_images": 30.0,
            "parts": {"clip": {"fraction_of_total": 0.75}, "ssim": {"fraction_of_total": 0.05}}}


def test_eval_rows_and_the_gpu_goal(tmp_path):
    _write(tmp_path, "eval-cpu-2026-01-01.json", _eval_result("cpu: x86_64, 1 threads", 3720.0))
    _write(tmp_path, "eval-cuda-2026-01-01.json", _eval_result("NVIDIA H100 80GB HBM3, 79 GiB", 45.0))

    rows = {(row["stage"], row["figure"]): row for row in summary.summary_rows(tmp_path)}

    assert rows["eval-cpu", "s for 1000 images"]["met"] == "—"  # informational on a CPU
    assert (rows["eval-cuda", "s for 1000 images"]["met"], rows["eval-cuda", "s for 1000 images"]["goal"]) == ("yes", "< 60 s on one GPU")
    assert rows["eval-cpu", "slowest: clip (fraction of time)"]["value"] == "0.75"
    assert rows["eval-cuda", "images/s"]["value"] == "22.2"  # 1000 / 45
    assert rows["eval-cuda", "pixel metrics' s for 1000 images (CPU)"]["value"] == "30"


def test_nifti_row_takes_its_own_inflaters_floor_when_recorded(tmp_path):
    result = _prepare_result(2.5)
    result["floors"]["nifti"]["inflate_floor_seconds_best"] = 2.0
    _write(tmp_path, "prepare-vm-2026-01-01.json", result)

    rows = {(row["stage"], row["figure"]): row for row in summary.summary_rows(tmp_path)}

    assert rows["prepare-vm", "NIfTI s/session (havir)"]["fraction of floor"] == "80%"  # 2.0 / 2.5


def test_goal_direction_and_device():
    at_most = summary.Goal("<=", 5.0, "<= 5 min", device="H100")
    assert at_most.met(5.0, "NVIDIA H100") is True
    assert at_most.met(5.1, "NVIDIA H100") is False
    assert at_most.met(1.0, "cpu") is None
    assert summary.Goal(">=", 10.0, ">= 10x").met(9.9, "cpu") is False
    assert summary.Goal("<", 60.0, "< 60 s").met(60.0, "cpu") is False  # strictly under


def test_print_summary_prints_one_table(tmp_path):
    _write(tmp_path, "train-tiny-cpu-2026-01-01.json", {
        "benchmark": "train", "device": "cpu", "seconds_per_epoch": 0.5, "floor_seconds_per_epoch": 0.05})
    out = io.StringIO()

    summary.print_summary(tmp_path, Console(file=out, width=200))

    text = out.getvalue()
    for column in ("stage", "figure", "value", "floor", "fraction of floor", "goal", "met", "peak memory"):
        assert column in text
    assert "train-tiny-cpu" in text and "s per epoch" in text and "10%" in text


def test_write_result_records_peak_memory_beside_the_figures(tmp_path):
    # a child that holds 200 MiB: its peak reaches RUSAGE_CHILDREN once it has been waited for
    subprocess.run([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"], check=True)
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    out = results_module.write_result(tmp_path / "r.json", {"benchmark": "b", "seconds": 1.25}, torch.device("cpu"),
                                       children=True)

    after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    written = json.loads(out.read_text())
    assert written["seconds"] == 1.25 and written["benchmark"] == "b"
    assert written["device"].startswith("cpu") and "torch" in written["versions"] and written["date"]
    peak = written["peak_memory"]
    assert before_kib / 1024 - 0.1 <= peak["rss_mib"] <= after_kib / 1024 + 0.1
    assert peak["children_rss_mib"] >= 200
    assert "cuda_max_allocated_mib" not in peak  # only on a CUDA device


def test_write_result_without_torch_device_records_the_machine(tmp_path):
    out = results_module.write_result(tmp_path / "r.json", {"benchmark": "b", "versions": {"numpy": "2"}})

    written = json.loads(out.read_text())
    assert set(written["device"]) == {"hostname", "cpu_model", "nproc", "ram_gib"}
    assert written["versions"] == {"numpy": "2"}  # the benchmark's own versions are kept
    assert written["peak_memory"]["rss_mib"] > 0
    assert "children_rss_mib" not in written["peak_memory"]  # not asked for: it started no work in children
    assert len(written["load_average"]) == 3 and all(load >= 0 for load in written["load_average"])
