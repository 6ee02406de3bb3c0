"""`havir eval` on bad or hostile inputs: reconstruction names, 16-bit and huge PNGs, broken
sibling folders, unusable weights files, and strings from the data written into the report."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from havir.errors import InvalidInputError
from havir.metrics.evaluate import evaluate_folder, load_reconstructions
from tests.metrics.golden import write_pngs, write_prepared

NSD_IDS = np.array([12, 40, 512, 7001])


@pytest.fixture
def small_eval(tmp_path):
    """Prepared data of 4 random 32-px stimuli and a folder of their reconstructions."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_prepared(tmp_path / "data", NSD_IDS, truth, sessions=40)
    write_pngs(tmp_path / "runs" / "fused", NSD_IDS, truth[::-1].copy())
    return tmp_path / "data", tmp_path / "runs" / "fused", truth


def _evaluate(data, recon, **options):
    return evaluate_folder(recon, data, 1, networks={}, resamples=10, progress=False, **options)


def test_one_canonical_name_per_image(small_eval, run_cli):
    data, recon, _ = small_eval
    PIL.Image.open(recon / "12.png").save(recon / "0012.png")  # the same image under a second name
    with pytest.raises(InvalidInputError, match=r"leading zeros.*0012\.png -> 12\.png"):
        load_reconstructions(recon, NSD_IDS)
    (recon / "12.png").unlink()  # only the non-canonical name left: still refused, never guessed
    status, _, err = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing")
    assert status == 2 and "0012.png" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_damaged_prepared_file_is_one_line(small_eval, run_cli):
    """It was read with h5py directly: an OSError traceback, reported as a bug."""
    data, recon, _ = small_eval
    (data / "subj01.h5").write_bytes(b"not HDF5")
    status, _, err = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing")
    assert status == 2 and err.startswith("error: prepared file") and "damaged or not HDF5" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_16_bit_grayscale_is_scaled_and_16_bit_colour_refused(tmp_path):
    levels = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    PIL.Image.fromarray(levels).save(tmp_path / "1.png")
    assert PIL.Image.open(tmp_path / "1.png").mode == "I;16"
    np.testing.assert_array_equal(load_reconstructions(tmp_path, [1])[0, 0, :, 0], [0, 1, 128, 255])
    # A 16-bit RGB PNG written by hand (PIL cannot write one); PIL reads only its high byte.
    import struct
    import zlib

    rows = b"".join(b"\x00" + np.full((4, 3), 40000, dtype=">u2").tobytes() for _ in range(4))

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    (tmp_path / "1.png").write_bytes(png)
    with pytest.raises(InvalidInputError, match="16-bit colour PNG"):
        load_reconstructions(tmp_path, [1])


def test_a_huge_png_is_one_line(small_eval, run_cli, monkeypatch):
    data, recon, _ = small_eval
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 = 1024 > 2 x 100: a "bomb"
    status, _, err = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing")
    assert status == 2 and "too large to be a reconstruction" in err and "Traceback" not in err


def test_a_broken_sibling_folder_is_skipped_with_a_note(small_eval):
    data, recon, truth = small_eval
    garbled = recon.parent / "semantic"
    write_pngs(garbled, NSD_IDS, truth)
    (garbled / "manifest.json").write_text("{ not json")
    odd = recon.parent / "structural"
    write_pngs(odd, NSD_IDS, truth)
    (odd / "manifest.json").write_text(json.dumps({"mode": "structural"}))
    (odd / "0040.png").write_bytes((odd / "40.png").read_bytes())
    evaluation = _evaluate(data, recon)
    assert any("semantic" in note and "manifest.json" in note for note in evaluation.notes)
    assert any("structural" in note and "leading zeros" in note for note in evaluation.notes)
    page = (recon / "eval" / "report.html").read_text()
    assert "not shown" in page and page.count("<img") == 1 + 4 * 2  # chart; stimulus | fused


def test_strings_from_the_data_are_escaped_in_the_report(small_eval, tmp_path):
    data, recon, truth = small_eval
    (data / "subj01.json").write_text(json.dumps({"sessions": "<script>alert('sessions')</script>"}))
    sibling = recon.parent / "other"
    write_pngs(sibling, NSD_IDS, truth)
    (sibling / "manifest.json").write_text(json.dumps({"mode": "<img src=x onerror=alert('mode')>"}))
    named = recon.parent / "<b>folder"  # a folder name with markup, evaluated: in the modes table too
    write_pngs(named, NSD_IDS, truth)
    (named / "manifest.json").write_text("{}")
    (named / "eval").mkdir()
    (named / "eval" / "eval.json").write_text(json.dumps({"n": 4, "details": {"<i>metric": {"mean": 0.5}}}))
    _evaluate(data, recon)
    page = (recon / "eval" / "report.html").read_text()
    assert "<script>alert" not in page and "onerror=alert('mode')>" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror" in page
    assert "<b>folder" not in page and "&lt;b&gt;folder" in page and "<i>metric" not in page


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage, not a checkpoint", "wrong keys"],
    ids=["empty", "garbage", "wrong-keys"],
)
def test_unusable_weights_file_is_one_line(small_eval, run_cli, offline_caches, content):
    data, recon, _ = small_eval
    weights = offline_caches / "weights"
    weights.mkdir()
    path = weights / "alexnet-owt-7be5be79.pth"
    if content == "wrong keys":
        torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_bytes(content)
    status, _, err = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--weights-dir", weights)
    assert status == 2 and "Traceback" not in err and err.count("\n") == 1
    assert str(path) in err and "delete it" in err and "download.pytorch.org/models/alexnet-owt-7be5be79.pth" in err
