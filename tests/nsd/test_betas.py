"""Masked betas reading: both release formats, against nibabel's whole-volume read."""

import gzip

import h5py
import nibabel as nib
import numpy as np
import pytest

import havir.nsd.betas
from havir.errors import InvalidInputError
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
    pytest.importorskip("isal.isal_zlib")
    assert gzip_inflater().name == "isal_zlib"
    request.getfixturevalue("without_isal")
    assert gzip_inflater().name == "zlib"


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


# --- the streaming NIfTI reader: any split of the stream, any member layout ---------------------

#: A small session: (X, Y, Z, trials) = (3, 4, 5, 7), so one int16 volume is 120 bytes.
SMALL_SHAPE = (3, 4, 5, 7)


def small_volume(dtype=np.int16, seed=0):
    return np.random.default_rng(seed).integers(-3000, 3000, SMALL_SHAPE).astype(dtype)


def every_voxel():
    return np.argwhere(np.ones(SMALL_SHAPE[:3], bool))[::-1]  # reversed: not the file's order


def nibabel_read(path, voxels):
    """nibabel's own decoding of the whole file, then HAVIR's arithmetic (stored value / 300)."""
    stored = np.asanyarray(nib.load(path).dataobj)
    out = stored[tuple(voxels.T)].T.astype(np.float32)
    out /= 300
    return out


def save_nifti(path, volume, image_class=nib.Nifti1Image):
    image = image_class(volume, np.eye(4))
    image.header.set_data_dtype(volume.dtype)
    nib.save(image, path)
    return path


@pytest.fixture(params=["installed", "missing"])
def isal(request):
    """Run a test with python-isal's inflater and again with zlib's."""
    if request.param == "installed":
        pytest.importorskip("isal.isal_zlib")
    else:
        request.getfixturevalue("without_isal")
    return request.param


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f4", ">u2"])
def test_stream_equals_nibabel(tmp_path, isal, suffix, image_class, dtype):
    volume = small_volume(dtype) if dtype != ">u2" else np.abs(small_volume()).astype(dtype)
    path = save_nifti(tmp_path / f"betas{suffix}", volume, image_class)
    voxels = every_voxel()
    np.testing.assert_array_equal(read_masked_betas(open_betas(path, "nifti"), voxels), nibabel_read(path, voxels))


def test_header_extensions_are_skipped(tmp_path, isal):
    image = nib.Nifti1Image(small_volume(), np.eye(4))
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 1000))
    nib.save(image, tmp_path / "betas.nii.gz")
    assert nib.load(tmp_path / "betas.nii.gz").dataobj.offset > 1000  # the data start moved
    voxels = every_voxel()
    got = read_masked_betas(open_betas(tmp_path / "betas.nii.gz", "nifti"), voxels)
    np.testing.assert_array_equal(got, nibabel_read(tmp_path / "betas.nii.gz", voxels))


def test_every_split_of_an_uncompressed_stream(tmp_path, monkeypatch):
    # Uncompressed, a piece of n bytes ends every n bytes: n from 1 to a volume and a byte more
    # puts the piece boundaries at every offset inside a volume and inside the header.
    path = save_nifti(tmp_path / "betas.nii", small_volume())
    voxels = every_voxel()
    expected = nibabel_read(path, voxels)
    volume_bytes = int(np.prod(SMALL_SHAPE[:3])) * 2
    for piece_bytes in range(1, volume_bytes + 2):
        monkeypatch.setattr(havir.nsd.betas, "_NIFTI_PIECE_BYTES", piece_bytes)
        got = read_masked_betas(open_betas(path, "nifti"), voxels)
        np.testing.assert_array_equal(got, expected, err_msg=f"pieces of {piece_bytes} bytes")


@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 7, 16, 119, 120, 121, 1000])
def test_any_piece_size_of_a_gzip_stream(tmp_path, monkeypatch, isal, piece_bytes):
    monkeypatch.setattr(havir.nsd.betas, "_NIFTI_PIECE_BYTES", piece_bytes)
    path = save_nifti(tmp_path / "betas.nii.gz", small_volume())
    voxels = every_voxel()
    np.testing.assert_array_equal(read_masked_betas(open_betas(path, "nifti"), voxels), nibabel_read(path, voxels))


def multi_member(raw, cuts, padding=b""):
    """``raw`` as consecutive gzip members split at ``cuts``, ``padding`` between them."""
    bounds = [0, *cuts, len(raw)]
    return padding.join(gzip.compress(raw[a:b], compresslevel=1) for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("piece_bytes", [5, 32 * 1024])
@pytest.mark.parametrize("padding", [b"", b"\0" * 9], ids=["no padding", "zero padding"])
def test_multi_member_gzip(tmp_path, monkeypatch, isal, piece_bytes, padding):
    monkeypatch.setattr(havir.nsd.betas, "_NIFTI_PIECE_BYTES", piece_bytes)
    plain = save_nifti(tmp_path / "betas.nii", small_volume())
    raw = plain.read_bytes()
    # cuts inside the header, at the data's start, inside a volume and at a volume's end
    cuts = [100, 352, 352 + 50, 352 + 120 * 3]
    path = tmp_path / "betas.nii.gz"
    path.write_bytes(multi_member(raw, cuts, padding))
    assert gzip.decompress(path.read_bytes()) == raw  # the standard library reads it so too
    voxels = every_voxel()
    np.testing.assert_array_equal(read_masked_betas(open_betas(path, "nifti"), voxels), nibabel_read(plain, voxels))


@pytest.mark.parametrize("kept", ["header", "half the data", "all but the trailer", "one member of two"])
def test_truncated_stream_is_a_user_error(tmp_path, isal, kept):
    raw = save_nifti(tmp_path / "betas.nii", small_volume()).read_bytes()
    whole = multi_member(raw, [len(raw) // 2])
    first_member = len(gzip.compress(raw[: len(raw) // 2], compresslevel=1))
    cut = {"header": 200, "half the data": len(whole) * 3 // 4, "all but the trailer": len(whole) - 4,
           "one member of two": first_member}[kept]
    path = tmp_path / "betas_session03.nii.gz"
    path.write_bytes(whole[:cut])
    with pytest.raises(InvalidInputError, match=r"betas_session03.nii.gz is truncated or corrupt"):
        read_masked_betas(open_betas(path, "nifti"), np.array([[1, 1, 1]]))


def test_truncated_header_is_a_user_error(tmp_path, isal):
    raw = save_nifti(tmp_path / "betas.nii", small_volume()).read_bytes()
    path = tmp_path / "betas_session03.nii.gz"
    path.write_bytes(gzip.compress(raw[:200]))  # a complete gzip stream holding half a header
    with pytest.raises(InvalidInputError, match=r"betas_session03.nii.gz is truncated or corrupt \(.*inside its NIfTI header"):
        open_betas(path, "nifti")


def test_isal_and_zlib_read_identical_multi_member_streams(tmp_path, monkeypatch, request):
    pytest.importorskip("isal.isal_zlib")
    monkeypatch.setattr(havir.nsd.betas, "_NIFTI_PIECE_BYTES", 3)
    raw = save_nifti(tmp_path / "betas.nii", small_volume(seed=1)).read_bytes()
    path = tmp_path / "betas.nii.gz"
    path.write_bytes(multi_member(raw, [7, 400, 777]))
    voxels = every_voxel()
    fast = read_masked_betas(open_betas(path, "nifti"), voxels)
    request.getfixturevalue("without_isal")
    assert gzip_inflater().name == "zlib"
    np.testing.assert_array_equal(read_masked_betas(open_betas(path, "nifti"), voxels), fast)
