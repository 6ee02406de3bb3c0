"""HAVIR: hierarchical reconstruction of seen images from fMRI (Natural Scenes Dataset)."""

from havir._torchvision import ensure_torchvision_importable

__version__ = "0.1.0"

# Before anything imports transformers or diffusers, which import torchvision when installed.
ensure_torchvision_importable()
