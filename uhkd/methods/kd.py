"""KD (Hinton et al. 2015): CE + α·τ²·KL(p_t^τ ‖ p_s^τ) on the logits."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import kd_loss
from .base import Distiller, param, register_method


@register_method
class KD(Distiller):
    name = "kd"
    display = "KD"
    reference = "kd"
    paper = "Hinton, Vinyals, Dean, Distilling the Knowledge in a Neural Network, NeurIPS workshop 2015"
    year = 2015
    terms = ("ce", "kl")
    search_space = {"alpha": {"loguniform": [0.1, 4.0]}, "temperature": {"choice": [1.0, 2.0, 4.0]}}

    @dataclass(frozen=True)
    class Params:
        alpha: float = param(1.0, low=0, doc="weight of the KL term")
        temperature: float = param(1.0, low=0, low_open=True, doc="softmax temperature (1 in the OFA-KD protocol)")

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student.forward_logits(images)
        kl = kd_loss(logits.float(), self.teacher_logits(images), self.p.temperature)
        return logits, {"ce": self.ce(logits, target), "kl": self.p.alpha * kl}
