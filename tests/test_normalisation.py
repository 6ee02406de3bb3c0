"""``havir prepare --normalisation``: per-session z-scoring against a float64 reference, the
drift it removes, the trials it reads, and how it is recorded."""

import dataclasses
import json

import h5py
import numpy as np
import pytest

import havir.prepare
from havir.errors import InvalidInputError
from havir.nsd.layout import NSDLayout
from havir.prepare import load_split, prepare_subject, prepared_normalisation
from tests.test_prepare import _raw_masked_betas

SETS = ("structural", "semantic", "other")


def _is_test(truth):
    return np.isin(truth.subjects[1].trial_nsd_id, truth.shared_nsd_id)


def _edit_session_betas(root, session, edit):
    """Change one session's HDF5 betas in place: ``edit(int16 (trials, Z, Y, X)) -> int16``."""
    with h5py.File(NSDLayout(root).betas_file(1, session, "hdf5"), "r+") as h5:
        h5["betas"][...] = edit(h5["betas"][()].astype(np.int32)).astype(np.int16)


def _prepare(root, out, normalisation):
    prepare_subject(root, 1, out, betas_format="hdf5", normalisation=normalisation, progress=False)
    return out / "subj01.h5"


def test_session_statistics_and_zscores_match_float64(_small_nsd, tmp_path):
    """Each session's mean and std (ddof 0) over its training trials, and every trial z-scored
    with its own session's, against numpy in float64 on the NIfTI copy of the betas."""
    root, truth = _small_nsd
    path = _prepare(root, tmp_path, "session")
    session = truth.subjects[1].trials_per_session
    is_test = _is_test(truth)
    train, test = load_split(path, "train"), load_split(path, "test")
    for name in SETS:
        with h5py.File(path) as h5:
            voxels = h5[f"voxels/{name}"][()].astype(int)
            mean, std = h5[f"normalisation/session_{name}_mean"][()], h5[f"normalisation/session_{name}_std"][()]
            assert f"normalisation/{name}_mean" not in h5  # no pooled statistics beside them to misuse
        raw = _raw_masked_betas(root, 1, truth.subjects[1].sessions, voxels)
        expected = np.empty_like(raw)
        assert mean.shape == std.shape == (2, len(voxels))
        for k in range(2):
            rows = slice(k * session, (k + 1) * session)
            training = raw[rows][~is_test[rows]]
            np.testing.assert_allclose(mean[k], training.mean(0), atol=1e-5)
            np.testing.assert_allclose(std[k], training.std(0), rtol=1e-5)
            expected[rows] = (raw[rows] - training.mean(0)) / training.std(0)
        # The check can tell: the two sessions' statistics differ (the synthetic drift).
        assert np.abs(mean[0] - mean[1]).max() > 0.3
        np.testing.assert_allclose(getattr(train, name), expected[~is_test], atol=2e-4)
        np.testing.assert_allclose(getattr(test, name), expected[is_test], atol=2e-4)


@pytest.mark.parametrize("normalisation", ["training", "session"])
def test_an_offset_on_one_session_disappears_with_session_only(_small_nsd, small_nsd, tmp_path, normalisation):
    """2 % signal change added to every voxel of session 2: per-session z-scoring gives the same
    arrays as without it; training-set z-scoring carries it into every trial."""
    original = _prepare(_small_nsd[0], tmp_path / "original", normalisation)
    _edit_session_betas(small_nsd[0], 2, lambda betas: betas + 600)  # stored as int16 / 300
    shifted = _prepare(small_nsd[0], tmp_path / "shifted", normalisation)
    for split in ("train", "test"):
        a, b = load_split(original, split), load_split(shifted, split)
        for name in SETS:
            difference = np.abs(getattr(a, name) - getattr(b, name))
            if normalisation == "session":
                assert difference.max() < 1e-4, (split, name)
            else:
                assert difference[a.session == 2].mean() > 0.3, (split, name)


