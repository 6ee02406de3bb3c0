"""The decoders: shapes follow their config, save/load is exact, parameter counts stay sane."""

import pytest
import torch

from havir.models.decoders import PRESETS, SemanticExtractor, StructuralGenerator


def test_structural_generator_shape_follows_the_vae():
    for channels, size in ((4, 64), (4, 16), (8, 32)):
        model = StructuralGenerator(n_voxels=50, latent_channels=channels, latent_size=size, map_size=size // 4,
                                    **PRESETS["tiny"]["structural"])
        assert model(torch.randn(3, 50)).shape == (3, channels, size, size)


def test_map_size_must_divide_by_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        StructuralGenerator(n_voxels=10, latent_size=64, map_size=24)


def test_semantic_extractor_shapes():
    model = SemanticExtractor(n_voxels=40, dim=32, **PRESETS["tiny"]["semantic"])
    image, text = model(torch.randn(2, 40))
    assert image.shape == (2, 257, 32) and text.shape == (2, 77, 32)


def test_paper_preset_heads_stay_small():
    """Token-factorised heads: about 88M parameters instead of the 1.1B of dense heads."""
    with torch.device("meta"):
        model = SemanticExtractor(n_voxels=15724, **PRESETS["paper"]["semantic"])
    heads = sum(p.numel() for name, p in model.named_parameters() if "head" in name)
    assert 80e6 < heads < 100e6
    assert heads < 4096 * (257 + 77) * 768 / 10


@pytest.mark.parametrize("cls, kwargs", [(StructuralGenerator, {"latent_size": 16, "map_size": 4}), (SemanticExtractor, {"dim": 16})])
def test_save_and_load_round_trip(tmp_path, cls, kwargs):
    preset = PRESETS["tiny"]["structural" if cls is StructuralGenerator else "semantic"]
    model = cls(n_voxels=30, **kwargs, **preset).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m/diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "m/config.json").is_file()
    loaded = cls.from_pretrained(tmp_path / "m").eval()
    voxels = torch.randn(4, 30)
    with torch.no_grad():
        first, second = model(voxels), loaded(voxels)
    for a, b in zip(first if isinstance(first, tuple) else (first,), second if isinstance(second, tuple) else (second,)):
        assert torch.equal(a, b)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config)
