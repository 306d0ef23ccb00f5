"""Augmentation recipes (docs/protocol.md#recipes) and the batch-level operations shared by both data paths.

Images stay in [0, 1] everywhere: every model normalises its own inputs. A recipe's per-image part (random resized
crop, flip, RandAugment) runs either per image with PIL in a DataLoader (`image_transform`) or on whole uint8 batches
on the training device (`uhkd.data.device`); its batch part (random erasing, mixup/cutmix: `mix_and_erase`) always
runs on the device batch, drawing its random numbers as timm does (Python's `random` per image for erasing, numpy's
generator once per batch for mixing), so the trainer's per-epoch seeding makes both reproducible.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
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


def random_erase(images: torch.Tensor, prob: float, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """timm's `RandomErasing(prob, mode="pixel")` on a batch: per image with probability `prob`, one box of 2-33% of
    the area and aspect ratio 0.3-3.3 (up to 10 tries for one that fits), filled with per-pixel N(0, 1) noise in the
    normalised space of a student trained on the dataset: mean + std·N(0, 1) in these [0, 1] images (not clipped).
    The boxes come from Python's `random` in timm's order (a seeded run erases the boxes timm's would), the noise
    from one batched draw."""
    n, c, h, w = images.shape
    boxes = [_erase_box(prob, h, w) for _ in range(n)]
    if not any(boxes):
        return images
    top, left, bh, bw = torch.tensor([b or (0, 0, 0, 0) for b in boxes], dtype=torch.float32).to(images.device).T
    noise = torch.randn_like(images) * _column(std, images) + _column(mean, images)
    return torch.where(_box_mask(top, left, bh, bw, h, w), noise, images)


def _erase_box(prob: float, h: int, w: int) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of one image's erased box, or None; the draws of timm's `RandomErasing._erase`."""
    if random.random() > prob:
        return None
    for _ in range(10):
        area = random.uniform(*ERASE_AREA) * h * w
        ratio = math.exp(random.uniform(*ERASE_LOG_RATIO))
        bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if bw < w and bh < h:
            return random.randint(0, h - bh), random.randint(0, w - bw), bh, bw
    return None


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype).to(like.device).view(1, -1, 1, 1)


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
    """timm's `Mixup` in its default "batch" mode: one draw per batch, from numpy's global generator in timm's order
    (a seeded run mixes as timm's would). With both on, cutmix with probability 0.5; λ ~ Beta(a, a). Mixup blends
    the batch with its reverse; cutmix pastes one box of the reversed batch, and λ becomes the share of the image
    outside the box. Soft targets λ·one_hot(y) + (1 − λ)·one_hot(y reversed); label smoothing is the loss's."""
    lam, use_cutmix = _batch_draw(recipe)
    if use_cutmix:
        h, w = images.shape[-2:]
        top, bottom, left, right = _cutmix_box(h, w, lam)
        lam = 1 - (bottom - top) * (right - left) / (h * w)
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
    else:
        mixed = images * lam + images.flip(0) * (1 - lam)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    return mixed, one_hot * lam + one_hot.flip(0) * (1 - lam)


def _batch_draw(recipe: Recipe) -> tuple[float, bool]:
    """(λ, cutmix?) of a batch: the draws of timm's `Mixup._params_per_batch` (mixing probability 1)."""
    np.random.rand()  # timm's draw against its mixing probability, 1 here: kept so the streams stay aligned
    if recipe.mixup > 0 and recipe.cutmix > 0:
        use_cutmix = bool(np.random.rand() < CUTMIX_SWITCH_PROB)
    else:
        use_cutmix = recipe.cutmix > 0
    concentration = recipe.cutmix if use_cutmix else recipe.mixup
    return float(np.random.beta(concentration, concentration)), use_cutmix


def _cutmix_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of timm's cutmix box for λ: sides √(1 − λ) of the image's, a uniform centre,
    clipped to the image."""
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = np.random.randint(0, h), np.random.randint(0, w)
    return (int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + (cut_h + 1) // 2, 0, h)),
            int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + (cut_w + 1) // 2, 0, w)))


def mix_and_erase(images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, num_classes: int,
                  mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch part of a recipe, in timm's order (erasing, then mixing); `mean`/`std`: the student's
    normalisation (erasing's noise is N(0, 1) there). Targets are int labels, or soft (N, C) when the recipe mixes."""
    if recipe.erase > 0:
        images = random_erase(images, recipe.erase, mean, std)
    if recipe.mixes:
        return mix(images, labels, recipe, num_classes)
    return images, labels
