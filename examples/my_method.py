"""An example plugin: your own distillation method in one file, run under the toolkit's protocol without forking.

Logit-standardised KD (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024): KD's KL term on
z-scored logits, so the student matches the shape of the teacher's logits rather than their scale.

    python -m uhkd.train --plugin examples/my_method.py --method zkd --preset quick --workers 0
    python sweeps/hetero_pairs.py --plugin examples/my_method.py --method zkd        # searches its declared space
    python sweeps/reproduce_tables.py --plugin examples/my_method.py --methods scratch,kd,zkd

Everything the toolkit needs is declared on the class: its parameters (`--set method.zkd.temperature=3`), loss
terms, search space, table header; the registry-driven tests (tests/test_methods.py, tests/test_learning.py) check
a method like this one as they check the built-in ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from uhkd.losses import kd_loss
from uhkd.methods import Distiller, param, register_method


def standardise(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Each row's logits minus their mean, over their standard deviation."""
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


@register_method
class ZScoreKD(Distiller):
    name = "zkd"
    display = "KD (z-score)"
    paper = "Sun, Ren, Li, Wang, Cao, Logit Standardization in Knowledge Distillation, CVPR 2024"
    code = "https://github.com/sunshangquan/logit-standardization-KD"
    year = 2024
    terms = ("ce", "kl")
    search_space = {"alpha": {"loguniform": [0.5, 20.0]}, "temperature": {"choice": [1.0, 2.0, 3.0]}}

    @dataclass(frozen=True)
    class Params:
        alpha: float = param(9.0, low=0, doc="weight of the KL term (the paper's CIFAR-100 setting)")
        temperature: float = param(2.0, low=0, low_open=True, doc="base temperature of the standardised logits")

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student.forward_logits(images)
        with torch.no_grad():
            teacher = standardise(self.teacher_logits(images))
        kl = kd_loss(standardise(logits.float()), teacher, self.p.temperature)
        return logits, {"ce": self.ce(logits, target), "kl": self.p.alpha * kl}
