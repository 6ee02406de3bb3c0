"""A new backbone is one class registered in its own file (issue 15, item 3): HAVIR computes its
features, trains decoders for its target sizes, reconstructs with it and evaluates the result,
with no edit anywhere else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from havir.cli import BUG_REPORT
from havir.errors import InvalidInputError
from havir.features import compute_features
from havir.metrics.evaluate import evaluate_folder
from havir.models.backbone import BACKBONES, Backbone, backbone_class, load_backbone, register_backbone
from havir.reconstruct import reconstruct_run
from havir.targets import TargetSizes
from havir.train import TrainConfig, train_subject


@register_backbone
class PixelBackbone(Backbone):
    """A toy backbone without a network: its "latent" is the image average-pooled to 4x4 (RGB in
    [-1, 1]), its two "image tokens" the image's mean and spread per channel, its three "text
    tokens" letter counts of the caption; it generates by upsampling the latent (structural),
    painting the predicted mean colour (semantic), or both averaged (fused)."""

    built_in = ("toy-pixels",)
    index_names = ("PixelBackbonePipeline",)

    def __init__(self, image_side: int = 16, source: str = "toy-pixels"):
        self.image_side, self.source = image_side, source

    @classmethod
    def from_pretrained(cls, model, *, device="cpu", dtype=torch.float32, seed=0) -> PixelBackbone:
        if str(model) in cls.built_in:
            return cls()
        index = json.loads((Path(model) / "model_index.json").read_text())
        return cls(image_side=index["image_side"], source=str(model))

    def save_pretrained(self, folder: Path) -> Path:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model_index.json").write_text(json.dumps({"_class_name": "PixelBackbonePipeline", "image_side": self.image_side}))
        return Path(folder)

    @property
    def target_sizes(self) -> TargetSizes:
        return TargetSizes(latent_channels=3, latent_side=4, image_tokens=2, text_tokens=3, dim=8)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device=None, dtype=None) -> PixelBackbone:
        return self

    def encode_images(self, images) -> dict[str, torch.Tensor]:
        pixels = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = F.adaptive_avg_pool2d(pixels, 4)
        stats = torch.stack([pixels.mean((2, 3)), pixels.std((2, 3))], dim=1)  # (n, 2, 3)
        return {"vae_latents": latents, "clip_image": F.pad(stats, (0, 5))}

    def encode_texts(self, texts) -> dict[str, torch.Tensor]:
        counts = [[text.lower().count(letter) for letter in "abcdefghijklmnopqrstuvwx"] for text in texts]
        return {"clip_text": torch.tensor(counts, dtype=torch.float32).reshape(len(texts), 3, 8)}

    def generate(self, predictions, nsd_ids, *, mode, settings, candidate=0) -> np.ndarray:
        layout = F.interpolate(predictions["vae_latents"].float(), size=self.image_side, mode="nearest")
        colour = predictions["clip_image"][:, 0, :3].float()[..., None, None].expand_as(layout)
        picture = {"structural": layout, "semantic": colour, "fused": (layout + colour) / 2}[mode]
        return ((picture.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _prepared_copy(trainable, folder: Path) -> Path:
    folder.mkdir()
    for name in ("subj01.h5", "subj01.json"):
        shutil.copy(trainable[0] / name, folder / name)
    return folder


def test_a_registered_backbone_runs_features_train_reconstruct_and_eval(trainable, tmp_path):
    data = _prepared_copy(trainable, tmp_path / "data")
    summary = compute_features(data, 1, model="toy-pixels", progress=False)
    assert summary["shapes"] == {"vae_latents": [3, 4, 4], "clip_image": [2, 8], "clip_text": [3, 8]}
    with h5py.File(summary["output"]) as h5:  # the caption-averaged text target, from the toy's own encoder
        first = int(h5["nsd_id"][0])
        with h5py.File(data / "subj01.h5") as prepared:
            captions = [t for i, t in zip(prepared["captions/nsd_id"][()], prepared["captions/text"].asstr()[()]) if i == first]
        expected = PixelBackbone().encode_texts(captions)["clip_text"].mean(0)
        np.testing.assert_allclose(h5["clip_text"][0], expected.numpy(), rtol=1e-3)

    run = tmp_path / "run"
    train_subject(data, 1, run, config=TrainConfig(preset="tiny", epochs=3), device="cpu", progress=False)
    for mode in ("structural", "semantic", "fused"):
        result = reconstruct_run(run, tmp_path / "recon" / mode, mode=mode, device="cpu", progress=False)
        assert result["reconstructed"] == result["n_images"] > 1
    manifest = json.loads((tmp_path / "recon" / "fused" / "manifest.json").read_text())
    assert manifest["backbone"] == "PixelBackbone" and manifest["vd"] == "toy-pixels"
    evaluation = evaluate_folder(tmp_path / "recon" / "structural", data, 1, networks={}, resamples=10, progress=False)
    assert np.isfinite(evaluation.scores["pixcorr"].mean)
    # The toy's structural pathway is a linear read-out of pooled pixels: trained decoders must beat chance.
    assert evaluation.scores["pixcorr"].mean > 0.2


def test_a_saved_backbone_folder_is_read_by_its_registered_class(tmp_path):
    folder = PixelBackbone(image_side=8).save_pretrained(tmp_path / "pixels")
    assert backbone_class(folder) is PixelBackbone
    loaded = load_backbone(folder)
    assert isinstance(loaded, PixelBackbone) and loaded.image_side == 8 and loaded.source == str(folder)
    assert backbone_class("tiny") is BACKBONES["VersatileDiffusion"]  # the built-ins stay Versatile Diffusion's


def test_a_folder_of_an_unregistered_backbone_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "UnheardOfPipeline"}))
    with pytest.raises(InvalidInputError, match=r"holds a UnheardOfPipeline, which no HAVIR backbone reads .*PixelBackbonePipeline"):
        backbone_class(tmp_path)


def test_two_backbones_cannot_claim_one_name():
    with pytest.raises(TypeError, match="claims toy-pixels, already PixelBackbone's"):
        @register_backbone
        class Impostor(PixelBackbone):
            index_names = ("ImpostorPipeline",)
    assert "Impostor" not in BACKBONES


def test_a_backbone_breaking_its_target_contract_is_a_bug_not_a_user_error(trainable, tmp_path, run_cli, monkeypatch):
    data = _prepared_copy(trainable, tmp_path / "data")
    monkeypatch.setattr(PixelBackbone, "encode_texts", lambda self, texts: {"clip_text": torch.zeros(len(texts), 3, 7)})
    with pytest.raises(RuntimeError, match=r"backbone PixelBackbone encoded texts as \{'clip_text': \(\d+, 3, 7\)\}; its targets are") as raised:
        run_cli("features", "--data", data, "--subject", 1, "--vd", "toy-pixels")
    assert BUG_REPORT in raised.value.__notes__  # the command line's bug path: traceback, exit 1
    assert not (data / "subj01_features.h5").exists()
