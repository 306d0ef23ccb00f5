"""timm models that return logits and 4 NCHW stage feature maps, teachers, and our checkpoint files.

Every model is a real timm model; stage features come from its `forward_intermediates`. Which intermediates are the
4 stages is read from the model's `feature_info`: hierarchical models (all reductions not equal) use the last tap of
each of their last 4 resolutions; isotropic models (ViT, DeiT, Mixer, ResMLP) use UHKD's blocks
(docs/method.md#stage-taps), scaled to the model's depth. Shapes come from a dry forward.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet, _gen_mobilenet_v2
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, _create_mixer
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer, _create_swin_transformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .errors import UserError, choice_error, did_you_mean, one_line
from .hub import HUB

# timm's register_model appends the registered entry points to this list.
__all__ = ["FAMILIES", "StageHook", "StageModel", "check_checkpoint_file", "create_stage_model", "load_teacher",
           "model_family", "model_kind", "save_model_checkpoint"]

# Architecture families: name prefix -> kind. `swin` is a token model with a hierarchical (4-resolution) layout.
FAMILIES: dict[str, str] = {
    "resnet": "cnn", "mobilenetv2": "cnn", "convnext": "cnn",
    "vit": "vit", "deit": "vit", "swin": "vit",
    "mixer": "mlp", "resmlp": "mlp",
}
# Stage-end blocks of a 12-block isotropic model (1-based), docs/method.md#stage-taps.
ISOTROPIC_BLOCKS: dict[str, tuple[int, ...]] = {"uhkd": (3, 6, 9, 12), "ofa": (2, 4, 10, 12)}
SCALES = ("full", "tiny")
EXAMPLES = ("resnet18", "resnet50", "mobilenetv2_100", "convnext_tiny", "vit_small_patch16_224",
            "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "swin_pico_patch4_window7_224",
            "swin_nano_patch4_window7_224", "mixer_b16_224", "resmlp_12_224")
_FAMILY_RE = re.compile(r"^(%s)(?=\d|_)" % "|".join(sorted(FAMILIES, key=len, reverse=True)))

# Swin-P / Swin-N (docs/protocol.md#pairs) are not in timm: registered here as timm Swin variants.
default_cfgs = generate_default_cfgs({
    name: dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
               interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv="patch_embed.proj", classifier="head.fc")
    for name in ("swin_pico_patch4_window7_224", "swin_nano_patch4_window7_224")
})


@register_model
def swin_pico_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Swin-P: embed 48, depths 2-2-2-2, heads 2-4-8-16, window 7."""
    args = dict(patch_size=4, window_size=7, embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    return _create_swin_transformer("swin_pico_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def swin_nano_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Swin-N: embed 64, depths 2-2-2-2, heads 2-4-8-16, window 7."""
    args = dict(patch_size=4, window_size=7, embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    return _create_swin_transformer("swin_nano_patch4_window7_224", pretrained, **dict(args, **kwargs))


def _family(name: str) -> str:
    match = _FAMILY_RE.match(name)
    if match is None or not timm.is_model(name):
        families = ", ".join(f"{f}*" for f in FAMILIES)
        hint = did_you_mean(name, [m for m in timm.list_models() if _FAMILY_RE.match(m)])
        examples = "" if hint else f" (e.g. {', '.join(EXAMPLES)})"
        raise UserError(f"unknown or unsupported model {name!r}{hint}; supported families: {families}{examples}")
    return match.group(1)


def model_kind(name: str) -> str:
    """"cnn", "vit" or "mlp"; unknown or unsupported names raise `UserError`."""
    return FAMILIES[_family(name)]


def model_family(name: str) -> str:
    """"cnn" or "token" (ViT and MLP models): selects the training recipe (docs/protocol.md#recipes)."""
    return "cnn" if model_kind(name) == "cnn" else "token"


# Scaled-down widths/depths (scale="tiny"), per family; every family keeps its real timm class.
_TINY: dict[str, dict[str, Any]] = {
    "resnet": dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16),
    "convnext": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    "vit": dict(embed_dim=64, depth=6, num_heads=2),
    "deit": dict(embed_dim=64, depth=6, num_heads=2),
    "swin": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
    "mixer": dict(num_blocks=6, embed_dim=64),
    "resmlp": dict(num_blocks=6, embed_dim=64, mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine),
}


def _build_timm(name: str, family: str, *, num_classes: int, img_size: int, scale: str,
                pretrained_file: str) -> nn.Module:
    kwargs: dict[str, Any] = dict(num_classes=num_classes)
    if pretrained_file:  # "hub": timm fetches the default ImageNet weights from the Hugging Face hub (or its cache)
        kwargs.update(pretrained=True, **({} if pretrained_file == HUB else dict(
            pretrained_cfg_overlay=dict(file=pretrained_file))))
    tiny = scale == "tiny"
    small = img_size < 224  # e.g. 32 px: 16-px patches would leave a 2x2 token grid; ViT/DeiT use 4, Swin 2 (window 4)
    if FAMILIES[family] != "cnn":
        kwargs["img_size"] = img_size
    if family in ("vit", "deit") and small:
        kwargs["patch_size"] = 4
    if family == "swin" and small:
        kwargs.update(patch_size=2, window_size=4)
    if tiny:
        kwargs.update(_TINY.get(family, {}))
    # These entry points fix their architecture arguments, so scaled-down variants go through timm's own builders.
    if tiny and family == "mobilenetv2":
        return _gen_mobilenet_v2(name, 0.35, depth_multiplier=0.5, **kwargs)
    if tiny and family in ("mixer", "resmlp"):
        return _create_mixer(name, patch_size=4 if small else 16, **kwargs)
    return timm.create_model(name, **kwargs)


def _stage_indices(feature_info: Sequence[dict], isotropic_blocks: str) -> list[int]:
    """Indices (into `forward_intermediates`) of the 4 stage ends."""
    reductions = [f["reduction"] for f in feature_info]
    if len(set(reductions)) == 1:
        depth = len(reductions)
        return [max(1, int(b * depth / 12 + 0.5)) - 1 for b in ISOTROPIC_BLOCKS[isotropic_blocks]]
    last = {r: i for i, r in enumerate(reductions)}  # last tap of each resolution
    ends = sorted(last.values())
    if len(ends) < 4:
        raise UserError(f"model has {len(ends)} resolution stages, 4 are needed")
    return ends[-4:]


# hook(stage, x): the NCHW map about to enter stage 1..4 -> the map the model continues with
StageHook = Callable[[int, Tensor], Tensor]


class _Walk:
    """A timm model cut into the pieces its own `forward_intermediates` runs, in order: `stem`, `units`, `finish`
    (the final norm before `forward_head`). `taps[k]` is the unit whose output is stage k+1's map, `entries[k]` the
    unit before which stage k+1's hook runs. The entries are where the released PAT code puts its prompts (timm
    0.6's stage boundaries): ResNet before layer k (after the stem's max-pool), ConvNeXt before stage k (its
    down-sampling included), Swin after stage k's patch merging (timm 0.6 merged at the end of the previous stage),
    MobileNetV2 and the isotropic models (ViT, Mixer, ResMLP) before the first block after the previous stage's end.

    `layout` is the models' own between-unit format: "nchw", "nhwc" (Swin) or "nlc" (tokens; `prefix` leading
    tokens such as a class token are not part of the grid)."""

    def __init__(self, net: nn.Module, take: list[int]) -> None:
        self.layout, self.prefix, self.finish = "nchw", 0, nn.Identity()
        if isinstance(net, ResNet):  # feature index 0 is the stem before max-pooling, 1..4 the layers
            self.stem = lambda x: net.maxpool(net.act1(net.bn1(net.conv1(x))))
            self.units = [net.layer1, net.layer2, net.layer3, net.layer4]
            self.taps = self.entries = [i - 1 for i in take]
        elif isinstance(net, EfficientNet):  # feature index i ends after block stage_ends[i] - 1 (0 = the stem)
            self.stem, self.finish = lambda x: net.bn1(net.conv_stem(x)), lambda x: net.bn2(net.conv_head(x))
            self.units = list(net.blocks)
            self.taps = [net.stage_ends[i] - 1 for i in take]
            self.entries = [net.stage_ends[i - 1] for i in take]
        elif isinstance(net, ConvNeXt):
            self.stem, self.units, self.finish = net.stem, list(net.stages), net.norm_pre
            self.taps = self.entries = list(take)
        elif isinstance(net, SwinTransformer):
            self.stem, self.finish, self.layout = net.patch_embed, net.norm, "nhwc"
            self.units = [unit for stage in net.layers for unit in (stage.downsample, stage.blocks)]
            self.taps = self.entries = [2 * i + 1 for i in take]
        elif isinstance(net, (VisionTransformer, MlpMixer)):
            if isinstance(net, VisionTransformer):
                self.stem = lambda x: net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
                self.prefix, self.patches = net.num_prefix_tokens, net.patch_embed
            else:
                self.stem, self.patches = net.stem, net.stem
            self.units, self.finish, self.layout = list(net.blocks), net.norm, "nlc"
            self.taps = list(take)
            self.entries = [0] + [i + 1 for i in take[:-1]]
        else:
            raise TypeError(f"no stage-by-stage forward for {type(net).__name__}")

    def to_map(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.layout == "nhwc":
            return x.permute(0, 3, 1, 2).contiguous()
        if self.layout == "nlc":
            tokens = x[:, self.prefix:]
            return tokens.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
        return x

    def from_map(self, m: Tensor, like: Tensor) -> Tensor:
        """`m` (NCHW) back in the layout of `like`, with `like`'s prefix tokens in front."""
        if self.layout == "nhwc":
            return m.permute(0, 2, 3, 1).contiguous()
        if self.layout == "nlc":
            return torch.cat([like[:, :self.prefix], m.flatten(2).transpose(1, 2)], 1)
        return m


class StageModel(nn.Module):
    """A timm model on images in [0, 1]: `forward(x) -> (logits, [f1, f2, f3, f4])` with NCHW stage maps.

    Attributes (from a dry forward): `stage_channels`, `stage_reductions` (input size / map size), `stage_sizes`
    ((H, W) per stage), `stage_inputs` ((C, H, W) of the map entering each stage, see `forward_staged`),
    `num_features` (width before the classifier), `num_classes`, `name`, `kind`, `img_size`, `has_class_token`.
    """

    def __init__(self, net: nn.Module, name: str, *, img_size: int, scale: str, isotropic_blocks: str,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if isotropic_blocks not in ISOTROPIC_BLOCKS:
            raise choice_error("model.isotropic_blocks", isotropic_blocks, ISOTROPIC_BLOCKS)
        self.net = net
        self.name, self.kind, self.img_size, self.scale = name, model_kind(name), img_size, scale
        self.num_classes = net.num_classes
        self.num_features = net.num_features
        self.has_class_token = bool(getattr(net, "has_class_token", False))  # ViT/DeiT: the first prefix token
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self._set_stages(_stage_indices(net.feature_info, isotropic_blocks))
        self.frozen = False
        self.pruned_after: int | None = None  # last computed stage when layers after it were removed
        inputs: dict[int, tuple[int, ...]] = {}

        def record(stage: int, x: Tensor) -> Tensor:
            inputs[stage] = tuple(x.shape[1:])
            return x

        was_training = self.training
        self.eval()
        with torch.no_grad():
            _, feats = self.forward_staged(torch.zeros(1, 3, img_size, img_size), record)
        self.train(was_training)
        self.stage_inputs = [inputs[s] for s in (1, 2, 3, 4)]
        self.stage_channels = [f.shape[1] for f in feats]
        self.stage_sizes = [(f.shape[2], f.shape[3]) for f in feats]
        self.stage_reductions = [img_size // f.shape[2] for f in feats]

    def _set_stages(self, indices: list[int]) -> None:
        self._take = sorted(set(indices))  # forward_intermediates rejects repeats; small depths can map two stages to one block
        self._pick = [self._take.index(i) for i in indices]

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        x = self.normalize(x)
        if self.pruned_after is not None:  # head removed: features only
            inter = self.net.forward_intermediates(x, indices=self._take, intermediates_only=True, output_fmt="NCHW")
            return None, [inter[j] for j in self._pick]
        final, inter = self.net.forward_intermediates(x, indices=self._take, output_fmt="NCHW")
        return self.net.forward_head(final), [inter[j] for j in self._pick]

    def forward_staged(self, x: Tensor, hook: StageHook | None = None) -> tuple[Tensor, list[Tensor]]:
        """`forward`, stage by stage, calling `hook(stage, map)` on the NCHW map about to enter each stage (1..4)
        and continuing with the map it returns (prompts, PAT). The pieces are those `forward_intermediates` runs,
        so with a hook that returns its input this is `forward` (within float rounding). Not on a pruned model."""
        if self.pruned_after is not None:
            raise RuntimeError(f"{self.name} was pruned after stage {self.pruned_after}: no stage-by-stage forward")
        walk = _Walk(self.net, [self._take[j] for j in self._pick])
        grid = walk.patches.dynamic_feat_size(tuple(x.shape[-2:])) if walk.layout == "nlc" else None
        x = walk.stem(self.normalize(x))
        maps: dict[int, Tensor] = {}
        for i, unit in enumerate(walk.units):
            for k in (k for k, entry in enumerate(walk.entries) if entry == i and hook is not None):
                x = walk.from_map(hook(k + 1, walk.to_map(x, grid)), x)
            x = unit(x)
            maps.update((k, walk.to_map(x, grid)) for k, tap in enumerate(walk.taps) if tap == i)
        return self.net.forward_head(walk.finish(x)), [maps[k] for k in range(4)]

    def forward_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(logits, embedding)`: the pooled embedding is the classifier's input (timm's pre-logits: global pool,
        and for ViT/DeiT the normed class token, for ConvNeXt the head's norm); logits = classifier(embedding)."""
        if self.pruned_after is not None:
            raise RuntimeError(f"{self.name} was pruned after stage {self.pruned_after}: it has no classifier")
        embedding = self.net.forward_head(self.net.forward_features(self.normalize(x)), pre_logits=True)
        return self.net.get_classifier()(embedding), embedding

    def forward_with_class_tokens(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """`forward` plus each stage's class token (B, 1, C); only for models with one (`has_class_token`)."""
        final, inter = self.net.forward_intermediates(self.normalize(x), indices=self._take, output_fmt="NCHW",
                                                      return_prefix_tokens=True)
        maps, prefix = [inter[j][0] for j in self._pick], [inter[j][1][:, :1] for j in self._pick]
        return self.net.forward_head(final), maps, prefix

    def forward_logits(self, x: Tensor) -> Tensor:
        """Logits only (evaluation); equals the timm model's own forward on the normalised input."""
        if self.pruned_after is not None:
            raise RuntimeError(f"{self.name} was pruned after stage {self.pruned_after}: it has no classifier")
        return self.net(self.normalize(x))

    def freeze(self) -> "StageModel":
        """No gradients, and eval mode forever (a parent's `.train()` does not reach it)."""
        self.requires_grad_(False)
        self.frozen = True
        return self.train(False)

    def train(self, mode: bool = True) -> "StageModel":
        return super().train(mode and not self.frozen)

    def prune_after(self, stage: int) -> None:
        """Remove the layers (and the head) after stage `stage` (1..4); `forward` then returns no logits."""
        indices = [self._take[j] for j in self._pick[:stage]]
        self.net.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        self._set_stages(indices)
        self.pruned_after = stage


def check_checkpoint_file(path: str, what: str = "checkpoint file", load: bool = False) -> None:
    """A look before any worker starts: the file exists and its zip directory (torch's format) is whole, so a
    truncated or foreign file fails in one line here rather than in every trial; with `load`, it is also read once
    as the runs read it (weights only), which refuses a whole file that pickles anything but tensors and plain
    data."""
    if not Path(path).is_file():
        raise UserError(f"{what} {path!r} not found")
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{what} {path!r} is truncated or not a torch checkpoint ({one_line(err)})") from None
    if load:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for what it refuses to unpickle
            refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            reason = f"it pickles {refused.group(1)}" if refused else f"{type(err).__name__}: {one_line(err, 200)}"
            raise UserError(f"{what} {path!r} cannot be loaded with weights_only=True ({reason})") from None


def _read_checkpoint(path: str, name: str, num_classes: int, img_size: int, scale: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"checkpoint file {path!r} not found")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a foreign, truncated or damaged file
        raise UserError(f"checkpoint file {path!r} is not readable (truncated or corrupted?): "
                        f"{type(err).__name__}: {one_line(err)}") from None
    if not isinstance(ckpt, dict) or not {"arch", "num_classes", "state_dict"} <= set(ckpt):
        raise UserError(f"checkpoint file {path!r} is not a uhkd model checkpoint (a timm weight file goes to "
                        f"pretrained_file)")
    for what, found, wanted in (("architecture", ckpt["arch"], name), ("class count", ckpt["num_classes"], num_classes),
                                ("img_size", ckpt.get("img_size", img_size), img_size),
                                ("scale", ckpt.get("scale", scale), scale)):
        if found != wanted:
            raise UserError(f"checkpoint {path!r} has {what} {found!r}, but this run needs {wanted!r}")
    return ckpt


def create_stage_model(name: str, *, num_classes: int, img_size: int = 224, scale: str = "full",
                       isotropic_blocks: str = "uhkd", mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, checkpoint: str = "",
                       pretrained_file: str = "") -> StageModel:
    """A `StageModel` for timm model `name`.

    `checkpoint`: a file written by `save_model_checkpoint` (arch, class count, img_size and scale must match).
    `pretrained_file`: a local timm/ImageNet weight file, or "hub" for timm's default weights from the Hugging Face
    hub, loaded by timm with the classifier reset to `num_classes`.
    `mean`/`std` default to the checkpoint's, else the model's timm pretrained_cfg.
    """
    family = _family(name)
    if scale not in SCALES:
        raise choice_error("model.scale", scale, SCALES)
    if pretrained_file and pretrained_file != HUB and not Path(pretrained_file).is_file():
        raise UserError(f"pretrained weight file {pretrained_file!r} not found")
    ckpt = _read_checkpoint(checkpoint, name, num_classes, img_size, scale) if checkpoint else {}
    net = _build_timm(name, family, num_classes=num_classes, img_size=img_size, scale=scale,
                      pretrained_file=pretrained_file)
    if ckpt:
        net.load_state_dict(ckpt["state_dict"])
    cfg = net.pretrained_cfg
    mean = mean if mean is not None else ckpt.get("mean", cfg["mean"])
    std = std if std is not None else ckpt.get("std", cfg["std"])
    return StageModel(net, name, img_size=img_size, scale=scale, isotropic_blocks=isotropic_blocks,
                      mean=mean, std=std)


def save_model_checkpoint(path: str | Path, model: StageModel, **extra: Any) -> None:
    """Write `{"arch", "num_classes", "img_size", "scale", "mean", "std", "state_dict"}` (+ `extra`).

    `state_dict` is the plain timm model's, so the file also serves as a timm `checkpoint_path`.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": model.name, "num_classes": model.num_classes, "img_size": model.img_size,
                "scale": model.scale, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                "state_dict": model.net.state_dict(), **extra}, path)


def load_teacher(name: str, checkpoint: str, *, num_classes: int, img_size: int, scale: str = "full",
                 isotropic_blocks: str = "uhkd", stages: Sequence[int] = (1, 2, 3, 4),
                 needs_logits: bool = True) -> StageModel:
    """A frozen teacher that stays in eval mode. Without `needs_logits`, layers after the last of `stages` are
    pruned (and `forward` returns `(None, maps up to that stage)`). `checkpoint=""` = random init (tests only)."""
    teacher = create_stage_model(name, num_classes=num_classes, img_size=img_size, scale=scale,
                                 isotropic_blocks=isotropic_blocks, checkpoint=checkpoint).freeze()
    if not needs_logits and stages:
        teacher.prune_after(max(stages))
    return teacher
