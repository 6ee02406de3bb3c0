"""Careless and unlucky input to every command, as a table: each case ends with exit 0 and the
right result, or exit 2 and exactly one line on stderr naming the option or file and a fix,
never a traceback (issue 12, items 3, 5, 6 and 11).

To add a case, append a ``Case`` to ``CASES``: ``make`` receives a :class:`World` (the shared
synthetic data, a trained run, a private scratch folder) and returns the command's arguments,
after damaging a private copy of whatever the case needs.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import PIL.Image
import pytest
import torch

from havir.masks import definitions_dir
from havir.nsd.layout import NSDLayout
from havir.train import TrainConfig, train_subject
from tests.conftest import json_of

TINY_RUN = TrainConfig(preset="tiny", epochs=1, batch_size=64, learning_rate=1e-3, checkpoint_minutes=0)


@dataclass
class World:
    nsd: Path  # the small synthetic release (shared: copy before damaging)
    data: Path  # subject 1 prepared, with tiny features (shared)
    run: Path  # a finished one-epoch tiny run on ``data`` (shared)
    ridge: Path  # a finished ridge run on ``data`` (shared)
    scratch: Path  # this case's own folder

    def copy(self, source: Path, name: str) -> Path:
        target = self.scratch / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        return target

    def data_copy(self) -> Path:
        data = self.scratch / "data"
        data.mkdir()
        for path in self.data.iterdir():
            if path.suffix in (".h5", ".json"):
                shutil.copy(path, data / path.name)
        return data

    def run_copy(self, data: Path | None = None, source: Path | None = None) -> Path:
        """A private copy of the trained run (or ``source``), pointing at ``data`` (default: the shared data)."""
        run = self.copy(source or self.run, "run")
        if data is not None:
            record = json.loads((run / "run.json").read_text())
            (run / "run.json").write_text(json.dumps(record | {"data": str(data)}))
        return run

    def config(self, text: str) -> Path:
        path = self.scratch / "config.toml"
        path.write_text('preset = "tiny"\n' + text + ("" if "epochs" in text else "epochs = 1\n"))
        return path


@dataclass
class Case:
    name: str
    make: Callable[[World], list]
    expect: tuple[str, ...] = ()  # fragments of the one error line; empty: the command must succeed
    check: Callable[..., None] | None = None  # for a success: check(world, json, [stderr]) asserts on the result
    no_output: str | None = None  # a folder (relative to scratch) that must not exist after the error
    patch: Callable[[pytest.MonkeyPatch], Callable | None] | None = field(default=None, repr=False)  # may return an undo
    fresh_process: bool = False  # run `python -m havir` in a new process: libraries' own stderr handlers included


def reconstruct(*extra):
    return lambda w: ["reconstruct", "--run", w.run, "--out", w.scratch / "recon", "--steps", 2, *extra]


def train(*extra):
    return lambda w: ["train", "--data", w.data, "--subject", 1, "--out", w.scratch / "out", *extra]


def train_config(text):
    return lambda w: ["train", "--data", w.data, "--subject", 1, "--out", w.scratch / "out", "--config", w.config(text)]


def prepare(*extra):
    return lambda w: ["prepare", "--nsd-root", w.nsd, "--subject", 1, "--out", w.scratch / "out", *extra]


def features(*extra):
    return lambda w: ["features", "--data", w.data, "--subject", 1, "--vd", "tiny", *extra]


def damaged_nsd(damage: Callable[[NSDLayout], None], *extra):
    def make(w: World):
        root = w.copy(w.nsd, "nsd")
        damage(NSDLayout(root))
        return ["prepare", "--nsd-root", root, "--subject", 1, "--out", w.scratch / "out", *extra]

    return make


def damaged_data(damage: Callable[[Path], None], command: str):
    """Damage a private copy of the prepared data (``damage(data)``), then run ``command`` on it."""

    def make(w: World):
        data = w.data_copy()
        damage(data)
        if command == "reconstruct":
            return ["reconstruct", "--run", w.run_copy(data), "--out", w.scratch / "recon", "--steps", 2]
        args = ["--data", data, "--subject", 1]
        return [command, *args, "--vd", "tiny"] + (["--out", w.scratch / "out"] if command == "train" else [])

    return make


def damaged_run(damage: Callable[[Path], None], ridge: bool = False):
    def make(w: World):
        run = w.run_copy(source=w.ridge if ridge else None)
        damage(run)
        return ["reconstruct", "--run", run, "--out", w.scratch / "recon", "--steps", 2]

    return make


# --- damage -------------------------------------------------------------------------------


def edit_h5(name: str, edit: Callable[[h5py.File], None]):
    def damage(folder: Path):
        with h5py.File(folder / name, "a") as h5:
            edit(h5)

    return damage


def set_row_nan(dataset: str):
    def edit(h5):
        values = h5[dataset][0]
        h5[dataset][0] = np.full_like(values, np.nan)

    return edit


def truncate(name: str):
    def damage(folder: Path):
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])

    return damage


def overwrite(name: str, content: bytes):
    def damage(folder: Path):
        (folder / name).write_bytes(content)

    return damage


def drop_json_key(name: str, key: str):
    def damage(folder: Path):
        record = json.loads((folder / name).read_text())
        del record[key]
        (folder / name).write_text(json.dumps(record))

    return damage


def replace_dataset(name: str, values: np.ndarray):
    def edit(h5):
        del h5[name]
        h5[name] = values

    return edit


def stimuli_as(convert: Callable[[np.ndarray], np.ndarray]):
    def damage(layout: NSDLayout):
        with h5py.File(layout.stimuli, "a") as h5:
            replace_dataset("imgBrick", convert(h5["imgBrick"][()]))(h5)

    return damage


def drop_first_image_captions(h5):
    ids, texts = h5["captions/nsd_id"][()], h5["captions/text"][()]
    keep = ids != ids[0]
    replace_dataset("captions/nsd_id", ids[keep])(h5)
    del h5["captions/text"]
    h5.create_dataset("captions/text", data=texts[keep], dtype=h5py.string_dtype())


def captions_without_text(layout: NSDLayout):
    path = layout.annotations_dir / "captions_train2017.json"
    coco = json.loads(path.read_text())
    del coco["annotations"][0]["caption"]
    path.write_text(json.dumps(coco))


def stimulus_table_missing_rows(layout: NSDLayout):
    lines = layout.stim_info.read_text().splitlines()
    layout.stim_info.write_text("\n".join(lines[: len(lines) // 2]) + "\n")


def extends_cycle(w: World):
    (w.scratch / "a.toml").write_text('extends = "b.toml"\n')
    (w.scratch / "b.toml").write_text('extends = "a.toml"\n')
    return prepare("--definition", w.scratch / "a.toml")(w)


def mask_definition(text: str):
    def make(w: World):
        (w.scratch / "m.toml").write_text(text)
        return prepare("--definition", w.scratch / "m.toml")(w)

    return make


def mask_definition_not_utf8(w: World):
    text = (definitions_dir() / "subj01.toml").read_bytes()
    (w.scratch / "masks.toml").write_bytes(b'description = "caf\xe9"\n' + text.replace(b"description", b"#", 1))
    return prepare("--definition", w.scratch / "masks.toml")(w)


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def ten_step_config(w: World):
    """epochs = 2 with a batch size giving 5 steps per epoch: 10 steps, where torch's OneCycleLR
    at pct_start 0.1 divided by zero (the issue's `epochs = 2, batch_size = 100`)."""
    n_fit = len(_fit_rows(w.data))
    return train_config(f"epochs = 2\nbatch_size = {-(-n_fit // 5)}\n")(w)


def _fit_rows(data: Path) -> np.ndarray:
    from havir.train import load_training_data

    return load_training_data(data, 1, TINY_RUN).fit.nsd_id


def latin1_run_folder(w: World):
    out = w.scratch / os.fsdecode(b"run-\xe9t\xe9")  # not UTF-8: safetensors' file loader refused it
    return ["train", "--data", w.data, "--subject", 1, "--out", out, "--config", w.config(""), "--json"]


def zero_pixdim(path: Path, grid_pad: int = 0):
    """Rewrite a NIfTI with pixdim[1] = 0 (nibabel logs a fix-up on every load), its grid padded."""
    image = nib.load(path)
    data = np.pad(np.asanyarray(image.dataobj), ((0, grid_pad), (0, 0), (0, 0)), constant_values=-1)
    fresh = nib.Nifti1Image(data, image.affine)
    fresh.header["pixdim"][1] = 0
    nib.save(fresh, path)


def rois_logged_and_off_grid(layout: NSDLayout):
    for atlas in ("nsdgeneral", "prf-visualrois", "streams", "floc-faces", "floc-bodies", "floc-places", "floc-words"):
        zero_pixdim(layout.roi_file(1, atlas), grid_pad=1)


def unexpected_decoder_key(run: Path):
    config = json.loads((run / "structural" / "config.json").read_text())
    (run / "structural" / "config.json").write_text(json.dumps(config | {"unexpected_setting": 1}))


def logged_and_no_settings(w: World):
    data = w.data_copy()
    edit_h5("subj01_features.h5", lambda h5: h5.attrs.__delitem__("settings"))(data)
    run = w.run_copy(data)
    unexpected_decoder_key(run)
    return ["reconstruct", "--run", run, "--out", w.scratch / "recon", "--steps", 2]


def logged_success(w: World):
    run = w.run_copy()
    unexpected_decoder_key(run)
    return ["reconstruct", "--run", run, "--out", w.scratch / "recon", "--mode", "structural", "--limit", 2, "--json"]


def diffusers_warnings(monkeypatch):
    """Let diffusers log warnings (loading a Versatile Diffusion earlier in this process turned
    them off, as a fresh `havir` process has them on until it loads one)."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    return lambda: diffusers_logging.set_verbosity(previous)


def out_of_memory(module: str, name: str):
    """A patch making ``module.name`` run out of GPU memory, as a batch too large would."""

    def patch(monkeypatch):
        def exhausted(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(f"{module}.{name}", exhausted)

    return patch


def standin_out_of_memory(monkeypatch):
    """``havir eval`` scores with the offline stand-in network (no protocol weights here), which runs out of memory."""
    from havir.metrics.networks import load_standin_network

    monkeypatch.setattr("havir.metrics.evaluate.load_networks", lambda *a, **k: ({"lite0": load_standin_network()}, {}))
    out_of_memory("havir.metrics.networks.FeatureNetwork", "features")(monkeypatch)


def ground_truth_as_recon(w: World) -> list:
    """``havir eval`` of the test stimuli themselves."""
    from havir.metrics.evaluate import load_ground_truth

    nsd_ids, images, _ = load_ground_truth(w.data, 1)
    recon = w.scratch / "recon"
    recon.mkdir()
    for nsd_id, image in zip(nsd_ids, images):
        PIL.Image.fromarray(image).save(recon / f"{int(nsd_id)}.png")
    return ["eval", "--recon", recon, "--data", w.data, "--subject", 1, "--batch-size", 8, "--out", w.scratch / "eval"]


def reconstructed_two(w: World, summary: dict, stderr: str):
    assert summary["n_images"] == 2 and len(list((w.scratch / "recon").glob("*.png"))) == 2
    assert "unexpected_setting" in stderr  # held during the command, printed after it succeeded


def trained_ok(w: World, summary: dict):
    assert summary["epochs"] == 2 and np.isfinite(list(summary["final_train_loss"].values())).all()
    metrics = [json.loads(line) for line in (w.scratch / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def latin1_run_ok(w: World, summary: dict):
    (run,) = [p for p in w.scratch.iterdir() if p.name.startswith("run-")]
    assert (run / "summary.json").is_file() and (run / "structural" / "diffusion_pytorch_model.safetensors").is_file()
    assert 0 <= summary["test_scores"]["vae_latents_identification"] <= 1


CASES = [
    # Item 3: options that gave wrong results with exit 0.
    Case("reconstruct-batch-size-negative", reconstruct("--batch-size", -2), ("--batch-size", ">= 1", "-2"), no_output="recon"),
    Case("reconstruct-limit-negative", reconstruct("--limit", -1), ("--limit", ">= 1", "-1"), no_output="recon"),
    Case("reconstruct-limit-zero", reconstruct("--limit", 0), ("--limit", ">= 1"), no_output="recon"),
    Case("reconstruct-guidance-nan", reconstruct("--guidance", "nan"), ("--guidance", "finite", "nan"), no_output="recon"),
    Case("reconstruct-guidance-inf", reconstruct("--guidance", "inf"), ("--guidance", "finite"), no_output="recon"),
    Case("reconstruct-steps-zero", reconstruct("--steps", 0), ("--steps", "[1, 1000]"), no_output="recon"),
    Case("reconstruct-text-share", reconstruct("--text-share", -0.1), ("--text-share", "[0, 1]"), no_output="recon"),
    Case("reconstruct-scheduler", reconstruct("--scheduler", "lms"), ("--scheduler", "'ddim', 'pndm'"), no_output="recon"),
    Case("reconstruct-mode", reconstruct("--mode", "both"), ("--mode", "'fused', 'structural', 'semantic'"), no_output="recon"),
    Case("reconstruct-limit-text", reconstruct("--limit", "ten"), ("--limit", "havir reconstruct --help"), no_output="recon"),
    Case("features-batch-size-zero", features("--batch-size", 0), ("--batch-size", ">= 1", "got 0")),
    Case("prepare-sessions-negative", prepare("--sessions", -1), ("--sessions", ">= 1", "-1"), no_output="out"),
    Case("prepare-betas-format", prepare("--betas-format", "mat"), ("--betas-format", "'auto', 'hdf5', 'nifti'"), no_output="out"),
    Case("synth-image-side-zero", lambda w: ["synth-nsd", "--out", w.scratch / "nsd", "--image-side", 0], ("--image-side", "[16, 1024]"), no_output="nsd"),
    Case("synth-seed-negative", lambda w: ["synth-nsd", "--out", w.scratch / "nsd", "--seed", -1], ("--seed", "got -1"), no_output="nsd"),
    Case("demo-epochs-zero", lambda w: ["demo", "--out", w.scratch / "demo", "--epochs", 0], ("--epochs", ">= 1"), no_output="demo"),
    Case("demo-steps-zero", lambda w: ["demo", "--out", w.scratch / "demo", "--steps", 0], ("--steps", "[1, 1000]"), no_output="demo"),
    Case("demo-null-runs-zero", lambda w: ["demo", "--out", w.scratch / "demo", "--null-runs", 0], ("--null-runs", "[1, 10]"), no_output="demo"),
    Case("eval-batch-size-zero", lambda w: ["eval", "--recon", w.scratch, "--data", w.data, "--subject", 1, "--batch-size", 0], ("--batch-size", ">= 1")),
    Case("config-learning-rate-nan", train_config("learning_rate = nan\n"), ("learning_rate", "finite", "config.toml"), no_output="out"),
    Case("config-epochs-negative", train_config("epochs = -3\n"), ("epochs", ">= 1", "config.toml"), no_output="out"),
    Case("config-val-fraction", train_config("val_fraction = 1.5\n"), ("val_fraction", "(0, 1)", "config.toml"), no_output="out"),
    Case("config-use-trials-text", train_config('use_trials = "yes"\n'), ("use_trials", "True, False"), no_output="out"),
    Case("config-ridge-alphas", train_config("ridge_alphas = [1.0, -1.0]\n"), ("ridge_alphas", "non-empty list"), no_output="out"),
    # Item 5: tracebacks for user errors, and valid settings that crashed.
    Case("config-batch-size-zero", train_config("batch_size = 0\n"), ("batch_size", ">= 1", "config.toml"), no_output="out"),
    Case("mask-extends-cycle", extends_cycle, ("extends itself", "a.toml -> b.toml -> a.toml"), no_output="out"),
    Case("captions-without-text", damaged_nsd(captions_without_text), ("captions_train2017.json", "caption text"), no_output="out"),
    Case("prepared-image-without-caption", damaged_data(edit_h5("subj01.h5", drop_first_image_captions), "features"),
         ("subj01.h5", "no caption for 1 images", "havir prepare")),
    Case("stimulus-table-missing-rows", damaged_nsd(stimulus_table_missing_rows), ("stimulus table lacks rows", "re-download"), no_output="out"),
    Case("prepared-file-missing-captions", damaged_data(edit_h5("subj01.h5", lambda h5: h5.__delitem__("captions")), "features"),
         ("prepared file", "subj01.h5", "run `havir prepare` again")),
    Case("prepared-file-missing-split", damaged_data(edit_h5("subj01.h5", lambda h5: h5.__delitem__("train/semantic")), "train"),
         ("prepared file", "subj01.h5", "semantic", "run `havir prepare` again"), no_output="out"),
    Case("run-record-missing-key", damaged_run(drop_json_key("run.json", "data")), ("run record", "run.json", "lacks the keys data"), no_output="recon"),
    Case("device-cuda-without-gpu", train("--device", "cuda"), ("--device cuda", "no usable CUDA GPU", "--device cpu"), no_output="out", patch=no_cuda),
    Case("train-ten-steps", lambda w: ten_step_config(w) + ["--json"], check=trained_ok),
    # Issue 15, item 5: out of GPU memory is one line naming a smaller batch, in every command that batches.
    Case("train-out-of-memory", train_config("batch_size = 64\n"), ("out of memory at batch size 64", "batch_size = 32 in the --config"),
         patch=out_of_memory("havir.train", "_losses")),
    Case("reconstruct-out-of-memory", reconstruct("--batch-size", 4, "--limit", 2), ("out of memory at batch size 4", "try --batch-size 2"),
         no_output="recon", patch=out_of_memory("havir.models.versatile.VersatileDiffusion", "generate")),
    Case("eval-out-of-memory", ground_truth_as_recon, ("out of memory at batch size 8", "try --batch-size 4"),
         patch=standin_out_of_memory),
    # Item 6: NaN in the inputs is named as such, before the run folder exists.
    Case("prepared-nan", damaged_data(edit_h5("subj01.h5", set_row_nan("train/structural")), "train"),
         ("subj01.h5", "NaN or infinite", "train/structural", "havir prepare"), no_output="out"),
    Case("features-inf", damaged_data(edit_h5("subj01_features.h5", lambda h5: h5["clip_text"].__setitem__(0, np.inf)), "train"),
         ("subj01_features.h5", "NaN or infinite", "clip_text", "havir features"), no_output="out"),
    # Item 11: damaged files are named, with a fix.
    Case("prepared-truncated", damaged_data(truncate("subj01.h5"), "train"), ("subj01.h5", "damaged or not HDF5", "havir prepare"), no_output="out"),
    Case("features-garbage", damaged_data(overwrite("subj01_features.h5", b"not hdf5 at all" * 100), "train"),
         ("subj01_features.h5", "damaged or not HDF5", "havir features"), no_output="out"),
    Case("features-no-settings", damaged_data(edit_h5("subj01_features.h5", lambda h5: h5.attrs.__delitem__("settings")), "reconstruct"),
         ("subj01_features.h5", "havir features"), no_output="recon"),
    Case("prepared-record-invalid-json", damaged_data(overwrite("subj01.json", b"{not json"), "features"), ("subj01.json", "not valid JSON", "havir prepare")),
    Case("prepared-record-not-utf8", damaged_data(overwrite("subj01.json", b'{"nsd_root": "\xff"}'), "features"), ("subj01.json", "not UTF-8", "havir prepare")),
    Case("run-record-not-utf8", damaged_run(overwrite("run.json", b'{"subject": "\xfe"}')), ("run.json", "not UTF-8", "havir train"), no_output="recon"),
    Case("run-summary-a-list", damaged_run(overwrite("summary.json", b"[1, 2]")), ("summary.json", "not an object", "havir train"), no_output="recon"),
    Case("config-not-utf8", lambda w: train("--config", _write(w.scratch / "c.toml", b"epochs = 1 # \xff\n"))(w), ("c.toml", "not valid TOML"), no_output="out"),
    Case("mask-extends-nothing", mask_definition('extends = "gone.toml"\n'), ("m.toml extends", "gone.toml", "fix its extends"), no_output="out"),
    Case("mask-subject-text", mask_definition(f'extends = "{definitions_dir() / "default.toml"}"\nsubject = "one"\n'), ("m.toml", "subject must be one of 1..8", "'one'"), no_output="out"),
    Case("mask-definition-not-utf8", mask_definition_not_utf8, ("masks.toml", "not valid TOML"), no_output="out"),
    Case("stimulus-table-not-utf8", damaged_nsd(lambda layout: layout.stim_info.write_bytes(b"nsdId,cocoId\n\xff\xfe,1\n")),
         ("nsd_stim_info_merged.csv", "re-download"), no_output="out"),
    Case("ctab-not-utf8", damaged_nsd(lambda layout: _write(layout.ctab_file("streams"), b"1 early\xff 0 0 0 0\n")),
         ("streams.mgz.ctab", "re-download"), no_output="out"),
    Case("stimuli-grey", damaged_nsd(stimuli_as(lambda brick: brick[..., 0])), ("nsd_stimuli.hdf5", "imgBrick", "(n, side, side, 3)"), no_output="out"),
    Case("stimuli-float", damaged_nsd(stimuli_as(lambda brick: brick / 255.0)), ("nsd_stimuli.hdf5", "float64", "uint8"), no_output="out"),
    Case("prepared-wrong-shape", damaged_data(edit_h5("subj01.h5", replace_dataset("train/semantic", np.zeros(7, np.float32))), "train"),
         ("subj01.h5", "train/semantic", "float32 (7,)", "havir prepare"), no_output="out"),
    Case("features-wrong-rows", damaged_data(edit_h5("subj01_features.h5", lambda h5: replace_dataset("clip_text", h5["clip_text"][:3])(h5)), "train"),
         ("subj01_features.h5", "clip_text", "havir features"), no_output="out"),
    Case("latin1-run-folder", latin1_run_folder, check=latin1_run_ok),
    Case("decoder-weights-garbage", damaged_run(overwrite("structural/diffusion_pytorch_model.safetensors", b"garbage")),
         ("decoder in", "structural", "cannot be loaded", "havir train"), no_output="recon"),
    Case("decoder-weights-other-shape", damaged_run(lambda run: shutil.copy(run / "semantic" / "diffusion_pytorch_model.safetensors",
                                                                            run / "structural" / "diffusion_pytorch_model.safetensors")),
         ("decoder in", "structural", "havir train"), no_output="recon"),
    Case("ridge-weights-garbage", damaged_run(overwrite("ridge/model.safetensors", b"garbage"), ridge=True),
         ("ridge decoder in", "cannot be loaded", "havir train"), no_output="recon"),
    Case("ridge-config-not-json", damaged_run(overwrite("ridge/config.json", b"{"), ridge=True),
         ("ridge decoder in", "JSONDecodeError", "havir train"), no_output="recon"),
    Case("ctab-truncated", damaged_nsd(lambda layout: _write(layout.ctab_file("streams"), b"0 Unknown 0 0 0 0\n1 early 1 1 1 0\n")),
         ("no label 'ventral'", "streams.mgz.ctab", "re-download"), no_output="out"),
    # Item 11: library log messages do not turn a user error into several lines.
    Case("nibabel-log-then-error", damaged_nsd(rois_logged_and_off_grid), ("ROI grid", "does not match"), no_output="out",
         fresh_process=True),
    Case("diffusers-log-then-error", logged_and_no_settings, ("subj01_features.h5", "havir features"), no_output="recon",
         patch=diffusers_warnings),
    Case("diffusers-log-after-success", logged_success, check=reconstructed_two, patch=diffusers_warnings),
]


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def shared(_small_nsd, trainable, tmp_path_factory):
    data, _ = trainable
    run = tmp_path_factory.mktemp("fuzz") / "run"
    train_subject(data, 1, run, config=TINY_RUN, device="cpu", progress=False)
    train_subject(data, 1, run.with_name("ridge"), model="ridge", config=TINY_RUN, device="cpu", progress=False)
    return _small_nsd[0], data, run, run.with_name("ridge")


def run_in_new_process(args: list) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python -m havir ARGS`` in a new process, this checkout first."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "havir", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def run_cli_fd(capfd):
    """Like ``run_cli``, capturing the file descriptors: the libraries' own stderr handlers
    (bound to the real stderr when they were set up) are seen too."""
    from havir.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capfd.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case(case: Case, shared, run_cli_fd, tmp_path, monkeypatch):
    world = World(*shared, scratch=tmp_path)
    args = case.make(world)
    if case.fresh_process:
        status, stdout, stderr = run_in_new_process(args)
    else:
        undo = case.patch(monkeypatch) if case.patch else None
        try:
            status, stdout, stderr = run_cli_fd(*args)
        finally:
            if undo:
                undo()
    assert "Traceback" not in stderr
    if not case.expect:
        assert status == 0, stderr
        wants_stderr = len(inspect.signature(case.check).parameters) == 3
        case.check(world, json_of(stdout), *([stderr] if wants_stderr else []))
        return
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in case.expect:
        assert fragment in lines[0], lines[0]
    if case.no_output:
        assert not (tmp_path / case.no_output).exists(), f"{case.no_output} written before the error"


@pytest.mark.parametrize("total", range(1, 41))
def test_one_cycle_schedule_runs_every_length(total):
    """Every run length steps without dividing by zero, starts at max_lr / 25 (or max_lr for
    one or two steps), peaks at max_lr on step ~10%, and ends below where it started."""
    from havir.train import one_cycle

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    schedule = one_cycle(optimizer, 0.1, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert max(rates) == pytest.approx(0.1)
    if total >= 3:
        assert rates[0] == pytest.approx(0.1 / 25) and rates[-1] < rates[0]
        assert int(np.argmax(rates)) == min(max(1, round(0.1 * total) - 1), total - 2)
    if total % 10 == 0 and total >= 20:  # the 10% warm-up of torch's pct_start = 0.1, unchanged
        reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=0.1, total_steps=total, pct_start=0.1)
        expected = []
        for _ in range(total):
            expected.append(reference_optimizer.param_groups[0]["lr"])
            reference_optimizer.step()
            reference.step()
        np.testing.assert_allclose(rates, expected, rtol=1e-12)


# --- every numeric option of every command, generated from the command line itself -----------


@dataclass(frozen=True)
class Option:
    name: str  # the Python parameter
    flag: str | None  # "--batch-size"; None for an argument
    kind: type  # int, float, str, Path...
    default: object  # inspect.Parameter.empty when required


def _commands() -> dict[tuple[str, ...], list[Option]]:
    """Every command's options, read from the typer functions' annotations."""
    import inspect
    import typing

    import typer

    from havir.cli import app

    def options(function) -> list[Option]:
        hints = typing.get_type_hints(function, include_extras=True)
        found = []
        for name, parameter in inspect.signature(function).parameters.items():
            base, info = typing.get_args(hints[name])[:2]
            kinds = [k for k in typing.get_args(base) if k is not type(None)] or [base]
            flag = None  # an argument
            if isinstance(info, typer.models.OptionInfo):
                flag = info.param_decls[0] if info.param_decls else "--" + name.replace("_", "-")
            found.append(Option(name, flag, kinds[0], parameter.default))
        return found

    def walk(typer_app, prefix):
        for command in typer_app.registered_commands:
            yield (*prefix, command.name or command.callback.__name__.replace("_", "-")), options(command.callback)
        for group in typer_app.registered_groups:
            yield from walk(group.typer_instance, (*prefix, group.name))

    return dict(walk(app, ()))


def _numeric_option_cases():
    return [
        pytest.param(path, option.flag, "-1" if option.kind is int else "nan", id=f"{'-'.join(path)}{option.flag}")
        for path, options in _commands().items() for option in options if option.flag and option.kind in (int, float)
    ]


@pytest.mark.parametrize("command, flag, value", _numeric_option_cases())
def test_every_numeric_option_is_checked_before_any_work(command, flag, value, run_cli, tmp_path):
    """-1 (every integer option here must be positive) and NaN (no float option may be NaN),
    with every path pointing nowhere: the one line must name the option, so it is checked
    before any file is looked at, and nothing is created."""
    import inspect

    given = {"--nsd-root": tmp_path / "nsd", "--data": tmp_path / "data", "--run": tmp_path / "run",
             "--recon": tmp_path / "recon", "--out": tmp_path / "out" / "x.png", "--subject": 1}
    args = [*command]
    flags = {option.flag for option in _commands()[command]}
    for option in _commands()[command]:
        if option.flag is None:
            if "--out" not in flags:  # synth-nsd's deprecated positional OUT: its --out is given instead
                args.append(tmp_path / "out")
        elif option.flag != flag and (option.default is inspect.Parameter.empty or option.flag == "--out"):
            args += [option.flag, given[option.flag]]
    status, stdout, stderr = run_cli(*args, flag, value)
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert flag.lstrip("-") in lines[0] and value in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


#: Options that take one of a few words; "bogus" is none of them.
CHOICE_OPTIONS = ("--device", "--dtype", "--mode", "--scheduler", "--model", "--betas-format", "--normalisation",
                  "--img2img-start", "--protocol", "--format")


def _choice_option_cases():
    return [
        pytest.param(path, option.flag, id=f"{'-'.join(path)}{option.flag}")
        for path, options in _commands().items() for option in options if option.flag in CHOICE_OPTIONS
    ]


@pytest.mark.parametrize("command, flag", _choice_option_cases())
def test_every_choice_option_is_checked_before_any_work(command, flag, run_cli, tmp_path):
    test_every_numeric_option_is_checked_before_any_work(command, flag, "bogus", run_cli, tmp_path)


def test_cli_defaults_are_the_library_defaults():
    """The command line shows its defaults in --help, so it states them; they must be the
    library's (a notebook and the command line run the same settings)."""
    import inspect

    from havir.demo import run_demo
    from havir.explain import explain_run
    from havir.features import compute_features
    from havir.nsd.synth import synthesize_nsd
    from havir.prepare import prepare_subject
    from havir.reconstruct import SamplerSettings, reconstruct_run
    from havir.train import train_subject

    def defaults(function, rename=None):
        rename = rename or {}
        return {rename.get(k, k): p.default for k, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}

    library = {
        ("synth-nsd",): defaults(synthesize_nsd),
        ("prepare",): defaults(prepare_subject),
        ("features",): defaults(compute_features, {"model": "vd"}),
        ("train",): defaults(train_subject),
        ("reconstruct",): defaults(reconstruct_run) | {f: getattr(SamplerSettings(), f) for f in SamplerSettings.__dataclass_fields__},
        ("demo",): defaults(run_demo, {"fused_steps": "steps"}),
        ("explain",): defaults(explain_run),
    }
    compared = 0
    for path, known in library.items():
        for option in _commands()[path]:
            # --subjects is text the command line parses ("1,2" -> (1, 2)): not comparable
            if option.name in known and option.default not in (None, inspect.Parameter.empty) and option.name != "subjects":
                assert option.default == known[option.name], f"havir {' '.join(path)} {option.flag}"
                compared += 1
    assert compared >= 20


def test_library_messages_are_printed_after_success_and_before_a_bug(monkeypatch, capsys):
    """Held, not lost: a library's log line comes out once the command is over, unless the
    command ended with a user error (then the one error line is all)."""
    import logging

    import havir.cli
    from havir.cli import main
    from havir.errors import InvalidInputError

    outcome = {}

    def fake_synthesize(out, *args, **kwargs):
        logging.getLogger("nibabel.global").warning("a note from nibabel")
        if outcome.get("raise"):
            raise outcome["raise"]
        return type("Truth", (), {"to_json": lambda self: {}})()

    monkeypatch.setattr("havir.nsd.synth.synthesize_nsd", fake_synthesize)
    for raised, status in ((None, 0), (InvalidInputError("bad input"), 2)):
        outcome["raise"] = raised
        with pytest.raises(SystemExit) as exit_info:
            main(["synth-nsd", "--out", "somewhere", "--json"])
        err = capsys.readouterr().err
        assert exit_info.value.code == status
        assert ("a note from nibabel" in err) == (status == 0) and ("error: bad input" in err) == (status == 2)
    outcome["raise"] = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        main(["synth-nsd", "--out", "somewhere", "--json"])
    assert "a note from nibabel" in capsys.readouterr().err
    assert logging.getLogger("nibabel.global").handlers  # its own handler is back
