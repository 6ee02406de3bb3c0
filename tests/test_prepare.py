"""``havir prepare`` against the generator's truth and an independent float64 recomputation."""

import contextlib
import importlib.util
import io
import json

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import havir.prepare
from havir.cli import main
from havir.masks import build_masks, definition_for
from havir.nsd.atlas import read_atlas
from havir.nsd.betas import open_betas, read_masked_betas
from havir.nsd.layout import NSDLayout
from havir.prepare import load_split, prepare_subject
from tests.conftest import json_of


@pytest.fixture(scope="module")
def prepared(two_subject_nsd, tmp_path_factory):
    """Subjects 1 and 4 prepared from HDF5 (auto) and subject 1 also from NIfTI, via the CLI."""
    root, truth = two_subject_nsd
    out = tmp_path_factory.mktemp("prepared")
    summaries = {}
    for subject, fmt, folder in ((1, "auto", "auto"), (4, "auto", "auto"), (1, "nifti", "nifti")):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exit_info:
            main(["prepare", "--nsd-root", str(root), "--subject", str(subject), "--out", str(out / folder),
                  "--betas-format", fmt, "--json"])
        assert exit_info.value.code == 0
        summaries[subject, folder] = json_of(stdout.getvalue())
    return root, truth, out, summaries


@pytest.mark.parametrize("subject", [1, 4])
def test_counts_equal_the_generators_truth(prepared, subject):
    _, truth, _, summaries = prepared
    summary = summaries[subject, "auto"]
    expected = truth.subjects[subject]
    for key in ("sessions", "train_images", "test_images", "train_trials", "test_trials"):
        assert summary[key] == getattr(expected, key), key
    assert summary["betas_formats"] == ["hdf5"]
    assert summary["structural_voxels"] > 0 and summary["semantic_voxels"] > 0


def test_trials_show_the_images_the_generator_showed(prepared):
    _, truth, out, _ = prepared
    shown = truth.subjects[1].trial_nsd_id  # in presentation order
    train, test = load_split(out / "auto/subj01.h5", "train"), load_split(out / "auto/subj01.h5", "test")
    is_test = np.isin(shown, truth.shared_nsd_id)
    np.testing.assert_array_equal(train.nsd_id, shown[~is_test])
    np.testing.assert_array_equal(test.nsd_id, shown[is_test])
    assert set(train.nsd_id).isdisjoint(test.nsd_id)
    assert train.repetition.max() == 2 and test.session.min() == 1


def test_nifti_and_hdf5_give_identical_files(prepared):
    _, _, out, _ = prepared
    with h5py.File(out / "auto/subj01.h5") as a, h5py.File(out / "nifti/subj01.h5") as b:
        names = []
        a.visit(lambda name: names.append(name) if isinstance(a[name], h5py.Dataset) else None)
        assert len(names) > 15
        for name in names:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)


