"""FitNet (Romero et al. 2015) with KD: per stage, a 1×1 conv regressor maps the student map to the teacher's
width, matched by MSE to the teacher map resized to the student's grid."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..models import StageModel
from .base import CrossEntropy, FeatureKD, register_method


@register_method
class FitNet(FeatureKD):
    name = "fitnet"
    display = "FitNet"
    reference = "fitnet"
    paper = "Romero, Ballas, Kahou, Chassang, Gatta, Bengio, FitNets: Hints for Thin Deep Nets, ICLR 2015"
    year = 2015
    search_space = {"alpha": {"loguniform": [0.1, 4.0]}, "beta": {"loguniform": [0.05, 20.0]}}

    def __init__(self, p: Any, ce: CrossEntropy, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(p, ce, student, teacher)
        self.regressors = nn.ModuleList(
            nn.Conv2d(student.stage_channels[s - 1], teacher.stage_channels[s - 1], 1) for s in self.stages)

    def stage_loss(self, level: int, feat_s: Tensor, feat_t: Tensor) -> Tensor:
        target = F.interpolate(feat_t.float(), size=feat_s.shape[-2:], mode="bilinear", antialias=True)
        return F.mse_loss(self.regressors[level](feat_s).float(), target)
