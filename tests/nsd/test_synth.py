"""The synthetic NSD: the release layout, determinism, and a brain whose hierarchy is real."""

import json

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io
import pytest
from PIL import Image

from havir.errors import MissingInputError
from havir.nsd.layout import ATLASES, NSDLayout
from havir.nsd.scenes import BACKGROUNDS
from havir.nsd.synth import TRUTH_FOLDER, read_synth_truth, synthesize_nsd
from havir.prepare import load_split, prepare_subject


def test_design_is_one_based_with_shared_images_first(two_subject_nsd):
    root, truth = two_subject_nsd
    mat = scipy.io.loadmat(NSDLayout(root).expdesign)
    assert mat["masterordering"].shape == (1, 3 * truth.images_per_subject)
    assert mat["masterordering"].min() == 1 and mat["masterordering"].max() == truth.images_per_subject
    assert mat["subjectim"].shape == (8, truth.images_per_subject)
    assert mat["subjectim"].min() == 1 and mat["subjectim"].max() == truth.total_images
    sharedix = mat["sharedix"].ravel()
    np.testing.assert_array_equal(sharedix, truth.shared_nsd_id + 1)
    for row in mat["subjectim"]:
        np.testing.assert_array_equal(row[: len(sharedix)], sharedix)


def test_stimulus_table_has_the_release_columns(two_subject_nsd):
    root, truth = two_subject_nsd
    table = pd.read_csv(NSDLayout(root).stim_info)
    assert list(table.columns[:9]) == ["Unnamed: 0", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId",
                                       "flagged", "BOLD5000", "shared1000"]
    assert {f"subject{s}" for s in range(1, 9)} | {f"subject{s}_rep{r}" for s in range(1, 9) for r in range(3)} <= set(table.columns)
    assert len(table) == truth.total_images and table["shared1000"].sum() == truth.shared_images
    # rep columns are 1-based trial numbers of the subject's showings.
    shown = truth.subjects[1].trial_nsd_id
    first = table.set_index("nsdId").loc[shown[0]]
    assert first["subject1_rep0"] == 1


def test_betas_and_atlases_have_release_types_and_axes(two_subject_nsd):
    root, truth = two_subject_nsd
    layout = NSDLayout(root)
    for subject, facts in truth.subjects.items():
        assert len(layout.sessions_on_disk(subject)) == facts.sessions
        nifti = nib.load(layout.betas_file(subject, 1, "nifti"))
        assert nifti.get_data_dtype() == np.int16 and nifti.shape == (*facts.grid, facts.trials_per_session)
        with h5py.File(layout.betas_file(subject, 1, "hdf5")) as h5:
            betas = h5["betas"]
            assert betas.dtype == np.int16 and betas.shape == (facts.trials_per_session, *facts.grid[::-1])
            assert betas.chunks == (facts.trials_per_session, 1, 1, 1)
        for atlas in ATLASES:
            labels = np.asanyarray(nib.load(layout.roi_file(subject, atlas)).dataobj)
            assert labels.shape == facts.grid and labels.min() == -1 and labels.max() >= 1
            assert layout.ctab_file(atlas).is_file()
    assert truth.subjects[1].grid != truth.subjects[4].grid
    assert truth.subjects[1].sessions != truth.subjects[4].sessions


def test_stimuli_and_captions(two_subject_nsd):
    root, truth = two_subject_nsd
    layout = NSDLayout(root)
    with h5py.File(layout.stimuli) as h5:
        assert h5["imgBrick"].shape == (truth.total_images, truth.image_side, truth.image_side, 3)
        assert h5["imgBrick"].dtype == np.uint8
    annotations = []
    for split in ("train2017", "val2017"):
        annotations += json.loads((layout.annotations_dir / f"captions_{split}.json").read_text())["annotations"]
    per_image = pd.Series([a["image_id"] for a in annotations]).value_counts()
    assert len(per_image) == truth.total_images and (per_image == 5).all()


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = synthesize_nsd(tmp_path / "a", images=20, seed=1, sessions=1, betas_format="nifti")
    b = synthesize_nsd(tmp_path / "b", images=20, seed=1, sessions=1, betas_format="nifti")
    c = synthesize_nsd(tmp_path / "c", images=20, seed=2, sessions=1, betas_format="nifti")
    read = lambda root: np.asanyarray(nib.load(NSDLayout(root).betas_file(1, 1, "nifti")).dataobj)
    np.testing.assert_array_equal(read(tmp_path / "a"), read(tmp_path / "b"))
    assert not np.array_equal(read(tmp_path / "a"), read(tmp_path / "c"))
    np.testing.assert_array_equal(a.subjects[1].trial_nsd_id, b.subjects[1].trial_nsd_id)
    assert a.to_json() == b.to_json() != c.to_json()


