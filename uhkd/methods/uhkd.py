"""UHKD (SPEC §1.1): per matched stage, FTM on the teacher map and FAM on the student map, matched by MSE."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MethodConfig
from ..errors import UserError
from ..frequency import FAM, FTM, band_fits, level_grid
from ..models import StageModel
from ..registry import METHODS
from .base import FeatureKD


@METHODS.register("uhkd")
class UHKD(FeatureKD):
    def __init__(self, cfg: MethodConfig, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(cfg, student, teacher)
        levels = {s: level_grid(cfg.k, student.stage_sizes[s - 1], teacher.stage_sizes[s - 1]) for s in self.stages}
        if cfg.spectrum != "none":
            self._keep_formable_levels(cfg, levels)
        self.ks = [levels[s][0] for s in self.stages]
        self.ftm = nn.ModuleList(FTM(levels[s][0], cfg.spectrum, cfg.band, levels[s][1], teacher.stage_sizes[s - 1])
                                 for s in self.stages)
        self.fam = nn.ModuleList(
            FAM(student.stage_channels[s - 1], teacher.stage_channels[s - 1], levels[s][0], cfg.spectrum, cfg.band,
                cfg.sca, cfg.sra, levels[s][1], student.stage_sizes[s - 1])
            for s in self.stages)

    def _keep_formable_levels(self, cfg: MethodConfig, levels: dict[int, tuple[int, tuple[int, int]]]) -> None:
        """Drop the stages where `band` cannot be formed (k_eff ≥ a side of the common grid), saying so in one line."""
        skipped = [s for s in self.stages if not band_fits(cfg.band, *levels[s])]
        if not skipped:
            return
        kept = [i for i, s in enumerate(self.stages) if s not in skipped]
        where = ", ".join(f"stage {s} (k_eff {k} on a {g[0]}x{g[1]} grid)" for s, (k, g) in levels.items()
                          if s in skipped)
        if not kept:
            raise UserError(f"method.band={cfg.band} cannot be formed at any matched stage with method.k={cfg.k}: "
                            f"k_eff >= the smaller map side at {where}; lower method.k or use band=low")
        print(f"uhkd: band={cfg.band} cannot be formed at {where}: k_eff >= the smaller map side, so "
              f"{'that stage is' if len(skipped) == 1 else 'those stages are'} not matched", flush=True)
        self.stage_weights = tuple(self.stage_weights[i] for i in kept)
        self.stages = tuple(self.stages[i] for i in kept)

    def stage_loss(self, level: int, feat_s: Tensor, feat_t: Tensor) -> Tensor:
        return F.mse_loss(self.fam[level](feat_s).float(), self.ftm[level](feat_t))
