"""The write protocol of :mod:`havir.io` and what it guarantees each command: a second writer is
refused, a failed start never blocks the corrected rerun, stale temporaries go, a damaged
partial file is recomputed, a full disk is one line, and only safetensors are read."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import subprocess
import sys

import pytest

import havir.io
import havir.train
from havir.errors import DiskFullError, FolderBusyError
from havir.io import atomic_path, output_folder, remove_stale_temporaries, write_json
from tests.conftest import without_progress

TINY = havir.train.TrainConfig(preset="tiny", epochs=2, batch_size=64, learning_rate=1e-3, checkpoint_minutes=0)

DEAD_PID = 2**22 + 12345  # above Linux's pid_max: no process has it


def test_atomic_path_commits_a_file_or_a_folder_and_leaves_nothing_on_failure(tmp_path):
    write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.json") as temporary:
        temporary.write_text("half")
        raise RuntimeError
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    for version in (1, 2):
        with atomic_path(tmp_path / "model") as temporary:
            temporary.mkdir()
            (temporary / "weights").write_text(str(version))
    assert (tmp_path / "model/weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "model"]


def test_stale_temporaries_of_dead_processes_are_removed_and_a_cut_swap_is_undone(tmp_path):
    (tmp_path / f".partial-{DEAD_PID}-3.png").write_bytes(b"half an image")
    (tmp_path / f".partial-{os.getppid()}-7.png").write_bytes(b"a live writer's")
    (tmp_path / "run").mkdir()
    (tmp_path / f"run/.partial-{DEAD_PID}-checkpoint").mkdir()
    (tmp_path / f"run/.replaced-{DEAD_PID}-structural").mkdir()  # swap cut before the new one arrived
    (tmp_path / "run/.replaced-{0}-semantic".format(DEAD_PID)).mkdir()  # cut after it arrived
    (tmp_path / "run/semantic").mkdir()
    (tmp_path / ".havir-lock-subj09").write_text(f"{DEAD_PID}\n")  # a killed writer's lock, held by no one
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == [".havir-lock-subj09", f".partial-{DEAD_PID}-3.png"]  # this folder only
    (tmp_path / f".partial-{DEAD_PID}-3.png").write_bytes(b"half an image")
    removed = remove_stale_temporaries(tmp_path, recursive=True)
    assert sorted(p.name for p in removed) == sorted([f".partial-{DEAD_PID}-3.png", f".partial-{DEAD_PID}-checkpoint",
                                                     f".replaced-{DEAD_PID}-semantic"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["semantic", "structural"]
    assert (tmp_path / f".partial-{os.getppid()}-7.png").exists()


@contextlib.contextmanager
def locked_elsewhere(folder, scope=""):
    """Another process holds ``folder``'s lock (or its ``scope`` lock) for the block; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from havir.io import output_folder\n"
         "with output_folder(sys.argv[1], scope=sys.argv[2] or None):\n    print('locked', flush=True); time.sleep(60)",
         str(folder), scope],
        stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": os.getcwd()},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_of_a_folder_is_refused(tmp_path):
    with locked_elsewhere(tmp_path) as pid:
        with pytest.raises(FolderBusyError, match=rf"{tmp_path} is being written by another havir process \(pid {pid}\)"):
            with output_folder(tmp_path):
                pass
    with output_folder(tmp_path), output_folder(tmp_path):  # free again; re-entrant within a process
        assert (tmp_path / havir.io.LOCK_NAME).is_file()
    assert not (tmp_path / havir.io.LOCK_NAME).exists()


def test_two_train_runs_into_one_folder(trainable, tmp_path, run_cli):
    """Issue 12, item 3 (last case): two `train` runs into one --out both "succeeded", every epoch logged twice."""
    data, _ = trainable
    run = tmp_path / "run"
    run.mkdir()
    with locked_elsewhere(run):
        status, _, stderr = run_cli("train", "--data", data, "--subject", 1, "--out", run)
    assert status == 2
    assert stderr.count("\n") == 1 and "is being written by another havir process" in stderr
    assert not (run / "run.json").exists()


def test_prepare_locks_one_subjects_files_only(small_nsd, tmp_path, run_cli):
    root, _ = small_nsd
    data = tmp_path / "data"
    data.mkdir()
    with locked_elsewhere(data, "subj01"):
        status, _, stderr = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", data, "--json")
        assert status == 2 and f"subj01's files in {data} are being written by another havir process" in stderr
    with locked_elsewhere(data, "subj04"):  # another subject prepared into the same folder: no conflict
        status, _, stderr = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", data, "--json")
        assert status == 0, stderr
        assert sorted(p.name for p in data.iterdir()) == [".havir-lock-subj04", "subj01.h5", "subj01.json"]


