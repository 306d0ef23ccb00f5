"""The per-image part of a recipe applied to a whole uint8 batch on the training device, with per-sample randomness:
random resized crop + flip in one `grid_sample`, and RandAugment ("rand-m9-mstd0.5-inc1", the same 15 operations,
magnitudes and probabilities as timm's PIL version) as masked batch operations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import CROP_RATIO, CROP_SCALE, RA_MAGNITUDE_MAX, Recipe

RA_LAYERS = 2
RA_PROB = 0.5
RA_MAGNITUDE, RA_MAGNITUDE_STD, RA_LEVELS = 9.0, 0.5, 10.0
FILL = 128 / 255  # geometric ops fill with grey, as timm's img_mean default


def resize(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, img_size, img_size) in [0, 1] (the evaluation transform)."""
    x = images.float().div_(255)
    if x.shape[-2:] == (img_size, img_size):
        return x
    return F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False,
                         antialias=img_size < max(x.shape[-2:])).clamp_(0, 1)


def train_batch(images: torch.Tensor, recipe: Recipe, img_size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) on the device -> float (N, 3, img_size, img_size) in [0, 1], augmented per sample."""
    if not recipe.crop:
        return resize(images, img_size)
    x = _resized_crop_flip(images.float().div_(255), img_size)
    if recipe.rand_augment:
        x = rand_augment(x)
    return x


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


def _resized_crop_flip(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """RandomResizedCrop(scale, ratio) + horizontal flip as one affine resampling per sample. torchvision retries
    boxes that do not fit; here the box sides are clipped to the image instead."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, *CROP_SCALE, dev)
    ratio = _uniform(n, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), dev).exp()
    w = (area * ratio).sqrt().clamp(max=1)  # box sides as fractions of the image
    h = (area / ratio).sqrt().clamp(max=1)
    cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - w)  # box centre in [-1, 1] coordinates
    cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [n, x.shape[1], img_size, img_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: b + factor * (a - b), clipped."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.int64)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize per sample and channel, via 256-bin histograms."""
    n, c, h, w = x.shape
    q = _quantise(x).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    last = hist.gather(1, (hist > 0).float().cumsum(1).argmax(1, keepdim=True))  # count of the top used level
    step = ((h * w - last) / 256).floor()
    cum_before = hist.cumsum(1) - hist
    lut = ((cum_before + (step / 2).floor()) / step.clamp(min=1)).floor().clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device, dtype=lut.dtype).expand_as(lut))
    return (lut.gather(1, q) / 255).view(n, c, h, w)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp(min=1e-6), x)


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL SHARPEN blend: a 3x3 smoothing kernel (centre 5, 13 in total), border pixels unchanged."""
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(x.shape[1], 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=x.shape[1])
    return _blend(x, smooth, factor)


def _affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample with per-sample 2x2 `matrices` and translations (N, 2, 3) in [-1, 1] coordinates, grey fill."""
    grid = F.affine_grid(matrices, list(x.shape), align_corners=False)
    return F.grid_sample(x - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + FILL


def _geometric(x: torch.Tensor, op: str, level: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if op == "Rotate":
        angle = torch.deg2rad(level * 30)
        theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
        theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    elif op == "ShearX":  # PIL shears about the top-left corner: x_in = x + f·y in pixels, hence the translation
        theta[:, 0, 1] = theta[:, 0, 2] = level * 0.3 * x.shape[-2] / x.shape[-1]
    elif op == "ShearY":
        theta[:, 1, 0] = theta[:, 1, 2] = level * 0.3 * x.shape[-1] / x.shape[-2]
    elif op == "TranslateXRel":
        theta[:, 0, 2] = level * 0.45 * 2
    else:  # TranslateYRel
        theta[:, 1, 2] = level * 0.45 * 2
    return _affine(x, theta)


def apply_op(x: torch.Tensor, op: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One RandAugment op on a sub-batch; `level` = magnitude / 10 per sample, `sign` = random +-1 per sample."""
    if op in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        return _geometric(x, op, level * sign)
    enhance = (1 + level * 0.9 * sign).clamp(min=0.1)
    if op == "AutoContrast":
        return _autocontrast(x)
    if op == "Equalize":
        return _equalize(x)
    if op == "Invert":
        return 1 - x
    if op == "PosterizeIncreasing":
        shift = (8 - (4 - (level * 4).long())).view(-1, 1, 1, 1)
        return ((_quantise(x) >> shift) << shift).float() / 255
    if op == "SolarizeIncreasing":
        threshold = (256 - (level * 256).long()).view(-1, 1, 1, 1)
        q = _quantise(x)
        return torch.where(q >= threshold, 255 - q, q).float() / 255
    if op == "SolarizeAdd":
        add = (level * 110).long().clamp(max=128).view(-1, 1, 1, 1)
        q = _quantise(x)
        return torch.where(q < 128, (q + add).clamp(max=255), q).float() / 255
    if op == "ColorIncreasing":
        return _blend(x, _grey(x).expand_as(x), enhance)
    if op == "ContrastIncreasing":
        return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), enhance)
    if op == "BrightnessIncreasing":
        return _blend(x, torch.zeros_like(x), enhance)
    return _sharpness(x, enhance)  # SharpnessIncreasing


OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
       "TranslateXRel", "TranslateYRel")


def rand_augment(x: torch.Tensor) -> torch.Tensor:
    """Per sample: RA_LAYERS ops drawn uniformly (with replacement), each applied with probability RA_PROB at
    magnitude N(9, 0.5) clipped to [0, RA_MAGNITUDE_MAX]. The op counts are read once per layer, so selecting
    each op's samples needs no further host sync (`nonzero_static`)."""
    n, dev = x.shape[0], x.device
    x = x.clone()
    for _ in range(RA_LAYERS):
        op_index = torch.randint(len(OPS), (n,), device=dev)
        op_index = torch.where(torch.rand(n, device=dev) < RA_PROB, op_index, len(OPS))  # len(OPS): not applied
        level = (torch.randn(n, device=dev) * RA_MAGNITUDE_STD + RA_MAGNITUDE).clamp(0, RA_MAGNITUDE_MAX) / RA_LEVELS
        sign = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
        counts = torch.bincount(op_index, minlength=len(OPS)).tolist()
        for k, (op, count) in enumerate(zip(OPS, counts)):
            if count:
                idx = torch.nonzero_static(op_index == k, size=count).flatten()
                x.index_copy_(0, idx, apply_op(x[idx], op, level[idx], sign[idx]))
    return x.clamp_(0, 1)
