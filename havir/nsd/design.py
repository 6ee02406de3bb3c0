"""The NSD experiment design: which image each trial showed, and which trials are test trials.

``nsd_expdesign.mat`` stores MATLAB's 1-based indices. The arithmetic, done once here:

* trial ``t`` (0-based, counted over the sessions in order) showed the subject's image
  ``k = masterordering[t]`` (1-based into that subject's list of 10,000 images);
* its 73k image id is ``subjectim[subject - 1, k - 1]`` (1-based), so the 0-based ``nsdId`` (the
  row of ``imgBrick`` and of the stimulus table) is that minus one;
* the first ``len(sharedix)`` entries of every subject's list are the shared images, so a trial is
  a test trial iff ``k <= len(sharedix)`` (``k <= 1000`` in the release).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from havir.errors import InvalidInputError
from havir.nsd.layout import require_file


@dataclass(frozen=True)
class Design:
    """The experiment design as released (all indices 1-based, as in the file).

    Attributes
    ----------
    masterordering : int64 array of shape (n_trials,), values 1..n_images_per_subject.
    subjectim : int64 array of shape (8, n_images_per_subject), 1-based 73k ids.
    sharedix : int64 array of shape (n_shared,), 1-based 73k ids of the shared images.
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray

    @property
    def n_shared(self) -> int:
        return int(self.sharedix.size)


@dataclass(frozen=True)
class Trials:
    """The trials of one subject over the sessions read, in presentation order.

    Attributes
    ----------
    nsd_id : int64 array of shape (n_trials,), 0-based 73k image id of each trial.
    is_test : bool array of shape (n_trials,), True for trials of the shared (test) images.
    repetition : int8 array of shape (n_trials,), 0 for an image's first showing, then 1, 2.
    session : int16 array of shape (n_trials,), 1-based session number.
    """

    nsd_id: np.ndarray
    is_test: np.ndarray
    repetition: np.ndarray
    session: np.ndarray


def load_design(path: Path) -> Design:
    """Read ``nsd_expdesign.mat`` and check that its indices are consistent."""
    require_file(path, "NSD experiment design", "download nsddata/experiments/nsd/ from the NSD release")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises several unrelated types for a damaged file
        raise InvalidInputError(f"cannot read the experiment design {path}: {err}; re-download it") from err
    missing = [key for key in ("masterordering", "subjectim", "sharedix") if key not in mat]
    if missing:
        raise InvalidInputError(f"experiment design {path} lacks {', '.join(missing)}: is it nsd_expdesign.mat?")
    design = Design(
        masterordering=np.asarray(mat["masterordering"], dtype=np.int64).ravel(),
        subjectim=np.atleast_2d(np.asarray(mat["subjectim"], dtype=np.int64)),
        sharedix=np.asarray(mat["sharedix"], dtype=np.int64).ravel(),
    )
    n_list = design.subjectim.shape[1]
    if design.masterordering.min() < 1 or design.masterordering.max() > n_list:
        raise InvalidInputError(
            f"experiment design {path}: masterordering must hold 1-based indices in 1..{n_list}, "
            f"found {design.masterordering.min()}..{design.masterordering.max()}"
        )
    return design


def subject_trials(design: Design, subject: int, trials_per_session: list[int]) -> Trials:
    """Trials of ``subject`` for the sessions read, session 1 first.

    Parameters
    ----------
    design : the experiment design.
    subject : NSD subject, 1..8.
    trials_per_session : number of trials in each session read, in order (750 each in the
        release); trials beyond them do not exist for this subject.
    """
    n_trials = int(sum(trials_per_session))
    if n_trials > design.masterordering.size:
        raise InvalidInputError(
            f"the sessions hold {n_trials} trials but the design describes only "
            f"{design.masterordering.size}: do the betas belong to this design file?"
        )
    if design.subjectim.shape[0] < subject:
        raise InvalidInputError(f"the design's subjectim has {design.subjectim.shape[0]} rows; no subject {subject}")
    k = design.masterordering[:n_trials]  # 1-based index into the subject's image list
    nsd_id = design.subjectim[subject - 1, k - 1] - 1
    is_test = k <= design.n_shared
    repetition = np.zeros(n_trials, dtype=np.int8)
    seen: dict[int, int] = {}
    for t, image in enumerate(nsd_id.tolist()):
        repetition[t] = seen.get(image, 0)
        seen[image] = repetition[t] + 1
    session = np.repeat(np.arange(1, len(trials_per_session) + 1, dtype=np.int16), trials_per_session)
    return Trials(nsd_id=nsd_id.astype(np.int64), is_test=is_test, repetition=repetition, session=session)
