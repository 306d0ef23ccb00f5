"""Golden values of the logit losses against independent float64 numpy loops written from the formulas of
docs/baselines.md#conventions."""
import math

import numpy as np
import pytest
import torch

from uhkd.losses import dist_loss, dkd_loss, kd_loss, ofa_loss

B, C = 4, 6
_gen = torch.Generator().manual_seed(7)
ZS = torch.randn(B, C, generator=_gen, dtype=torch.float64) * 2
ZT = torch.randn(B, C, generator=_gen, dtype=torch.float64) * 3
Y = torch.tensor([0, 5, 2, 2])


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def np_kd(zs, zt, t):
    return t * t * np.mean([kl(softmax(b, t), softmax(a, t)) for a, b in zip(zs.tolist(), zt.tolist())])


def np_dkd(zs, zt, y, alpha, beta, t):
    tckd, nckd = [], []
    for a, b, g in zip(zs.tolist(), zt.tolist(), y.tolist()):
        ps, pt = softmax(a, t), softmax(b, t)
        tckd.append(kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]]))
        # NCKD: a distribution over the non-target classes only (the -1000 shift removes the target)
        qs = softmax([v for c, v in enumerate(a) if c != g], t)
        qt = softmax([v for c, v in enumerate(b) if c != g], t)
        nckd.append(kl(qt, qs))
    return t * t * (alpha * np.mean(tckd) + beta * np.mean(nckd))


def np_pearson(a, b):
    """Pearson correlation with the released DIST guard: centred dot product / (|a|·|b| + 1e-8)."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()) + 1e-8))


def np_dist(zs, zt, beta, gamma, t):
    ps = np.array([softmax(r, t) for r in zs.tolist()])
    pt = np.array([softmax(r, t) for r in zt.tolist()])
    inter = 1 - np.mean([np_pearson(ps[b], pt[b]) for b in range(len(ps))])
    intra = 1 - np.mean([np_pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return t * t * (beta * inter + gamma * intra)


def np_ofa(zs, zt, y, gamma, t):
    """docs/baselines.md#conventions written per class:
    −[(1+p_t,ŷ)^γ − 1]·log p_s,ŷ − Σ_{c≠ŷ} p_t,c^γ · log p_s,c."""
    total = []
    for a, b, g in zip(zs.tolist(), zt.tolist(), y.tolist()):
        ps, pt = softmax(a, t), softmax(b, t)
        loss = -((1 + pt[g]) ** gamma - 1) * math.log(ps[g])
        loss -= sum(pt[c] ** gamma * math.log(ps[c]) for c in range(len(a)) if c != g)
        total.append(loss)
    return np.mean(total)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_golden(t):
    assert kd_loss(ZS, ZT, t).item() == pytest.approx(np_kd(ZS, ZT, t), rel=1e-9)


@pytest.mark.parametrize("alpha,beta,t", [(1.0, 2.0, 1.0), (0.5, 8.0, 4.0)])
def test_dkd_golden(alpha, beta, t):
    assert dkd_loss(ZS, ZT, Y, alpha, beta, t).item() == pytest.approx(np_dkd(ZS, ZT, Y, alpha, beta, t), rel=1e-7)


@pytest.mark.parametrize("beta,gamma,t", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_golden(beta, gamma, t):
    assert dist_loss(ZS, ZT, beta, gamma, t).item() == pytest.approx(np_dist(ZS, ZT, beta, gamma, t), rel=1e-7)


@pytest.mark.parametrize("gamma,t", [(1.0, 1.0), (1.5, 1.0), (1.5, 2.0)])
def test_ofa_golden(gamma, t):
    assert ofa_loss(ZS, ZT, Y, gamma, t).item() == pytest.approx(np_ofa(ZS, ZT, Y, gamma, t), rel=1e-9)


def test_dist_pearson_guard_is_the_released_one():
    """Nearly equal logits across a batch give class columns of tiny spread (|a|·|b| ~ 1e-8): the released
    `/(|a|·|b| + 1e-8)` damps their correlation where a clamp at 1e-8 would not; a constant column correlates 0."""
    gen = torch.Generator().manual_seed(3)
    zs = 3e-4 * torch.randn(8, 3, generator=gen, dtype=torch.float64)
    zt = 3e-4 * torch.randn(8, 3, generator=gen, dtype=torch.float64)
    ps, pt = torch.softmax(zs, 1).numpy(), torch.softmax(zt, 1).numpy()
    released = 1 - np.mean([np_pearson(ps[:, c], pt[:, c]) for c in range(3)])
    assert dist_loss(zs, zt, 0.0, 1.0, 1.0).item() == pytest.approx(released, rel=1e-9)
    a, b = ps - ps.mean(0), pt - pt.mean(0)
    norms = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    clamped = 1 - np.mean((a * b).sum(0) / np.maximum(norms, 1e-8))
    assert 1e-9 < norms.min() and norms.max() < 1e-7 and abs(clamped - released) > 0.05
    constant = torch.zeros(2, 3, dtype=torch.float64)
    assert dist_loss(constant, constant, 0.0, 1.0, 1.0).item() == pytest.approx(1.0)  # every column constant: ρ = 0


def test_hand_computed_values():
    """Two classes, values worked out by hand."""
    zs = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    zt = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    expected_kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(zs, zt, 1.0).item() == pytest.approx(expected_kl)
    # gamma = 1: soft-target cross-entropy −Σ p_t log p_s = log 2
    assert ofa_loss(zs, zt, torch.tensor([0]), 1.0, 1.0).item() == pytest.approx(math.log(2))
    # gamma = 2, target 0: −[(7/4)² − 1]·log ½ − (1/4)²·log ½
    assert ofa_loss(zs, zt, torch.tensor([0]), 2.0, 1.0).item() == pytest.approx((33 / 16 + 1 / 16) * math.log(2))


def test_identical_logits_give_zero():
    assert kd_loss(ZT, ZT, 2.0).item() == pytest.approx(0, abs=1e-12)
    assert dkd_loss(ZT, ZT, Y, 1.0, 2.0, 2.0).item() == pytest.approx(0, abs=1e-12)
    # the released + 1e-8 leaves 1e-8 / (|a|·|b|) ≈ 1e-6 here
    assert dist_loss(ZT, ZT, 1.0, 1.0, 1.0).item() == pytest.approx(0, abs=1e-5)


def test_confident_models_stay_finite():
    """Large logits: the binary target probabilities of DKD are taken in log space (no log(0))."""
    zs = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)
    zt = torch.tensor([[-60.0, 60.0, 0.0]])
    loss = dkd_loss(zs, zt, torch.tensor([0]), 1.0, 2.0, 1.0) + ofa_loss(zs, zt, torch.tensor([1]), 1.5, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
