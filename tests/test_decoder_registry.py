"""A new decoder is one class registered in its own file (issue 15, item 4): it trains, is saved
with its class name, and comes back through ``load_decoders(run)`` for reconstruction."""

from __future__ import annotations

import json

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from havir.artifacts.run import load_decoders
from havir.models.decoders import register_decoder
from havir.reconstruct import SamplerSettings, reconstruct_run
from havir.targets import TargetSizes, targets_of
from havir.train import TrainConfig, train_subject


@register_decoder
class LinearLatent(ModelMixin, ConfigMixin):
    """A toy structural decoder: one linear map from the voxels to the VAE latent."""

    role = "structural"
    targets = targets_of("structural")

    @register_to_config
    def __init__(self, n_voxels: int, latent_channels: int = 4, latent_side: int = 8):
        super().__init__()
        self.linear = nn.Linear(n_voxels, latent_channels * latent_side * latent_side)

    @classmethod
    def for_targets(cls, n_voxels: int, sizes: TargetSizes, preset: str, **settings) -> LinearLatent:
        return cls(n_voxels=n_voxels, latent_channels=sizes.latent_channels, latent_side=sizes.latent_side)

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        side = self.config.latent_side
        return self.linear(voxels).view(-1, self.config.latent_channels, side, side)

    def predict(self, voxels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"vae_latents": self(voxels)}


def test_a_registered_decoder_trains_reloads_and_reconstructs(trainable, tmp_path, run_cli):
    data, _ = trainable
    config, run = tmp_path / "config.toml", tmp_path / "run"
    config.write_text('preset = "tiny"\nepochs = 1\nstructural_decoder = "LinearLatent"\n')
    status, _, stderr = run_cli("train", "--data", data, "--subject", 1, "--out", run, "--config", config, "--json")
    assert status == 0, stderr
    assert json.loads((run / "structural" / "config.json").read_text())["_class_name"] == "LinearLatent"
    assert json.loads((run / "semantic" / "config.json").read_text())["_class_name"] == "SemanticExtractor"
    decoders = load_decoders(run)
    assert type(decoders["structural"]) is LinearLatent and not decoders["structural"].training
    trained = decoders["structural"].linear.weight
    assert not torch.equal(trained, LinearLatent.from_config(decoders["structural"].config).linear.weight)  # weights, not a fresh init
    summary = reconstruct_run(run, tmp_path / "recon", mode="structural", limit=2, settings=SamplerSettings(steps=2), device="cpu")
    assert summary["reconstructed"] == 2 and len(list((tmp_path / "recon").glob("*.png"))) == 2


def test_decoder_settings_are_checked_before_any_work(trainable, tmp_path, run_cli):
    data, _ = trainable
    config, run = tmp_path / "config.toml", tmp_path / "run"
    for line, expected in (('structural_decoder = "Nope"', "one of StructuralGenerator, SemanticExtractor"),
                           ('structural_decoder = "SemanticExtractor"', "is a semantic decoder")):
        config.write_text(f'preset = "tiny"\nepochs = 1\n{line}\n')
        status, _, stderr = run_cli("train", "--data", data, "--subject", 1, "--out", run, "--config", config)
        assert status == 2 and expected in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not run.exists()


def test_a_run_of_an_unknown_decoder_class_is_named(trainable, tmp_path):
    import pytest

    from havir.errors import InvalidInputError

    data, _ = trainable
    run = tmp_path / "run"
    train_subject(data, 1, run, config=TrainConfig(preset="tiny", epochs=1), device="cpu", progress=False)
    config = run / "semantic" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"_class_name": "GoneExtractor"}))
    with pytest.raises(InvalidInputError, match=r"semantic is a GoneExtractor, which this HAVIR does not know"):
        load_decoders(run)
