"""UHKD (SPEC §1.1): per matched stage, FTM on the teacher map and FAM on the student map, matched by MSE."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MethodConfig
from ..frequency import FAM, FTM
from ..models import StageModel
from ..registry import METHODS
from .base import FeatureKD


@METHODS.register("uhkd")
class UHKD(FeatureKD):
    def __init__(self, cfg: MethodConfig, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(cfg, student, teacher)
        self.ks = [min(cfg.k, *student.stage_sizes[s - 1], *teacher.stage_sizes[s - 1]) for s in self.stages]
        self.ftm = nn.ModuleList(FTM(k, cfg.spectrum, cfg.band) for k in self.ks)
        self.fam = nn.ModuleList(
            FAM(student.stage_channels[s - 1], teacher.stage_channels[s - 1], k, cfg.spectrum, cfg.band, cfg.sca,
                cfg.sra)
            for s, k in zip(self.stages, self.ks))

    def stage_loss(self, level: int, feat_s: Tensor, feat_t: Tensor) -> Tensor:
        return F.mse_loss(self.fam[level](feat_s).float(), self.ftm[level](feat_t))
