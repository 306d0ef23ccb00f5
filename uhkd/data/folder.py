"""Datasets stored as `train/` and `val/` trees of class folders (one sub-folder of images per class): ImageNet-1K
and `--dataset folder`, any such tree, whose class count comes from its folders and whose mean/std are computed once
from its training images and cached (or given with `data.mean` / `data.std`)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from ..errors import UserError
from .info import DatasetInfo
from .stats import cached_stats

PARTS = ("train", "val")


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path!r}: {exc}") from None


class ClassFolders(ImageFolder):
    """`root/train/<class>/<image>` (train=True) or `root/val/<class>/<image>`; labels follow the sorted class
    folder names, so train and val must hold the same class folders."""

    WHAT = "class-folder dataset"

    def __init__(self, root: str, train: bool = True, transform: Callable | None = None) -> None:
        folder = Path(root) / PARTS[not train]
        if not folder.is_dir():
            raise UserError(f"{self.WHAT} not found at {root!r}: {expected(folder)}")
        try:
            super().__init__(str(folder), transform=transform, loader=_load_rgb)
        except FileNotFoundError as exc:
            raise UserError(f"{self.WHAT} folder {str(folder)!r} is unusable ({exc}); {expected(folder)}") from None


def expected(folder: Path) -> str:
    return f"expected {folder}/<class>/<image> folders of JPEG/PNG files"


def check_folders(what: str, root: str) -> None:
    """train/ and val/ exist and hold the same class folders (labels follow the sorted folder names)."""
    for part in PARTS:
        if not (Path(root) / part).is_dir():
            raise UserError(f"{what} not found at {root!r}: {expected(Path(root) / part)}")
    problem = class_mismatch(*(class_names(Path(root) / part) for part in PARTS))
    if problem:
        raise UserError(f"{what} at {root!r}: {problem}")


def class_names(folder: Path) -> list[str]:
    """The class folders of `folder`, sorted: the labels `ImageFolder` gives them."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def class_mismatch(train: list[str], val: list[str], names: tuple[str, str] = ("train/", "val/")) -> str:
    """"" when train and val have the same classes, else which classes each side lacks."""
    if train == val:
        return ""
    only = [(names[0], sorted(set(train) - set(val))), (names[1], sorted(set(val) - set(train)))]
    listed = "; ".join(f"{len(classes)} only in {name}: {_some(classes)}" for name, classes in only if classes)
    return (f"{names[0]} has {len(train)} class folders and {names[1]} {len(val)}; they must be the same (labels "
            f"follow the sorted folder names): {listed or 'same names, in another order'}")


def _some(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_folder(root: str, download: bool) -> None:
    if not root:
        raise UserError("dataset 'folder' needs --data-root DIR holding train/<class>/<image> and val/<class>/<image>")
    check_folders("class-folder dataset", root)


def _resolve_folder(root: str) -> DatasetInfo:
    _check_folder(root, False)
    train, val = ClassFolders(root, train=True), ClassFolders(root, train=False)
    stats = cached_stats(f"folder|{Path(root).resolve()}|{len(train)}|{','.join(train.classes)}", train)
    found = (f"{len(train.classes)} classes at {root}, {len(train)} images in {PARTS[0]}/ and {len(val)} in "
             f"{PARTS[1]}/")
    return dataclasses.replace(FOLDER, num_classes=len(train.classes), mean=stats.mean, std=stats.std, resolve=None,
                               found=found, stats_from=stats.origin)


FOLDER = DatasetInfo("folder", 0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False, 0.875,
                     lambda root, train, download: ClassFolders(root, train), _check_folder, _resolve_folder)
