"""One schema of the training targets (issue 15, item 2): the features cache, the decoders and the
backbone agree with :mod:`havir.targets`."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from havir.features import features_path
from havir.models.decoders import SemanticExtractor, StructuralGenerator
from havir.models.versatile import build_random
from havir.targets import TARGET_NAMES, TARGETS, TargetSizes, stored_bytes, target_shapes, targets_of


def test_shapes_follow_the_backbone_sizes():
    sizes = TargetSizes(latent_channels=4, latent_side=64, image_tokens=257, text_tokens=77, dim=768)
    assert target_shapes(sizes) == {"vae_latents": (4, 64, 64), "clip_image": (257, 768), "clip_text": (77, 768)}
    assert stored_bytes(sizes) == 2 * (4 * 64 * 64 + 257 * 768 + 77 * 768)  # float16
    assert targets_of("structural") + targets_of("semantic") == TARGET_NAMES


def test_the_features_cache_holds_every_target_in_its_schema(trainable):
    data, _ = trainable
    sizes = build_random("tiny").target_sizes
    with h5py.File(features_path(data, 1), "r") as h5:
        for name, shape in target_shapes(sizes).items():
            assert h5[name].shape[1:] == shape and h5[name].dtype == np.dtype(TARGETS[name].stored_dtype), name


def test_decoders_predict_a_dict_of_their_targets():
    sizes = TargetSizes(latent_channels=4, latent_side=8, image_tokens=5, text_tokens=3, dim=6)
    shapes = target_shapes(sizes)
    structural = StructuralGenerator(n_voxels=7, latent_size=8, width=16, n_blocks=1, map_channels=8, map_size=4, groups=2)
    semantic = SemanticExtractor(n_voxels=9, dim=6, image_tokens=5, text_tokens=3, width=16, n_blocks=1, rank=2)
    predicted = structural.predict(torch.zeros(2, 7)) | semantic.predict(torch.zeros(2, 9))
    assert list(predicted) == list(TARGET_NAMES)
    assert {name: tuple(value.shape[1:]) for name, value in predicted.items()} == shapes
