"""Contracts every registered method meets (the way timm's tests run over `list_models()`): it builds on every
heterogeneous family pair of docs/protocol.md#pairs (scaled down), gives finite loss terms, sends gradients to the
student and to every extra module, counts its extra parameters apart, and declares a valid default for every
parameter under each protocol and student family. Then the published defaults, UHKD's ablation switches, bad input."""
import dataclasses
import functools
import math

import pytest
import torch
from torch import nn

from uhkd.config import CHOICES, RunConfig, apply_overrides, build_config
from uhkd.errors import UserError
from uhkd.methods import Protocol, build_method, method_params, registered, teacher_use
from uhkd.methods.base import SCALARS, make_params, param_fields
from uhkd.models import create_stage_model, load_teacher

PAIRS = [  # (student, teacher): every family combination of docs/protocol.md#pairs (CIFAR-100 and ImageNet-1K)
    ("resnet18", "swin_tiny_patch4_window7_224"), ("resnet18", "vit_small_patch16_224"),
    ("resnet18", "mixer_b16_224"), ("mobilenetv2_100", "swin_tiny_patch4_window7_224"),
    ("mobilenetv2_100", "deit_tiny_patch16_224"), ("mobilenetv2_100", "mixer_b16_224"),
    ("deit_tiny_patch16_224", "convnext_tiny"), ("deit_tiny_patch16_224", "mixer_b16_224"),
    ("deit_tiny_patch16_224", "resnet50"), ("swin_pico_patch4_window7_224", "convnext_tiny"),
    ("swin_pico_patch4_window7_224", "mixer_b16_224"), ("swin_nano_patch4_window7_224", "resnet50"),
    ("resmlp_12_224", "convnext_tiny"), ("resmlp_12_224", "swin_tiny_patch4_window7_224"),
    ("resmlp_12_224", "resnet50"),
    ("resnet18", "resnet34"),  # the homogeneous check
]
METHODS = [cls.name for cls in registered()]
X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 7])


@functools.cache
def model(name, role):
    """One model per (name, role) per test module; distillers freeze teachers, students keep learning."""
    torch.manual_seed(0)
    return create_stage_model(name, num_classes=10, img_size=32, scale="tiny")


def config(method, student="resnet18", teacher="vit_small_patch16_224", **overrides):
    return build_config(None, {"method.name": method, "model.student": student, "model.teacher": teacher,
                               "model.scale": "tiny", "data.img_size": 32, "data.protocol": "cifar100",
                               **overrides})


