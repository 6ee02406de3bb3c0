"""HAVIR: hierarchical reconstruction of seen images from fMRI (Natural Scenes Dataset)."""

from havir._torchvision import install_import_hook

__version__ = "0.1.0"

# Before anything imports transformers or diffusers, which import torchvision when installed.
install_import_hook()
