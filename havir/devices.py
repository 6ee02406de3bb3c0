"""Where and in what precision work runs: one place that reads ``--device`` and ``--dtype``."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from havir.distributed import processes
from havir.errors import BatchTooLargeError, HavirError, InvalidInputError
from havir.io import package_versions
from havir.options import DEVICE_OPTIONS
from havir.validation import check_options

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; anything else is taken as given.

    Under ``accelerate launch`` (several processes) it is the device the launch gave this process
    (``cuda:<local rank>``, or the CPU); a name must agree with it.
    """
    launch = processes()
    if launch.num_processes > 1:
        given = launch.device if launch.device.type == "cuda" else torch.device("cpu")
        if name not in ("auto", given.type, str(given)):
            raise InvalidInputError(f"under accelerate launch this process runs on {given}, not {name}: pass --device auto")
        return given
    check_options(DEVICE_OPTIONS, device=name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise InvalidInputError(f"--device {name}: this machine has no usable CUDA GPU (torch sees none): pass --device cpu or auto")
        if device.index is not None and device.index >= visible:
            raise InvalidInputError(f"--device {name}: only {visible} CUDA GPUs are visible (cuda:0..cuda:{visible - 1}): pass one of those")
    return device


def use_threads(threads: int | None = None) -> int:
    """Run torch's CPU work on ``threads`` threads; returns the count in use.

    ``None`` keeps what the process has: ``OMP_NUM_THREADS`` when it is set (torch reads it at
    start-up), else torch's default (one per physical core). Several jobs sharing a machine
    should each ask for their share: oversubscribed threads make CPU training 20-40x slower.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bf16 on CUDA (the models' inference precision there) and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InvalidInputError(f"--dtype must be auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@contextmanager
def smaller_batch_on_oom(batch_size: int, setting: str = "--batch-size {}") -> Iterator[None]:
    """Turn running out of memory inside the block into a :class:`BatchTooLargeError` whose one
    line names half the batch size.

    Wrap the batched work of every command that takes a batch size (not the loading of models:
    a smaller batch would not help there). ``setting`` says where the user sets it, with ``{}``
    for the suggested size: ``"--batch-size {}"``, or ``"batch_size = {} in the --config TOML"``.
    """
    try:
        yield
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        if isinstance(err, HavirError):  # already advised (a nested block)
            raise
        where = "the GPU" if isinstance(err, torch.cuda.OutOfMemoryError) else "the machine"
        raise BatchTooLargeError(
            f"{where} ran out of memory at batch size {batch_size}: try {setting.format(max(1, batch_size // 2))}"
        ) from err


def synchronise(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeats: int = 3) -> list[float]:
    """Wall times of ``repeats`` calls of ``function``, after one warm-up call (allocations,
    kernel choices, lazy initialisation), each synchronised on CUDA."""
    function()
    synchronise(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronise(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def matmul_rate(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """Measured dense matrix-multiply rate in FLOP/s (bf16 8192^3 on CUDA, fp32 1024^3 on a
    CPU; the best of 5): the ceiling that benchmarks draw their FLOP floors against."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: a @ b, device, repeats=5))


def describe(device: torch.device) -> dict:
    """What a benchmark ran on: ``{"device": ..., "versions": {...}}``, for its result file."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = f"{properties.name}, {properties.total_memory / 1024**3:.0f} GiB"
    else:
        name = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "versions": package_versions("torch", "diffusers", "transformers", "accelerate", "numpy") | {"cuda": torch.version.cuda},
    }
