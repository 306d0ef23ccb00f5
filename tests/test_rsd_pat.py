"""The 2025 heterogeneous baselines: RSD's loss against an independent NumPy formula, PAT's prompted teacher and
feedback, and both methods' extra parameters against the layouts of the released code at 224."""
import functools
import math

import numpy as np
import pytest
import torch

from uhkd.errors import UserError
from uhkd.methods.base import CrossEntropy
from uhkd.methods.pat import PAT, hcl_loss
from uhkd.methods.rsd import RSD, rsd_loss
from uhkd.models import create_stage_model

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 7, 3, 0])


@functools.cache
def tiny(name):
    torch.manual_seed(0)
    return create_stage_model(name, num_classes=10, img_size=32, scale="tiny")


def build(cls, student="resnet18", teacher="swin_tiny_patch4_window7_224", **params):
    torch.manual_seed(0)
    return cls(cls.Params(**params), CrossEntropy(), tiny(student), tiny(teacher))


# ---- RSD -------------------------------------------------------------------------------------------------------

def numpy_rsd(s, t, kappa):
    """The paper's loss in float64 NumPy: batch-standardised embeddings (biased std + 1e-5), C = T̂ᵀŜ / B,
    Σ_i (C_ii − 1)² + κ Σ_{i≠j} C_ij²."""
    zs = (s - s.mean(0)) / (s.std(0) + 1e-5)
    zt = (t - t.mean(0)) / (t.std(0) + 1e-5)
    c = zt.T @ zs / s.shape[0]
    off = c - np.diag(np.diag(c))
    return ((np.diag(c) - 1) ** 2).sum() + kappa * (off ** 2).sum()


def test_rsd_loss_and_gradients_match_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(8, 5)) * 3 + 1, rng.normal(size=(8, 5)) @ rng.normal(size=(5, 5))
    student = torch.tensor(s, requires_grad=True)
    loss = rsd_loss(student, torch.tensor(t), 0.01)
    assert loss.item() == pytest.approx(numpy_rsd(s, t, 0.01), rel=1e-10)
    loss.backward()
    numeric = np.zeros_like(s)  # central differences of the NumPy formula
    for index in np.ndindex(s.shape):
        step = np.zeros_like(s)
        step[index] = 1e-6
        numeric[index] = (numpy_rsd(s + step, t, 0.01) - numpy_rsd(s - step, t, 0.01)) / 2e-6
    np.testing.assert_allclose(student.grad.numpy(), numeric, rtol=1e-5, atol=1e-7)


def test_rsd_loss_is_zero_for_identical_whitened_embeddings():
    rng = np.random.default_rng(1)
    b, d = 16, 6
    q, _ = np.linalg.qr(np.concatenate([np.ones((b, 1)), rng.normal(size=(b, d))], 1))
    whitened = math.sqrt(b) * q[:, 1:]  # zero mean, unit biased std, uncorrelated columns
    x = torch.tensor(whitened * rng.uniform(0.5, 2.0, size=d) + rng.normal(size=d))  # any per-column affine map
    assert rsd_loss(x, x, 0.01).item() < 1e-8  # (1/(1 + 1e-5)² − 1)² per dimension
    assert rsd_loss(x, x[:, torch.randperm(d)], 0.01).item() > 1  # the same features, not the same dimensions


def test_rsd_reads_the_pooled_embeddings_and_has_no_kl():
    distiller = build(RSD).train()
    logits, terms = distiller(X, Y)
    assert set(terms) == {"ce", "rsd"}
    with torch.no_grad():
        embedding = distiller.student.forward_embedding(X)[1]
        embedding_t = distiller.teacher.forward_embedding(X)[1]
        expected = 0.1 * rsd_loss(distiller.projector(embedding), embedding_t, 0.01)
    torch.testing.assert_close(terms["rsd"], expected)
    linears = [m for m in distiller.projector if isinstance(m, torch.nn.Linear)]
    assert [m.bias for m in linears] == [None, None]
    assert [tuple(m.weight.shape) for m in linears] == [(256, 128), (128, 256)]  # d_s -> 2·d_s -> d_t
    assert build(RSD, weight=0.0).extra_param_count() == 0


# ---- PAT -------------------------------------------------------------------------------------------------------

