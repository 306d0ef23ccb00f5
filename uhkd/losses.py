"""Logit losses of the baselines, in the conventions of docs/baselines.md#conventions.

p^τ = softmax(z / τ); sums over classes, means over the batch; `target` = class indices (B,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _kl(log_pt: Tensor, log_ps: Tensor) -> Tensor:
    """mean_b KL(p_t ‖ p_s) from log-probabilities over dim 1."""
    return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


def kd_loss(logits_s: Tensor, logits_t: Tensor, temperature: float) -> Tensor:
    """τ² · mean_b Σ_c p_t^τ (log p_t^τ − log p_s^τ)  (Hinton et al.)."""
    log_ps = F.log_softmax(logits_s / temperature, dim=1)
    log_pt = F.log_softmax(logits_t / temperature, dim=1)
    return temperature ** 2 * _kl(log_pt, log_ps)


def _binary_log_probs(log_p: Tensor, gt: Tensor) -> Tensor:
    """log [p_target, p_rest] per row, computed in log space so a confident model does not give log(0)."""
    log_target = log_p.masked_fill(~gt, float("-inf")).logsumexp(1)
    log_rest = log_p.masked_fill(gt, float("-inf")).logsumexp(1)
    return torch.stack([log_target, log_rest], dim=1)


def dkd_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: float) -> Tensor:
    """α·TCKD + β·NCKD (decoupled KD, Zhao et al. 2022): TCKD = τ²·mean_b KL(b_t ‖ b_s) on the binary
    target/non-target probabilities; NCKD = τ²·mean_b KL over the classes with the target pushed out by −1000."""
    gt = F.one_hot(target, logits_s.shape[1]).bool()
    log_ps = F.log_softmax(logits_s / temperature, dim=1)
    log_pt = F.log_softmax(logits_t / temperature, dim=1)
    log_bs, log_bt = _binary_log_probs(log_ps, gt), _binary_log_probs(log_pt, gt)
    tckd = _kl(log_bt, log_bs)
    mask = 1000.0 * gt
    log_qs = F.log_softmax(logits_s / temperature - mask, dim=1)
    log_qt = F.log_softmax(logits_t / temperature - mask, dim=1)
    nckd = _kl(log_qt, log_qs)
    return temperature ** 2 * (alpha * tckd + beta * nckd)


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    # + 1e-8 as released (not a clamp): a constant column gives 0, and a tiny norm product is damped the same way
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)


def dist_loss(logits_s: Tensor, logits_t: Tensor, beta: float, gamma: float, temperature: float) -> Tensor:
    """τ²·(β·inter + γ·intra) (DIST, Huang et al. 2022): inter = 1 − mean over samples of the Pearson correlation
    of the class distributions, intra = 1 − mean over classes of the correlation across the batch."""
    ps = F.softmax(logits_s / temperature, dim=1)
    pt = F.softmax(logits_t / temperature, dim=1)
    inter = 1 - _pearson(ps, pt, dim=1).mean()
    intra = 1 - _pearson(ps, pt, dim=0).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


def ofa_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, gamma: float, temperature: float) -> Tensor:
    """mean_b Σ_c −[(p_t^τ + g)^γ − g] · log p_s^τ (OFA-KD, Hao et al. 2023; g = one-hot target)."""
    gt = F.one_hot(target, logits_s.shape[1]).to(logits_t.dtype)
    log_ps = F.log_softmax(logits_s / temperature, dim=1)
    pt = F.softmax(logits_t / temperature, dim=1)
    return -(((pt + gt) ** gamma - gt) * log_ps).sum(1).mean()
