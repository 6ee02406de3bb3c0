"""Two processes under ``accelerate launch`` (CPU, gloo) give what one process gives: the same
features cache, the same trained weights and scores (up to float rounding), the same PNGs; and
they finish runs that one process began."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import havir.features
import havir.train
from havir.distributed import Shard
from havir.features import compute_features
from havir.models.versatile import VersatileDiffusion
from havir.reconstruct import SamplerSettings, reconstruct_run
from havir.train import Decoders, TrainConfig, _losses, _tensors, build_decoders, load_training_data, train_subject

# An odd batch that leaves one row for the last step (486 fitting trials): two processes get
# shards of 48 and 49 rows, and one of them an empty shard at the end of every epoch. InfoNCE
# needs the whole batch.
TRAIN = TrainConfig(preset="tiny", epochs=3, batch_size=97, learning_rate=1e-3, contrastive_weight=0.1,
                    checkpoint_minutes=0, seed=0)
RECONSTRUCT = ("--steps", 3, "--limit", 7, "--batch-size", 2)


def launch(*args) -> None:
    """``havir ARGS`` as two processes, through ``accelerate launch``.

    accelerate's ``--cpu`` launcher starts one process (more only through mpirun); ``--multi_gpu``
    starts N through torchrun, and with CUDA hidden HAVIR runs them on the CPU with gloo.
    Each process gets one thread, as torchrun gives; a free port keeps concurrent runs apart.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "havir", *(str(a) for a in args),
    ]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"


