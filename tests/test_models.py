"""Shape contract of the stage models over every supported family, teachers, checkpoints, bad input."""
import functools

import pytest
import timm
import torch

from uhkd.errors import UserError
from uhkd.models import create_stage_model, load_teacher, model_family, model_kind, save_model_checkpoint

FAMILY_MODELS = {  # one model per family (docs/protocol.md#pairs names), scaled down
    "resnet18": "cnn", "mobilenetv2_100": "cnn", "convnext_tiny": "cnn", "vit_small_patch16_224": "vit",
    "deit_tiny_patch16_224": "vit", "swin_tiny_patch4_window7_224": "vit", "swin_pico_patch4_window7_224": "vit",
    "mixer_b16_224": "mlp", "resmlp_12_224": "mlp",
}
HIERARCHICAL = {"resnet18", "mobilenetv2_100", "convnext_tiny", "swin_tiny_patch4_window7_224",
                "swin_pico_patch4_window7_224"}


@functools.cache
def tiny(name, num_classes=10):
    torch.manual_seed(0)
    return create_stage_model(name, num_classes=num_classes, img_size=32, scale="tiny").eval()


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_stage_contract(name):
    model = tiny(name)
    x = torch.rand(2, 3, 32, 32)
    logits, feats = model(x)
    assert model.kind == FAMILY_MODELS[name] and model.name == name and model.num_classes == 10
    assert len(feats) == 4 and logits.shape == (2, 10)
    for f, c, r in zip(feats, model.stage_channels, model.stage_reductions):
        assert f.shape == (2, c, 32 // r, 32 // r)  # NCHW, prefix tokens dropped
    if name in HIERARCHICAL:
        assert model.stage_reductions == [model.stage_reductions[0] * 2 ** i for i in range(4)]
    else:
        assert len(set(model.stage_reductions)) == 1 and len(set(model.stage_channels)) == 1
    with torch.no_grad():
        own = model.net(model.normalize(x))
    assert torch.allclose(logits, own, atol=1e-5) and torch.allclose(model.forward_logits(x), own, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_stage_by_stage_forward_is_forward_intermediates(name):
    """An identity hook leaves `forward` (timm's `forward_intermediates`) unchanged; the hook sees the map entering
    each stage: the previous stage's output, or for Swin that output after the stage's patch merging."""
    model, x, seen = tiny(name), torch.rand(2, 3, 32, 32), {}

    def identity(stage, m):
        seen[stage] = m
        return m

    with torch.no_grad():
        logits, maps = model(x)
        staged_logits, staged_maps = model.forward_staged(x, identity)
    torch.testing.assert_close(staged_logits, logits)
    for staged, plain in zip(staged_maps, maps):
        torch.testing.assert_close(staged, plain)
    assert sorted(seen) == [1, 2, 3, 4] and [tuple(seen[s].shape[1:]) for s in (1, 2, 3, 4)] == model.stage_inputs
    for stage in (2, 3, 4):
        if name.startswith("swin"):
            merge = model.net.layers[stage - 1].downsample
            expected = merge(maps[stage - 2].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            expected = maps[stage - 2]
        torch.testing.assert_close(seen[stage], expected)


@pytest.mark.parametrize("name", ["resnet18", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_a_hook_changes_only_the_stages_after_it(name):
    model, x = tiny(name), torch.rand(2, 3, 32, 32)
    noise = torch.randn((2, *model.stage_inputs[2]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, maps = model(x)
        shifted_logits, shifted = model.forward_staged(x, lambda stage, m: m + noise if stage == 3 else m)
    torch.testing.assert_close(shifted[:2], maps[:2])
    assert all(not torch.allclose(a, b) for a, b in zip(shifted[2:], maps[2:]))
    assert not torch.allclose(shifted_logits, logits)


def test_pooled_embedding_is_the_classifiers_input():
    x = torch.rand(2, 3, 32, 32)
    resnet, deit = tiny("resnet18"), tiny("deit_tiny_patch16_224")
    with torch.no_grad():
        logits, embedding = resnet.forward_embedding(x)
        torch.testing.assert_close(embedding, resnet(x)[1][3].mean((2, 3)))  # global average pool of stage 4
        torch.testing.assert_close(logits, resnet.forward_logits(x))
        logits, embedding = deit.forward_embedding(x)
        torch.testing.assert_close(embedding, deit.net.forward_features(deit.normalize(x))[:, 0])  # class token
        torch.testing.assert_close(logits, deit.forward_logits(x))


def test_kinds_and_families():
    assert [model_kind(n) for n in ("resnet50", "swin_nano_patch4_window7_224", "resmlp_12_224")] == \
        ["cnn", "vit", "mlp"]
    assert model_family("convnext_tiny") == "cnn" and model_family("mixer_b16_224") == "token"


def test_inputs_are_normalised_with_each_models_own_statistics():
    vit, resnet = tiny("vit_small_patch16_224"), tiny("resnet18")
    assert vit.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert resnet.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    cifar = create_stage_model("resnet18", num_classes=10, img_size=32, scale="tiny",
                               mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
    assert cifar.std.flatten().tolist() == pytest.approx([0.2673, 0.2564, 0.2762])


def test_full_scale_stages_at_224():
    swin_p = create_stage_model("swin_pico_patch4_window7_224", num_classes=100)
    assert swin_p.stage_channels == [48, 96, 192, 384] and swin_p.stage_reductions == [4, 8, 16, 32]
    assert [len(layer.blocks) for layer in swin_p.net.layers] == [2, 2, 2, 2]
    assert [layer.blocks[0].attn.num_heads for layer in swin_p.net.layers] == [2, 4, 8, 16]
    assert timm.create_model("swin_nano_patch4_window7_224").embed_dim == 64
    resnet = create_stage_model("resnet18", num_classes=100)
    assert resnet.stage_channels == [64, 128, 256, 512] and resnet.stage_sizes == [(56, 56), (28, 28), (14, 14), (7, 7)]


@pytest.mark.parametrize("blocks,ends", [("uhkd", (3, 6, 9, 12)), ("ofa", (2, 4, 10, 12))])
def test_isotropic_stage_ends_are_block_outputs(blocks, ends):
    """Depth-12 DeiT: stage l is the output of block ends[l] (tokens of the grid, class token dropped)."""
    model = create_stage_model("deit_tiny_patch16_224", num_classes=10, img_size=32, isotropic_blocks=blocks).eval()
    x = torch.rand(1, 3, 32, 32)
    net = model.net
    with torch.no_grad():
        _, feats = model(x)
        h = net.norm_pre(net._pos_embed(net.patch_embed(model.normalize(x))))
        outputs = []
        for block in net.blocks:
            h = block(h)
            outputs.append(h[:, net.num_prefix_tokens:].transpose(1, 2).reshape(1, -1, 8, 8))
    for f, end in zip(feats, ends):
        assert torch.allclose(f, outputs[end - 1], atol=1e-5)


def test_tiny_isotropic_depth_scales_the_block_choice():
    """Depth 6 (tiny): 3,6,9,12 of 12 -> blocks 2,3,5,6 (rounded half up)."""
    model = tiny("vit_small_patch16_224")
    assert len(model.net.blocks) == 6 and model._take == [1, 2, 4, 5]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "teacher.pt"
    torch.manual_seed(1)
    model = create_stage_model("vit_small_patch16_224", num_classes=10, img_size=32, scale="tiny")
    save_model_checkpoint(path, model, epoch=3)
    return path, model.eval()


def test_teacher_is_frozen_loaded_and_stays_in_eval(teacher_file):
    path, source = teacher_file
    teacher = load_teacher("vit_small_patch16_224", str(path), num_classes=10, img_size=32, scale="tiny")
    assert all(not p.requires_grad for p in teacher.parameters())
    parent = torch.nn.Sequential(teacher).train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x)[0], source(x)[0], atol=1e-6)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    del parent


def test_teacher_without_logits_is_pruned_after_its_last_stage(teacher_file):
    path, source = teacher_file
    full = load_teacher("vit_small_patch16_224", str(path), num_classes=10, img_size=32, scale="tiny")
    pruned = load_teacher("vit_small_patch16_224", str(path), num_classes=10, img_size=32, scale="tiny",
                          stages=(1, 2), needs_logits=False)
    assert len(pruned.net.blocks) == 3 < len(full.net.blocks)  # stage 2 ends at block 3 of 6
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = pruned(x)
        _, full_feats = full(x)
    assert logits is None and len(feats) == 2
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(feats, full_feats))


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="resnet18"), "architecture 'vit_small_patch16_224', but this run needs 'resnet18'"),
    (dict(num_classes=100), "class count 10, but this run needs 100"),
    (dict(img_size=64), "img_size 32, but this run needs 64"),
])
def test_mismatching_checkpoint_is_refused(teacher_file, kwargs, match):
    path, _ = teacher_file
    args = dict(name="vit_small_patch16_224", checkpoint=str(path), num_classes=10, img_size=32, scale="tiny")
    with pytest.raises(UserError, match=match) as err:
        load_teacher(**{**args, **kwargs})
    assert "\n" not in str(err.value)


def test_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint file '/nonexistent.pt' not found"):
        load_teacher("resnet18", "/nonexistent.pt", num_classes=10, img_size=32)
    foreign = tmp_path / "timm.pth"
    torch.save(tiny("resnet18").net.state_dict(), foreign)
    with pytest.raises(UserError, match="not a uhkd model checkpoint"):
        load_teacher("resnet18", str(foreign), num_classes=10, img_size=32, scale="tiny")


def test_pretrained_file_loads_backbone_and_resets_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    imagenet = create_stage_model("resnet18", num_classes=1000, img_size=32, scale="tiny")
    path = tmp_path / "resnet18_in1k.pth"
    torch.save(imagenet.net.state_dict(), path)
    model = create_stage_model("resnet18", num_classes=10, img_size=32, scale="tiny", pretrained_file=str(path))
    assert model.net.fc.out_features == 10
    assert torch.equal(model.net.conv1.weight, imagenet.net.conv1.weight)
    assert torch.equal(model.net.layer4[0].conv2.weight, imagenet.net.layer4[0].conv2.weight)


@pytest.mark.parametrize("call,match", [
    (lambda: model_kind("resnetv2_50"),
     r"unsupported model 'resnetv2_50' \(did you mean resnet50 or .*\?\); supported families: resnet\*, "),
    (lambda: model_kind("vit_huge_nonexistent"), "unknown or unsupported model 'vit_huge_nonexistent'"),
    (lambda: create_stage_model("resnet18", num_classes=10, scale="small"),
     "model.scale 'small'; valid choices: full, tiny"),
    (lambda: create_stage_model("resnet18", num_classes=10, img_size=32, isotropic_blocks="mid"),
     "model.isotropic_blocks 'mid'; valid choices: ofa, uhkd"),
    (lambda: create_stage_model("resnet18", num_classes=10, pretrained_file="/no/such.pth"),
     "pretrained weight file '/no/such.pth' not found"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(UserError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
