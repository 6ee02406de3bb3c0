"""The torchvision compatibility shim: what it fixes, and that it only acts when needed."""

import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _extension_loads() -> bool:
    extension = next(Path(find_spec("torchvision").origin).parent.glob("_C.*"))
    return _python(f"import torch; torch.ops.load_library({str(extension)!r})").returncode == 0


def test_importing_havir_makes_the_evaluation_networks_and_transforms_work():
    result = _python(
        "import havir, torch, torchvision\n"
        "from torchvision.models import alexnet\n"
        "from torchvision.models.feature_extraction import create_feature_extractor\n"
        "from torchvision.transforms.v2.functional import resize\n"
        "net = create_feature_extractor(alexnet(), return_nodes=['features.4'])\n"
        "print(tuple(net(resize(torch.rand(1, 3, 64, 64), [224, 224]))['features.4'].shape))\n"
        "import transformers, diffusers  # both import torchvision when it is installed\n"
        "from diffusers import AutoencoderKL\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 192, 27, 27)"


def test_the_shim_acts_only_when_the_extension_cannot_load():
    needed = not _extension_loads()
    result = _python("from havir._torchvision import ensure_torchvision_importable as f; print(f(), f())")
    assert result.returncode == 0 and result.stdout.split() == [str(needed), "False"]
    bare = _python("import torchvision")
    if needed:
        # The failure the shim exists for; when upstream fixes it, this test says the shim can go.
        assert bare.returncode != 0 and "torchvision::nms" in bare.stderr
    else:
        assert bare.returncode == 0


def test_importing_havir_does_not_import_torch():
    result = _python("import sys, havir.nsd.design, havir.masks; print('torch' in sys.modules)")
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build loads torchvision's own operators")
def test_detection_operators_stay_unavailable_with_a_clear_error():
    result = _python(
        "import havir, torch, torchvision\n"
        "torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)\n"
    )
    if _extension_loads():
        assert result.returncode == 0
    else:  # torchvision's own message, not a crash in the shim
        assert result.returncode != 0 and "Couldn't load custom C++ ops" in result.stderr