@pytest.mark.parametrize("normalisation", ["training", "session"])
def test_test_trials_never_enter_the_statistics(_small_nsd, small_nsd, tmp_path, normalisation):
    """Only session 1's test trials changed: the statistics and every training trial stay
    bit-identical; the changed test trials (and only they) move."""
    root, truth = small_nsd
    session = truth.subjects[1].trials_per_session
    test_rows = np.flatnonzero(_is_test(truth)[:session])
    assert len(test_rows) > 0

    def shift_test_trials(betas):
        betas[test_rows] += 1500
        return betas

    original = _prepare(_small_nsd[0], tmp_path / "original", normalisation)
    _edit_session_betas(root, 1, shift_test_trials)
    changed = _prepare(root, tmp_path / "changed", normalisation)
    with h5py.File(original) as a, h5py.File(changed) as b:
        statistics = list(a["normalisation"])
        assert len(statistics) == 6
        for key in statistics:
            np.testing.assert_array_equal(a["normalisation"][key][()], b["normalisation"][key][()], err_msg=key)
        for name in SETS:
            np.testing.assert_array_equal(a[f"train/{name}"][()], b[f"train/{name}"][()], err_msg=name)
            moved = np.abs(a[f"test/{name}"][()] - b[f"test/{name}"][()]).min(axis=1) > 0
            np.testing.assert_array_equal(moved, a["test/session"][()] == 1)


def test_the_record_says_which_normalisation_ran(_small_nsd, tmp_path, run_cli):
    root, _ = _small_nsd
    status, _, _ = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", tmp_path, "--normalisation", "session", "--json")
    assert status == 0
    record = json.loads((tmp_path / "subj01.json").read_text())["protocol"]["normalisation"]
    assert record["method"] == "session" and "that session's training trials only" in record["rule"]
    assert "std 1" in record["constant_voxels"]
    with h5py.File(tmp_path / "subj01.h5") as h5:
        assert h5["normalisation"].attrs["method"] == "session"
        assert h5["normalisation"].attrs["session_structural_constant_voxels"] == 0
    assert prepared_normalisation(tmp_path / "subj01.h5") == "session"


def test_an_unknown_normalisation_is_refused_before_any_work(_small_nsd, tmp_path, run_cli):
    root, _ = _small_nsd
    status, _, stderr = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", tmp_path / "out", "--normalisation", "run")
    assert status == 2
    assert "'--normalisation': " in stderr and "'run' is not one of 'training', 'session'" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_a_session_without_training_trials_is_an_error_naming_it(_small_nsd, tmp_path, monkeypatch):
    """Per-session statistics need training trials in every session; a session of test trials
    only is named, before the output folder exists (training-set z-scoring still runs)."""
    root, _ = _small_nsd
    subject_trials = havir.prepare.subject_trials

    def session_2_all_test(*args):
        trials = subject_trials(*args)
        return dataclasses.replace(trials, is_test=trials.is_test | (trials.session == 2))

    monkeypatch.setattr(havir.prepare, "subject_trials", session_2_all_test)
    with pytest.raises(InvalidInputError, match="session 02 of subj01 has none .*--normalisation training"):
        prepare_subject(root, 1, tmp_path / "session", normalisation="session", progress=False)
    assert not (tmp_path / "session").exists()
    assert prepare_subject(root, 1, tmp_path / "training", progress=False)["train_trials"] > 0


@pytest.mark.parametrize("resumed_with", ["session", "training"])
def test_an_interrupted_session_run_resumes_to_the_same_file(small_nsd, tmp_path, interrupt_on_call, resumed_with):
    """Killed in session 2 and run again: the same file as an uninterrupted run. The raw file
    holds unnormalised betas, so a rerun with the other normalisation resumes from it too."""
    root, _ = small_nsd
    whole = _prepare(root, tmp_path / "whole", resumed_with)
    restore = interrupt_on_call(havir.prepare, "read_masked_betas", 2)
    with pytest.raises(KeyboardInterrupt):
        _prepare(root, tmp_path / "resumed", "session")
    restore()
    summary = prepare_subject(root, 1, tmp_path / "resumed", betas_format="hdf5", normalisation=resumed_with, progress=False)
    assert summary["resumed_sessions"] == 1
    with h5py.File(whole) as a, h5py.File(tmp_path / "resumed/subj01.h5") as b:
        names = []
        a.visit(lambda name: names.append(name) if isinstance(a[name], h5py.Dataset) else None)
        assert b["normalisation"].attrs["method"] == resumed_with
        assert f"normalisation/{'session_' if resumed_with == 'session' else ''}semantic_std" in names
        for name in names:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
