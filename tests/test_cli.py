"""Bad input to the command line: one line on stderr, exit status 2, nothing half-written."""

import json

import nibabel as nib
import numpy as np
import pytest

from havir.masks import definitions_dir
from havir.nsd.layout import NSDLayout
from tests.conftest import without_progress


def prepare_args(root, out, *extra):
    return ("prepare", "--nsd-root", root, "--subject", 1, "--out", out, "--json", *extra)


def assert_user_error(result, *fragments, out=None):
    status, stdout, stderr = result
    assert status == 2, stderr
    lines = without_progress(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and stderr.strip().endswith(lines[0]), stderr
    assert "Traceback" not in stderr and stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if out is not None and out.exists():
        assert list(out.iterdir()) == [], "output left behind"


def replace_volume(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), path)


def test_missing_nsd_root(run_cli, tmp_path):
    assert_user_error(run_cli(*prepare_args(tmp_path / "nowhere", tmp_path / "out")), "NSD root", "does not exist")


@pytest.mark.parametrize(
    "path_of",
    [
        lambda layout: layout.expdesign,
        lambda layout: layout.stim_info,
        lambda layout: layout.stimuli,
        lambda layout: layout.annotations_dir / "captions_val2017.json",
        lambda layout: layout.roi_file(1, "streams"),
    ],
    ids=["design", "stimulus-table", "stimuli", "captions", "roi"],
)
def test_missing_file_is_named(run_cli, small_nsd, tmp_path, path_of):
    root, _ = small_nsd
    missing = path_of(NSDLayout(root))
    missing.unlink()
    assert_user_error(run_cli(*prepare_args(root, tmp_path / "out")), str(missing), out=tmp_path / "out")


