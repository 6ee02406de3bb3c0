"""What every benchmark's result file records beside its figures: when, where, and the peak memory.

Every ``bench/bench_*.py`` builds its figures as a dict and hands it to :func:`write_result`, which
adds the date, the machine (``havir.devices.describe`` for a torch device, :func:`device_facts`
otherwise), :func:`peak_memory` and the load average, then writes the JSON file. ``bench/summary.py`` reads them back.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import socket
from pathlib import Path

from havir.io import write_json

MIB = 1024**2


def device_facts() -> dict:
    """Hostname, CPU model, cores and RAM of this machine."""
    cpu_model = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        ram_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "ram_gib": round(ram_kib / 1024**2, 1),
    }


def peak_memory(device=None, children: bool = False) -> dict:
    """The benchmark's peak memory so far, in MiB.

    ``rss_mib``: this process's high-water resident set (``getrusage`` ``ru_maxrss``, KiB on Linux).
    ``children_rss_mib`` (with ``children``, for a benchmark that runs its work in child
    processes): the largest high-water RSS among the children it waited for. Linux counts in a
    child the memory of the parent it was forked from, so this is at least the parent's RSS at the
    spawn; helpers such as ``uname`` count too, hence only where asked for.
    ``cuda_max_allocated_mib``: ``torch.cuda.max_memory_allocated`` on a CUDA ``device`` (torch's
    allocations, not the driver's reserve).
    """
    peak = {"rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if children:
        peak["children_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    if device is not None and device.type == "cuda":
        import torch

        peak["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
    return peak


def write_result(out: Path, result: dict, device=None, children: bool = False) -> Path:
    """Write ``result`` to ``out`` as JSON with the date, the machine and :func:`peak_memory` added.

    ``result`` holds ``"benchmark"`` (a one-line name) and the figures. ``device``: the torch device
    the benchmark ran on (its description and versions come from ``havir.devices.describe``), or
    None for a CPU benchmark without torch (:func:`device_facts`). ``children``: record the child
    processes' peak too (:func:`peak_memory`). Returns ``out``.
    """
    if device is not None:
        from havir.devices import describe

        machine = describe(device)
    else:
        machine = {"device": device_facts()}
    record = {
        "benchmark": result["benchmark"],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **machine,
        **result,
        "peak_memory": peak_memory(device, children),
        # 1, 5 and 15-minute load averages when the run ended: on a shared machine, how busy it
        # was while the figures were taken (the 5 and 15-minute ones span a run of minutes)
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    print(f"results: {out}")
    return out