def test_a_failed_start_does_not_block_the_corrected_rerun(trainable, tmp_path, monkeypatch):
    """Issue 12, item 6: a config that failed in the first epoch left a run folder that refused
    the corrected rerun ("holds another run")."""
    data, _ = trainable
    original = havir.train._losses
    monkeypatch.setattr(havir.train, "_losses", lambda *a, **k: {n: v * float("nan") for n, v in original(*a, **k).items()})
    bad = dataclasses.replace(TINY, learning_rate=10.0)
    with pytest.raises(ValueError, match="became"):
        havir.train.train_subject(data, 1, tmp_path / "run", config=bad, device="cpu", progress=False)
    monkeypatch.undo()
    summary = havir.train.train_subject(data, 1, tmp_path / "run", config=TINY, device="cpu", progress=False)
    assert summary["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert 'learning_rate = 0.001' in (tmp_path / "run/config.toml").read_text()


def test_no_run_folder_before_the_inputs_are_checked(trainable, tmp_path, run_cli):
    status, _, stderr = run_cli("train", "--data", trainable[0], "--subject", 1, "--out", tmp_path / "run", "--vd", "other")
    assert status == 2 and "--vd" in stderr
    assert not (tmp_path / "run").exists()


# --- A full disk (issue 12, item 4) ------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullAfter(havir.io._SpaceGuardedFile):
    """An HDF5 file on a disk that fills after 64 kB."""

    def _write(self, data) -> int:
        if self.tell() + memoryview(data).nbytes > 65536:
            _no_space()
        return super()._write(data)


def _one_line_disk_full(status: int, stderr: str, folder) -> None:
    assert status == 2, stderr
    lines = without_progress(stderr)  # progress made before the disk filled is not the error
    assert len(lines) == 1 and stderr.strip().endswith(lines[0]), stderr
    assert f"the disk holding {folder}" in lines[0] and "free" in lines[0]


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("failing", ["fsync", "hdf5"])
def test_full_disk_in_prepare(small_nsd, tmp_path, run_cli, monkeypatch, failing):
    root, _ = small_nsd
    monkeypatch.setattr(*(("os.fsync", _no_space) if failing == "fsync" else (havir.io, "_SpaceGuardedFile", _FullAfter)))
    status, _, stderr = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", tmp_path / "data", "--json")
    _one_line_disk_full(status, stderr, tmp_path / "data")
    assert _files(tmp_path / "data") == [], "partial files left behind"


def test_full_disk_in_prepare_is_found_before_the_work(small_nsd, tmp_path, run_cli, monkeypatch):
    root, _ = small_nsd
    monkeypatch.setattr(havir.io.shutil, "disk_usage", lambda path: shutil_usage(free=1000))
    status, _, stderr = run_cli("prepare", "--nsd-root", root, "--subject", 1, "--out", tmp_path / "data", "--json")
    _one_line_disk_full(status, stderr, tmp_path / "data")
    assert "(1.0 kB free, about" in stderr and "MB needed)" in stderr


def shutil_usage(free: int):
    import collections

    return collections.namedtuple("usage", "total used free")(10**9, 10**9 - free, free)


@pytest.mark.parametrize("failing", ["fsync", "hdf5"])
def test_full_disk_in_features(small_nsd, tmp_path, run_cli, monkeypatch, failing):
    import havir.features
    from havir.models.versatile import build_random
    from havir.prepare import prepare_subject

    root, _ = small_nsd
    prepare_subject(root, 1, tmp_path / "data", progress=False)
    before = _files(tmp_path / "data")
    tiny = build_random("tiny", seed=0)
    monkeypatch.setattr(havir.features, "load_backbone", lambda *args, **kwargs: tiny)
    monkeypatch.setattr(*(("os.fsync", _no_space) if failing == "fsync" else (havir.io, "_SpaceGuardedFile", _FullAfter)))
    status, _, stderr = run_cli("features", "--data", tmp_path / "data", "--subject", 1, "--vd", "tiny", "--json")
    _one_line_disk_full(status, stderr, tmp_path / "data")
    assert _files(tmp_path / "data") == before, "partial files left behind"


def test_full_disk_in_train(trainable, tmp_path, run_cli, monkeypatch):
    config = tmp_path / "tiny.toml"
    config.write_text('preset = "tiny"\nepochs = 1\nbatch_size = 64\n')
    monkeypatch.setattr(havir.train, "save_file", lambda *args, **kwargs: _safetensors_full())
    status, _, stderr = run_cli("train", "--data", trainable[0], "--subject", 1, "--out", tmp_path / "run", "--config", config, "--json")
    _one_line_disk_full(status, stderr, tmp_path / "run")
    assert not any(p.name.startswith(".") for p in (tmp_path / "run").rglob("*")), "partial files left behind"


def _safetensors_full():
    from safetensors import SafetensorError

    # What safetensors' Rust writer raises on a full disk (not an OSError).
    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')


def test_full_disk_in_reconstruct(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from havir.models.versatile import build_random
    from havir.reconstruct import SamplerSettings, reconstruct

    tiny = build_random("tiny", seed=0)
    side = tiny.image_side // 8
    predicted = {"vae_latents": torch.zeros(2, 4, side, side), "clip_image": torch.zeros(2, 257, 32),
                 "clip_text": torch.zeros(2, 77, 32)}
    monkeypatch.setattr("os.fsync", _no_space)
    with pytest.raises(DiskFullError, match=rf"the disk holding {tmp_path / 'recon'} is full \(.* free\)"):
        reconstruct(tiny, predicted, np.array([3, 5]), tmp_path / "recon", mode="structural", settings=SamplerSettings(steps=1))
    assert _files(tmp_path / "recon") == []


def _tmpfs_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare -rm to mount a tmpfs without root")
@pytest.mark.parametrize("size", ["300k", "2m"])
def test_synth_nsd_and_prepare_on_a_real_full_disk(small_nsd, tmp_path, size):
    """A real 300 kB / 2 MB tmpfs: synth-nsd and prepare ended in a segmentation fault (exit -11)."""
    root, _ = small_nsd
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {disk} && cd {os.getcwd()} && "
        f"{sys.executable} -m havir synth-nsd --out {disk}/nsd --images 40 --sessions 2 2>{tmp_path}/synth.err; echo synth=$?; "
        f"{sys.executable} -m havir prepare --nsd-root {root} --subject 1 --out {disk}/data 2>{tmp_path}/prepare.err; echo prepare=$?; "
        f"cat {tmp_path}/synth.err {tmp_path}/prepare.err; find {disk} -name '.*' -o -name '*partial*'"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"})
    lines = result.stdout.splitlines()
    assert lines[0] == "synth=2" and lines[1] == "prepare=2", result.stdout + result.stderr
    assert len(lines) == 4, f"one line per command and no partial file expected: {lines}"
    assert all("is full" in line for line in lines[2:]), lines


def test_a_run_folder_with_pickled_weights_is_not_unpickled(trainable, tmp_path, monkeypatch):
    """Issue 12, item 10: a ``.bin`` instead of ``.safetensors`` in a run folder was loaded
    through torch's pickle path."""
    import torch
    from safetensors.torch import load_file

    from havir.reconstruct import predict_test_set

    run = tmp_path / "run"
    havir.train.train_subject(trainable[0], 1, run, config=dataclasses.replace(TINY, epochs=1), device="cpu", progress=False)
    for name in ("structural", "semantic"):
        weights = run / name / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(weights), weights.with_suffix(".bin"))
        weights.unlink()

    def unpickle(*args, **kwargs):
        raise AssertionError("a user's file was unpickled")

    monkeypatch.setattr(torch, "load", unpickle)
    with pytest.raises((OSError, ValueError), match="safetensors"):  # a missing file, or a user error naming it
        predict_test_set(run, torch.device("cpu"))


def test_a_pickled_checkpoint_of_an_older_havir_is_refused_not_loaded(trainable, tmp_path, monkeypatch):
    import torch

    run = tmp_path / "run"
    config = dataclasses.replace(TINY, epochs=1)
    havir.train.train_subject(trainable[0], 1, run, config=config, device="cpu", progress=False)
    (run / "checkpoint/optimizer.safetensors").unlink()
    torch.save({"state": {}, "param_groups": []}, run / "checkpoint/optimizer.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a checkpoint was unpickled"))
    with pytest.raises(ValueError, match=r"checkpoint of an older HAVIR .* delete it"):
        havir.train.train_subject(trainable[0], 1, run, config=config, device="cpu", progress=False)


