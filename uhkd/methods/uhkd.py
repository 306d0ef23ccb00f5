"""UHKD (docs/method.md): per matched stage, FTM on the teacher map and FAM on the student map, matched by MSE, plus
KL on the logits and cross-entropy on the labels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..frequency import BANDS, FAM, FTM, SCAS, SPECTRA, band_fits, level_grid
from ..models import StageModel
from .base import CrossEntropy, FeatureKD, param, register_method


@register_method
class UHKD(FeatureKD):
    name = "uhkd"
    display = "UHKD"
    reference = "uhkd"
    paper = "Yu, Pan, Zhang, Guan, Jiang, A Unified Framework for Heterogeneous Knowledge Distillation via " \
            "Frequency-Domain Representations, arXiv 2510.24116, 2025 (reconstructed: the code is unreleased)"
    year = 2025
    search_space = {"alpha": {"loguniform": [0.1, 4.0]}, "beta": {"loguniform": [0.05, 20.0]},
                    "temperature": {"choice": [1.0, 2.0, 4.0]},
                    "spectrum": {"choice": ["amplitude", "log_amplitude", "complex"]}}

    @dataclass(frozen=True)
    class Params(FeatureKD.Params):
        k: int = param(7, low=1, doc="side of the low-frequency block kept per level (k_eff = min(k, map sides))")
        spectrum: str = param("amplitude", choices=SPECTRA, doc="FTM's spectrum form; none = spatial MSE after "
                                                               "pooling to k×k (the 'w/o FTM' ablation)")
        band: str = param("low", choices=BANDS, doc="frequency band matched, in cycles per image on the level's "
                                                    "common grid")
        sca: str = param("linear", choices=SCAS, doc="SCA: linear = projection of the cropped spectrum; conv_bn = "
                                                     "1×1 conv + BN on the full map before the FFT")
        sra: bool = param(True, doc="SRA: the residual token-mixing MLP after SCA")

    def __init__(self, p: Any, ce: CrossEntropy, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(p, ce, student, teacher)
        levels = {s: level_grid(p.k, student.stage_sizes[s - 1], teacher.stage_sizes[s - 1]) for s in self.stages}
        if p.spectrum != "none":
            self._keep_formable_levels(p, levels)
        self.ks = [levels[s][0] for s in self.stages]
        self.ftm = nn.ModuleList(FTM(levels[s][0], p.spectrum, p.band, levels[s][1], teacher.stage_sizes[s - 1])
                                 for s in self.stages)
        self.fam = nn.ModuleList(
            FAM(student.stage_channels[s - 1], teacher.stage_channels[s - 1], levels[s][0], p.spectrum, p.band,
                p.sca, p.sra, levels[s][1], student.stage_sizes[s - 1])
            for s in self.stages)

    def _keep_formable_levels(self, p: Any, levels: dict[int, tuple[int, tuple[int, int]]]) -> None:
        """Drop the stages where `band` cannot be formed (k_eff ≥ a side of the common grid), saying so in one line."""
        skipped = [s for s in self.stages if not band_fits(p.band, *levels[s])]
        if not skipped:
            return
        kept = [i for i, s in enumerate(self.stages) if s not in skipped]
        where = ", ".join(f"stage {s} (k_eff {k} on a {g[0]}x{g[1]} grid)" for s, (k, g) in levels.items()
                          if s in skipped)
        if not kept:
            raise UserError(f"method.uhkd.band={p.band} cannot be formed at any matched stage with method.uhkd.k="
                            f"{p.k}: k_eff >= the smaller map side at {where}; lower method.uhkd.k or use band=low")
        print(f"uhkd: band={p.band} cannot be formed at {where}: k_eff >= the smaller map side, so "
              f"{'that stage is' if len(skipped) == 1 else 'those stages are'} not matched", flush=True)
        self.stage_weights = tuple(self.stage_weights[i] for i in kept)
        self.stages = tuple(self.stages[i] for i in kept)

    def stage_loss(self, level: int, feat_s: Tensor, feat_t: Tensor) -> Tensor:
        return F.mse_loss(self.fam[level](feat_s).float(), self.ftm[level](feat_t))
