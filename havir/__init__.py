"""HAVIR: hierarchical reconstruction of seen images from fMRI (Natural Scenes Dataset)."""

__version__ = "0.1.0"
