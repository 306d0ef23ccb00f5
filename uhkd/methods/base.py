"""The base class of every method: a student, an optional frozen teacher, and the method's extra modules."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MethodConfig, RunConfig, parse_stage_weights, parse_stages
from ..errors import UserError
from ..losses import kd_loss
from ..models import StageModel


def hard_labels(target: Tensor) -> Tensor:
    """Class indices from indices (B,) or soft targets (B, C) such as mixup's: their argmax class."""
    return target.argmax(1) if target.ndim == 2 else target


class Distiller(nn.Module):
    """`forward(images, target, epoch) -> (student logits, {term: weighted loss})`; the trainer sums the terms.

    `images` are in [0, 1] (each model normalises its own input); `target` is class indices (B,) or soft targets
    (B, C); `epoch` is the 0-based index of the current epoch (DKD's warm-up).
    Every learnable module other than the student is an extra module (`extra_parameters()`): trained, counted
    apart, never exported with the student. The teacher is frozen and stays in eval mode.
    """

    terms: tuple[str, ...] = ("ce",)
    needs_teacher = True

    def __init__(self, cfg: MethodConfig, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise UserError(f"method {cfg.name!r} needs a teacher (model.teacher); only 'scratch' trains without one")
        self.cfg = cfg
        self.student = student
        self.teacher = teacher.freeze() if self.needs_teacher else None
        weights = parse_stage_weights(cfg.stage_weights, len(parse_stages(cfg.stages)))
        self.stages = self.matched_stages(cfg)  # the student stages that get extra modules
        self.stage_weights = weights if self.stages else ()

    @classmethod
    def defaults(cls, cfg: RunConfig) -> dict[str, Any]:
        """Values for the `None` fields of `cfg.method` that this method uses (SPEC §2)."""
        return {}

    @classmethod
    def matched_stages(cls, cfg: MethodConfig) -> tuple[int, ...]:
        """Student stages with an extra module; none when its loss weight is 0 (an unused module would also
        break DistributedDataParallel)."""
        return ()

    @classmethod
    def teacher_stages(cls, cfg: MethodConfig) -> tuple[int, ...]:
        """Teacher stage maps the method reads."""
        return ()

    @classmethod
    def uses_teacher_logits(cls, cfg: MethodConfig) -> bool:
        return cls.needs_teacher

    def ce(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.cfg.w_ce * F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        return self.teacher.forward_logits(images).float()

    @torch.no_grad()
    def teacher_forward(self, images: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        logits, feats = self.teacher(images)
        return (None if logits is None else logits.float()), feats

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for name, module in self.named_children() if name not in ("student", "teacher")
                for p in module.parameters()]

    def extra_param_count(self) -> int:
        return sum(p.numel() for p in self.extra_parameters())

    def student_param_count(self) -> int:
        return sum(p.numel() for p in self.student.parameters())

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Student and extra modules (what a resumed run needs); the frozen teacher is left out."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"state does not match the method: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self


class FeatureKD(Distiller):
    """CE + α·KD + β·Σ_l w_l·(loss of matched stage l): the frame of FitNet and UHKD. Subclasses build one module
    per matched stage in `__init__` and define `stage_loss`."""

    terms = ("ce", "kl", "feat")

    @classmethod
    def defaults(cls, cfg: RunConfig) -> dict[str, Any]:
        return dict(alpha=1.0, beta=1.0, temperature=1.0)

    @classmethod
    def matched_stages(cls, cfg: MethodConfig) -> tuple[int, ...]:
        return parse_stages(cfg.stages) if cfg.beta > 0 else ()

    @classmethod
    def teacher_stages(cls, cfg: MethodConfig) -> tuple[int, ...]:
        return cls.matched_stages(cfg)

    @classmethod
    def uses_teacher_logits(cls, cfg: MethodConfig) -> bool:
        return cfg.alpha > 0

    def stage_loss(self, level: int, feat_s: Tensor, feat_t: Tensor) -> Tensor:
        """Loss of the `level`-th matched stage (index into `self.stages`)."""
        raise NotImplementedError

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        logits, feats_s = self.student(images)
        logits_t, feats_t = self.teacher_forward(images)
        zero = logits.new_zeros((), dtype=torch.float32)
        kl = c.alpha * kd_loss(logits.float(), logits_t, c.temperature) if c.alpha > 0 else zero
        feat = c.beta * sum((w * self.stage_loss(level, feats_s[s - 1], feats_t[s - 1])
                             for level, (s, w) in enumerate(zip(self.stages, self.stage_weights))), zero)
        return logits, {"ce": self.ce(logits, target), "kl": kl, "feat": feat}
