"""Cross-subject training (issue 17, item 2): one model for several subjects (a linear input layer
per subject into shared decoders), its per-subject runs taken by reconstruct unchanged, adapting
it to a new subject (``--init``), resuming, and the refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import havir.train
from havir.artifacts.run import load_decoders, load_shared_decoders, read_finished_run
from havir.features import compute_features
from havir.models.decoders import CrossSubjectSemantic, CrossSubjectStructural, SemanticExtractor, StructuralGenerator
from havir.nsd.synth import read_synth_truth, synthesize_nsd
from havir.prepare import prepare_subject
from havir.reconstruct import SamplerSettings, reconstruct_run
from havir.train import TrainConfig, train_subject, train_subjects
from tests.conftest import without_progress

#: Small and quick: repetition averages (81 rows per subject), a batch split 8 + 8 between two subjects.
QUICK = TrainConfig(preset="tiny", epochs=3, batch_size=16, learning_rate=2e-3, use_trials=False, shared_width=32,
                    checkpoint_minutes=0, seed=0)


@pytest.fixture(scope="module")
def pooled_data(tmp_path_factory):
    """Subjects 1 and 2 prepared in full and subject 3 from one session, each with ``tiny`` features
    (three grids and voxel counts): (data folder, one-session data folder)."""
    root = tmp_path_factory.mktemp("nsd3")
    synthesize_nsd(root, subjects=(1, 2, 3), images=100, seed=5, sessions=4, betas_format="hdf5")
    data, one = tmp_path_factory.mktemp("pool"), tmp_path_factory.mktemp("one_session")
    for subject, folder, sessions in ((1, data, None), (2, data, None), (3, one, 1)):
        prepare_subject(root, subject, folder, sessions=sessions, progress=False)
        compute_features(folder, subject, model="tiny", progress=False)
    return data, one


@pytest.fixture(scope="module")
def pooled_run(pooled_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("pooled") / "run"
    summary = train_subjects(pooled_data[0], (1, 2), run, config=QUICK, device="cpu", progress=False)
    return run, summary


def test_a_pooled_run_holds_one_ordinary_run_per_subject(pooled_data, pooled_run, tmp_path):
    run, summary = pooled_run
    assert summary["subjects"] == [1, 2] and set(summary["test_scores"]) == {"subj01", "subj02"}
    with pytest.raises(ValueError, match=r"is a multi-subject run \(subjects 1, 2\): pass one subject's run inside it, such as .*subj01"):
        read_finished_run(run)
    shared = load_shared_decoders(run)
    assert type(shared["structural"]) is StructuralGenerator and type(shared["semantic"]) is SemanticExtractor
    assert shared["structural"].config.n_voxels == 32  # the shared space
    record = json.loads((run / "run.json").read_text())
    assert record["subjects"] == [1, 2] and record["features"]["model"] == "tiny"
    voxels = set()
    for subject in (1, 2):
        folder = run / f"subj{subject:02d}"
        held = read_finished_run(folder)
        assert held["subject"] == subject and held["model"] == "havir"
        assert held["test_scores"] == summary["test_scores"][f"subj{subject:02d}"]
        decoders = load_decoders(folder)
        assert type(decoders["structural"]) is CrossSubjectStructural and type(decoders["semantic"]) is CrossSubjectSemantic
        voxels.add(decoders["structural"].config.n_voxels)
        for role in ("structural", "semantic"):  # the same shared weights behind every subject's input layer
            for key, value in shared[role].state_dict().items():
                torch.testing.assert_close(decoders[role].shared.state_dict()[key], value, rtol=0, atol=0)
    assert len(voxels) == 2  # different voxel counts, one model
    out = reconstruct_run(run / "subj02", tmp_path / "recon", mode="structural", limit=2, settings=SamplerSettings(steps=2),
                          device="cpu", progress=False)
    assert out["reconstructed"] == 2 and len(list((tmp_path / "recon").glob("*.png"))) == 2


def test_adapting_to_a_new_subject_trains_its_input_layers_first(pooled_data, pooled_run, tmp_path):
    run, _ = pooled_run
    config = dataclasses.replace(QUICK, epochs=2, finetune_epochs=2, checkpoint_minutes=60)
    frozen = train_subject(pooled_data[1], 3, tmp_path / "frozen", init=run, device="cpu", progress=False,
                           config=dataclasses.replace(config, epochs=4, finetune_epochs=0, best_by="identification"))
    assert frozen["init_subjects"] == [1, 2] and frozen["subject"] == 3
    records = [json.loads(line) for line in (tmp_path / "frozen/metrics.jsonl").read_text().splitlines()]
    for role, targets in (("structural", ["vae_latents"]), ("semantic", ["clip_image", "clip_text"])):
        identification = [sum(r["val_scores"][f"{t}_identification"] for t in targets) for r in records]
        assert frozen["best_epoch"][role] == 1 + identification.index(max(identification))  # kept: the first best epoch
    pretrained, adapted = load_shared_decoders(run), load_decoders(tmp_path / "frozen")
    for role in ("structural", "semantic"):  # input layers alone: the shared decoders did not move
        for key, value in pretrained[role].state_dict().items():
            torch.testing.assert_close(adapted[role].shared.state_dict()[key], value, rtol=0, atol=0)
    train_subject(pooled_data[1], 3, tmp_path / "tuned", config=config, init=run, device="cpu", progress=False)
    tuned = load_file(tmp_path / "tuned/checkpoint/structural.safetensors")
    moved = [key for key, value in pretrained["structural"].state_dict().items() if not torch.equal(tuned[key], value)]
    assert moved  # fine-tuning moved the shared decoder too
    assert read_finished_run(tmp_path / "tuned")["init"] == str(run.resolve())


def test_an_interrupted_pooled_run_resumes_to_the_same_weights(pooled_data, pooled_run, tmp_path, interrupt_on_call):
    run, _ = pooled_run
    rows = max(len(havir.train.load_training_data(pooled_data[0], s, QUICK).fit.nsd_id) for s in (1, 2))
    steps = -(-rows // (QUICK.batch_size // 2))  # one pass over the larger subject's averages, 8 rows of each subject a step
    restore = interrupt_on_call(havir.train, "_losses", (steps + 2) + 3)  # inside the second epoch (2 validations each)
    with pytest.raises(KeyboardInterrupt):
        train_subjects(pooled_data[0], (1, 2), tmp_path / "run", config=QUICK, device="cpu", progress=False)
    restore()
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["epoch"] == 1
    train_subjects(pooled_data[0], (1, 2), tmp_path / "run", config=QUICK, device="cpu", progress=False)
    for part in ("structural", "semantic", "inputs"):
        want, got = load_file(run / f"checkpoint/{part}.safetensors"), load_file(tmp_path / f"run/checkpoint/{part}.safetensors")
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def _refused(run_cli, *args) -> str:
    status, stdout, stderr = run_cli("train", *args)
    lines = without_progress(stderr)
    assert status == 2 and len(lines) == 1 and not stdout, stderr
    return lines[0]


def test_bad_cross_subject_options_are_refused_before_any_work(pooled_data, pooled_run, run_cli, tmp_path, monkeypatch):
    data, one = pooled_data
    run, _ = pooled_run
    out = tmp_path / "out"
    monkeypatch.setattr(havir.train, "load_training_data", lambda *a, **k: pytest.fail("read the data before refusing"))
    assert "no prepared data for subj05" in _refused(run_cli, "--data", data, "--subjects", "1,5", "--out", out)
    assert "names subject 2 more than once" in _refused(run_cli, "--data", data, "--subjects", "1,2,2", "--out", out)
    assert "not both" in _refused(run_cli, "--data", data, "--subject", 1, "--subjects", "1,2", "--out", out)
    assert "--init adapts a multi-subject run to one --subject" in _refused(
        run_cli, "--data", data, "--subjects", "1,2", "--init", run, "--out", out)
    single = tmp_path / "single"
    single.mkdir()
    (single / "run.json").write_text(json.dumps({"subject": 1, "model": "havir", "data": str(data)}))
    (single / "summary.json").write_text("{}")
    assert "is a run of one subject (subj01), not a multi-subject run" in _refused(
        run_cli, "--data", one, "--subject", 3, "--init", single, "--out", out)
    other = tmp_path / "other"  # a multi-subject run trained on another backbone's features
    shutil.copytree(run, other)
    record = json.loads((other / "run.json").read_text())
    record["features"]["model"] = "demo"
    (other / "run.json").write_text(json.dumps(record))
    assert "trained on the features of --vd demo" in _refused(run_cli, "--data", one, "--subject", 3, "--init", other, "--out", out)
    shapes = tmp_path / "shapes"  # ... or on targets of other shapes
    shutil.copytree(run, shapes)
    record = json.loads((shapes / "run.json").read_text())
    record["features"]["shapes"]["clip_text"] = [77, 768]
    (shapes / "run.json").write_text(json.dumps(record))
    assert "[77, 768]" in _refused(run_cli, "--data", one, "--subject", 3, "--init", shapes, "--out", out)
    assert "--finetune-epochs fine-tunes a model adapted with --init" in _refused(
        run_cli, "--data", one, "--subject", 3, "--finetune-epochs", 2, "--out", out)
    assert not out.exists()


def test_a_pooled_run_on_two_processes_equals_one(pooled_data, tmp_path):
    """Under ``accelerate launch`` each process takes its rows of every subject's sub-batch:
    8 rows of each subject a step and 81 averages each leave one row per subject for the last
    step (an empty shard); InfoNCE contrasts the whole batch across the processes."""
    from tests.test_distributed import files_in, launch, one_thread

    config = dataclasses.replace(QUICK, epochs=2, contrastive_weight=0.1)
    rows = {len(havir.train.load_training_data(pooled_data[0], s, config).fit.nsd_id) for s in (1, 2)}
    assert rows == {81}, "the data must leave a one-row last sub-batch (an empty shard)"
    with one_thread():
        want = train_subjects(pooled_data[0], (1, 2), tmp_path / "one", config=config, device="cpu", progress=False)
    toml = tmp_path / "train.toml"
    toml.write_text(config.to_toml())
    launch("train", "--data", pooled_data[0], "--subjects", "1,2", "--out", tmp_path / "two", "--config", toml)
    assert files_in(tmp_path / "two") == files_in(tmp_path / "one")
    for part in ("structural", "semantic", "inputs"):
        got, expected = (load_file(tmp_path / f"{run}/checkpoint/{part}.safetensors") for run in ("two", "one"))
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{part}.{key}: {m}")
    got = json.loads((tmp_path / "two/summary.json").read_text())
    assert got["best_epoch"] == want["best_epoch"]
    for subject, scores in want["test_scores"].items():
        assert got["test_scores"][subject] == pytest.approx(scores, rel=1e-5, abs=1e-6), subject


def test_adapting_on_two_processes_equals_one(pooled_data, pooled_run, tmp_path):
    """The input layers alone, then everything: DDP wraps the model again when the shared decoders thaw."""
    from tests.test_distributed import files_in, launch, one_thread

    run, _ = pooled_run
    config = dataclasses.replace(QUICK, epochs=2, finetune_epochs=2, checkpoint_minutes=60)
    with one_thread():
        train_subject(pooled_data[1], 3, tmp_path / "one", config=config, init=run, device="cpu", progress=False)
    toml = tmp_path / "train.toml"
    toml.write_text(config.to_toml())
    launch("train", "--data", pooled_data[1], "--subject", 3, "--init", run, "--out", tmp_path / "two", "--config", toml)
    assert files_in(tmp_path / "two") == files_in(tmp_path / "one")
    for part in ("structural", "semantic", "inputs"):
        got, expected = (load_file(tmp_path / f"{folder}/checkpoint/{part}.safetensors") for folder in ("two", "one"))
        for key in expected:  # Adam's first steps on a freshly thawed decoder scale tiny gradients up: 1e-4
            torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4, msg=lambda m: f"{part}.{key}: {m}")


def _measure_cross_subject():
    """``scripts/measure_cross_subject.py`` (scripts/ is not a package), imported by path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "measure_cross_subject.py"
    spec = importlib.util.spec_from_file_location("measure_cross_subject", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pretraining_on_two_subjects_beats_one_session_alone_for_a_third(tmp_path):
    """Issue 17's acceptance: pretrained on subjects 1 and 2, adapted to subject 3's one session,
    the model identifies the images subject 3 saw outside that session (669, never fitted) at least
    0.05 better than that session alone, for the VAE latents and for CLIP text; adapted from the
    shuffled-pairs pretraining instead, it does not (what transfers is learnt from the pairs).

    The world where one session is short of data (``measure_cross_subject.py --noise 3.0 --images
    800 --sessions 16``, README "Cross-subject training"): half the default single-trial SNR, 2,400
    trials for each pretraining subject against 150 in subject 3's session. Measured gains
    (adapted; shuffled control), latents / text: training seeds 0, 1, 2 give +0.068 / +0.224
    (-0.088 / +0.051), +0.054 / +0.225 (-0.105 / -0.007), +0.073 / +0.116 (-0.120 / -0.188). The
    world is pinned (the script's, ``world_seed = 11``): in another (5) the latents gain only +0.028.
    About 4 minutes on one CPU thread."""
    measured = _measure_cross_subject().measure(tmp_path, images=800, sessions=16, noise=3.0, seed=0)
    runs = tmp_path / "runs"
    grids = {subject: load_decoders(runs / f"pre/subj{subject:02d}") for subject in (1, 2)} | {3: load_decoders(runs / "adapted")}
    counts = {subject: (d["structural"].config.n_voxels, d["semantic"].config.n_voxels) for subject, d in grids.items()}
    assert len(set(counts.values())) == 3, counts  # three voxel counts ...
    assert len({read_synth_truth(tmp_path / "nsd", subject).roles.shape for subject in (1, 2, 3)}) == 3  # ... and grids
    assert measured["held_out_images"] > 600
    gains, control = measured["gain_over_alone"]["adapted"], measured["gain_over_alone"]["adapted_ctl"]
    assert gains["vae_latents"] >= 0.05 and gains["clip_text"] >= 0.05, measured
    assert not (control["vae_latents"] >= 0.05 and control["clip_text"] >= 0.05), measured