def numpy_pool(x, level):
    """Adaptive average pooling of (B, C, H, W) to level×level: bin i spans ⌊iH/level⌋ .. ⌈(i+1)H/level⌉."""
    h = x.shape[2]
    bins = [(i * h // level, -(-(i + 1) * h // level)) for i in range(level)]
    return np.stack([np.stack([x[:, :, a:b, c:d].mean((2, 3)) for c, d in bins], -1) for a, b in bins], -2)


def test_hcl_loss_matches_numpy():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 3, 7, 7)), rng.normal(size=(2, 3, 7, 7))
    mse = [((numpy_pool(s, n) - numpy_pool(t, n)) ** 2).mean() for n in (4, 2, 1)]
    expected = (((s - t) ** 2).mean() + mse[0] / 2 + mse[1] / 4 + mse[2] / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    assert hcl_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(expected, rel=1e-12)
    small_s, small_t = s[:, :, :2, :2], t[:, :, :2, :2]  # a 2×2 map: only the 1×1 level is smaller
    expected = (((small_s - small_t) ** 2).mean() + ((small_s.mean((2, 3)) - small_t.mean((2, 3))) ** 2).mean() / 2)
    assert hcl_loss(torch.tensor(small_s), torch.tensor(small_t)).item() == pytest.approx(expected / 1.5, rel=1e-12)


@pytest.mark.parametrize("teacher", ["swin_tiny_patch4_window7_224", "vit_small_patch16_224", "mixer_b16_224",
                                     "resmlp_12_224", "convnext_tiny", "resnet50"])
def test_zero_prompts_leave_the_teacher_unchanged(teacher):
    distiller = build(PAT, "resnet18", teacher).train()
    with torch.no_grad():
        logits, maps = distiller.teacher(X)
        prompted_logits, prompted_maps = distiller._prompted_teacher(X)
        torch.testing.assert_close(prompted_logits, logits)
        for a, b in zip(prompted_maps, maps):
            torch.testing.assert_close(a, b)
        distiller.prompts["3"].scale.fill_(0.5)  # one prompt acts: the stages after it change, not those before
        prompted_logits, prompted_maps = distiller._prompted_teacher(X)
    torch.testing.assert_close(prompted_maps[:2], maps[:2])
    assert not torch.allclose(prompted_maps[2], maps[2]) and not torch.allclose(prompted_maps[3], maps[3])
    assert not torch.allclose(prompted_logits, logits) or not logits.any()  # timm's Mixer heads start at zero
    assert not distiller.teacher.training and all(not p.requires_grad for p in distiller.teacher.parameters())


def test_prompts_see_the_previous_steps_gap_and_train():
    """ResNet-50: its stage inputs and outputs differ, so each feedback prompt aligns the gap first. The first step
    has no gap yet (zero); from the second on, every prompt parameter learns."""
    distiller = build(PAT, "resnet18", "resnet50").train()
    for prompt in distiller.prompts.values():
        prompt.scale.data.fill_(0.5)
    distiller(X, Y)
    gaps = distiller._gaps
    assert [tuple(g.shape[1:]) for g in gaps] == [(c, *size) for c, size in zip(distiller.teacher.stage_channels,
                                                                              distiller.teacher.stage_sizes)]
    _, terms = distiller(X, Y)
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.prompts.parameters())
    gaps = distiller._gaps
    assert all(p.grad is None for p in distiller.teacher.parameters())
    with torch.no_grad():
        with_gap = distiller._prompted_teacher(X)[0]
        distiller._gaps = [torch.zeros_like(g) for g in gaps]
        without = distiller._prompted_teacher(X)[0]
        distiller._gaps = [g[:2] for g in gaps]  # another batch size: the stale gap is not used
        torch.testing.assert_close(distiller._prompted_teacher(X)[0], without)
    assert not torch.allclose(with_gap, without)


def test_pat_switches():
    kd_only = build(PAT, beta=0.0)
    assert kd_only.extra_param_count() == 0
    _, terms = kd_only(X, Y)
    assert terms["fd"].item() == terms["reg"].item() == 0.0 and terms["kl"].item() > 0
    raa_only = build(PAT, prompt_stages="")
    assert not hasattr(raa_only, "prompts") or len(raa_only.prompts) == 0
    _, terms = raa_only(X, Y)
    assert terms["reg"].item() == 0.0 and terms["fd"].item() > 0
    assert list(build(PAT, prompt_stages="2,4").prompts) == ["2", "4"]


