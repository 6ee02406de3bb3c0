"""The features cache: ``DATA/subjXX_features.h5``, written by ``havir features``, read by
``havir train`` and ``havir reconstruct``.

One row per image the subject saw (``nsd_id``, ascending), one dataset per target of
:mod:`havir.targets` (float16), a ``done`` flag per row while it is being written, and the
attributes ``format_version``, ``subject`` and ``settings`` (JSON: ``model``, ``dtype``, ``seed``).
"""

from __future__ import annotations

import json
from pathlib import Path

from havir.errors import InvalidInputError, MissingInputError
from havir.validation import reading_hdf5

#: Version of the cache's layout; readers refuse another.
FEATURES_FORMAT = 1

_RECOMPUTE = "run `havir features` again"


def features_path(data: Path, subject: int) -> Path:
    """Where ``havir features --data DATA`` writes ``subject``'s cache."""
    return Path(data) / f"subj{subject:02d}_features.h5"


def require_features(data: Path, subject: int) -> Path:
    """``subject``'s features cache in ``data``, or one line saying to run ``havir features``."""
    path = features_path(data, subject)
    if not path.is_file():
        raise MissingInputError(f"no features for subj{subject:02d} in {data}: run `havir features` first")
    return path


def reading_features(cache: Path):
    """Open a features cache; damage or a missing dataset is one line naming it and the fix."""
    return reading_hdf5(cache, what="features cache", fix=f"delete it and {_RECOMPUTE}")


def features_settings(cache: Path, keys: tuple[str, ...] = ("model", "seed")) -> dict:
    """``keys`` of what a features cache was computed with (its ``settings``: ``model``, ``dtype``, ``seed``)."""
    with reading_features(cache) as h5:
        settings = h5.attrs["settings"]
    try:
        settings = json.loads(settings)
        return {key: settings[key] for key in keys}
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidInputError(f"features cache {cache} has no valid settings record ({err}): {_RECOMPUTE}") from err


def features_shapes(cache: Path) -> dict[str, list[int]]:
    """``{target: per-image shape}`` of a features cache (what decoders trained on it predict)."""
    from havir.targets import TARGET_NAMES

    with reading_features(cache) as h5:
        return {name: list(h5[name].shape[1:]) for name in TARGET_NAMES}
