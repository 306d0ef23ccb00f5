"""ImageNet-1K from the usual `train/` and `val/` class folders (one sub-folder of images per class)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from ..errors import UserError


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path!r}: {exc}") from None


class ImageNet(ImageFolder):
    """`root/train/<class>/<image>` (train=True) or `root/val/<class>/<image>`; labels follow the sorted class
    folder names, so train and val must hold the same class folders."""

    def __init__(self, root: str, train: bool = True, transform: Callable | None = None) -> None:
        folder = Path(root) / ("train" if train else "val")
        expected = f"expected {folder}/<class>/<image> folders of JPEG/PNG files"
        if not folder.is_dir():
            raise UserError(f"ImageNet-1K not found at {root!r}: {expected}")
        try:
            super().__init__(str(folder), transform=transform, loader=_load_rgb)
        except FileNotFoundError as exc:
            raise UserError(f"ImageNet-1K folder {str(folder)!r} is unusable ({exc}); {expected}") from None
