"""OFA-KD (Hao et al. 2023): an exit branch per matched student stage maps its features to logits; the head and
every branch learn the teacher's logits with `ofa_loss`. Branch shapes follow SPEC §2."""
from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..config import MethodConfig, RunConfig, parse_stages
from ..losses import ofa_loss
from ..models import StageModel, model_kind
from ..registry import METHODS
from .base import Distiller, hard_labels


def _sep_conv(cin: int, cout: int) -> nn.Sequential:
    """Depthwise-separable down-sampling block: depthwise 3×3 stride 2, pointwise 1×1."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CNNBranch(nn.Sequential):
    """(4 − stage) down-sampling blocks doubling the width, the last to `width` (a 1×1 conv at stage 4), then
    global pooling and a Linear classifier."""

    def __init__(self, channels: int, stage: int, width: int, num_classes: int) -> None:
        blocks: list[nn.Module] = []
        for i in range(4 - stage):
            out = width if i == 3 - stage else channels * 2
            blocks.append(_sep_conv(channels, out))
            channels = out
        if not blocks:
            blocks.append(nn.Conv2d(channels, width, 1))
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class TokenBranch(nn.Module):
    """Patch merging to a (at most) 7×7 grid, max(4 − stage, 1) transformer blocks, mean token, Linear."""

    def __init__(self, channels: int, size: tuple[int, int], stage: int, width: int, num_classes: int) -> None:
        super().__init__()
        grid = min(7, *size)
        stride = min(size) // grid
        self.merge = nn.Sequential(nn.Conv2d(channels, width, stride, stride), nn.AdaptiveAvgPool2d(grid))
        heads = max(h for h in range(1, max(1, width // 64) + 1) if width % h == 0)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(max(4 - stage, 1))))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.merge(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


@METHODS.register("ofa")
class OFA(Distiller):
    """CE + L_OFA(head) + w·Σ_stage L_OFA(branch)."""

    terms = ("ce", "ofa", "ofa_branches")

    @classmethod
    def defaults(cls, cfg: RunConfig) -> dict[str, Any]:
        cnn_on_cifar = cfg.data.dataset == "cifar100" and model_kind(cfg.model.student) == "cnn"
        return dict(gamma=1.5 if cfg.data.dataset == "imagenet1k" else 1.0, temperature=1.0,
                    branch_weight=0.1 if cnn_on_cifar else 1.0)

    @classmethod
    def matched_stages(cls, cfg: MethodConfig) -> tuple[int, ...]:
        return parse_stages(cfg.stages) if cfg.branch_weight > 0 else ()

    def __init__(self, cfg: MethodConfig, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(cfg, student, teacher)
        width = max(student.num_features, teacher.num_features)
        n = student.num_classes
        self.branches = nn.ModuleList(
            CNNBranch(student.stage_channels[s - 1], s, width, n) if student.kind == "cnn"
            else TokenBranch(student.stage_channels[s - 1], student.stage_sizes[s - 1], s, width, n)
            for s in self.stages)

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        logits, feats = self.student(images)
        logits_t = self.teacher_logits(images)
        labels = hard_labels(target)
        head = ofa_loss(logits.float(), logits_t, labels, c.gamma, c.temperature)
        branches = sum((ofa_loss(branch(feats[s - 1]).float(), logits_t, labels, c.gamma, c.temperature)
                        for s, branch in zip(self.stages, self.branches)), head.new_zeros(()))
        return logits, {"ce": self.ce(logits, target), "ofa": head, "ofa_branches": c.branch_weight * branches}