@contextmanager
def one_thread():
    """Run as each launched process does: CPU kernels sum in another order with more threads,
    which moves a few pixels by one level."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same_weights(run: Path, expected: Path) -> None:
    for name in ("structural", "semantic"):
        got, want = load_file(run / f"checkpoint/{name}.safetensors"), load_file(expected / f"checkpoint/{name}.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}.{key}: {m}")


def assert_same_metrics(run: Path, expected: Path) -> None:
    def records(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    got, want = records(run), records(expected)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == list(range(1, TRAIN.epochs + 1))
    for g, w in zip(got, want):
        for part in ("train_loss", "val_loss", "val_scores"):
            assert g[part] == pytest.approx(w[part], rel=1e-5, abs=1e-6), (g["epoch"], part)


@pytest.fixture(scope="module")
def one_process_run(trainable, tmp_path_factory):
    """The reference: ``TRAIN`` on one process."""
    run = tmp_path_factory.mktemp("one") / "run"
    train_subject(trainable[0], 1, run, config=TRAIN, device="cpu", progress=False)
    return run


def test_shards_losses_and_gradients_sum_to_the_whole_batch(trainable):
    """What data parallelism rests on, in one process: the shards' shares of a batch (dropout
    included, an empty shard too) sum to the batch's losses and gradients. (AdamW's steps do not
    change when every gradient is scaled alike, so the two-process runs below cannot show this.)"""
    config = dataclasses.replace(TRAIN, contrastive_weight=0.0)  # InfoNCE exchanges rows between processes
    data = load_training_data(trainable[0], 1, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoders = Decoders(*build_decoders(data, config)).train()
        batch = {name: value[:5] for name, value in _tensors(data.fit, torch.device("cpu")).items()}

        def losses_and_gradients(shard):
            torch.manual_seed(1)  # every process draws the same dropout masks
            decoders.zero_grad()
            losses = _losses(decoders, batch, config, shard)
            (losses["structural"] + losses["semantic"]).backward()
            return torch.stack(list(losses.values())).detach(), [p.grad.clone() for p in decoders.parameters()]

        want_losses, want_gradients = losses_and_gradients(None)
        for count in (2, 6):  # shards of 2 and 3 rows; of 0 or 1 row
            shares = [losses_and_gradients(Shard.of(5, index, count)) for index in range(count)]
            torch.testing.assert_close(sum(losses for losses, _ in shares), want_losses)
            for p, gradients in enumerate(zip(*(gradients for _, gradients in shares))):
                torch.testing.assert_close(sum(gradients), want_gradients[p], atol=1e-6, rtol=1e-5)


def _prepared_copy(trainable, folder: Path) -> Path:
    folder.mkdir()
    for name in ("subj01.h5", "subj01.json"):
        shutil.copy(trainable[0] / name, folder / name)
    return folder


def test_features_two_processes_finish_an_interrupted_run_identically(trainable, tmp_path, interrupt_on_call):
    with one_thread():
        reference = compute_features(_prepared_copy(trainable, tmp_path / "one"), 1, model="tiny", progress=False)
        data = _prepared_copy(trainable, tmp_path / "two")
        restore = interrupt_on_call(VersatileDiffusion, "encode_texts", 3)  # two of the 13 batches done
        with pytest.raises(KeyboardInterrupt):
            compute_features(data, 1, model="tiny", progress=False)
        restore()
    launch("features", "--data", data, "--subject", 1, "--vd", "tiny")  # the remaining 11 batches: 6 and 5
    assert files_in(data) == ["subj01.h5", "subj01.json", "subj01_features.h5"]
    with h5py.File(reference["output"]) as want, h5py.File(data / "subj01_features.h5") as got:
        assert dict(got.attrs) == dict(want.attrs) and set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name][()], want[name][()], err_msg=name)


def test_training_on_two_processes_equals_one(trainable, one_process_run, tmp_path):
    n_fit = len(load_training_data(trainable[0], 1, TRAIN).fit.nsd_id)
    assert n_fit % TRAIN.batch_size == 1, "the config must leave a one-row last batch (an empty shard)"
    config = tmp_path / "train.toml"
    config.write_text(TRAIN.to_toml())
    launch("train", "--data", trainable[0], "--subject", 1, "--out", tmp_path / "run", "--config", config)

    run = tmp_path / "run"
    assert files_in(run) == files_in(one_process_run)  # the main process alone wrote, and nothing half-written is left
    assert_same_weights(run, one_process_run)
    assert_same_metrics(run, one_process_run)
    got, want = (json.loads((folder / "summary.json").read_text()) for folder in (run, one_process_run))
    assert got["best_epoch"] == want["best_epoch"]
    assert got["test_scores"] == pytest.approx(want["test_scores"], rel=1e-5, abs=1e-6)


def test_two_processes_resume_a_one_process_run(trainable, one_process_run, tmp_path, interrupt_on_call):
    steps = -(-len(load_training_data(trainable[0], 1, TRAIN).fit.nsd_id) // TRAIN.batch_size)
    restore = interrupt_on_call(havir.train, "_losses", 2 * (steps + 1) + 3)  # inside the third epoch
    with pytest.raises(KeyboardInterrupt):
        train_subject(trainable[0], 1, tmp_path / "run", config=TRAIN, device="cpu", progress=False)
    restore()
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["epoch"] == 2
    config = tmp_path / "train.toml"
    config.write_text(TRAIN.to_toml())
    launch("train", "--data", trainable[0], "--subject", 1, "--out", tmp_path / "run", "--config", config)
    assert_same_weights(tmp_path / "run", one_process_run)
    assert_same_metrics(tmp_path / "run", one_process_run)


def test_reconstruct_on_two_processes_writes_the_same_pngs(one_process_run, tmp_path):
    settings = SamplerSettings(steps=3)
    with one_thread():
        reconstruct_run(one_process_run, tmp_path / "one", settings=settings, limit=7, batch_size=2, device="cpu")
    pngs = sorted((tmp_path / "one").glob("*.png"), key=lambda p: int(p.stem))
    assert len(pngs) == 7
    (tmp_path / "two").mkdir()
    for png in pngs[:2]:  # the first batch is done: the processes share the other three (two and one)
        shutil.copy(png, tmp_path / "two" / png.name)
    launch("reconstruct", "--run", one_process_run, "--out", tmp_path / "two", *RECONSTRUCT)
    assert files_in(tmp_path / "two") == files_in(tmp_path / "one")
    for name in files_in(tmp_path / "one"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
