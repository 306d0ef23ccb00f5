"""Augmentation recipes of SPEC §3 and the batch-level operations shared by both data paths.

Images stay in [0, 1] everywhere: every model normalises its own inputs. A recipe's per-image part (random resized
crop, flip, RandAugment) runs either per image with PIL in a DataLoader (`image_transform`) or on whole uint8 batches
on the training device (`uhkd.data.device`); its batch part (random erasing, mixup/cutmix: `mix_and_erase`) always
runs on the device batch, with per-sample randomness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torchvision import transforms as T

from ..errors import choice_error

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm's config string: magnitude 9 +- 0.5, 2 ops, the "increasing" set
# magnitudes are clipped to [0, 10) rather than [0, 10]: at 10 timm's PosterizeIncreasing keeps 0 bits, which
# Pillow >= 10 rejects (ValueError mid-epoch)
RA_MAGNITUDE_MAX = 9.99
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
CUTMIX_SWITCH_PROB = 0.5


@dataclass(frozen=True)
class Recipe:
    crop: bool  # random resized crop + horizontal flip (else a plain resize)
    rand_augment: bool
    mixup: float  # Beta(a, a) concentration; 0 = off
    cutmix: float
    erase: float  # random-erasing probability per image

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


RECIPES = {
    "none": Recipe(crop=False, rand_augment=False, mixup=0.0, cutmix=0.0, erase=0.0),
    "cnn": Recipe(crop=True, rand_augment=False, mixup=0.0, cutmix=0.0, erase=0.0),
    "vit": Recipe(crop=True, rand_augment=True, mixup=0.8, cutmix=1.0, erase=0.25),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise choice_error("augmentation recipe", name, RECIPES)
    return RECIPES[name]


def image_transform(recipe: Recipe, img_size: int, train: bool, crop_pct: float = 1.0) -> Callable:
    """PIL image -> float tensor (3, img_size, img_size) in [0, 1]: the per-image part of `recipe` when `train`,
    else resize to img_size / crop_pct and centre-crop (crop_pct 1 = resize the whole image)."""
    if not (train and recipe.crop):
        return T.Compose([T.Resize(round(img_size / crop_pct)), T.CenterCrop(img_size), T.ToTensor()])
    steps = [T.RandomResizedCrop(img_size, scale=CROP_SCALE, ratio=CROP_RATIO), T.RandomHorizontalFlip()]
    if recipe.rand_augment:
        from timm.data.auto_augment import rand_augment_transform

        steps.append(rand_augment_transform(RAND_AUGMENT, {"img_mean": (128, 128, 128),
                                                           "magnitude_max": RA_MAGNITUDE_MAX}))
    return T.Compose([*steps, T.ToTensor()])


def random_erase(images: torch.Tensor, prob: float) -> torch.Tensor:
    """timm-style random erasing, per sample with probability `prob`: one box of 2-33% of the area, aspect ratio
    0.3-3.3, filled with uniform noise (inputs are in [0, 1], before each model's normalisation)."""
    n, _, h, w = images.shape
    dev = images.device
    area = torch.empty(n, device=dev).uniform_(*ERASE_AREA) * h * w
    ratio = torch.empty(n, device=dev).uniform_(*ERASE_LOG_RATIO).exp()
    eh = (area * ratio).sqrt().round().clamp(1, h)
    ew = (area / ratio).sqrt().round().clamp(1, w)
    top = (torch.rand(n, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(n, device=dev) * (w - ew + 1)).floor()
    mask = _box_mask(top, left, eh, ew, h, w) & (torch.rand(n, 1, 1, 1, device=dev) < prob)
    return torch.where(mask, torch.rand_like(images), images)


def _box_mask(top: torch.Tensor, left: torch.Tensor, bh: torch.Tensor, bw: torch.Tensor, h: int, w: int
              ) -> torch.Tensor:
    """(N, 1, h, w) bool mask of one box per sample."""
    rows = torch.arange(h, device=top.device).view(1, h, 1)
    cols = torch.arange(w, device=top.device).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + bh).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + bw).view(-1, 1, 1)))
    return inside.unsqueeze(1)


def mix(images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, num_classes: int
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mixup / cutmix with the batch reversed as partner. Returns the images and soft targets (N, C):
    each target is (1 - w) one_hot(y) + w one_hot(y_partner), w the exact fraction of the partner in the image."""
    n, _, h, w = images.shape
    dev = images.device
    if recipe.mixup > 0 and recipe.cutmix > 0:
        use_cutmix = torch.rand(n, device=dev) < CUTMIX_SWITCH_PROB
    else:
        use_cutmix = torch.full((n,), recipe.cutmix > 0, device=dev)
    lam_mix = _beta(recipe.mixup, n, dev)
    lam_cut = _beta(recipe.cutmix, n, dev)
    cut = (1 - lam_cut).sqrt()
    bh, bw = (cut * h).floor(), (cut * w).floor()
    cy, cx = (torch.rand(n, device=dev) * h).floor(), (torch.rand(n, device=dev) * w).floor()
    top, left = (cy - bh // 2).clamp(0, h), (cx - bw // 2).clamp(0, w)
    bottom, right = (cy + bh // 2).clamp(0, h), (cx + bw // 2).clamp(0, w)
    box = _box_mask(top, left, bottom - top, right - left, h, w).to(images.dtype)
    weight = torch.where(use_cutmix.view(-1, 1, 1, 1), box, (1 - lam_mix).view(-1, 1, 1, 1))
    mixed = images * (1 - weight) + images.flip(0) * weight
    partner = weight.mean(dim=(1, 2, 3)).unsqueeze(1)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    return mixed, one_hot * (1 - partner) + one_hot.flip(0) * partner


def _beta(concentration: float, n: int, device: torch.device) -> torch.Tensor:
    if concentration <= 0:
        return torch.ones(n, device=device)
    c = torch.tensor(float(concentration), device=device)
    return torch.distributions.Beta(c, c, validate_args=False).sample((n,))


def mix_and_erase(images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, num_classes: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch part of a recipe; targets are int labels, or soft (N, C) targets when the recipe mixes."""
    if recipe.erase > 0:
        images = random_erase(images, recipe.erase)
    if recipe.mixes:
        return mix(images, labels, recipe, num_classes)
    return images, labels