def _heldout_correlation(voxels, targets, train, test, alpha=100.0):
    """Mean over target columns of the held-out Pearson r of a closed-form ridge fit."""
    x_mean, y_mean = voxels[train].mean(0), targets[train].mean(0)
    x, y = voxels[train] - x_mean, targets[train] - y_mean
    weights = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)
    predicted = (voxels[test] - x_mean) @ weights + y_mean
    keep = targets[test].std(0) > 0
    return np.mean([np.corrcoef(p, t)[0, 1] for p, t in zip(predicted.T[keep], targets[test].T[keep])])


def test_structural_voxels_encode_layout_and_semantic_voxels_encode_content(two_subject_nsd, tmp_path):
    """Decoding is learnable and the hierarchy real, on held-out images.

    Layout target: the 8x8 image minus the mean image of its background (where the objects
    are, which content alone does not fix). Content target: the scene content vector.
    Measured (seed 7): structural->layout 0.43, semantic->layout 0.01, semantic->content 0.99,
    structural->content 0.27, shuffled pairs ~0.
    """
    root, truth = two_subject_nsd
    prepare_subject(root, 1, tmp_path, progress=False)
    train = load_split(tmp_path / "subj01.h5", "train")
    ids = np.unique(train.nsd_id)
    average = lambda betas: np.stack([betas[train.nsd_id == i].mean(0) for i in ids])
    structural, semantic = average(train.structural), average(train.semantic)
    with h5py.File(NSDLayout(root).stimuli) as h5:
        images = h5["imgBrick"][ids]
    layout = np.stack([np.asarray(Image.fromarray(im).resize((8, 8), Image.BOX), float).ravel() for im in images])
    content = truth.content[ids]
    background = content[:, -len(BACKGROUNDS):].argmax(1)
    for b in np.unique(background):
        layout[background == b] -= layout[background == b].mean(0)
    order = np.random.default_rng(0).permutation(len(ids))
    fit, held_out = order[:140], order[140:]

    structural_layout = _heldout_correlation(structural, layout, fit, held_out)
    semantic_layout = _heldout_correlation(semantic, layout, fit, held_out)
    semantic_content = _heldout_correlation(semantic, content, fit, held_out)
    structural_content = _heldout_correlation(structural, content, fit, held_out)
    shuffled = _heldout_correlation(structural[np.random.default_rng(1).permutation(len(ids))], layout, fit, held_out)
    assert structural_layout > 0.3 and structural_layout > semantic_layout + 0.2
    assert semantic_content > 0.8 and semantic_content > structural_content + 0.3
    assert abs(shuffled) < 0.15


def test_ground_truth_sidecar_matches_the_generator_and_the_atlases(two_subject_nsd):
    """The sidecar holds, per voxel of each grid, the in-memory truth: roles as the atlases on
    disk define them (early = prf-visualrois > 0, outside = nsdgeneral < 0), and drives in
    percent signal change exactly where (and only where) the role says the voxel is driven."""
    root, truth = two_subject_nsd
    layout = NSDLayout(root)
    for subject, facts in truth.subjects.items():
        stored = read_synth_truth(root, subject)
        assert stored.subject == subject and stored.roles.shape == facts.grid and stored.roles.dtype == np.int8
        np.testing.assert_array_equal(stored.roles, facts.roles)
        np.testing.assert_array_equal(stored.layout_drive, facts.layout_drive)
        np.testing.assert_array_equal(stored.content_drive, facts.content_drive)
        roi = nib.load(layout.roi_file(subject, "prf-visualrois"))
        np.testing.assert_allclose(stored.affine, roi.affine, atol=1e-5)  # NIfTI stores it in float32
        np.testing.assert_array_equal(stored.roles == 2, np.asanyarray(roi.dataobj) > 0)
        outside = np.asanyarray(nib.load(layout.roi_file(subject, "nsdgeneral")).dataobj) < 0
        np.testing.assert_array_equal(stored.roles == 0, outside)
        assert (stored.signal, stored.noise) == (1.5, 1.5)
        assert np.array_equal(stored.layout_drive > 0, stored.roles == 2)
        assert np.array_equal(stored.content_drive > 0, stored.roles == 3)
        np.testing.assert_allclose(stored.layout_drive[stored.roles == 2], 1.5, rtol=1e-6)
    assert not (root / "nsddata" / TRUTH_FOLDER).exists()  # beside the release, not inside its layout


def test_missing_ground_truth_is_one_line(tmp_path):
    with pytest.raises(MissingInputError, match=r"no synthetic ground truth for subj02: .*subj02\.npz does not exist .*havir synth-nsd"):
        read_synth_truth(tmp_path, 2)
