"""PAT, Perspective-Aware Teaching (Lin, Yao, Hsu, Xie, Shuai, Cheng, ICCV 2025): region-aware attention (RAA) mixes
the student's four stage maps, seen as a few patch tokens each; per stage, an aligner maps the mixed tokens to the
teacher's stage map and a hierarchical context loss (ReviewKD's HCL) matches them. Adaptive feedback prompts (AFP),
inserted before teacher stages, adapt the teacher's features to the student: each sees the previous step's gap
between the aligned student and the teacher at that stage. The teacher's own weights stay frozen; its prompts train,
by the feature loss and by a regulariser that keeps the prompted teacher's logits near the plain teacher's.

Module layout, initialisation and defaults follow the authors' released code (jimmylin0979/PAT, Apache-2.0, an
OFA-KD fork; read to learn them, not copied). Where ours differs, and why: docs/baselines.md#pat."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..losses import kd_loss
from ..models import StageModel
from .base import CrossEntropy, Distiller, LearningCheck, TeacherUse, param, parse_stages, register_method
from .ofa import init_branch

Shape = tuple[int, int, int]  # (C, H, W)


def hcl_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """ReviewKD's hierarchical context loss, as PAT releases it: the MSE of the maps, plus the MSE after average
    pooling to 4×4, 2×2 and 1×1 (the levels smaller than the map's height) at weights 1/2, 1/4, 1/8, normalised by
    the sum of the weights."""
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for level in (4, 2, 1):
        if level < student.shape[2]:
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level),
                                              F.adaptive_avg_pool2d(teacher, level))
            total += weight
    return loss / total


def sinusoids(positions: int, dim: int) -> Tensor:
    """The transformer's fixed positional encoding, (positions, dim): sin on even, cos on odd channels."""
    position = torch.arange(positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(positions, dim)
    out[:, 0::2] = torch.sin(position * frequency)
    out[:, 1::2] = torch.cos(position * frequency)
    return out


class StageTokens(nn.Module):
    """A stage map (B, C, H, W) as grid×grid tokens of width `width`: nearest up-sampling to a multiple of the grid
    where the map is not one, then a patch-embedding convolution (kernel = stride = ⌈side / grid⌉)."""

    def __init__(self, channels: int, size: tuple[int, int], grid: int, width: int) -> None:
        super().__init__()
        patch = tuple(math.ceil(side / grid) for side in size)
        self.size = tuple(p * grid for p in patch)
        self.embed = nn.Conv2d(channels, width, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="nearest")
        return self.embed(x).flatten(2).transpose(1, 2)


class RegionAttention(nn.Module):
    """RAA: the tokens of the four student stages attend to each other (one LayerNorm, query and key/value
    projections shared by all stages, fixed sinusoidal positions on queries and keys, `heads` heads, no output
    projection); returns each stage's tokens, (B, queries / 4, width)."""

    def __init__(self, student: StageModel, queries: int, width: int, heads: int) -> None:
        super().__init__()
        grid = math.isqrt(queries // 4)
        self.tokens = nn.ModuleList(StageTokens(c, size, grid, width)
                                    for c, size in zip(student.stage_channels, student.stage_sizes))
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(width, 2 * width)
        self.heads = heads
        self.register_buffer("positions", sinusoids(queries, width), persistent=False)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, ...]:
        x = self.norm(torch.cat([embed(f) for embed, f in zip(self.tokens, feats)], 1))
        q, (k, v) = self.to_q(x), self.to_kv(x).chunk(2, -1)
        b, n, d = q.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        positions = self.positions.to(q.dtype)
        out = F.scaled_dot_product_attention(split(q + positions), split(k + positions), split(v))
        return out.transpose(1, 2).reshape(b, n, d).chunk(4, 1)


class TokenAlign(nn.Module):
    """Towards a token teacher (ViT, Swin, Mixer, ResMLP), on the maps' tokens: BatchNorm over the input tokens,
    Linear over channels, BatchNorm over channels, Linear over tokens (the released ViT-to-ViT projector)."""

    def __init__(self, source: Shape, target: Shape) -> None:
        super().__init__()
        (c, h, w), (self.c, self.h, self.w) = source, target
        self.norm_tokens, self.channels = nn.BatchNorm1d(h * w), nn.Linear(c, self.c)
        self.norm_channels, self.positions = nn.BatchNorm1d(self.c), nn.Linear(h * w, self.h * self.w)

    def forward(self, x: Tensor) -> Tensor:
        x = self.channels(self.norm_tokens(x.flatten(2).transpose(1, 2)))  # (B, L, C) -> (B, L, C')
        x = self.positions(self.norm_channels(x.transpose(1, 2)))  # (B, C', L) -> (B, C', L')
        return x.reshape(x.shape[0], self.c, self.h, self.w)


class MapAlign(nn.Sequential):
    """Towards a CNN teacher (ResNet, ConvNeXt): nearest resizing to the target grid, BatchNorm, a bias-free 1×1
    convolution to the target width (the released ViT-to-CNN and CNN-to-CNN projectors)."""

    def __init__(self, source: Shape, target: Shape) -> None:
        super().__init__(nn.Upsample(size=target[1:], mode="nearest"), nn.BatchNorm2d(source[0]),
                         nn.Conv2d(source[0], target[0], 1, bias=False))


def aligner(teacher: StageModel, source: Shape, target: Shape) -> nn.Module:
    module = MapAlign(source, target) if teacher.kind == "cnn" else TokenAlign(source, target)
    module.apply(init_branch)  # the released init: Linear trunc-normal 0.02, conv Kaiming fan-out, BN 1/0
    return module


class ChannelGate(nn.Sequential):
    """Squeeze-and-excitation's gate as the released block computes it: global average pool, 1×1 conv to C/16, ReLU,
    1×1 conv back, sigmoid. Its output is the gate itself (B, C, 1, 1), not the gated map."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        hidden = max(channels // ratio, 1)
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                         nn.Conv2d(hidden, channels, 1), nn.Sigmoid())


class FeedbackPrompt(nn.Module):
    """AFP before one teacher stage: `x + scale · prompt(fuse(x, aligned gap))`. The gap (aligned student − teacher
    at the stage's output) is aligned to the stage's input map; fusion and prompt are the released Pro-tuning style
    blocks, and since they end in `ChannelGate` the prompt is one offset per channel and image. `scale` (the
    released β) starts at 0, so the prompted teacher starts as the teacher."""

    def __init__(self, gap: Shape, entry: Shape, teacher: StageModel) -> None:
        super().__init__()
        c = entry[0]
        self.align = nn.Identity() if gap == entry else aligner(teacher, gap, entry)
        self.fuse = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.Conv2d(c, c, 5, padding=2), nn.Conv2d(c, c, 1),
                                  ChannelGate(c), nn.Conv2d(c, c, 1))
        groups = math.gcd(4, c)  # released: 4
        self.prompt = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups), nn.Conv2d(c, c, 5, padding=2, groups=c),
                                    nn.Conv2d(c, c, 1), ChannelGate(c), nn.Conv2d(c, c, 1, groups=groups))
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, gap: Tensor) -> Tensor:
        fused = self.fuse(torch.cat([x, self.align(gap.to(x.dtype))], 1))
        return x + self.scale * self.prompt(fused)


def prompt_stages(text: str) -> tuple[int, ...]:
    return parse_stages(text) if text else ()


@register_method
class PAT(Distiller):
    """CE + α·KL(student ‖ teacher) + β·Σ_stage HCL(aligned RAA tokens, prompted teacher map)
    + γ·KL(prompted teacher ‖ teacher)."""

    name = "pat"
    display = "PAT"
    reference = "pat"
    paper = "Lin, Yao, Hsu, Xie, Shuai, Cheng, Perspective-Aware Teaching: Adapting Knowledge for Heterogeneous " \
            "Distillation, ICCV 2025 (arXiv 2501.08885)"
    code = "https://github.com/jimmylin0979/PAT"
    year = 2025
    terms = ("ce", "kl", "fd", "reg")
    search_space = {"alpha": {"loguniform": [0.1, 4.0]}, "beta": {"loguniform": [0.1, 10.0]},
                    "gamma": {"loguniform": [0.1, 10.0]}}
    # The feature distance: with β = 1 the feature term outweighs the KL term on the check's tiny models (agreement
    # 0.08 where KD reaches 0.33). A 512-wide RAA costs 9x a KD step there (widths 16-128); 64 costs 2.4x.
    learning_check = LearningCheck("fd", overrides={"width": 64})

    @dataclass(frozen=True)
    class Params:
        alpha: float = param(1.0, low=0, doc="weight of the KL term (student against the plain teacher)")
        beta: float = param(1.0, low=0, doc="weight of the feature term (HCL per stage); 0 = KD, no extra modules")
        gamma: float = param(1.0, low=0, doc="weight of the regulariser KL(prompted teacher ‖ teacher)")
        temperature: float = param(1.0, low=0, low_open=True, doc="softmax temperature of the KL term")
        queries: int = param(64, low=4, doc="RAA tokens over the 4 stages (a square number per stage)")
        width: int = param(512, low=1, doc="RAA token width")
        heads: int = param(8, low=1, doc="RAA attention heads (dividing the width)")
        prompt_stages: str = param("1,2,3,4", doc="teacher stages with a feedback prompt before them, a comma "
                                                  "list of 1..4; empty = none (RAA only)")

        def check(self) -> None:
            per_stage = self.queries // 4
            if self.queries % 4 or math.isqrt(per_stage) ** 2 != per_stage:
                raise UserError(f"queries must be 4 x a square number (16, 36, 64, 100, ...), got {self.queries}")
            if self.width % self.heads:
                raise UserError(f"heads must divide width ({self.width}), got {self.heads}")
            prompt_stages(self.prompt_stages)

    @classmethod
    def teacher_use(cls, p: Any) -> TeacherUse:
        return TeacherUse(True, (1, 2, 3, 4) if p.beta > 0 else (), True)

    def __init__(self, p: Any, ce: CrossEntropy, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(p, ce, student, teacher)
        self.prompted = prompt_stages(p.prompt_stages) if p.beta > 0 else ()
        self._gaps: list[Tensor] | None = None  # the previous step's aligned student − teacher, per stage
        if p.beta == 0:  # KD alone: no idle modules
            return
        self.grid = math.isqrt(p.queries // 4)  # each stage's RAA tokens as a grid x grid map
        outputs = [(c, *size) for c, size in zip(teacher.stage_channels, teacher.stage_sizes)]
        self.raa = RegionAttention(student, p.queries, p.width, p.heads)
        self.aligners = nn.ModuleList(aligner(teacher, (p.width, self.grid, self.grid), out) for out in outputs)
        self.prompts = nn.ModuleDict({str(s): FeedbackPrompt(outputs[s - 1], teacher.stage_inputs[s - 1], teacher)
                                      for s in self.prompted})

    def _prompted_teacher(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The teacher's logits and stage maps with a prompt before each prompted stage (gradients reach the
        prompts, not the teacher). Before the first step, or after a batch-size change, the gap is zero."""
        gaps = self._gaps if self._gaps is not None and self._gaps[0].shape[0] == images.shape[0] else None

        def prompt(stage: int, x: Tensor) -> Tensor:
            if str(stage) not in self.prompts:
                return x
            gap = gaps[stage - 1] if gaps is not None else x.new_zeros(
                x.shape[0], self.teacher.stage_channels[stage - 1], *self.teacher.stage_sizes[stage - 1])
            return self.prompts[str(stage)](x, gap)

        logits, feats = self.teacher.forward_staged(images, prompt)
        return logits.float(), feats

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.p
        logits, feats_s = self.student(images)
        zero = logits.new_zeros((), dtype=torch.float32)
        fd = reg = zero
        if p.beta > 0 and self.prompted:
            logits_t = self.teacher_logits(images)
            logits_p, feats_t = self._prompted_teacher(images)
            reg = p.gamma * kd_loss(logits_p, logits_t, 1.0) if p.gamma > 0 else zero
        else:
            logits_t, feats_t = self.teacher_forward(images)
        if p.beta > 0:
            tokens = self.raa(feats_s)
            aligned = [align(t.transpose(1, 2).reshape(t.shape[0], -1, self.grid, self.grid))
                       for align, t in zip(self.aligners, tokens)]
            fd = p.beta * sum((hcl_loss(s.float(), t.float()) for s, t in zip(aligned, feats_t)), zero)
            if self.prompted:
                self._gaps = [(s - t).detach() for s, t in zip(aligned, feats_t)]
        kl = p.alpha * kd_loss(logits.float(), logits_t, p.temperature) if p.alpha > 0 else zero
        return logits, {"ce": self.ce(logits, target), "kl": kl, "fd": fd, "reg": reg}