def test_reconstructions_with_other_settings_are_not_mixed_into_a_folder(tmp_path):
    import numpy as np
    import torch

    from havir.models.versatile import build_random
    from havir.reconstruct import SamplerSettings, reconstruct

    tiny = build_random("tiny", seed=0)
    side = tiny.image_side // 8
    predicted = {"vae_latents": torch.zeros(2, 4, side, side), "clip_image": torch.zeros(2, 257, 32),
                 "clip_text": torch.zeros(2, 77, 32)}
    ids = np.array([3, 5])
    reconstruct(tiny, predicted, ids, tmp_path, mode="structural", settings=SamplerSettings(steps=2), limit=1)
    (tmp_path / "manifest.json").unlink()  # as after a kill: PNGs, no manifest
    with pytest.raises(ValueError, match=rf"{tmp_path} holds reconstructions made with another mode, settings: choose another --out"):
        reconstruct(tiny, predicted, ids, tmp_path, mode="fused", settings=SamplerSettings(steps=3))
    summary = reconstruct(tiny, predicted, ids, tmp_path, mode="structural", settings=SamplerSettings(steps=2), batch_size=1)
    assert summary["reconstructed"] == 1  # the same settings resume, whatever the batch size and limit


def test_a_reconstruction_that_fails_before_its_first_image_leaves_no_folder(tmp_path, monkeypatch):
    import numpy as np
    import torch

    import havir.models.sampling
    import havir.reconstruct
    from havir.models.versatile import build_random

    tiny = build_random("tiny", seed=0)
    side = tiny.image_side // 8
    predicted = {"vae_latents": torch.zeros(1, 4, side, side), "clip_image": torch.zeros(1, 257, 32),
                 "clip_text": torch.zeros(1, 77, 32)}
    monkeypatch.setattr(havir.models.sampling, "decode", lambda *a: (_ for _ in ()).throw(MemoryError("out of memory")))
    with pytest.raises(MemoryError):
        havir.reconstruct.reconstruct(tiny, predicted, np.array([3]), tmp_path / "recon", mode="structural")
    assert not (tmp_path / "recon").exists()


