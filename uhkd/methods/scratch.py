"""The student alone: label-smoothed cross-entropy, no teacher (the tables' "Scratch" column)."""
from __future__ import annotations

from torch import Tensor

from .base import Distiller, register_method


@register_method
class Scratch(Distiller):
    name = "scratch"
    display = "Scratch"
    reference = "scratch"
    paper = "the student trained alone (label-smoothed cross-entropy)"
    needs_teacher = False

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student.forward_logits(images)
        return logits, {"ce": self.ce(logits, target)}
