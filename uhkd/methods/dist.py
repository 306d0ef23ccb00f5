"""DIST (Huang et al. 2022): CE + τ²·(β·inter-class + γ·intra-class) relation loss, 1 − Pearson correlation."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import dist_loss
from .base import Distiller, param, register_method


@register_method
class DIST(Distiller):
    name = "dist"
    display = "DIST"
    reference = "dist"
    paper = "Huang, You, Wang, Qian, Xu, Knowledge Distillation from A Stronger Teacher, NeurIPS 2022"
    code = "https://github.com/hunto/DIST_KD"
    year = 2022
    terms = ("ce", "dist")
    search_space = {"beta": {"loguniform": [0.25, 4.0]}, "gamma": {"loguniform": [0.25, 4.0]},
                    "temperature": {"choice": [1.0, 2.0, 4.0]}}

    @dataclass(frozen=True)
    class Params:
        beta: float = param(1.0, low=0, doc="weight of the inter-class relation (per image, across classes)")
        gamma: float = param(1.0, low=0, doc="weight of the intra-class relation (per class, across the batch)")
        temperature: float = param(1.0, low=0, low_open=True, doc="softmax temperature")

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.p
        logits = self.student.forward_logits(images)
        dist = dist_loss(logits.float(), self.teacher_logits(images), p.beta, p.gamma, p.temperature)
        return logits, {"ce": self.ce(logits, target), "dist": dist}
