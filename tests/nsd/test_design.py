"""The 1-based index arithmetic of nsd_expdesign.mat, on a design small enough to do by hand."""

import numpy as np
import pytest
import scipy.io

from havir.nsd.design import Design, load_design, subject_trials

# Subject 2's list of five images (1-based 73k ids); its first two are the shared images.
SUBJECTIM = np.zeros((8, 5), dtype=np.int64)
SUBJECTIM[1] = [3, 7, 12, 15, 20]
SHAREDIX = np.array([3, 7])
MASTERORDERING = np.array([3, 1, 5, 3, 2, 1, 4, 3])  # 1-based into the subject's list


@pytest.fixture
def design_file(tmp_path):
    path = tmp_path / "nsd_expdesign.mat"
    # MATLAB stores row vectors as (1, n) doubles, as the release does.
    scipy.io.savemat(path, {"masterordering": MASTERORDERING[None].astype(float),
                            "subjectim": SUBJECTIM.astype(float), "sharedix": SHAREDIX[None].astype(float)})
    return path


def test_hand_worked_trials(design_file):
    design = load_design(design_file)
    trials = subject_trials(design, subject=2, trials_per_session=[4, 4])
    # k=3 -> id 12 -> nsdId 11; k=1 -> 3 -> 2; k=5 -> 20 -> 19; k=2 -> 7 -> 6; k=4 -> 15 -> 14.
    assert trials.nsd_id.tolist() == [11, 2, 19, 11, 6, 2, 14, 11]
    assert trials.is_test.tolist() == [False, True, False, False, True, True, False, False]
    assert trials.repetition.tolist() == [0, 0, 0, 1, 0, 1, 0, 2]
    assert trials.session.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]


def test_trials_stop_at_the_sessions_read(design_file):
    trials = subject_trials(load_design(design_file), subject=2, trials_per_session=[4])
    assert trials.nsd_id.tolist() == [11, 2, 19, 11]
    assert trials.is_test.sum() == 1


def test_more_trials_than_the_design_is_an_error(design_file):
    with pytest.raises(ValueError, match="describes only 8"):
        subject_trials(load_design(design_file), subject=2, trials_per_session=[4, 4, 4])


def test_zero_based_masterordering_is_rejected(tmp_path):
    path = tmp_path / "bad.mat"
    scipy.io.savemat(path, {"masterordering": (MASTERORDERING - 1)[None], "subjectim": SUBJECTIM, "sharedix": SHAREDIX[None]})
    with pytest.raises(ValueError, match="1-based"):
        load_design(path)


def test_design_lacking_a_key_names_it(tmp_path):
    path = tmp_path / "other.mat"
    scipy.io.savemat(path, {"masterordering": MASTERORDERING[None], "subjectim": SUBJECTIM})
    with pytest.raises(ValueError, match="lacks sharedix"):
        load_design(path)


def test_design_dataclass_counts_shared():
    assert Design(MASTERORDERING, SUBJECTIM, SHAREDIX).n_shared == 2