def test_subject_without_data(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    result = run_cli("prepare", "--nsd-root", root, "--subject", 2, "--out", tmp_path / "out")
    assert_user_error(result, "no betas for subj02")


def test_subject_outside_nsd(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    assert_user_error(run_cli("prepare", "--nsd-root", root, "--subject", 9, "--out", tmp_path), "one of 1..8")


def test_sessions_beyond_what_exists(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    assert_user_error(run_cli(*prepare_args(root, tmp_path / "out", "--sessions", 5)), "--sessions 5", "1..2")


def test_roi_grid_differs_from_betas_grid(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    layout = NSDLayout(root)
    for atlas in ("nsdgeneral", "prf-visualrois", "streams", "floc-faces", "floc-bodies", "floc-places", "floc-words"):
        labels = np.asanyarray(nib.load(layout.roi_file(1, atlas)).dataobj)
        replace_volume(layout.roi_file(1, atlas), np.pad(labels, ((0, 1), (0, 0), (0, 0)), constant_values=-1))
    assert_user_error(run_cli(*prepare_args(root, tmp_path / "out")), "ROI grid", "does not match betas grid", "func1pt8mm")


def test_nan_betas(run_cli, small_nsd, tmp_path):
    root, truth = small_nsd
    path = NSDLayout(root).betas_file(1, 1, "nifti")
    volume = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    volume[np.unravel_index(np.argmax(truth.subjects[1].roles == 2), volume.shape[:3])] = np.inf
    replace_volume(path, volume)
    result = run_cli(*prepare_args(root, tmp_path / "out", "--betas-format", "nifti"))
    assert_user_error(result, "NaN or inf", "betas_session01.nii.gz", out=tmp_path / "out")


def test_truncated_nifti(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    path = NSDLayout(root).betas_file(1, 2, "nifti")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    result = run_cli(*prepare_args(root, tmp_path / "out", "--betas-format", "nifti"))
    assert_user_error(result, "betas_session02.nii.gz is truncated or corrupt", out=tmp_path / "out")


def test_corrupt_hdf5(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    path = NSDLayout(root).betas_file(1, 1, "hdf5")
    path.write_bytes(path.read_bytes()[:4096])
    assert_user_error(run_cli(*prepare_args(root, tmp_path / "out")), "betas_session01.hdf5 is truncated or corrupt")


def test_mask_that_selects_nothing(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    path = NSDLayout(root).roi_file(1, "prf-visualrois")
    image = nib.load(path)
    replace_volume(path, np.zeros(image.shape, np.int16), image.affine)
    result = run_cli("masks", "build", "--nsd-root", root, "--subject", 1, "--out", tmp_path / "masks")
    assert_user_error(result, "structural set", "selects no voxels", out=tmp_path / "masks")


def test_unknown_label_in_definition(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    definition = tmp_path / "typo.toml"
    definition.write_text(
        f'extends = "{definitions_dir() / "default.toml"}"\n[[semantic]]\natlas = "floc-faces"\nlabels = ["FFA"]\n'
    )
    result = run_cli(*prepare_args(root, tmp_path / "out", "--definition", definition))
    assert_user_error(result, "floc-faces has no label 'FFA'", "FFA-1")


def test_output_folder_not_writable(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_user_error(run_cli(*prepare_args(root, blocker / "out")), "is not writable")


def test_bad_option_value(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    assert_user_error(run_cli(*prepare_args(root, tmp_path / "out", "--betas-format", "mat")), "--betas-format")


def test_synth_refuses_too_few_images_and_a_repeated_subject(run_cli, tmp_path):
    assert_user_error(run_cli("synth-nsd", "--out", tmp_path / "nsd", "--images", 5), "--images must be a whole number in [20, 10000]")
    assert_user_error(run_cli("synth-nsd", "--out", tmp_path / "twice", "--subject", 2, "--subject", 2), "subj02 is named twice")
    assert not (tmp_path / "twice").exists()


def test_debug_shows_the_traceback(small_nsd, tmp_path):
    from havir.cli import main

    with pytest.raises(FileNotFoundError):
        main(["--debug", *map(str, prepare_args(tmp_path / "nowhere", tmp_path / "out"))])


def test_masks_build_and_show(run_cli, small_nsd, tmp_path):
    root, _ = small_nsd
    status, stdout, _ = run_cli("masks", "build", "--nsd-root", root, "--subject", 1, "--out", tmp_path, "--json")
    assert status == 0
    summary = json.loads(stdout)
    assert summary["overlap_voxels"] == 0 and summary["structural_voxels"] == sum(summary["roi_counts"]["structural"].values())
    png = tmp_path / "subj01.png"
    status, _, _ = run_cli("masks", "show", "--nsd-root", root, "--subject", 1, "--out", png)
    assert status == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_masks_show_json(run_cli, small_nsd, tmp_path):
    png = tmp_path / "subj01.png"
    status, stdout, _ = run_cli("masks", "show", "--nsd-root", small_nsd[0], "--subject", 1, "--out", png, "--json")
    summary = json.loads(stdout)
    assert status == 0 and summary["png"] == str(png) and summary["subject"] == 1 and summary["structural_voxels"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_version_and_short_help(run_cli, monkeypatch):
    import havir

    monkeypatch.setenv("COLUMNS", "200")  # the help's table, unwrapped

    status, stdout, _ = run_cli("--version")
    assert status == 0 and stdout.strip() == f"havir {havir.__version__}"
    status, stdout, _ = run_cli("-h")
    assert status == 0 and "--debug" in stdout and "--version" in stdout and "synth-nsd" in stdout
    status, stdout, _ = run_cli("reconstruct", "-h")
    assert status == 0 and "<fused|structural|semantic>" in stdout and "<ddim|pndm|dpmsolver|euler>" in stdout
    json_row = next(line for line in stdout.splitlines() if "--json" in line)
    assert "<bool>" not in json_row  # a flag takes no value


def test_choice_options_take_the_library_words():
    """The command line's enumerations and the library's own checks accept the same words."""
    from havir import cli
    from havir.devices import DTYPES
    from havir.metrics.protocols import PRESETS
    from havir.explain import EXPLAIN_OPTIONS
    from havir.nsd.synth import SYNTH_OPTIONS
    from havir.prepare import PREPARE_OPTIONS
    from havir.models.backbone import IMG2IMG_STARTS, MODES
    from havir.models.sampling import SCHEDULERS
    from havir.train import TRAIN_OPTIONS

    def words(enumeration):
        return [member.value for member in enumeration]

    assert words(cli.Mode) == list(MODES)
    assert words(cli.Dtype) == ["auto", *DTYPES]
    assert words(cli.Scheduler) == list(SCHEDULERS)
    assert words(cli.Img2ImgStart) == list(IMG2IMG_STARTS)
    assert words(cli.TrainModel) == list(TRAIN_OPTIONS["model"].choices)
    assert words(cli.PreparedBetas) == list(PREPARE_OPTIONS["betas_format"].choices)
    assert words(cli.Normalisation) == list(PREPARE_OPTIONS["normalisation"].choices)
    assert words(cli.SynthBetas) == list(SYNTH_OPTIONS["betas_format"].choices)
    assert sorted(words(cli.Protocol)) == sorted(PRESETS)
    assert words(cli.ExplainMethod) == list(EXPLAIN_OPTIONS["method"].choices)


def test_choices_are_completed_by_the_shell(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "_HAVIR_COMPLETE": "complete_bash",
                        "COMP_WORDS": "havir reconstruct --mode ", "COMP_CWORD": "3"}
    done = subprocess.run([sys.executable, "-m", "havir"], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["fused", "structural", "semantic"], done.stdout + done.stderr


def test_synth_nsd_old_forms_still_work_with_a_deprecation_line(run_cli, monkeypatch, tmp_path):
    calls = []

    def fake_synthesize(out, subjects, *args, **kwargs):
        calls.append((out, subjects))
        return type("Truth", (), {"to_json": lambda self: {}})()

    monkeypatch.setattr("havir.nsd.synth.synthesize_nsd", fake_synthesize)
    status, _, stderr = run_cli("synth-nsd", "--out", tmp_path / "new", "--subject", 1, "--subject", 4, "--json")
    assert status == 0 and stderr == "" and calls[-1] == (tmp_path / "new", (1, 4))
    status, _, stderr = run_cli("synth-nsd", tmp_path / "old", "--subjects", "1,4", "--json")
    assert status == 0 and calls[-1] == (tmp_path / "old", (1, 4))
    assert stderr.splitlines() == [f"warning: the positional OUT ({tmp_path / 'old'}) is deprecated: write --out {tmp_path / 'old'}",
                                   "warning: --subjects 1,4 is deprecated: write --subject 1 --subject 4"]
    status, _, stderr = run_cli("synth-nsd", "--out", tmp_path / "x", "--json")
    assert status == 0 and calls[-1] == (tmp_path / "x", (1,))  # subject 1 by default
    assert_user_error(run_cli("synth-nsd", "--json"), "no output folder", "--out")
    assert_user_error(run_cli("synth-nsd", tmp_path / "a", "--out", tmp_path / "b"), "two output folders")


def test_reconstruct_defaults_are_the_sampler_settings_defaults(run_cli, monkeypatch, tmp_path):
    """The command line reads its defaults from SamplerSettings (issue 15, item 6), never its own copy."""
    import havir.artifacts.run
    import havir.reconstruct
    from havir.models.backbone import SamplerSettings

    received = {}
    monkeypatch.setattr(havir.artifacts.run, "read_finished_run", lambda run: {})
    monkeypatch.setattr(havir.reconstruct, "reconstruct_run", lambda run, out, **options: received.update(options) or {})
    status, _, stderr = run_cli("reconstruct", "--run", tmp_path / "run", "--out", tmp_path / "recon")
    assert status == 0, stderr
    assert received["settings"] == SamplerSettings() and received["mode"] == "fused"
