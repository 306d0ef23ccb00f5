"""Map-style dataset over uint8 images held in memory (CIFAR-100, MNIST-5k)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image


class ArrayDataset:
    """`(image, label)` pairs from a uint8 array `images` (N, H, W, 3) and int labels (N,), like torchvision's
    CIFAR datasets: items are PIL images, or `transform(image)` when a transform is given."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None) -> None:
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    def subset(self, indices: np.ndarray) -> "ArrayDataset":
        return ArrayDataset(self.images[indices], self.labels[indices], self.transform)
