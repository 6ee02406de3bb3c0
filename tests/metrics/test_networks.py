"""Finding the protocol's weights (never substituting random ones) and reading their layers."""

import numpy as np
import pytest
import torch

from havir.metrics.networks import MissingWeightsError, load_protocol_network, locate_weights
from havir.metrics.protocols import BRAIN_DIFFUSER, CLIP_MEAN, IMAGENET_MEAN, IMAGENET_STD, MINDEYE2


@pytest.mark.parametrize(
    ("name", "preset", "filename", "published"),
    [
        ("alexnet", MINDEYE2, "alexnet-owt-7be5be79.pth", "download.pytorch.org"),
        ("inception", MINDEYE2, "inception_v3_google-0cc3c7bd.pth", "download.pytorch.org"),
        ("effnet", MINDEYE2, "efficientnet_b1-c27df63c.pth", "download.pytorch.org"),  # DEFAULT = IMAGENET1K_V2
        ("effnet", BRAIN_DIFFUSER, "efficientnet_b1_rwightman-bac287d4.pth", "download.pytorch.org"),  # V1
        ("swav", MINDEYE2, "swav_800ep_pretrain.pth.tar", "dl.fbaipublicfiles.com"),
        ("clip", MINDEYE2, "ViT-L-14.pt", "openaipublic.azureedge.net"),
    ],
)
def test_missing_weights_name_the_file_where_and_the_source(offline_caches, name, preset, filename, published):
    with pytest.raises(MissingWeightsError) as error:
        load_protocol_network(name, offline_caches / "weights", preset=preset)
    message = str(error.value)
    assert filename in message and published in message and "--skip-missing" in message
    assert str(offline_caches / "weights") in message  # where it looked
    assert "\n" not in message


def test_weights_dir_is_used_and_the_network_is_labelled_protocol(offline_caches):
    torch.manual_seed(1)
    from torchvision.models import alexnet

    reference = alexnet(weights=None).eval()
    weights = offline_caches / "weights"
    weights.mkdir()
    torch.save(reference.state_dict(), weights / "alexnet-owt-7be5be79.pth")
    network = load_protocol_network("alexnet", weights)
    assert network.protocol and network.weights == str(weights / "alexnet-owt-7be5be79.pth")
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    features = network.features(images, ["features.4", "features.11"], device=torch.device("cpu"))
    # mindeye2 feeds AlexNet 256 px, bilinear without antialiasing
    pixels = torch.nn.functional.interpolate(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255, size=(256, 256),
                                             mode="bilinear", align_corners=False)
    batch = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.features[:12](batch).flatten(1).numpy()  # features.11 is conv5's ReLU
        expected_early = reference.features[:5](batch).flatten(1).numpy()  # features.4 is conv2's ReLU
    np.testing.assert_allclose(features["features.11"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features["features.4"], expected_early, rtol=1e-4, atol=1e-5)


def test_torch_hub_cache_is_searched(offline_caches):
    checkpoints = offline_caches / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "efficientnet_b1-c27df63c.pth").write_bytes(b"")
    assert locate_weights("effnet") == (checkpoints / "efficientnet_b1-c27df63c.pth", "file")


def test_swav_release_layout_loads_into_resnet50(offline_caches):
    from torchvision.models import resnet50

    torch.manual_seed(2)
    backbone = resnet50(weights=None).state_dict()
    release = {f"module.{k}": v for k, v in backbone.items() if not k.startswith("fc.")}
    release["module.projection_head.0.weight"] = torch.zeros(2048, 2048)
    release["module.prototypes.weight"] = torch.zeros(3000, 128)
    weights = offline_caches / "weights"
    weights.mkdir()
    torch.save(release, weights / "swav_800ep_pretrain.pth.tar")
    network = load_protocol_network("swav", weights)
    loaded = dict(network.extractor.named_parameters())
    torch.testing.assert_close(loaded["layer4.2.conv3.weight"], backbone["layer4.2.conv3.weight"])
    del release["module.layer4.2.conv3.weight"]
    torch.save(release, weights / "swav_800ep_pretrain.pth.tar")
    with pytest.raises(ValueError, match="lacks 1 ResNet-50 weights"):
        load_protocol_network("swav", weights)


def test_clip_from_a_model_folder(offline_caches):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                              patch_size=14, projection_dim=16)
    folder = offline_caches / "weights" / "clip-vit-large-patch14"
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    network = load_protocol_network("clip", offline_caches / "weights")
    assert network.protocol and network.mean == CLIP_MEAN and network.route == "transformers-folder" and network.input_size == 224
    images = np.zeros((2, 50, 50, 3), np.uint8)
    assert network.features(images, ["image_embeds"], device=torch.device("cpu"))["image_embeds"].shape == (2, 16)


def test_random_weights_only_when_asked_and_labelled():
    network = load_protocol_network("effnet", random_weights=True)
    assert not network.protocol and "RANDOM" in network.label and network.weights == "random"
