"""RSD, Redundancy Suppression Distillation (Zhang, Liu, Ran, Ma, ICCV 2025): the student's pooled embedding, through
a decoupling projector, and the teacher's pooled embedding are standardised over the batch; their cross-correlation
is pushed to the identity (diagonal to 1: invariance; off-diagonal to 0, weighted by κ: decorrelation). Defaults,
projector layout and initialisation are those of the authors' released code (VISION-SJTU/RSD, read to learn them;
it carries no licence, nothing of it is copied). Where ours differs: docs/baselines.md#rsd."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models import StageModel
from .base import CrossEntropy, Distiller, LearningCheck, TeacherUse, param, register_method
from .ofa import init_branch

EPS = 1e-5  # released: added to the biased batch standard deviation


def standardise(x: Tensor) -> Tensor:
    """Each column of `x` (B, D) to zero mean and unit (biased) standard deviation over the batch."""
    return (x - x.mean(0)) / (x.std(0, unbiased=False) + EPS)


def rsd_loss(student: Tensor, teacher: Tensor, kappa: float) -> Tensor:
    """Σ_i (C_ii − 1)² + κ Σ_{i≠j} C_ij², C = T̂ᵀŜ / B: the cross-correlation of the standardised teacher and
    (projected) student embeddings, both (B, D); in their dtype, also under autocast."""
    with torch.autocast(student.device.type, enabled=False):
        c = standardise(teacher).T @ standardise(student) / student.shape[0]
    eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    return (c.diagonal() - 1).pow(2).sum() + kappa * c.masked_fill(eye, 0).pow(2).sum()


class Projector(nn.Sequential):
    """The decoupling module: Linear(d_s → γ·d_s, no bias), BatchNorm1d, GELU, Linear(γ·d_s → d_t, no bias)."""

    def __init__(self, d_student: int, d_teacher: int, expansion: int) -> None:
        hidden = expansion * d_student
        super().__init__(nn.Linear(d_student, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Linear(hidden, d_teacher, bias=False))


@register_method
class RSD(Distiller):
    """CE + weight · RSD(projector(student embedding), teacher embedding); no KL term, as released."""

    name = "rsd"
    display = "RSD"
    reference = "rsd"
    paper = "Zhang, Liu, Ran, Ma, Cross-Architecture Distillation Made Simple with Redundancy Suppression, " \
            "ICCV 2025 (arXiv 2507.21844)"
    code = "https://github.com/VISION-SJTU/RSD"
    year = 2025
    terms = ("ce", "rsd")
    search_space = {"weight": {"loguniform": [0.01, 1.0]}, "kappa": {"loguniform": [0.001, 0.1]}}
    learning_check = LearningCheck("rsd")

    @dataclass(frozen=True)
    class Params:
        weight: float = param(0.1, low=0, doc="weight of the RSD loss")
        kappa: float = param(0.01, low=0, doc="weight of the decorrelation (off-diagonal) terms")
        expansion: int = param(2, low=1, doc="projector hidden width in multiples of the student's embedding width")

    @classmethod
    def teacher_use(cls, p: Any) -> TeacherUse:
        """The pooled embedding is the classifier's input: the teacher keeps its head (pooling, final norms)."""
        return TeacherUse(True, (), True)

    def __init__(self, p: Any, ce: CrossEntropy, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(p, ce, student, teacher)
        if p.weight > 0:  # a weight of 0 is plain CE: no idle projector
            self.projector = Projector(student.num_features, teacher.num_features, p.expansion)
            self.projector.apply(init_branch)  # the released init: Linear weights truncated-normal, std 0.02

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        logits, embedding = self.student.forward_embedding(images)
        rsd = logits.new_zeros((), dtype=torch.float32)
        if self.p.weight > 0:
            with torch.no_grad():
                embedding_t = self.teacher.forward_embedding(images)[1].float()
            rsd = self.p.weight * rsd_loss(self.projector(embedding).float(), embedding_t, self.p.kappa)
        return logits, {"ce": self.ce(logits, target), "rsd": rsd}