def build(method, student="resnet18", teacher="vit_small_patch16_224", **overrides):
    torch.manual_seed(0)
    return build_method(config(method, student, teacher, **overrides), model(student, "student"),
                        model(teacher, "teacher"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("student,teacher", PAIRS)
def test_forward_backward_on_every_pair(student, teacher, method):
    distiller = build(method, student, teacher).train()
    distiller.zero_grad(set_to_none=True)
    logits, terms = distiller(X, Y, epoch=0)
    assert logits.shape == (2, 10) and tuple(terms) == type(distiller).terms
    loss = sum(terms.values())
    assert torch.isfinite(loss) and all(t.ndim == 0 for t in terms.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    extras = distiller.extra_parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in extras)
    assert distiller.extra_param_count() == sum(p.numel() for p in extras)
    own = {id(p) for p in distiller.student.parameters()}
    if distiller.teacher is not None:
        own |= {id(p) for p in distiller.teacher.parameters()}
        assert not distiller.teacher.training
        assert all(p.grad is None for p in distiller.teacher.parameters())
    assert not own & {id(p) for p in extras}
    assert set(distiller.trainable_state_dict()) == {k for k in distiller.state_dict() if not k.startswith("teacher.")}


@pytest.mark.parametrize("cls", registered(), ids=METHODS)
def test_every_method_declares_itself_completely(cls):
    """What the rest of the toolkit reads from the registry: a display name, its loss terms, typed parameters
    with a default valid under every protocol and student family, a search space over its own parameters."""
    assert cls.display and cls.paper and "ce" in cls.terms and len(set(cls.terms)) == len(cls.terms)
    fields = param_fields(cls)
    assert all(tp in SCALARS for tp, _ in fields.values())
    assert set(cls.search_space) <= set(fields)
    assert set(cls.learning_check.overrides) <= set(fields)
    assert cls.learning_check.measure in ("agreement", *cls.terms)
    for dataset in CHOICES["data.protocol"]:
        for family in ("cnn", "token"):
            protocol = Protocol(dataset, family)
            assert set(cls.protocol_defaults(protocol)) <= set(fields)
            params = make_params(cls, protocol, {})
            assert all(isinstance(getattr(params, name), tp) for name, (tp, _) in fields.items())


@pytest.mark.parametrize("method,protocol,student,expected", [  # the papers' / released configs' defaults
    ("kd", "cifar100", "resnet18", dict(alpha=1.0, temperature=1.0)),
    ("dkd", "cifar100", "resnet18", dict(alpha=1.0, beta=2.0, temperature=1.0, warmup_epochs=20)),
    ("dist", "cifar100", "resnet18", dict(beta=1.0, gamma=1.0, temperature=1.0)),
    ("fitnet", "cifar100", "resnet18", dict(alpha=1.0, beta=1.0, temperature=1.0)),
    ("uhkd", "cifar100", "resnet18", dict(alpha=1.0, beta=1.0, temperature=1.0, k=7, stages="1,2,3,4")),
    ("ofa", "cifar100", "resnet18", dict(gamma=1.0, branch_weight=0.1, temperature=1.0)),
    ("ofa", "cifar100", "deit_tiny_patch16_224", dict(gamma=1.0, branch_weight=1.0)),
    ("ofa", "imagenet", "resnet18", dict(gamma=1.5, branch_weight=1.0)),
    ("ofa", "other", "mobilenetv2_100", dict(gamma=1.0, branch_weight=1.0)),
    ("rsd", "imagenet", "deit_tiny_patch16_224", dict(weight=0.1, kappa=0.01, expansion=2)),
    ("pat", "cifar100", "resnet18", dict(alpha=1.0, beta=1.0, gamma=1.0, temperature=1.0, queries=64, width=512,
                                         heads=8, prompt_stages="1,2,3,4")),
])
def test_resolved_defaults(method, protocol, student, expected):
    params = method_params(config(method, student, **{"data.protocol": protocol}))
    assert {k: getattr(params, k) for k in expected} == expected


def test_defaults_follow_the_protocol_not_the_dataset_name():
    """A class-folder copy of CIFAR-100 run under the cifar100 protocol gets CIFAR-100's defaults."""
    folder = build_config("cifar100", {"method.name": "ofa", "model.student": "resnet18", "data.dataset": "folder"})
    assert folder.data.protocol == "cifar100" and method_params(folder).branch_weight == 0.1


def test_explicit_values_win_over_defaults():
    params = method_params(config("ofa", **{"method.ofa.gamma": 2.0, "method.ofa.temperature": 4.0}))
    assert (params.gamma, params.temperature, params.branch_weight) == (2.0, 4.0, 0.1)


def test_dkd_warmup_ramps_linearly():
    distiller = build("dkd").eval()
    with torch.no_grad():
        values = [distiller(X, Y, epoch=e)[1]["dkd"].item() for e in (0, 9, 19, 50)]
    assert values[0] == pytest.approx(values[2] / 20) and values[1] == pytest.approx(values[2] / 2)
    assert values[3] == pytest.approx(values[2])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "scratch"])
def test_one_hot_soft_targets_equal_class_indices(method):
    distiller = build(method).eval()
    with torch.no_grad():
        _, hard = distiller(X, Y)
        _, soft = distiller(X, torch.nn.functional.one_hot(Y, 10).float())
    assert all(torch.allclose(hard[k], soft[k], atol=1e-6) for k in hard)


def test_extra_modules_are_not_part_of_the_student():
    distiller = build("uhkd")
    student_ids = {id(p) for p in distiller.student.parameters()}
    assert not student_ids & {id(p) for p in distiller.extra_parameters()}
    assert distiller.student_param_count() == sum(p.numel() for p in distiller.student.parameters())
    assert distiller.extra_param_count() == sum(p.numel() for p in distiller.fam.parameters()) > 0
    state = distiller.trainable_state_dict()
    assert not any(k.startswith("teacher.") for k in state) and any(k.startswith("fam.") for k in state)
    clone = build("uhkd")
    clone.load_trainable_state_dict({k: torch.zeros_like(v) if k.startswith("fam.") else v for k, v in state.items()})
    assert all(torch.count_nonzero(p) == 0 for p in clone.fam.parameters())


@pytest.mark.parametrize("method,override,term", [
    ("fitnet", {"method.fitnet.beta": 0}, "feat"), ("uhkd", {"method.uhkd.beta": 0}, "feat"),
    ("ofa", {"method.ofa.branch_weight": 0}, "ofa_branches"),
])
def test_zero_weight_builds_no_extra_modules(method, override, term):
    """A module whose loss is switched off would sit unused (and stop DistributedDataParallel)."""
    distiller = build(method, **override)
    assert distiller.extra_param_count() == 0 and distiller.stages == ()
    assert distiller(X, Y)[1][term].item() == 0


