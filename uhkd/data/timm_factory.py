"""Datasets by timm's dataset-factory names (`timm.data.create_dataset`): `torch/<name>` (torchvision datasets such
as `torch/cifar10` or `torch/image_folder`; `--download` where torchvision can fetch them) and `hfds/<name>` (Hugging
Face datasets; needs the `datasets` package and the data cached or the network). The class count comes from the
dataset, the mean/std from its training images (computed once, cached)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from .info import DatasetInfo
from .stats import cached_stats

PREFIXES = ("torch/", "hfds/")


class FactoryDataset:
    """(RGB PIL image, label) items of a timm-factory dataset, with an optional `transform`."""

    def __init__(self, base: Any, transform: Callable | None = None) -> None:
        self.base, self.transform = base, transform
        self.classes = _classes(base)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index][:2]
        image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), int(label)


def _classes(ds: Any) -> list:
    if getattr(ds, "classes", None) is not None:
        return list(ds.classes)
    class_to_idx = getattr(getattr(ds, "reader", None), "class_to_idx", None)
    if class_to_idx:
        return sorted(class_to_idx, key=class_to_idx.get)
    raise UserError(f"cannot tell the classes of {type(ds).__name__} (no classes or reader.class_to_idx)")


def _open(name: str, root: str, train: bool, download: bool) -> FactoryDataset:
    from timm.data import create_dataset

    if name.startswith("hfds/"):
        import datasets  # its progress bars are not the toolkit's lines

        datasets.disable_progress_bars()
    try:
        base = create_dataset(name, root=root or None, split="train" if train else "validation",
                              is_training=train, download=download)
    except UserError:
        raise
    except Exception as exc:  # torchvision, timm and datasets raise many types for a missing or foreign dataset
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UserError(f"dataset {name!r} at {root or '(no --data-root)'!r} does not open through timm's "
                        f"create_dataset: {type(exc).__name__}: {reason}") from None
    return FactoryDataset(base)


def factory_info(name: str) -> DatasetInfo:
    """The registry entry of a `torch/...` or `hfds/...` name."""

    def resolve(root: str) -> DatasetInfo:
        train = _open(name, root, True, False)
        key = f"{name}|{Path(root).resolve() if root else ''}|{len(train)}|{len(train.classes)}"
        stats = cached_stats(key, train)
        return dataclasses.replace(info, num_classes=len(train.classes), mean=stats.mean, std=stats.std, resolve=None,
                                   found=f"{len(train.classes)} classes, {len(train)} training images",
                                   stats_from=stats.origin)

    def check(root: str, download: bool) -> None:
        if not download:  # opening it is the check (a folder scan, or reading a torchvision archive's index)
            _open(name, root, True, False)

    info = DatasetInfo(name, 0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False, 0.875,
                       lambda root, train, download: _open(name, root, train, download), check, resolve)
    return info
