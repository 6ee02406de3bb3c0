"""A trained run: the folder ``havir train --out RUN`` writes, ``havir reconstruct --run RUN`` reads.

``run.json`` (subject, model, config hash, the data folder) is written first; ``structural/`` and
``semantic/`` (or ``ridge/``) hold the best decoders, each as diffusers' ``config.json`` (with
its ``_class_name``) + safetensors; ``metrics.jsonl`` one line per epoch, ``checkpoint/`` the
state to resume; ``summary.json`` is written last and marks the run finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from havir.errors import InvalidInputError, MissingInputError
from havir.io import atomic_path
from havir.validation import read_json

if TYPE_CHECKING:
    import torch

    from havir.models.ridge import RidgeDecoder

# torch, diffusers, safetensors and the decoders are imported by the functions that save or load
# weights: `havir reconstruct` reads a run's records first, and refuses a missing run at once
# rather than after seconds of imports.

#: The decoder folders of a run, one per role (what each reads and predicts, see :mod:`havir.targets`).
DECODER_ROLES = ("structural", "semantic")
RUN_RECORD = "run.json"
SUMMARY = "summary.json"
_RETRAIN = "run `havir train` again into a new --out"


def read_finished_run(run: Path) -> dict:
    """The records of a finished run (``summary.json`` and ``run.json`` merged), checked: a run
    not finished, or a damaged record, is one line saying what to do."""
    summary = Path(run) / SUMMARY
    if not summary.is_file():
        raise MissingInputError(f"{run} holds no finished training run (no {SUMMARY}): run `havir train` first")
    return read_json(summary, what="training summary", fix=_RETRAIN) | read_json(
        Path(run) / RUN_RECORD, what="run record", fix=_RETRAIN, keys=("subject", "model", "data")
    )


def save_decoder(model, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``weights`` in ``model``'s save_pretrained layout (config.json + safetensors), as one
    folder committed by one rename, so a crash never leaves half a model."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    with atomic_path(folder) as temporary:
        model.save_config(temporary)
        save_file({k: v.contiguous() for k, v in weights.items()}, temporary / SAFETENSORS_WEIGHTS_NAME)


def load_decoder(cls, folder: Path):
    """``cls.from_pretrained(folder)`` that works in any folder: safetensors' file loader takes
    only UTF-8 paths (a run folder named in Latin-1 could not reload its own model), so the
    weights are read here as bytes."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        model = cls.from_config(cls.load_config(folder))
        model.load_state_dict(load((Path(folder) / SAFETENSORS_WEIGHTS_NAME).read_bytes()))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # missing, damaged or mismatched
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidInputError(f"decoder in {folder} cannot be loaded ({reason}): {_RETRAIN}") from err
    return model.eval()


def load_decoders(run: Path, device: torch.device | str = "cpu") -> dict:
    """``{role: decoder}`` of a run's ``structural/`` and ``semantic/`` folders, each rebuilt as the
    class named in its ``config.json`` (``_class_name``; see :data:`havir.models.decoders.DECODERS`),
    in eval mode on ``device``."""
    from havir.models.decoders import DECODERS

    decoders = {}
    for role in DECODER_ROLES:
        folder = Path(run) / role
        config = read_json(folder / "config.json", what="decoder config", fix=_RETRAIN, keys=("_class_name",))
        name = config["_class_name"]
        if name not in DECODERS:
            raise InvalidInputError(
                f"decoder in {folder} is a {name}, which this HAVIR does not know (it knows {', '.join(DECODERS)}): "
                "import the module that registers it, or " + _RETRAIN
            )
        decoders[role] = load_decoder(DECODERS[name], folder).to(device)
    return decoders


def load_ridge(run: Path, device: torch.device | str = "cpu") -> RidgeDecoder:
    """The ridge baseline of a run (``model = "ridge"``): ``RUN/ridge/``; a missing or damaged
    one is one line saying to train again."""
    from safetensors import SafetensorError

    from havir.models.ridge import RidgeDecoder

    folder = Path(run) / "ridge"
    try:
        return RidgeDecoder.from_pretrained(folder, device=str(device))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:  # missing, damaged or not JSON
        raise InvalidInputError(f"ridge decoder in {folder} cannot be loaded ({type(err).__name__}: {err}): {_RETRAIN}") from err
