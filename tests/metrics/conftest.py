"""Fixtures shared by the evaluation tests."""

import pytest
import torch


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """torch hub and the Hugging Face cache pointed at empty folders, offline; returns tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path
