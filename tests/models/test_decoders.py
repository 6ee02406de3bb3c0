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


@pytest.mark.parametrize(("rank", "expected"), [(4, 4), ("full", 32)])
def test_rank_confines_every_tokens_image_dependent_part_to_one_subspace(rank, expected):
    """Rank r: a head's tokens minus their offsets, over images and tokens, span r of the D
    dimensions; ``"full"`` (a dense head) spans all D = 32 (float32 rank: singular values above
    1e-4 of the largest)."""
    torch.manual_seed(0)
    model = SemanticExtractor(n_voxels=40, dim=32, width=64, n_blocks=1, rank=rank).eval()
    with torch.no_grad():
        image, text = model(torch.randn(3, 40))
    for tokens, head in ((image, model.image_head), (text, model.text_head)):
        singular = torch.linalg.svdvals((tokens - head.token_offset).flatten(0, 1).double())
        assert int((singular > 1e-4 * singular[0]).sum()) == expected


def test_full_rank_heads_are_dense_and_round_trip(tmp_path):
    model = SemanticExtractor(n_voxels=20, dim=16, width=32, n_blocks=1, rank="full").eval()
    heads = sum(p.numel() for name, p in model.named_parameters() if "head" in name)
    assert heads == (32 + 1) * (257 + 77) * 16 + (257 + 77) * 16  # dense weights and biases, then the offsets
    model.save_pretrained(tmp_path / "m")
    loaded = SemanticExtractor.from_pretrained(tmp_path / "m").eval()
    voxels = torch.randn(2, 20)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(voxels), loaded(voxels)))
    assert loaded.config.rank == "full"


@pytest.mark.parametrize("rank", [0, -3, "half", 2.5, True])
def test_bad_rank_is_refused(rank):
    with pytest.raises(ValueError, match=r"rank must be a positive integer or \"full\""):
        SemanticExtractor(n_voxels=10, dim=8, width=16, n_blocks=1, rank=rank)


def test_variance_kept_by_rank_equals_the_best_low_rank_fit():
    """Against Eckart-Young in float64: 1 - (residual of the best rank-r approximation of the
    per-token-centred tokens, by SVD) / their total variance; a rank-3 signal is kept whole by 3."""
    import numpy as np

    from havir.models.decoders import variance_kept_by_rank

    rng = np.random.default_rng(0)
    offsets = rng.normal(size=(5, 12))
    signal = np.einsum("nr,rd->nd", rng.normal(size=(40 * 5, 3)), rng.normal(size=(3, 12))).reshape(40, 5, 12)
    tokens = offsets + signal + 0.01 * rng.normal(size=(40, 5, 12))
    result = variance_kept_by_rank(tokens, [1, 2, 3, 12])
    centred = (tokens - tokens.mean(0)).reshape(-1, 12)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    for r in (1, 2, 3):
        best = (u[:, :r] * s[:r]) @ vt[:r]
        assert abs(result["kept_by_rank"][str(r)] - (1 - ((centred - best) ** 2).sum() / (centred**2).sum())) < 1e-9
    assert result["kept_by_rank"]["3"] > 0.999 and result["kept_by_rank"]["12"] == pytest.approx(1.0)
    assert result["rank_for_share"]["0.99"] == 3
