"""ImageNet-1K from the usual `train/` and `val/` class folders (one sub-folder of images per class)."""
from __future__ import annotations

from .folder import ClassFolders


class ImageNet(ClassFolders):
    WHAT = "ImageNet-1K"
