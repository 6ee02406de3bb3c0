"""Crash points: each long command is stopped at many points, run again, and must end with the
outputs of an uninterrupted run (bit for bit) and no temporary file left.

Two ways to stop a command:

* ``prepare`` (quick to import) is killed for real: a subprocess SIGKILLs itself right after its
  k-th HDF5 write reached the file, for k spread over all its writes. Nothing is flushed or
  closed, as after ``kill -9`` or a power cut of the process (the OS keeps what was written).
* The torch commands (``features``, ``train``, ``reconstruct``, ``eval``) would take seconds per
  subprocess just to import: there a failure is injected in-process at the k-th commit
  (:func:`havir.io.commit`, the one rename every output goes through) or at the k-th step of
  the work, which unwinds the stack like a Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from havir.io import LOCK_NAME, REPLACED_PREFIX, TEMPORARY_PREFIX
from havir.prepare import prepare_subject

ROOT = Path(__file__).resolve().parents[1]

_KILL_AT_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import h5py
    from havir.prepare import prepare_subject

    kill_at, calls = int(sys.argv[3]), [0]
    write = h5py.Dataset.__setitem__

    def write_then_maybe_die(self, key, value):
        write(self, key, value)
        calls[0] += 1
        if calls[0] == kill_at:
            self.flush()  # this write reached the file; the rest of HDF5's state did not
            os.kill(os.getpid(), signal.SIGKILL)

    h5py.Dataset.__setitem__ = write_then_maybe_die
    prepare_subject(sys.argv[1], 1, sys.argv[2], progress=False)
    print(calls[0])
    """
)


def _prepare_in_subprocess(root: Path, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _KILL_AT_WRITE, str(root), str(out), str(kill_at)],
        capture_output=True, text=True, env=environment, timeout=120,
    )


def assert_same_hdf5(expected: Path, actual: Path) -> None:
    """Every dataset and attribute of two HDF5 files equal, bit for bit."""
    with h5py.File(expected) as a, h5py.File(actual) as b:
        names: list[str] = []
        a.visit(names.append)
        seen: list[str] = []
        b.visit(seen.append)
        assert sorted(seen) == sorted(names)
        for name in names:
            if isinstance(a[name], h5py.Dataset):
                np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
            assert dict(a[name].attrs) == dict(b[name].attrs), name
        assert dict(a.attrs) == dict(b.attrs)


def assert_no_temporaries(folder: Path) -> None:
    left = [p for p in Path(folder).rglob("*")
            if p.name.startswith((TEMPORARY_PREFIX, REPLACED_PREFIX, ".havir-write-test")) or p.name.startswith(LOCK_NAME)
            or p.name.endswith(".partial")]
    assert not left, f"temporary files left behind: {left}"


