"""A trained run: the folder ``havir train --out RUN`` writes, ``havir reconstruct --run RUN`` reads.

``run.json`` (subject, model, config hash, the data folder) is written first; ``structural/`` and
``semantic/`` (or ``ridge/``) hold the best decoders, each as diffusers' ``config.json`` (with
its ``_class_name``) + safetensors; ``metrics.jsonl`` one line per epoch, ``checkpoint/`` the
state to resume; ``summary.json`` is written last and marks the run finished. A run adapted from
a multi-subject one (``--init``) has ``init`` in ``run.json`` and cross-subject decoders.

A multi-subject run (``havir train --subjects``) records ``subjects`` (and the ``features`` its
decoders predict) instead of ``subject``, and holds one finished single-subject run per subject,
``subjXX/`` (``run.json``, ``summary.json``, ``structural/``, ``semantic/``: each decoder complete,
the subject's input layer and the shared weights), which ``havir reconstruct --run RUN/subjXX``
and ``havir explain`` read like any run; the shared decoders alone are ``shared/structural/`` and
``shared/semantic/`` (what ``--init`` reads); ``metrics.jsonl``, ``checkpoint/`` and
``summary.json`` are the whole run's.
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
#: The shared decoders' folder of a multi-subject run.
SHARED = "shared"
_RETRAIN = "run `havir train` again into a new --out"


def subject_folder_name(subject: int) -> str:
    """``"subjXX"``: a subject's folder in a multi-subject run (and its key in the run's records)."""
    return f"subj{subject:02d}"


def subject_run(run: Path, subject: int) -> Path:
    """``subject``'s single-subject run inside the multi-subject run ``run``."""
    return Path(run) / subject_folder_name(subject)


def read_finished_run(run: Path) -> dict:
    """The records of a finished run of one subject (``summary.json`` and ``run.json`` merged),
    checked: a run not finished, a multi-subject run (its subjects' folders are the runs), or a
    damaged record, is one line saying what to do."""
    summary = Path(run) / SUMMARY
    if not summary.is_file():
        raise MissingInputError(f"{run} holds no finished training run (no {SUMMARY}): run `havir train` first")
    record = read_json(Path(run) / RUN_RECORD, what="run record", fix=_RETRAIN, keys=("model", "data"))
    if "subjects" in record:
        raise InvalidInputError(
            f"{run} is a multi-subject run (subjects {', '.join(map(str, record['subjects']))}): pass one subject's run "
            f"inside it, such as {subject_run(run, record['subjects'][0])}"
        )
    return read_json(summary, what="training summary", fix=_RETRAIN) | read_json(
        Path(run) / RUN_RECORD, what="run record", fix=_RETRAIN, keys=("subject", "model", "data")
    )


def read_pooled_run(run: Path) -> dict:
    """The record (``run.json``) of a finished multi-subject run, for adapting it to a new subject
    (``havir train --init``): ``subjects`` and ``features`` (``model``, target ``shapes``). A run
    of one subject, an unfinished run or no run is one line saying what to do."""
    record_path = Path(run) / RUN_RECORD
    if not record_path.is_file():
        raise MissingInputError(f"--init {run} holds no training run (no {RUN_RECORD}): pass the --out of `havir train --subjects`")
    record = read_json(record_path, what="run record", fix=_RETRAIN, keys=("model",))
    if "subjects" not in record:
        raise InvalidInputError(
            f"--init {run} is a run of one subject (subj{record.get('subject', 0):02d}), not a multi-subject run: "
            "pass the --out of `havir train --subjects`"
        )
    if not (Path(run) / SUMMARY).is_file():
        raise MissingInputError(f"--init {run} is an unfinished multi-subject run (no {SUMMARY}): finish it first "
                                "(run the same `havir train --subjects` again)")
    return read_json(record_path, what="run record", fix=_RETRAIN, keys=("subjects", "features"))


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


def load_shared_decoders(run: Path, device: torch.device | str = "cpu") -> dict:
    """``{role: decoder}``: the shared decoders of a multi-subject run (``shared/``), rebuilt by class."""
    return load_decoders(Path(run) / SHARED, device)


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
