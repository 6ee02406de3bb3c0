"""Masked betas reading: both release formats, against nibabel's whole-volume read."""

import gzip

import h5py
import nibabel as nib
import numpy as np
import pytest

from havir.nsd.betas import gzip_inflater, open_betas, read_masked_betas
from havir.nsd.layout import NSDLayout


def reference(path, voxels):
    """The slow, obvious way: whole volume as float64, then index (fine for tiny files)."""
    data = nib.load(path).get_fdata()
    return (data[tuple(voxels.T)].T / 300).astype(np.float32)


@pytest.fixture(scope="module")
def session_files(two_subject_nsd):
    root, truth = two_subject_nsd
    layout = NSDLayout(root)
    return {fmt: layout.betas_file(1, 2, fmt) for fmt in ("nifti", "hdf5")}, truth.subjects[1]


@pytest.fixture(scope="module")
def scattered_voxels(session_files):
    _, subject = session_files
    rng = np.random.default_rng(0)
    inside = np.argwhere(subject.roles > 0)
    return inside[rng.choice(len(inside), 300, replace=False)]  # random order, gaps everywhere


def test_header_facts_in_nifti_axis_order(session_files):
    files, subject = session_files
    for fmt, path in files.items():
        betas = open_betas(path, fmt)
        assert betas.grid == subject.grid
        assert betas.n_trials == subject.trials_per_session


def test_both_formats_equal_the_reference_in_the_order_asked(session_files, scattered_voxels):
    files, _ = session_files
    expected = reference(files["nifti"], scattered_voxels)
    for fmt, path in files.items():
        got = read_masked_betas(open_betas(path, fmt), scattered_voxels)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_hdf5_axes_are_reversed_against_nifti(session_files):
    files, _ = session_files
    with h5py.File(files["hdf5"]) as h5:
        stored = h5["betas"][:, 3, 5, 7]  # (trials, Z, Y, X)
    volume = np.asanyarray(nib.load(files["nifti"]).dataobj)
    np.testing.assert_array_equal(stored, volume[7, 5, 3, :])


def test_nifti_scaling_is_applied(tmp_path):
    volume = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    image = nib.Nifti1Image(volume, np.eye(4))
    image.header.set_slope_inter(2.0, 1.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, path)
    voxels = np.array([[1, 2, 3], [0, 0, 0]])
    got = read_masked_betas(open_betas(path, "nifti"), voxels)
    expected = np.stack([volume[1, 2, 3], volume[0, 0, 0]], axis=1) * 2.0 + 1.0
    np.testing.assert_allclose(got, expected / 300, rtol=1e-6)


def test_nan_betas_are_refused(tmp_path):
    volume = np.ones((3, 3, 3, 4), dtype=np.float32)
    volume[1, 1, 1, 2] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    with pytest.raises(ValueError, match="NaN or inf values in 1 masked voxels"):
        read_masked_betas(open_betas(path, "nifti"), np.argwhere(np.ones((3, 3, 3), bool)))


def test_isal_is_chosen_when_installed_and_the_standard_library_otherwise(request):
    pytest.importorskip("isal.igzip")
    assert gzip_inflater().name == "isal.igzip"
    request.getfixturevalue("without_isal")
    assert gzip_inflater().name == "gzip"


def test_fast_and_standard_inflaters_read_identical_betas(session_files, scattered_voxels, request):
    files, _ = session_files
    fast = read_masked_betas(open_betas(files["nifti"], "nifti"), scattered_voxels)
    request.getfixturevalue("without_isal")
    standard = read_masked_betas(open_betas(files["nifti"], "nifti"), scattered_voxels)
    np.testing.assert_array_equal(fast, standard)
    np.testing.assert_array_equal(standard, reference(files["nifti"], scattered_voxels))


@pytest.mark.parametrize("isal", ["installed", "missing"])
def test_corrupt_nifti_stream_is_named(tmp_path, request, isal):
    # A valid header, then a deflate block of the reserved type 3: zlib and ISA-L each raise
    # their own error class (ISA-L's is not an OSError), and each must become the user error.
    if isal == "missing":
        request.getfixturevalue("without_isal")
    noise = np.random.default_rng(0).integers(-1000, 1000, (32, 32, 32, 20), dtype=np.int16)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), tmp_path / "plain.nii")
    raw = (tmp_path / "plain.nii").read_bytes()
    middle = len(raw) // 2  # the readers inflate ahead while parsing the header: damage lies far
    body = bytearray(gzip.compress(raw[middle:], compresslevel=1))
    body[10] = 0b111  # the first block's header, after gzip's 10 bytes: final, type 3 (invalid)
    damaged = tmp_path / "betas_session02.nii.gz"
    damaged.write_bytes(gzip.compress(raw[:middle], compresslevel=1) + bytes(body))  # two gzip members
    betas = open_betas(damaged, "nifti")
    with pytest.raises(ValueError, match=r"betas_session02.nii.gz is truncated or corrupt \(.*(invalid block type|Invalid deflate block)"):
        read_masked_betas(betas, np.array([[1, 1, 1]]))


def test_truncated_nifti_is_named(session_files, tmp_path):
    files, _ = session_files
    damaged = tmp_path / "betas_session02.nii.gz"
    damaged.write_bytes(files["nifti"].read_bytes()[: files["nifti"].stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_masked_betas(open_betas(damaged, "nifti"), np.array([[1, 1, 1]]))


def test_corrupt_hdf5_is_named(tmp_path):
    damaged = tmp_path / "betas_session01.hdf5"
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ValueError, match=r"betas_session01.hdf5 is truncated or corrupt"):
        open_betas(damaged, "hdf5")
