"""CLIP ViT-L/14 (OpenAI) through each place its weights are found, each written in that place's
own format with a small random model: OpenAI's TorchScript archive (``~/.cache/clip``, or
``--weights-dir``), open_clip's file in the Hugging Face cache, transformers' folder. The
archive is read without ``torch.jit.load`` and without unpickling anything but tensors."""

import pickle
import zipfile

import numpy as np
import pytest
import torch

from havir.errors import InvalidInputError
from havir.metrics import networks
from havir.metrics.networks import load_protocol_network
from tests.metrics.golden import tiny_openai_clip

IMAGES = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_clip():
    return tiny_openai_clip(7)


def _expected(model) -> np.ndarray:
    """encode_image of the model on IMAGES, fed as mindeye2 feeds CLIP (224 px bilinear, no antialias)."""
    pixels = torch.nn.functional.interpolate(torch.as_tensor(IMAGES).permute(0, 3, 1, 2).float() / 255, size=(224, 224),
                                             mode="bilinear", align_corners=False)
    mean = torch.tensor(networks.NORMALISATIONS["clip"][0]).view(1, 3, 1, 1)
    std = torch.tensor(networks.NORMALISATIONS["clip"][1]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.encode_image((pixels - mean) / std).numpy()


def _features(network) -> np.ndarray:
    return network.features(IMAGES, ["image_embeds"], device=torch.device("cpu"))["image_embeds"]


def _no_jit_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be used on a weights file")

    monkeypatch.setattr(torch.jit, "load", refuse)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")  # writing the test archive
def test_openai_archive_in_the_clip_cache(offline_caches, tiny_clip, monkeypatch):
    archive = offline_caches / "home" / ".cache" / "clip" / "ViT-L-14.pt"  # HOME is offline_caches/home
    archive.parent.mkdir(parents=True)
    image = torch.zeros(1, 3, 224, 224)
    text = torch.zeros(1, 8, dtype=torch.long)
    torch.jit.trace(tiny_clip, (image, text), check_trace=False).save(archive)  # OpenAI's format: a TorchScript archive
    assert zipfile.is_zipfile(archive)
    _no_jit_load(monkeypatch)
    network = load_protocol_network("clip")
    assert network.route == "openai-archive" and network.weights == str(archive) and network.protocol
    np.testing.assert_allclose(_features(network), _expected(tiny_clip), rtol=1e-5, atol=1e-6)


def test_weights_dir_archive_comes_first(offline_caches, tiny_clip):
    weights = offline_caches / "weights"
    weights.mkdir()
    torch.save(tiny_clip.state_dict(), weights / "ViT-L-14.pt")  # OpenAI's layout as a plain state dict
    cache = offline_caches / "home" / ".cache" / "clip"
    cache.mkdir(parents=True)
    (cache / "ViT-L-14.pt").write_bytes(b"not read")
    network = load_protocol_network("clip", weights)
    assert network.weights == str(weights / "ViT-L-14.pt")
    np.testing.assert_allclose(_features(network), _expected(tiny_clip), rtol=1e-5, atol=1e-6)


def test_open_clip_file_in_the_hugging_face_cache(offline_caches, tiny_clip):
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_caches / "hf" / "models--timm--vit_large_patch14_clip_224.openai"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, snapshot / "open_clip_model.safetensors")
    network = load_protocol_network("clip")
    assert network.route == "open_clip-hf-cache" and network.weights.endswith("open_clip_model.safetensors")
    np.testing.assert_allclose(_features(network), _expected(tiny_clip), rtol=1e-5, atol=1e-6)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_an_archive_that_names_code_is_refused(offline_caches):
    weights = offline_caches / "weights"
    weights.mkdir()
    path = weights / "ViT-L-14.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ViT-L-14/data.pkl", pickle.dumps({"weight": _Exploit()}, protocol=2))
        archive.writestr("ViT-L-14/constants.pkl", pickle.dumps(()))
    with pytest.raises(InvalidInputError, match=r"refusing to load posix\.system.*delete it"):
        load_protocol_network("clip", weights)
