"""Fixtures shared by the evaluation tests."""

import numpy as np
import pytest
import torch


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """torch hub, the Hugging Face cache and HOME (``~/.cache/clip``) pointed at empty folders,
    offline; returns tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """The golden tests' material, built once: images, networks, and a folder of prepared data,
    reconstructions and weights files (see tests/metrics/golden.py)."""
    from tests.metrics import golden as material

    root = tmp_path_factory.mktemp("golden")
    truth, recon = material.golden_images()
    nsd_ids = np.array([2951, 3050, 3078, 3147, 3158])
    networks = material.golden_networks()
    material.write_weights(networks, root / "weights")
    material.write_prepared(root / "data", nsd_ids, truth, sessions=40)
    material.write_pngs(root / "recon", nsd_ids, recon)
    return {"truth": truth, "recon": recon, "nsd_ids": nsd_ids, "networks": networks, "root": root}
