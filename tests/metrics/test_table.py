"""`havir table`: subjects' eval.json averaged into the published-style row, and its refusals."""

import csv
import io
import json

import numpy as np
import pytest

from havir.metrics.evaluate import evaluate_folder
from tests.conftest import json_of
from tests.metrics.golden import write_pngs, write_prepared


@pytest.fixture(scope="module")
def one_eval(tmp_path_factory):
    """A real eval.json (pixel metrics only), to derive the other subjects' files from."""
    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    nsd_ids = np.arange(1, 5)
    truth = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_prepared(root / "data", nsd_ids, truth, sessions=40)
    write_pngs(root / "recon", nsd_ids, truth[::-1].copy())
    evaluate_folder(root / "recon", root / "data", 1, networks={}, resamples=10, report=False, progress=False)
    return json.loads((root / "recon" / "eval" / "eval.json").read_text())


def _subject(folder, record, subject, **changes):
    """``record`` as subject ``subject``'s eval.json in ``folder``, with metrics set to
    fractions that identify the subject, and ``changes`` applied (key paths joined by '.')."""
    record = json.loads(json.dumps(record))
    record["protocol"]["data"]["subject"] = subject
    record["metrics"] = {"pixcorr": 0.1 * subject, "ssim": 0.2, "alexnet2": 0.9, "effnet": 0.6 + 0.01 * subject}
    for path, value in changes.items():
        *parents, last = path.split(".")
        target = record
        for key in parents:
            target = target[key]
        target[last] = value
    out = folder / f"subj{subject:02d}" / "eval.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(record))
    return out


def test_mean_over_subjects_beside_the_published_rows(one_eval, tmp_path, run_cli):
    assert one_eval["protocol"]["preset"] == "mindeye2" and one_eval["protocol"]["method"] == "recon"
    files = [_subject(tmp_path, one_eval, s) for s in (1, 2, 5, 7)]
    status, out, err = run_cli("table", *files, "--json")
    assert status == 0, err
    result = json_of(out)
    assert result["subjects"] == [1, 2, 5, 7] and result["preset"] == "mindeye2"
    assert result["mean_over_subjects"]["pixcorr"] == pytest.approx(0.1 * (1 + 2 + 5 + 7) / 4)
    assert result["mean_over_subjects"]["effnet"] == pytest.approx(0.6 + 0.01 * 15 / 4)
    assert set(result["missing"]) == {"alexnet5", "inception", "clip", "swav"}  # not computed: never averaged
    assert [row["method"] for row in result["published"]] == ["MindEye2", "MindEye1", "Brain-Diffuser", "Takagi & Nishimoto"]

    status, out, _ = run_cli("table", *files, "--format", "csv", "--method", "HAVIR (ours)")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][:3] == ["method", "PixCorr", "SSIM"] and rows[1][:2] == ["MindEye2", "0.322"]
    assert rows[-1][:5] == ["HAVIR (ours)", "0.375", "0.200", "90.0%", "—"]
    status, out, _ = run_cli("table", *files, "--format", "markdown")
    assert out.splitlines()[1].startswith("|---|") and "| recon | 0.375 |" in out
    status, out, _ = run_cli("table", *files, "--format", "latex")
    assert out.startswith(r"\begin{tabular}") and r"90.0\%" in out and "Takagi \\& Nishimoto" in out
    status, out, _ = run_cli("table", *files)
    assert status == 0 and "MindEye2" in out and "0.375" in out


def test_brain_diffuser_runs_are_not_put_beside_mindeye2_rows(one_eval, tmp_path, run_cli):
    files = [_subject(tmp_path, one_eval, s, **{"protocol.preset": "brain-diffuser"}) for s in (1, 2)]
    status, out, _ = run_cli("table", *files, "--json")
    result = json_of(out)
    assert result["published"] == [] and len(result["other_presets"]) == 4
    assert "computed with the mindeye2 preset, not brain-diffuser" in result["other_presets"][0]["reason"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"protocol.preset": "brain-diffuser"}, "different protocol presets"),
        ({"n": 982}, "different image counts"),
        ({"protocol.data.sessions": 37}, "different session counts"),
        ({"protocol.method": "ridge (fused)"}, "different methods"),
        ({"protocol.data.normalisation": "session"}, "different voxel normalisations"),
    ],
)
def test_refuses_to_average_unlike_runs(one_eval, tmp_path, run_cli, change, message):
    files = [_subject(tmp_path, one_eval, 1), _subject(tmp_path, one_eval, 2, **change)]
    status, out, err = run_cli("table", *files)
    assert status == 2 and message in err and err.count("\n") == 1 and not out


def test_refuses_a_subject_twice_and_foreign_files(one_eval, tmp_path, run_cli):
    first = _subject(tmp_path / "a", one_eval, 1)
    again = _subject(tmp_path / "b", one_eval, 1)
    status, _, err = run_cli("table", first, again)
    assert status == 2 and "subject 1 is given twice" in err
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"n": 3}))
    status, _, err = run_cli("table", first, foreign)
    assert status == 2 and "not an eval.json" in err and "Traceback" not in err