def _temporaries(folder) -> list[str]:
    return [name for name in _files(folder) if any(part.startswith(".") for part in name.split("/"))]


def test_full_disk_in_eval(trainable, tmp_path, run_cli, monkeypatch):
    import PIL.Image

    from havir.metrics.evaluate import load_ground_truth

    data, _ = trainable
    nsd_ids, images, _ = load_ground_truth(data, 1)
    recon = tmp_path / "recon"
    recon.mkdir()
    for nsd_id, image in zip(nsd_ids, images):
        PIL.Image.fromarray(image).save(recon / f"{int(nsd_id)}.png")
    monkeypatch.setattr("os.fsync", _no_space)
    status, _, stderr = run_cli("eval", "--recon", recon, "--data", data, "--subject", 1, "--skip-missing", "--json")
    _one_line_disk_full(status, stderr, recon / "eval")
    assert not (recon / "eval").exists(), "partial files left behind"


def test_full_disk_in_masks_build(small_nsd, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr("os.fsync", _no_space)
    status, _, stderr = run_cli("masks", "build", "--nsd-root", small_nsd[0], "--subject", 1, "--out", tmp_path / "masks", "--json")
    _one_line_disk_full(status, stderr, tmp_path / "masks")
    assert not (tmp_path / "masks").exists(), "partial files left behind"


@pytest.mark.parametrize("full_from", ["nsd", "recon"])
def test_full_disk_in_demo(tmp_path, run_cli, monkeypatch, full_from):
    """The disk fills while the demo writes its synthetic release (its first stage), or when it
    reaches the reconstructions (after prepare, features and train wrote theirs)."""
    out = tmp_path / "demo"
    sync = havir.io._fsync
    monkeypatch.setattr(havir.io, "_fsync", lambda path: _no_space() if f"/{full_from}/" in str(path) else sync(path))
    status, _, stderr = run_cli("demo", "--out", out, "--images", 50, "--epochs", 1, "--steps", 1, "--json")
    _one_line_disk_full(status, stderr, out / full_from)
    assert _temporaries(out) == [], "partial files left behind"
    assert not (out / full_from).exists() or not any(p.is_file() for p in (out / full_from).rglob("*")), "partial files left behind"
