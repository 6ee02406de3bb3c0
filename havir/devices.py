"""Where and in what precision work runs: one place that reads ``--device`` and ``--dtype``."""

from __future__ import annotations

import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from err


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bf16 on CUDA (the models' inference precision there) and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def synchronise(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """Measured dense matrix-multiply rate in FLOP/s (bf16 8192^3 on CUDA, fp32 1024^3 on a
    CPU): the ceiling that benchmarks draw their FLOP floors against."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    synchronise(device)
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    synchronise(device)
    return 5 * 2 * n**3 / (time.perf_counter() - start)