def _datasets(path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file, by name."""
    arrays = {}
    with h5py.File(path) as h5:
        h5.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


# Looked up at import: inside the test, the without_isal fixture already hides the package.
@pytest.mark.skipif(importlib.util.find_spec("isal") is None, reason="python-isal is not installed: both runs would use zlib")
def test_fast_inflater_and_zlib_prepare_identical_files(prepared, without_isal, tmp_path):
    root, _, out, _ = prepared
    prepare_subject(root, 1, tmp_path, betas_format="nifti", progress=False)
    fast, standard = _datasets(out / "nifti/subj01.h5"), _datasets(tmp_path / "subj01.h5")
    assert len(fast) > 15 and fast.keys() == standard.keys()
    for name in fast:
        np.testing.assert_array_equal(fast[name], standard[name], err_msg=name)
    recorded = {folder: json.loads((folder / "subj01.json").read_text())["versions"] for folder in (out / "nifti", tmp_path)}
    assert recorded[out / "nifti"]["gzip_inflater"] == "isal_zlib" and "isal" in recorded[out / "nifti"]
    assert recorded[tmp_path]["gzip_inflater"] == "zlib" and "isal" not in recorded[tmp_path]


def test_two_workers_write_what_one_worker_writes(prepared, tmp_path, run_cli):
    root, _, out, _ = prepared  # out/nifti: subject 1 from NIfTI, one worker
    status, _, _ = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", tmp_path, "--betas-format", "nifti", "--workers", 2)
    assert status == 0
    one, two = _datasets(out / "nifti/subj01.h5"), _datasets(tmp_path / "subj01.h5")
    assert len(one) > 15 and one.keys() == two.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    records = [json.loads(path.read_text()) for path in (out / "nifti/subj01.json", tmp_path / "subj01.json")]
    for record in records:
        del record["seconds"], record["output"]  # the run's time and folder
    assert records[0] == records[1]


def test_interrupted_prepare_with_workers_resumes_after_the_last_session(small_nsd, tmp_path, interrupt_on_call, run_cli):
    root, _ = small_nsd
    whole = prepare_subject(root, 1, tmp_path / "whole", progress=False)
    restore = interrupt_on_call(havir.prepare, "flush_h5", 3)  # Ctrl-C while session 2 is written
    with pytest.raises(KeyboardInterrupt):
        prepare_subject(root, 1, tmp_path / "resumed", workers=2, progress=False)
    restore()
    resumed = prepare_subject(root, 1, tmp_path / "resumed", workers=2, progress=False)
    assert resumed["resumed_sessions"] == 1
    one, two = _datasets(tmp_path / "whole/subj01.h5"), _datasets(tmp_path / "resumed/subj01.h5")
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    status, _, stderr = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", tmp_path / "bad", "--workers", 0)
    assert status == 2 and "workers" in stderr and "0" in stderr


def test_workers_read_at_most_their_count_ahead_of_the_writer(two_subject_nsd, monkeypatch):
    root, truth = two_subject_nsd
    files = [open_betas(NSDLayout(root).betas_file(1, session, "nifti"), "nifti") for session in (1, 2, 3, 4)]
    voxels = np.argwhere(truth.subjects[1].roles > 0)[:50]
    submitted = []

    class CountingPool(havir.prepare.ProcessPoolExecutor):
        def submit(self, *args, **kwargs):
            submitted.append(args[1])
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(havir.prepare, "ProcessPoolExecutor", CountingPool)
    ahead = []
    for held, (betas, session_betas) in enumerate(zip(files, havir.prepare._masked_sessions(files, voxels, 2))):
        ahead.append(len(submitted) - held - 1)  # sessions asked for beyond the one the writer holds
        np.testing.assert_array_equal(session_betas, read_masked_betas(betas, voxels))
    assert submitted == files
    assert ahead == [2, 2, 1, 0]  # never more than the 2 workers: memory stays bounded


def _raw_masked_betas(root, subject, sessions, voxels):
    """Independent route: nibabel's float64 volumes, indexed, scaled (small files only)."""
    layout = NSDLayout(root)
    rows = []
    for session in range(1, sessions + 1):
        volume = nib.load(layout.betas_file(subject, session, "nifti")).get_fdata()
        rows.append(volume[tuple(voxels.T)].T / 300)
    return np.concatenate(rows)


def test_the_three_sets_are_every_nsdgeneral_voxel_once(prepared):
    """structural, semantic and other: disjoint, and together exactly the nsdgeneral mask (the
    ridge baseline's Brain-Diffuser input)."""
    root, _, out, summaries = prepared
    with h5py.File(out / "auto/subj01.h5") as h5:
        voxels = [h5[f"voxels/{name}"][()].astype(int) for name in ("structural", "semantic", "other")]
    every = np.concatenate(voxels)
    nsdgeneral = np.argwhere(read_atlas(NSDLayout(root), 1, "nsdgeneral").labels == 1)
    assert len(np.unique(every, axis=0)) == len(every) and len(voxels[2]) > 0
    np.testing.assert_array_equal(np.unique(every, axis=0), np.unique(nsdgeneral, axis=0))
    assert summaries[1, "auto"]["other_voxels"] == len(voxels[2])


@pytest.mark.parametrize("which", ["structural", "semantic", "other"])
def test_zscore_uses_training_trials_only(prepared, which):
    root, truth, out, _ = prepared
    path = out / "auto/subj01.h5"
    with h5py.File(path) as h5:
        voxels = h5[f"voxels/{which}"][()].astype(int)
        mean, std = h5[f"normalisation/{which}_mean"][()], h5[f"normalisation/{which}_std"][()]
    masks = build_masks(NSDLayout(root), 1, definition_for(1))
    np.testing.assert_array_equal(voxels, masks.voxels(which))
    raw = _raw_masked_betas(root, 1, truth.subjects[1].sessions, voxels)
    train, test = load_split(path, "train"), load_split(path, "test")
    is_test = np.isin(truth.subjects[1].trial_nsd_id, truth.shared_nsd_id)
    train_raw, test_raw = raw[~is_test], raw[is_test]
    np.testing.assert_allclose(mean, train_raw.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, train_raw.std(0), rtol=1e-5)
    # The check can tell: statistics over all trials differ by more than the tolerance.
    assert np.abs(raw.mean(0) - train_raw.mean(0)).max() > 1e-3
    zscored = {"train": getattr(train, which), "test": getattr(test, which)}
    np.testing.assert_allclose(zscored["train"], (train_raw - train_raw.mean(0)) / train_raw.std(0), atol=2e-4)
    np.testing.assert_allclose(zscored["test"], (test_raw - train_raw.mean(0)) / train_raw.std(0), atol=2e-4)


def test_test_stimuli_and_captions_are_joined(prepared):
    root, _, out, _ = prepared
    layout = NSDLayout(root)
    with h5py.File(out / "auto/subj01.h5") as h5:
        ids, stimuli = h5["test/stimulus_nsd_id"][()], h5["test/stimuli"][()]
        caption_ids, captions = h5["captions/nsd_id"][()], h5["captions/text"].asstr()[()]
        all_ids = np.union1d(h5["train/nsd_id"][()], h5["test/nsd_id"][()])
    assert np.all(np.diff(ids) > 0)
    with h5py.File(layout.stimuli) as h5:
        np.testing.assert_array_equal(stimuli, h5["imgBrick"][ids])
    np.testing.assert_array_equal(np.unique(caption_ids), all_ids)
    table = pd.read_csv(layout.stim_info).set_index("nsdId")
    image = int(ids[0])
    split = table.loc[image, "cocoSplit"]
    coco = json.loads((layout.annotations_dir / f"captions_{split}.json").read_text())
    expected = [a["caption"] for a in coco["annotations"] if a["image_id"] == table.loc[image, "cocoId"]]
    assert list(captions[caption_ids == image]) == expected and len(expected) == 5


def test_metadata_records_the_protocol(prepared):
    _, _, out, _ = prepared
    meta = json.loads((out / "auto/subj04.json").read_text())
    assert meta["protocol"]["sessions_read"] == [1, 2, 3]
    assert meta["protocol"]["normalisation"]["method"] == "training"  # the default
    assert "training trials only" in meta["protocol"]["normalisation"]["rule"]
    assert meta["masks"]["definition"] == "subj04" and len(meta["masks"]["definition_sha256"]) == 64
    assert {"havir", "numpy", "h5py", "nibabel"} <= set(meta["versions"])
    assert not [p for p in (out / "auto").iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_fewer_sessions_read_fewer_trials(two_subject_nsd, tmp_path, run_cli):
    root, truth = two_subject_nsd
    status, stdout, _ = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", tmp_path, "--sessions", 2, "--json")
    assert status == 0
    summary = json_of(stdout)
    assert summary["sessions"] == 2
    assert summary["train_trials"] + summary["test_trials"] == 2 * truth.subjects[1].trials_per_session
    assert summary["test_trials"] < truth.subjects[1].test_trials


def test_interrupted_prepare_resumes_after_the_last_session(small_nsd, tmp_path, interrupt_on_call):
    root, _ = small_nsd
    whole = prepare_subject(root, 1, tmp_path / "whole", progress=False)
    restore = interrupt_on_call(havir.prepare, "read_masked_betas", 2)
    with pytest.raises(KeyboardInterrupt):
        prepare_subject(root, 1, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed/subj01.h5").exists() and (tmp_path / "resumed/.subj01.h5.partial").exists()
    restore()
    resumed = prepare_subject(root, 1, tmp_path / "resumed", progress=False)
    assert resumed["resumed_sessions"] == 1 and whole["resumed_sessions"] == 0
    assert not (tmp_path / "resumed/.subj01.h5.partial").exists()
    with h5py.File(tmp_path / "whole/subj01.h5") as a, h5py.File(tmp_path / "resumed/subj01.h5") as b:
        names = []
        a.visit(lambda name: names.append(name) if isinstance(a[name], h5py.Dataset) else None)
        for name in names:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert set(b.attrs) == set(a.attrs)
