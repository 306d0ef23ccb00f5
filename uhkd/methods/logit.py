"""Logit-only methods: scratch (CE), KD, DKD, DIST."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..config import RunConfig
from ..losses import dist_loss, dkd_loss, kd_loss
from ..registry import METHODS
from .base import Distiller, hard_labels


@METHODS.register("scratch")
class Scratch(Distiller):
    """The student alone: label-smoothed cross-entropy."""

    needs_teacher = False

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student.forward_logits(images)
        return logits, {"ce": self.ce(logits, target)}


@METHODS.register("kd")
class KD(Distiller):
    """CE + α·τ²·KL(p_t ‖ p_s)."""

    terms = ("ce", "kl")

    @classmethod
    def defaults(cls, cfg: RunConfig) -> dict[str, Any]:
        return dict(alpha=1.0, temperature=1.0)

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student.forward_logits(images)
        kl = kd_loss(logits.float(), self.teacher_logits(images), self.cfg.temperature)
        return logits, {"ce": self.ce(logits, target), "kl": self.cfg.alpha * kl}


@METHODS.register("dkd")
class DKD(Distiller):
    """CE + α·TCKD + β·NCKD, ramped up linearly over the first `warmup_epochs` epochs."""

    terms = ("ce", "dkd")

    @classmethod
    def defaults(cls, cfg: RunConfig) -> dict[str, Any]:
        return dict(alpha=1.0, beta=2.0, temperature=1.0, warmup_epochs=20)

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        logits = self.student.forward_logits(images)
        ramp = min((epoch + 1) / c.warmup_epochs, 1.0) if c.warmup_epochs > 0 else 1.0
        dkd = dkd_loss(logits.float(), self.teacher_logits(images), hard_labels(target), c.alpha, c.beta,
                       c.temperature)
        return logits, {"ce": self.ce(logits, target), "dkd": ramp * dkd}


@METHODS.register("dist")
class DIST(Distiller):
    """CE + β·inter-class + γ·intra-class relation loss."""

    terms = ("ce", "dist")

    @classmethod
    def defaults(cls, cfg: RunConfig) -> dict[str, Any]:
        return dict(beta=1.0, gamma=1.0, temperature=1.0)

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        logits = self.student.forward_logits(images)
        dist = dist_loss(logits.float(), self.teacher_logits(images), c.beta, c.gamma, c.temperature)
        return logits, {"ce": self.ce(logits, target), "dist": dist}
