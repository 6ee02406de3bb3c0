"""Resumable training state for the demo world's training scripts (``scripts/train_demo_*.py``).

A checkpoint is a folder holding ``checkpoint.safetensors`` (the named tensors: weights, the
optimiser's moments, torch's random state) and ``checkpoint.json`` (the step, the settings it was
made with, numpy's random state). A run started again with the same settings continues from it,
so a long CPU recipe can be cut into pieces; a checkpoint of other settings is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from havir.errors import InvalidInputError
from havir.io import atomic_path, write_json


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    rng: np.random.Generator, settings: dict) -> None:
    """Write ``tensors`` (e.g. ``{"unet.<key>": ...}``), ``optimizer``'s state and both random streams."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    everything = dict(tensors)
    for index, moments in optimizer.state_dict()["state"].items():
        for name, value in moments.items():
            everything[f"optim.{index}.{name}"] = torch.as_tensor(value)
    everything["torch_rng"] = torch.get_rng_state()
    with atomic_path(folder / "checkpoint.safetensors") as temporary:
        save_file({k: v.detach().contiguous() for k, v in everything.items()}, str(temporary))
    write_json(folder / "checkpoint.json", {"step": step, "settings": settings, "numpy_rng": rng.bit_generator.state})


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                    settings: dict) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore the optimiser and random streams of a checkpoint made with the same ``settings``.

    Returns (its step, its other tensors by name) — (0, {}) when ``folder`` holds none; the
    caller loads its weights from the tensors.
    """
    folder = Path(folder)
    if not (folder / "checkpoint.json").is_file():
        return 0, {}
    record = json.loads((folder / "checkpoint.json").read_text())
    if record["settings"] != settings:
        raise InvalidInputError(
            f"{folder} holds a checkpoint of other settings ({record['settings']}): remove it or pass another --checkpoint"
        )
    tensors = load_file(folder / "checkpoint.safetensors")
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".")
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = record["numpy_rng"]
    others = {k: v for k, v in tensors.items() if not k.startswith("optim.") and k != "torch_rng"}
    return int(record["step"]), others


def prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every key under ``prefix.``."""
    return {f"{prefix}.{key}": value for key, value in module.state_dict().items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors saved by :func:`prefixed` under ``prefix``, keys as the module names them."""
    return {key.removeprefix(f"{prefix}."): value for key, value in tensors.items() if key.startswith(f"{prefix}.")}