def test_uhkd_frequency_block_size_per_stage():
    """ResNet18 student maps 8, 4, 2, 1 against ViT teacher maps 8: k_eff = min(k, H_t, W_t, H_s, W_s)."""
    assert build("uhkd").ks == [7, 4, 2, 1]
    assert build("uhkd", **{"method.uhkd.k": 3}).ks == [3, 3, 2, 1]


SWITCHES = [  # (override, `check` of what it names, terms equal to the default run's; the other terms change)
    ({"method.uhkd.alpha": 0}, lambda d, t: t["kl"].item() == 0, ("ce", "feat")),
    ({"method.uhkd.beta": 0}, lambda d, t: t["feat"].item() == 0 and len(d.fam) == 0, ("ce", "kl")),
    ({"method.uhkd.stages": "4"}, lambda d, t: d.stages == (4,) and len(d.fam) == 1, ("ce", "kl")),
    ({"method.uhkd.sra": False}, lambda d, t: all(f.sra is None for f in d.fam), ("ce", "kl")),
    ({"method.uhkd.sca": "conv_bn"}, lambda d, t: all(f.bn is not None for f in d.fam), ("ce", "kl")),
    ({"method.uhkd.spectrum": "none"}, lambda d, t: all(f.spectrum == "none" for f in d.ftm), ("ce", "kl")),
    ({"method.uhkd.k": 3}, lambda d, t: d.ks == [3, 3, 2, 1], ("ce", "kl")),
    ({"method.uhkd.band": "high"}, lambda d, t: all(f.band == "high" for f in d.ftm), ("ce", "kl")),
    ({"method.uhkd.stage_weights": "1,0,0,0"}, lambda d, t: d.stage_weights == (1, 0, 0, 0), ("ce", "kl")),
]


@pytest.mark.parametrize("override,check,unchanged", SWITCHES, ids=[str(s[0]) for s in SWITCHES])
def test_each_ablation_switch_changes_only_what_it_names(override, check, unchanged):
    base, switched = build("uhkd").train(), build("uhkd", **override).train()
    key = next(iter(override))
    changed = {f.name for f in dataclasses.fields(base.p) if getattr(base.p, f.name) != getattr(switched.p, f.name)}
    assert changed == {key.rsplit(".", 1)[1]}
    with torch.no_grad():
        _, terms_base = base(X, Y)
        _, terms = switched(X, Y)
    assert check(switched, terms)
    assert all(torch.equal(terms[k], terms_base[k]) == (k in unchanged) for k in terms)


def test_uhkd_without_kl_runs_on_a_pruned_teacher():
    cfg = config("uhkd", **{"method.uhkd.alpha": 0, "method.uhkd.stages": "1,2"})
    use = teacher_use(cfg)
    assert use == (True, (1, 2), False)
    teacher = load_teacher("vit_small_patch16_224", "", num_classes=10, img_size=32, scale="tiny",
                           stages=use.stages, needs_logits=use.logits)
    distiller = build_method(cfg, model("resnet18", "student"), teacher)
    _, terms = distiller(X, Y)
    assert terms["kl"].item() == 0 and torch.isfinite(terms["feat"]) and terms["feat"].item() > 0
    assert teacher_use(config("kd")) == (True, (), True)
    assert teacher_use(config("fitnet", **{"method.fitnet.beta": 0})) == (True, (), True)
    assert teacher_use(config("scratch")).needed is False


@pytest.mark.parametrize("overrides,teacher,match", [
    ({"method.name": "crd"}, True, r"unknown method 'crd' \(did you mean rsd\?\); valid choices: dist, dkd, "),
    ({"method.name": "kd"}, False, "method 'kd' needs a teacher"),
    ({"method.uhkd.alpha": -1.0}, True, "method.uhkd.alpha must be >= 0, got -1.0"),
    ({"method.uhkd.beta": math.inf}, True, "method.uhkd.beta must be a finite number, got inf"),
    ({"method.name": "dist", "method.dist.gamma": math.nan}, True, "method.dist.gamma must be a finite number, "
                                                                   "got nan"),
    ({"method.uhkd.stages": "1,5"}, True, "method.uhkd.stages must be distinct stage indices from 1, 2, 3, 4, got "
                                          "'1,5'"),
    ({"method.uhkd.stage_weights": "1,-1,1,1"}, True, "method.uhkd.stage_weights must be finite non-negative "
                                                      "numbers"),
    ({"method.uhkd.spectrum": "phase"}, True, "method.uhkd.spectrum 'phase'; valid choices: amplitude, complex, "),
])
def test_bad_method_input_is_one_line(overrides, teacher, match):
    with pytest.raises(UserError, match=match) as err:
        cfg = apply_overrides(RunConfig(), {"model.student": "resnet18", "model.scale": "tiny",
                                            "data.img_size": 32, **overrides})
        build_method(cfg, model("resnet18", "student"), model("vit_small_patch16_224", "teacher") if teacher else None)
    assert "\n" not in str(err.value)