def test_prepare_killed_at_any_write_resumes_to_identical_arrays(small_nsd, tmp_path):
    """Issue 12, item 1: a kill between streaming and normalising z-scored the data twice."""
    root, _ = small_nsd
    whole = tmp_path / "whole"
    finished = _prepare_in_subprocess(root, whole, kill_at=0)
    assert finished.returncode == 0, finished.stderr
    n_writes = int(finished.stdout.split()[-1])
    assert n_writes >= 12
    kill_points = sorted({n_writes // 3, n_writes // 2, n_writes - 4, n_writes - 2, n_writes})
    for kill_at in kill_points:
        out = tmp_path / f"killed-{kill_at}"
        killed = _prepare_in_subprocess(root, out, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        prepare_subject(root, 1, out, progress=False)
        assert_same_hdf5(whole / "subj01.h5", out / "subj01.h5")
        with h5py.File(out / "subj01.h5") as h5:
            assert abs(h5["train/structural"][()].std(axis=0).mean() - 1) < 1e-3, f"z-scored twice (kill at {kill_at})"
        assert json.loads((out / "subj01.json").read_text())["train_trials"] > 0
        assert_no_temporaries(out)


class _StopAtCommit:
    """Counts the renames that commit an output under ``folder`` (``os.replace``, through which
    :func:`havir.io.commit` goes) and raises KeyboardInterrupt at the ``stop_at``-th one."""

    def __init__(self, monkeypatch, folder: Path, stop_at: int = 0):
        self.folder, self.stop_at, self.calls = str(Path(folder).resolve()), stop_at, 0
        self.original = os.replace
        monkeypatch.setattr(os, "replace", self)

    def __call__(self, source, destination, *args, **kwargs):
        if str(Path(destination).resolve()).startswith(self.folder):
            self.calls += 1
            if self.calls == self.stop_at:
                self.stopped_at = Path(destination)
                raise KeyboardInterrupt(f"stopped at commit {self.calls}: {destination}")
        return self.original(source, destination, *args, **kwargs)


def _commit_points(n_commits: int, wanted: int) -> list[int]:
    """``wanted`` stop points spread evenly over 1..n_commits (always the first and the last)."""
    return sorted({round(1 + i * (n_commits - 1) / (wanted - 1)) for i in range(wanted)})


def _same_safetensors(expected: Path, actual: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(expected), load_file(actual)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), f"{actual}: {key} differs"


def test_train_stopped_at_commits_resumes_to_the_same_weights(trainable, tmp_path, monkeypatch):
    """Issue 12, item 2: weights, optimiser and schedule written before the state file made the
    rerun replay an epoch from later weights, then fail for good ("Tried to step ...")."""
    from havir.train import TrainConfig, train_subject

    data, _ = trainable
    config = TrainConfig(preset="tiny", epochs=2, batch_size=64, learning_rate=1e-3, checkpoint_minutes=0)
    counter = _StopAtCommit(monkeypatch, tmp_path / "whole")
    train_subject(data, 1, tmp_path / "whole", config=config, device="cpu", progress=False)
    n_commits = counter.calls
    assert n_commits == 13  # config, record, metrics; 2 epochs x (2 best models + checkpoint), swaps in 2 renames; summary
    monkeypatch.undo()

    def epochs(run: Path) -> list[int]:
        return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    for stop_at in _commit_points(n_commits, 5):  # 1, 4, 7, 10, 13: 10 falls between the two renames of a folder swap
        run = tmp_path / f"stopped-{stop_at}"
        _StopAtCommit(monkeypatch, run, stop_at)
        with pytest.raises(KeyboardInterrupt):
            train_subject(data, 1, run, config=config, device="cpu", progress=False)
        monkeypatch.undo()
        train_subject(data, 1, run, config=config, device="cpu", progress=False)
        for name in ("checkpoint/structural.safetensors", "checkpoint/semantic.safetensors",
                     "structural/diffusion_pytorch_model.safetensors", "semantic/diffusion_pytorch_model.safetensors"):
            _same_safetensors(tmp_path / "whole" / name, run / name)
        assert epochs(run) == [1, 2], stop_at
        assert not list(run.glob("checkpoint/*.pt")), "optimiser state pickled"
        assert_no_temporaries(run)


@pytest.fixture
def small_prepared(small_nsd, tmp_path):
    """The small release prepared into a fresh folder: a function making more such folders."""
    root, _ = small_nsd
    reference = tmp_path / "prepared"
    prepare_subject(root, 1, reference, progress=False)

    def copy(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file in ("subj01.h5", "subj01.json"):
            (folder / file).write_bytes((reference / file).read_bytes())
        return folder

    return copy


class _StopAtWrite:
    """Raises KeyboardInterrupt at the ``stop_at``-th HDF5 dataset write (0: never); counts them."""

    def __init__(self, monkeypatch, stop_at: int = 0):
        self.stop_at, self.calls, self.original = stop_at, 0, h5py.Dataset.__setitem__
        stopper = self

        def write(dataset, key, value):
            stopper.calls += 1
            if stopper.calls == stopper.stop_at:
                raise KeyboardInterrupt(f"stopped at write {stopper.calls}")
            return stopper.original(dataset, key, value)

        monkeypatch.setattr(h5py.Dataset, "__setitem__", write)


@pytest.fixture(scope="module")
def tiny_vd():
    from havir.models.versatile import load_versatile_diffusion

    return load_versatile_diffusion("tiny", device="cpu", dtype=torch.float32, seed=0)


def test_features_stopped_or_damaged_resumes_to_the_same_cache(small_prepared, tiny_vd, monkeypatch):
    """Issue 12, item 7: a damaged features ``.partial`` blocked every rerun ("file signature not found")."""
    import havir.features
    from havir.features import compute_features, features_path

    monkeypatch.setattr(havir.features, "load_backbone", lambda *args, **kwargs: tiny_vd)
    whole = small_prepared("whole")
    counter = _StopAtWrite(monkeypatch)
    compute_features(whole, 1, model="tiny", batch_size=8, progress=False)
    n_writes = counter.calls
    for stop_at in _commit_points(n_writes, 3)[:-1]:
        data = small_prepared(f"stopped-{stop_at}")
        _StopAtWrite(monkeypatch, stop_at)
        with pytest.raises(KeyboardInterrupt):
            compute_features(data, 1, model="tiny", batch_size=8, progress=False)
        monkeypatch.setattr(h5py.Dataset, "__setitem__", counter.original)
        partial = features_path(data, 1).with_name("subj01_features.h5.partial")
        assert partial.is_file()
        if stop_at > 1:  # a torn file: half of it, as after a crash of the machine
            partial.write_bytes(partial.read_bytes()[: partial.stat().st_size // 2])
        compute_features(data, 1, model="tiny", batch_size=8, progress=False)
        assert_same_hdf5(features_path(whole, 1), features_path(data, 1))
        assert_no_temporaries(data)
    data = small_prepared("garbage")
    features_path(data, 1).with_name("subj01_features.h5.partial").write_bytes(b"not an HDF5 file")
    compute_features(data, 1, model="tiny", batch_size=8, progress=False)
    assert_same_hdf5(features_path(whole, 1), features_path(data, 1))


@pytest.fixture(scope="module")
def five_predictions(tiny_vd):
    generator = torch.Generator().manual_seed(0)
    side = tiny_vd.image_side // 8
    ids = np.array([30, 4, 17, 8, 21])
    return ids, {
        "vae_latents": torch.randn(5, 4, side, side, generator=generator),
        "clip_image": torch.randn(5, 257, 32, generator=generator) * 0.1,
        "clip_text": torch.randn(5, 77, 32, generator=generator) * 0.1,
    }


def _same_files(expected: Path, actual: Path) -> None:
    """The same files with the same bytes (where a file names its own folder, that name aside)."""
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in actual.iterdir()) == names
    for name in names:
        wanted = (expected / name).read_bytes().replace(str(expected).encode(), str(actual).encode())
        assert wanted == (actual / name).read_bytes(), f"{actual / name} differs"


def test_reconstruct_stopped_at_any_commit_resumes_to_identical_pngs(tiny_vd, five_predictions, tmp_path, monkeypatch):
    """Issue 12, item 7: a resumed run's PNG differed by a grey level (it ran in a smaller batch),
    and a crashed run's ``.partial-<pid>-<id>.png`` stayed behind for good."""
    from havir.reconstruct import SamplerSettings, reconstruct

    ids, predicted = five_predictions
    settings = SamplerSettings(steps=4, strength=0.75)
    counter = _StopAtCommit(monkeypatch, tmp_path / "whole")
    reconstruct(tiny_vd, predicted, ids, tmp_path / "whole", settings=settings, batch_size=2)
    monkeypatch.undo()
    assert counter.calls == 7  # the settings record, five PNGs and the manifest
    for stop_at in (2, 4, 6):
        out = tmp_path / f"stopped-{stop_at}"
        _StopAtCommit(monkeypatch, out, stop_at)
        with pytest.raises(KeyboardInterrupt):
            reconstruct(tiny_vd, predicted, ids, out, settings=settings, batch_size=2)
        monkeypatch.undo()
        out.mkdir(exist_ok=True)  # (a stop before the first image leaves no folder)
        (out / f".partial-{2**22 + 1}-17.png").write_bytes(b"what a killed run left")
        reconstruct(tiny_vd, predicted, ids, out, settings=settings, batch_size=2)
        _same_files(tmp_path / "whole", out)
        assert_no_temporaries(out)


def test_eval_stopped_at_any_commit_ends_with_the_same_outputs(trainable, tmp_path, monkeypatch):
    """``eval`` writes its report, chart, JSON and CSV one commit each: stopped at any of them,
    the rerun writes the files an uninterrupted run writes, and no temporary is left."""
    import PIL.Image

    from havir.metrics.evaluate import evaluate_folder, load_ground_truth
    from havir.metrics.networks import load_protocol_network

    data, _ = trainable
    nsd_ids, images, _ = load_ground_truth(data, 1)
    recon = tmp_path / "recon"
    recon.mkdir()
    for nsd_id, image in zip(nsd_ids, images[::-1]):
        PIL.Image.fromarray(image).save(recon / f"{int(nsd_id)}.png")
    networks = {"alexnet": load_protocol_network("alexnet", random_weights=True)}

    def evaluate(out: Path) -> None:
        evaluate_folder(recon, data, 1, out=out, networks=networks, progress=False, resamples=20)

    counter = _StopAtCommit(monkeypatch, tmp_path / "whole")
    evaluate(tmp_path / "whole")
    monkeypatch.undo()
    for stop_at in range(1, counter.calls + 1):
        out = tmp_path / f"stopped-{stop_at}"
        _StopAtCommit(monkeypatch, out, stop_at)
        with pytest.raises(KeyboardInterrupt):
            evaluate(out)
        monkeypatch.undo()
        evaluate(out)
        _same_files(tmp_path / "whole", out)
        assert_no_temporaries(out)




def _without_timings(value):
    """``value`` without the fields that time a run ("seconds", "train_seconds", ...): the only
    ones a rerun may change."""
    if isinstance(value, dict):
        return {key: _without_timings(item) for key, item in value.items() if not key.endswith("seconds")}
    if isinstance(value, list):
        return [_without_timings(item) for item in value]
    return value


def _same_tree(expected: Path, actual: Path) -> None:
    """The same files under two folders: HDF5 arrays, safetensors and PNGs bit for bit, JSON equal
    but for timing fields (``*seconds``), MATLAB files but for their header, every other file byte for byte (where a file names its own folder,
    that name aside)."""
    names = sorted(str(p.relative_to(expected)) for p in expected.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(actual)) for p in actual.rglob("*") if p.is_file()) == names
    for name in names:
        a, b = expected / name, actual / name
        if name.endswith((".h5", ".hdf5")):
            assert_same_hdf5(a, b)
        elif name.endswith(".safetensors"):
            _same_safetensors(a, b)
        elif name.endswith(".mat"):  # its header holds the time it was written
            _same_mat(a, b)
        else:
            wanted = a.read_bytes().replace(str(expected).encode(), str(actual).encode())
            if name.endswith((".json", ".jsonl")):
                lines = wanted.decode().splitlines() if name.endswith(".jsonl") else [wanted.decode()]
                got = b.read_text().splitlines() if name.endswith(".jsonl") else [b.read_text()]
                assert [_without_timings(json.loads(line)) for line in got] == \
                    [_without_timings(json.loads(line)) for line in lines], f"{b} differs"
            else:
                assert wanted == b.read_bytes(), f"{b} differs"


def _same_mat(expected: Path, actual: Path) -> None:
    from scipy.io import loadmat

    a, b = loadmat(expected), loadmat(actual)
    assert a.keys() == b.keys()
    for key in a.keys() - {"__header__"}:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{actual}: {key}")


DEMO_SETTINGS = {"images": 50, "epochs": 2, "fused_steps": 2, "null_runs": 2, "progress": False}  # DEMO_OPTIONS' minimum images; two null runs: the pooled path, at less cost


@pytest.fixture(scope="module")
def uninterrupted_demo(tmp_path_factory):
    """One demo run, uninterrupted: its folder and the number of commits it made."""
    from havir.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "whole"
    with pytest.MonkeyPatch.context() as monkeypatch:
        counter = _StopAtCommit(monkeypatch, out)
        run_demo(out, **DEMO_SETTINGS)
    return out, counter.calls


@pytest.mark.slow
def test_demo_stopped_at_commits_of_each_stage_resumes_to_the_same_outputs(uninterrupted_demo, tmp_path, monkeypatch):
    """``demo`` stopped at three commits spread over its run (a quarter, half and two thirds of its
    commits; wherever they fall, the folder being written is left as a kill leaves it), then run again, ends with an
    uninterrupted demo's files and no temporary. (Three points keep it near a minute.)"""
    from havir.demo import run_demo

    whole, n_commits = uninterrupted_demo
    assert n_commits > 60  # the release, masks, data, run, three reconstructions and evaluations
    for stop_at in (n_commits // 4, n_commits // 2, 2 * n_commits // 3):
        out = tmp_path / f"stopped-{stop_at}"
        stopper = _StopAtCommit(monkeypatch, out, stop_at)
        with pytest.raises(KeyboardInterrupt):
            run_demo(out, **DEMO_SETTINGS)
        monkeypatch.undo()
        # What a killed demo (another process) leaves where it stopped: its output half written
        # (a kill runs no clean-up, so the folder it was writing into is still there).
        stopper.stopped_at.parent.mkdir(parents=True, exist_ok=True)
        stopper.stopped_at.with_name(f".partial-{2**22 + 1}-{stopper.stopped_at.name}").write_bytes(b"half written")
        run_demo(out, **DEMO_SETTINGS)
        _same_tree(whole, out)
        assert_no_temporaries(out)


def test_encode_stopped_at_any_commit_leaves_no_model_and_reruns_to_the_same_one(trainable, tmp_path, monkeypatch):
    """``havir encode`` writes the accuracy map, the weights, then ``encoder.json``, which marks the
    folder complete: stopped at any commit it leaves no model a later stage would read, and a
    rerun writes the uninterrupted run's files."""
    from havir.artifacts.encoder import RECORD, load_encoder
    from havir.encode import fit_encoder
    from havir.errors import MissingInputError

    data, _ = trainable
    monkeypatch.setattr("havir.encode.SPACE_WEIGHTINGS", 2)  # a cheaper search, the same in every run
    with monkeypatch.context() as patch:
        counter = _StopAtCommit(patch, tmp_path / "whole")
        fit_encoder(data, 1, tmp_path / "whole", folds=2, device="cpu", progress=False)
    n_commits = counter.calls
    whole = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert len(whole) >= 3 and n_commits >= len(whole), (whole, n_commits)
    for stop_at in _commit_points(n_commits, 3):
        out = tmp_path / f"stopped-{stop_at}"
        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            _StopAtCommit(patch, out, stop_at)
            fit_encoder(data, 1, out, folds=2, device="cpu", progress=False)
        assert not (out / RECORD).exists()
        with pytest.raises(MissingInputError):
            load_encoder(out)
        fit_encoder(data, 1, out, folds=2, device="cpu", progress=False)
        assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == whole
        for name in whole:
            if name.suffix != ".json":  # the record names its own folder
                assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), (stop_at, name)
        expected, rerun = load_encoder(tmp_path / "whole"), load_encoder(out)
        np.testing.assert_array_equal(expected.cv_r, rerun.cv_r)
        assert_no_temporaries(out)
