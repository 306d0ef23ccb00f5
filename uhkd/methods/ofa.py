"""OFA-KD (Hao et al. 2023): an exit branch per matched student stage maps its features to logits; the head and
every branch learn the teacher's logits with `ofa_loss`. The branches have the layout of the authors' released code
(Hao840/OFAKD): see `CNNBranch` and `TokenBranch`, and README "Protocol" for where ours differs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..losses import ofa_loss
from ..models import StageModel
from .base import CrossEntropy, Distiller, Protocol, hard_labels, param, parse_stages, register_method

FINAL_GRID = 7  # token branches merge patches down towards a 7×7 grid
BRANCH_HEADS = 4


class DownsampleBlock(nn.Sequential):
    """Two depthwise-separable pairs, each a depthwise 3×3 then a pointwise 1×1, BN and ReLU; the first depthwise
    conv halves the map, the last pointwise conv changes the width to `cout`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.Conv2d(cin, cin, 1, bias=False),
            nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU())


class CNNBranch(nn.Sequential):
    """CNN students: (4 − stage) down-sampling blocks doubling the width, the last one to `width` (a 1×1 conv at
    stage 4), then global pooling and a Linear classifier. `width` = max(student, teacher) final width."""

    def __init__(self, channels: int, stage: int, width: int, num_classes: int) -> None:
        n = 4 - stage
        outs = [channels * 2 ** (i + 1) for i in range(n - 1)] + [width]
        blocks = [DownsampleBlock(channels * 2 ** i, out) for i, out in enumerate(outs[:n])] or [
            nn.Conv2d(channels, width, 1)]
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class PatchMerge(nn.Module):
    """2×2 neighbourhoods of an NHWC grid stacked on channels (an odd side is zero-padded first), LayerNorm, a
    bias-free Linear to `cout`, then GELU or nothing."""

    def __init__(self, cin: int, cout: int, gelu: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * cin)
        self.reduction = nn.Linear(4 * cin, cout, bias=False)
        self.act = nn.GELU() if gelu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1] // 2, x.shape[2] // 2
        x = x.reshape(b, h, 2, w, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, 4 * c)
        return self.act(self.reduction(self.norm(x)))


class TokenBranch(nn.Module):
    """Token students: ⌊log2(side / 7)⌋ patch merges to the student's final width (GELU after each but the last of
    two or more), max(4 − stage, 1) transformer blocks of that width with 4 heads, then the class token where the
    student has one (it joins the merged patches before the blocks), else the mean token, and a Linear classifier.
    A map already at ≤ 7×7 whose width differs (reduced inputs only, never at 224) gets a bias-free Linear instead."""

    def __init__(self, channels: int, size: tuple[int, int], stage: int, width: int, num_classes: int) -> None:
        super().__init__()
        merges = max(int(math.log2(min(size) / FINAL_GRID)), 0)
        layers: list[nn.Module] = [
            PatchMerge(channels if i == 0 else width, width, gelu=i == 0 or i < merges - 1) for i in range(merges)]
        if not layers and channels != width:
            layers.append(nn.Linear(channels, width, bias=False))
        self.merge = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*(Block(width, BRANCH_HEADS) for _ in range(max(4 - stage, 1))))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, class_token: Tensor | None = None) -> Tensor:
        tokens = self.merge(x.permute(0, 2, 3, 1)).flatten(1, 2)
        if class_token is not None:
            tokens = torch.cat([class_token, tokens], 1)
        tokens = self.blocks(tokens)
        return self.head(tokens[:, 0] if class_token is not None else tokens.mean(1))


def init_branch(module: nn.Module) -> None:
    """The released initialisation: convolutions Kaiming-normal (fan-out, ReLU), BN weight 1 / bias 0, Linear
    weights truncated-normal with std 0.02 and zero bias (LayerNorms keep PyTorch's)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_method
class OFA(Distiller):
    """CE + L_OFA(head) + w·Σ_stage L_OFA(branch)."""

    name = "ofa"
    display = "OFA"
    reference = "ofa"
    paper = "Hao, Guo, Han, Wang, Xu, Xu, One-for-All: Bridge the Gap Between Heterogeneous Architectures in " \
            "Knowledge Distillation, NeurIPS 2023"
    code = "https://github.com/Hao840/OFAKD"
    year = 2023
    terms = ("ce", "ofa", "ofa_branches")
    search_space = {"gamma": {"uniform": [1.0, 2.0]}, "branch_weight": {"loguniform": [0.05, 2.0]}}

    @dataclass(frozen=True)
    class Params:
        gamma: float = param(1.0, low=0, doc="exponent modulating the target-class term (1.5 on ImageNet)")
        temperature: float = param(1.0, low=0, low_open=True, doc="softmax temperature")
        branch_weight: float = param(1.0, low=0, doc="weight of the exit branches' losses (0.1 for CNN students "
                                                    "on CIFAR-100)")
        stages: str = param("1,2,3,4", doc="student stages with an exit branch, a comma list of 1..4")

        def check(self) -> None:
            parse_stages(self.stages)

    @classmethod
    def protocol_defaults(cls, protocol: Protocol) -> dict[str, Any]:
        """The released configs: γ = 1.5 on ImageNet-1K; branch weight 0.1 for CNN students on CIFAR-100."""
        out: dict[str, Any] = {"gamma": 1.5} if protocol.dataset == "imagenet" else {}
        if protocol.dataset == "cifar100" and protocol.family == "cnn":
            out["branch_weight"] = 0.1
        return out

    def __init__(self, p: Any, ce: CrossEntropy, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(p, ce, student, teacher)
        self.stages = parse_stages(p.stages) if p.branch_weight > 0 else ()
        n = student.num_classes
        if student.kind == "cnn":
            width = max(student.num_features, teacher.num_features)
            branches = [CNNBranch(student.stage_channels[s - 1], s, width, n) for s in self.stages]
        else:
            branches = [TokenBranch(student.stage_channels[s - 1], student.stage_sizes[s - 1], s,
                                    student.num_features, n) for s in self.stages]
        self.branches = nn.ModuleList(branches)
        self.branches.apply(init_branch)

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.p
        class_tokens: list[Tensor | None] = [None] * 4
        if self.student.has_class_token and self.stages:
            logits, feats, class_tokens = self.student.forward_with_class_tokens(images)
        else:
            logits, feats = self.student(images)
        logits_t = self.teacher_logits(images)
        labels = hard_labels(target)
        head = ofa_loss(logits.float(), logits_t, labels, p.gamma, p.temperature)
        branch_logits = (branch(feats[s - 1]) if isinstance(branch, CNNBranch) else
                         branch(feats[s - 1], class_tokens[s - 1]) for s, branch in zip(self.stages, self.branches))
        branches = sum((ofa_loss(z.float(), logits_t, labels, p.gamma, p.temperature) for z in branch_logits),
                       head.new_zeros(()))
        return logits, {"ce": self.ce(logits, target), "ofa": head, "ofa_branches": p.branch_weight * branches}