def released_token_branch_params(stage, grid, channels, width, classes):
    """Parameters of one token-student exit branch of the released OFA-KD code, layer by layer: ⌊log2(grid/7)⌋
    patch merges (LayerNorm over 4·C, bias-free Linear 4·C → width), max(4 − stage, 1) timm blocks of the
    student's width (two LayerNorms, bias-free qkv, proj, MLP ratio 4), the Linear classifier."""
    total, cin = 0, channels
    for _ in range(max(int(math.log2(grid / 7)), 0)):
        total += 2 * 4 * cin + 4 * cin * width
        cin = width
    block = 2 * 2 * width + width * 3 * width + (width * width + width) + (width * 4 * width + 4 * width) \
        + (4 * width * width + width)
    return total + max(4 - stage, 1) * block + width * classes + classes


def released_cnn_branch_params(stage, channels, width, classes):
    """One CNN-student exit branch of the released code: (4 − stage) blocks of two depthwise-separable pairs
    (dw 3×3, pw 1×1, BN each), the width doubling and the last block ending at `width`; at stage 4 a 1×1 conv
    with bias; then the Linear classifier."""
    if stage == 4:
        total = channels * width + width
    else:
        total, cin = 0, channels
        for i in range(4 - stage):
            cout = width if i == 3 - stage else 2 * cin
            total += (9 * cin + cin * cin + 2 * cin) + (9 * cin + cin * cout + 2 * cout)
            cin *= 2
    return total + width * classes + classes


@pytest.mark.parametrize("teacher,student", [("convnext_tiny", "deit_tiny_patch16_224"),
                                             ("swin_tiny_patch4_window7_224", "resnet18")])
def test_ofa_branches_have_the_released_layout_at_224(teacher, student):
    """Real full-size timm models at 224, 100 classes: the branches' parameter count and per-stage structure are
    those of the released OFA-KD code (before this layout: 52,275,088 and 1,382,992 extra parameters)."""
    from uhkd.methods.ofa import DownsampleBlock

    torch.manual_seed(0)
    s = create_stage_model(student, num_classes=100, img_size=224)
    t = create_stage_model(teacher, num_classes=100, img_size=224)
    distiller = build_method(build_config("cifar100", {"method.name": "ofa", "model.student": student,
                                                       "model.teacher": teacher}), s, t)
    if s.kind == "cnn":
        width = max(s.num_features, t.num_features)
        expected = sum(released_cnn_branch_params(i, s.stage_channels[i - 1], width, 100) for i in (1, 2, 3, 4))
        assert distiller.extra_param_count() == expected == 1_626_256
        blocks = [[m for m in b if isinstance(m, DownsampleBlock)] for b in distiller.branches]
        assert [len(b) for b in blocks] == [3, 2, 1, 0]
        assert [[blk[5].out_channels for blk in b] for b in blocks] == [[128, 256, 768], [256, 768], [768], []]
        depthwise = [sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in blk) for b in blocks for blk in b]
        assert depthwise == [2] * 6  # two depthwise-separable pairs per down-sampling block
        assert distiller.branches[3][0].kernel_size == (1, 1) and distiller.branches[3][0].out_channels == 768
    else:
        assert s.has_class_token and s.stage_sizes == [(14, 14)] * 4
        expected = sum(released_token_branch_params(i, 14, 192, s.num_features, 100) for i in (1, 2, 3, 4))
        assert distiller.extra_param_count() == expected == 3_783_184
        assert [len(b.merge) for b in distiller.branches] == [1, 1, 1, 1]
        assert [len(b.blocks) for b in distiller.branches] == [3, 2, 1, 1]
        assert {(blk.attn.num_heads, blk.norm1.normalized_shape[0]) for b in distiller.branches for blk in b.blocks} \
            == {(4, 192)}
    linears = [m for m in distiller.branches.modules() if isinstance(m, nn.Linear)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears if m.bias is not None)
    assert abs(torch.cat([m.weight.flatten() for m in linears]).std().item() - 0.02) < 0.002  # trunc-normal 0.02
    for conv in (m for m in distiller.branches.modules() if isinstance(m, nn.Conv2d) and m.groups == 1):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)  # Kaiming, fan-out


def test_ofa_token_branch_reads_the_class_token():
    distiller = build("ofa", "deit_tiny_patch16_224", "convnext_tiny").eval()
    logits, feats, tokens = distiller.student.forward_with_class_tokens(X)
    branch = distiller.branches[0]
    with torch.no_grad():
        assert not torch.allclose(branch(feats[0], tokens[0]), branch(feats[0], tokens[0] + 1))
        assert torch.equal(logits, distiller.student(X)[0])
