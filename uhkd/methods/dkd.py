"""DKD (Zhao et al. 2022): CE + α·TCKD + β·NCKD, ramped up linearly over the first `warmup_epochs` epochs."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import dkd_loss
from .base import Distiller, LearningCheck, hard_labels, param, register_method


@register_method
class DKD(Distiller):
    name = "dkd"
    display = "DKD"
    reference = "dkd"
    paper = "Zhao, Cui, Song, Qiu, Liang, Decoupled Knowledge Distillation, CVPR 2022"
    code = "https://github.com/megvii-research/mdistiller"
    year = 2022
    terms = ("ce", "dkd")
    search_space = {"alpha": {"loguniform": [0.25, 4.0]}, "beta": {"loguniform": [0.5, 16.0]},
                    "temperature": {"choice": [1.0, 2.0, 4.0]}}
    learning_check = LearningCheck("agreement", overrides={"warmup_epochs": 0})

    @dataclass(frozen=True)
    class Params:
        alpha: float = param(1.0, low=0, doc="weight of TCKD (target-class knowledge)")
        beta: float = param(2.0, low=0, doc="weight of NCKD (non-target-class knowledge)")
        temperature: float = param(1.0, low=0, low_open=True, doc="softmax temperature")
        warmup_epochs: int = param(20, low=0, doc="epochs over which the loss ramps up linearly (0 = none)")

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.p
        logits = self.student.forward_logits(images)
        ramp = min((epoch + 1) / p.warmup_epochs, 1.0) if p.warmup_epochs > 0 else 1.0
        dkd = dkd_loss(logits.float(), self.teacher_logits(images), hard_labels(target), p.alpha, p.beta,
                       p.temperature)
        return logits, {"ce": self.ce(logits, target), "dkd": ramp * dkd}
