"""FitNet (Romero et al. 2015) with KD: per stage, a 1×1 conv regressor maps the student map to the teacher's
width, matched by MSE to the teacher map resized to the student's grid."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MethodConfig
from ..models import StageModel
from ..registry import METHODS
from .base import FeatureKD


@METHODS.register("fitnet")
class FitNet(FeatureKD):
    def __init__(self, cfg: MethodConfig, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(cfg, student, teacher)
        self.regressors = nn.ModuleList(
            nn.Conv2d(student.stage_channels[s - 1], teacher.stage_channels[s - 1], 1) for s in self.stages)

    def stage_loss(self, level: int, feat_s: Tensor, feat_t: Tensor) -> Tensor:
        target = F.interpolate(feat_t.float(), size=feat_s.shape[-2:], mode="bilinear", antialias=True)
        return F.mse_loss(self.regressors[level](feat_s).float(), target)
