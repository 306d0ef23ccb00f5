"""Training and evaluation batches of one worker, as float images in [0, 1] at `img_size` on its device.

Two paths with the same recipe: in-memory datasets (with `data.device_data`) keep all uint8 images as one tensor on
the device and augment whole batches there; otherwise a DataLoader runs the per-image PIL transforms. Both shard the
data by rank like a DistributedSampler (same seeded permutation on every rank, every world-th index)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import DataConfig
from ..errors import UserError
from . import device as device_aug
from . import get_dataset, load_split, take, with_transform
from .augment import get_recipe, image_transform, mix_and_erase

Batch = tuple[torch.Tensor, torch.Tensor]


def _as_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, H, W) on `device`."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)


class WorkerData:
    def __init__(self, data_cfg: DataConfig, seed: int, device: torch.device, rank: int = 0, world: int = 1,
                 max_steps_per_epoch: int = 0) -> None:
        d = data_cfg
        self.info = get_dataset(d.dataset, d.root, d.mean, d.std)
        self.recipe = get_recipe(d.augment)
        self.img_size, self.batch_size, self.seed = d.img_size, d.batch_size, seed
        self.device, self.rank, self.world = device, rank, world
        train, evalset = load_split(d.dataset, d.root, d.split, d.val_fraction, d.download, d.limit_train,
                                    d.limit_eval)
        self.num_train, self.num_eval = len(train), len(evalset)
        self.on_device = self.info.in_memory and d.device_data
        self.steps_per_epoch = (len(train) // world) // d.batch_size
        if max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise UserError(f"{d.dataset}: {len(train)} training images give no full batch of data.batch_size="
                            f"{d.batch_size} per worker on {world} worker(s)")
        shard = np.arange(rank, len(evalset), world)
        if self.on_device:
            self.train_images = _as_tensor(train.images, device)
            self.train_labels = torch.from_numpy(train.labels).to(device)
            self.eval_images = _as_tensor(evalset.images[shard], device)
            self.eval_labels = torch.from_numpy(evalset.labels[shard]).to(device)
            return
        pin = device.type == "cuda"
        train = with_transform(train, image_transform(self.recipe, d.img_size, True, self.info.eval_crop_pct))
        self.sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.train_loader = DataLoader(train, d.batch_size, sampler=self.sampler, num_workers=d.loader_workers,
                                       pin_memory=pin, drop_last=True)
        evalset = with_transform(take(evalset, shard),
                                 image_transform(self.recipe, d.img_size, False, self.info.eval_crop_pct))
        self.eval_loader = DataLoader(evalset, d.batch_size, num_workers=d.loader_workers, pin_memory=pin)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """`steps_per_epoch` augmented batches: (images, targets); targets are soft (N, C) when the recipe mixes."""
        for images, labels in self._raw_train(epoch):
            yield mix_and_erase(images, labels, self.recipe, self.info.num_classes, self.info.mean, self.info.std)

    def _raw_train(self, epoch: int) -> Iterator[Batch]:
        if self.on_device:
            perm = torch.randperm(len(self.train_labels), generator=torch.Generator().manual_seed(
                self.seed * 100_003 + epoch))[self.rank::self.world]
            for step in range(self.steps_per_epoch):
                idx = perm[step * self.batch_size:(step + 1) * self.batch_size].to(self.device)
                yield device_aug.train_batch(self.train_images[idx], self.recipe, self.img_size), self.train_labels[idx]
            return
        self.sampler.set_epoch(epoch)
        for step, (images, labels) in enumerate(self.train_loader):
            if step == self.steps_per_epoch:
                break
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def eval_batches(self) -> Iterator[Batch]:
        """This rank's shard of the evaluation set: (images, int labels)."""
        if self.on_device:
            for start in range(0, len(self.eval_labels), self.batch_size):
                end = start + self.batch_size
                yield device_aug.resize(self.eval_images[start:end], self.img_size), self.eval_labels[start:end]
            return
        for images, labels in self.eval_loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