@pytest.mark.parametrize("params,match", [(dict(queries=60), "queries must be 4 x a square number"),
                                          (dict(heads=7), "heads must divide width"),
                                          (dict(prompt_stages="0,5"), "stages")])
def test_bad_pat_params_are_one_line(params, match):
    with pytest.raises(UserError, match=match):
        PAT.Params(**params).check()


@pytest.mark.parametrize("cls", [RSD, PAT])
def test_losses_are_float32_under_autocast(cls):
    distiller = build(cls, "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = distiller(X, Y)
    assert {name: t.dtype for name, t in terms.items()} == {name: torch.float32 for name in cls.terms}


# ---- extra parameters at 224 against the released layouts ------------------------------------------------------

def conv(cin, cout, k, groups=1, bias=True):
    return cin // groups * cout * k * k + (cout if bias else 0)


def released_pat_params(student, teacher_out, teacher_in, token_teacher, queries=64, width=512):
    """PAT's extra parameters as the released code lays them out (distillers/pat.py), from the stage shapes
    (C, H, W) of the student, of the teacher's stage outputs and of the maps entering its stages."""
    per_stage = queries // 4
    grid = math.isqrt(per_stage)
    raa = sum(conv(c, width, math.ceil(h / grid)) for c, h, _ in student)  # patch embeddings
    raa += 2 * width + width * width + width + width * 2 * width + 2 * width  # LayerNorm, to_q, to_kv

    def project(source, target):  # ViT2ViT (token teachers) or ViT2CNN / CNN2CNN projectors
        (ci, hi, wi), (co, ho, wo) = source, target
        if token_teacher:
            return 2 * hi * wi + ci * co + co + 2 * co + hi * wi * ho * wo + ho * wo
        return 2 * ci + ci * co

    aligners = sum(project((width, grid, grid), out) for out in teacher_out)
    se = [conv(c, c // 16, 1) + conv(c // 16, c, 1) for c, _, _ in teacher_in]
    prompts = sum(conv(2 * c, c, 1) + conv(c, c, 5) + conv(c, c, 1) + s + conv(c, c, 1)  # fusion block
                  + conv(c, c, 1, 4) + conv(c, c, 5, c) + conv(c, c, 1) + s + conv(c, c, 1, 4)  # prompt block
                  + 1  # beta
                  + (project(out, inp) if out != inp else 0)  # feedback aligner
                  for (c, _, _), s, out, inp in zip(teacher_in, se, teacher_out, teacher_in))
    return raa + aligners + prompts


@functools.cache
def full(name):
    torch.manual_seed(0)
    return create_stage_model(name, num_classes=100, img_size=224)


RESNET18 = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
SWIN_T = [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]  # released prompts: after patch merging
CONVNEXT_T = [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]
CONVNEXT_T_IN = [(96, 56, 56), (96, 56, 56), (192, 28, 28), (384, 14, 14)]  # released prompts: before down-sampling
DEIT_T = [(192, 14, 14)] * 4


@pytest.mark.parametrize("teacher,student,rsd,pat", [
    ("swin_tiny_patch4_window7_224", "resnet18", (512, 768),
     released_pat_params(RESNET18, SWIN_T, SWIN_T, token_teacher=True)),
    ("convnext_tiny", "deit_tiny_patch16_224", (192, 768),
     released_pat_params(DEIT_T, CONVNEXT_T, CONVNEXT_T_IN, token_teacher=False)),
])
def test_extra_parameters_have_the_released_layouts_at_224(teacher, student, rsd, pat):
    """Full-size models, 100 classes. RSD: Linear(d_s, 2·d_s) + BatchNorm1d(2·d_s) + Linear(2·d_s, d_t), no biases.
    PAT: published ~14.5 M extra parameters for ConvNeXt-T -> DeiT-T; Swin-T's wider prompts (full 5×5 fusion
    convolutions up to 768 channels) make Swin-T -> ResNet18 38.5 M."""
    s, t = full(student), full(teacher)
    d_s, d_t = rsd
    assert RSD(RSD.Params(), CrossEntropy(), s, t).extra_param_count() == d_s * 2 * d_s + 2 * 2 * d_s + 2 * d_s * d_t
    distiller = PAT(PAT.Params(), CrossEntropy(), s, t)
    assert distiller.extra_param_count() == pat
    assert pat == (38_521_997 if teacher.startswith("swin") else 14_475_236)
