"""Typed configuration of one distillation run (= one sweep trial).

A run is a `RunConfig` of four sections. Every field has a flat dotted key (`method.alpha`, `optim.lr`, `seed`):
the same key is used by `--set key=value`, by the sweeps' search spaces and as the Parquet column name.
Presets are small YAML files in `uhkd/presets/` that override the defaults below.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError, choice_error

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass
class ModelConfig:
    student: str = "resnet18"
    teacher: str = "vit_small_patch16_224"  # "" = no teacher (method `scratch`)
    teacher_checkpoint: str = ""  # local file; "" = none: a run that distils is refused unless random_teacher
    random_teacher: bool = False  # distil from a randomly initialised teacher when there is no checkpoint (quick)
    pretrained_file: str = ""  # local ImageNet weight file the student starts from (teacher fine-tuning, SPEC §3)
    scale: str = "full"  # full | tiny (scaled-down widths and depths for tests and the quick preset)
    isotropic_blocks: str = "uhkd"  # stage ends of 12-block isotropic models: uhkd = 3,6,9,12; ofa = 2,4,10,12
    channels_last: bool = True  # GPU only


@dataclass
class DataConfig:
    dataset: str = "cifar100"  # see uhkd.registry.DATASETS
    root: str = ""
    img_size: int = 224
    split: str = "final"  # tune = seeded 90/10 split of the training set; final = train/test
    val_fraction: float = 0.1
    batch_size: int = 128  # per worker
    augment: str = "cnn"  # cnn | vit | none  (SPEC §3 recipes)
    device_data: bool = True  # in-memory datasets: uint8 tensor on the training device, batched augmentation
    loader_workers: int = 4
    limit_train: int = 0  # 0 = all images; >0 keeps a seeded random N (tests, smoke runs)
    limit_eval: int = 0
    download: bool = False
    mean: str = ""  # per-channel statistics, comma lists in [0, 1] units; "" = the dataset's (computed for `folder`)
    std: str = ""


@dataclass
class OptimConfig:
    epochs: int = 300
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    min_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 2e-3
    schedule: str = "cosine"  # cosine | step
    step_epochs: int = 30
    step_gamma: float = 0.1
    warmup_epochs: int = 3
    clip_grad: float = 0.0  # 0 = off
    ema_decay: float = 0.0  # 0 = off
    effective_batch: int = 0  # images per optimizer update over all workers (the protocol's); 0 = not fixed
    accumulate: int = 0  # gradient accumulation steps; 0 = effective_batch / (batch_size x workers), else 1
    scale_lr: bool = False  # reach effective_batch by linear lr scaling instead of accumulation (batch_plan)
    max_steps_per_epoch: int = 0  # 0 = full epochs


@dataclass
class MethodConfig:
    """Loss hyperparameters. `None` means "the method's own default" (SPEC §2), resolved by the method."""

    name: str = "uhkd"
    w_ce: float = 1.0
    label_smoothing: float = 0.1
    alpha: Union[float, None] = None  # KL weight (kd, fitnet, uhkd), TCKD weight (dkd)
    beta: Union[float, None] = None  # feature weight (uhkd, fitnet), NCKD weight (dkd), inter-class (dist)
    gamma: Union[float, None] = None  # intra-class (dist), target exponent (ofa)
    temperature: Union[float, None] = None
    warmup_epochs: Union[int, None] = None  # dkd loss warm-up
    branch_weight: Union[float, None] = None  # ofa exit branches
    stages: str = "1,2,3,4"  # matched stages, any subset of 1..4
    stage_weights: str = ""  # comma list, one per stage; "" = 1/L each
    k: int = 7
    spectrum: str = "amplitude"  # amplitude | log_amplitude | complex | none
    band: str = "low"  # low | high | full
    sca: str = "linear"  # linear (projection of the cropped spectrum) | conv_bn (1x1 conv + BN on the full map)
    sra: bool = True


# Fields that mean different things to different methods (`None` = the method's own default, SPEC §2): a preset
# never sets them, so a value meant for one method cannot change another (e.g. OFA's gamma is DIST's intra weight).
PER_METHOD_KEYS: tuple[str, ...] = tuple(f"method.{f.name}" for f in fields(MethodConfig) if f.default is None)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    seed: int = 0
    name: str = ""
    output_dir: str = ""  # where checkpoints go; "" = runs/<name>
    workers: int = 1  # Ray Train workers; 0 = in-process (no Ray)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    amp: str = "auto"  # auto (bf16 where supported on GPU, off on CPU) | bf16 | fp16 | off
    compile: str = "auto"  # torch.compile the training step: auto (on for CUDA, off on CPU) | on | cudagraphs | off
    threads: int = 0  # torch threads per worker; 0 = cpus_per_worker rounded up
    eval_teacher: bool = True
    max_failures: int = 2  # Ray Train worker-group restarts


CHOICES: dict[str, tuple[str, ...]] = {
    "model.scale": ("full", "tiny"),
    "model.isotropic_blocks": ("uhkd", "ofa"),
    "data.split": ("tune", "final"),
    "data.augment": ("cnn", "vit", "none"),
    "optim.optimizer": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "step"),
    "method.spectrum": ("amplitude", "log_amplitude", "complex", "none"),
    "method.band": ("low", "high", "full"),
    "method.sca": ("linear", "conv_bn"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "compile": ("auto", "on", "cudagraphs", "off"),
}


def _scalar_type(tp: Any) -> type:
    """`float | None` -> float; plain types unchanged."""
    if get_origin(tp) is Union:
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def _leaf_types() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for top in fields(RunConfig):
        hint = get_type_hints(RunConfig)[top.name]
        if dataclasses.is_dataclass(hint):
            for sub in fields(hint):
                out[f"{top.name}.{sub.name}"] = get_type_hints(hint)[sub.name]
        else:
            out[top.name] = hint
    return out


LEAF_TYPES: dict[str, Any] = _leaf_types()


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """All fields as `{dotted key: scalar}` (the Parquet hyperparameter columns)."""
    flat: dict[str, Any] = {}
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> RunConfig:
    return apply_overrides(RunConfig(), flat)


def unknown_key(key: str) -> UserError:
    """The error for a key no config field has: the keys of its section if that is one, else the sections."""
    section = key.partition(".")[0] + "."
    same = [k for k in LEAF_TYPES if k.startswith(section)]
    listed = same or sorted({k.partition(".")[0] + ".*" if "." in k else k for k in LEAF_TYPES})
    return choice_error("config key", key, LEAF_TYPES, listed)


def coerce(key: str, value: Any) -> Any:
    """Convert `value` (possibly a string from the command line or YAML) to the type of field `key`."""
    if key not in LEAF_TYPES:
        raise unknown_key(key)
    tp = LEAF_TYPES[key]
    optional = get_origin(tp) is Union
    base = _scalar_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UserError(f"config key {key!r} needs a {base.__name__}, got None")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key {key!r} needs a {base.__name__}, got {value!r}") from None


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted-key overrides applied (values coerced to the field types)."""
    cfg = dataclasses.replace(
        cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in fields(cfg)
                if dataclasses.is_dataclass(getattr(cfg, f.name))}
    )
    for key, value in overrides.items():
        value = coerce(key, value)
        if "." in key:
            section, leaf = key.split(".", 1)
            setattr(getattr(cfg, section), leaf, value)
        else:
            setattr(cfg, key, value)
    return cfg


def parse_set(items: list[str]) -> dict[str, str]:
    """`["optim.lr=0.1", ...]` -> `{"optim.lr": "0.1"}`; unknown keys fail with the valid ones."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in LEAF_TYPES:
            raise unknown_key(key)
        out[key] = value
    return out


def _flatten_mapping(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(_flatten_mapping(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw preset mapping: run-config overrides, plus an optional `by_student_family` section."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise choice_error("preset", name, preset_names())
    return yaml.safe_load(path.read_text()) or {}


def _check_preset(name: str, base: Mapping[str, Any], by_family: Mapping[str, Any]) -> None:
    sections = [base, *(_flatten_mapping(v or {}) for v in by_family.values())]
    leaked = sorted({k for section in sections for k in section if k in PER_METHOD_KEYS})
    if leaked:
        raise UserError(f"preset {name!r} sets {', '.join(leaked)}, which each method reads in its own sense; "
                        f"leave them to the methods' defaults (uhkd/methods) or --set them for one run")


def build_config(preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults <- preset <- the preset's recipe for the student's family (cnn / token) <- overrides.

    The family recipe is chosen after the overrides are known, so `--set model.student=deit_tiny_patch16_224`
    gets the ViT/MLP-student recipe of SPEC §3; explicit overrides always win.
    """
    from .models import model_family  # lazy: keeps config import light

    overrides = dict(overrides or {})
    raw = load_preset(preset) if preset else {}
    by_family = raw.pop("by_student_family", {}) or {}
    base = _flatten_mapping(raw)
    if preset:
        _check_preset(preset, base, by_family)
    student = str(overrides.get("model.student", base.get("model.student", ModelConfig.student)))
    family = _flatten_mapping(by_family.get(model_family(student), {}) or {})
    cfg = apply_overrides(RunConfig(), {**base, **family, **overrides})
    validate(cfg)
    return cfg


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def validate(cfg: RunConfig) -> None:
    """Config-level checks that need no model or data (names of models/methods/datasets are checked where built)."""
    flat = flatten(cfg)
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise choice_error(key, flat[key], choices)
    for key in ("method.w_ce", "method.label_smoothing", "method.alpha", "method.beta", "method.gamma",
                "method.temperature", "method.branch_weight", "optim.lr", "optim.weight_decay"):
        value = flat[key]
        if value is not None and not _finite_non_negative(value):
            raise UserError(f"{key} must be a finite non-negative number, got {value!r}")
    if cfg.method.temperature is not None and cfg.method.temperature <= 0:
        raise UserError(f"method.temperature must be > 0, got {cfg.method.temperature!r}")
    stages = parse_stages(cfg.method.stages)
    weights = parse_stage_weights(cfg.method.stage_weights, len(stages))
    if not all(_finite_non_negative(w) for w in weights):
        raise UserError(f"method.stage_weights must be finite non-negative numbers, got {cfg.method.stage_weights!r}")
    if cfg.method.k < 1:
        raise UserError(f"method.k must be >= 1, got {cfg.method.k}")
    if not 0 < cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.workers < 0:
        raise UserError(f"workers must be >= 0, got {cfg.workers}")
    if cfg.optim.epochs < 1:
        raise UserError(f"optim.epochs must be >= 1, got {cfg.optim.epochs}")
    if cfg.data.batch_size < 1:
        raise UserError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    for key in ("optim.effective_batch", "optim.accumulate"):
        if flat[key] < 0:
            raise UserError(f"{key} must be >= 0, got {flat[key]}")
    batch_plan(cfg)


@dataclass(frozen=True)
class BatchPlan:
    """How a run reaches its effective batch on the workers it has (README "Protocol")."""

    batch_per_worker: int
    train_workers: int  # processes that train (1 in-process)
    accumulation: int  # micro-batches per optimizer update
    effective_batch: int  # images per update: batch_per_worker x train_workers x accumulation
    lr_scale: float  # applied to optim.lr and optim.min_lr: achieved / optim.effective_batch with scale_lr, else 1

    def columns(self, cfg: RunConfig) -> dict[str, Any]:
        """The results-row columns: the batch layout and the peak lr actually used."""
        return {"batch_per_worker": self.batch_per_worker, "train_workers": self.train_workers,
                "accumulation": self.accumulation, "effective_batch": self.effective_batch,
                "lr_used": cfg.optim.lr * self.lr_scale}


def batch_plan(cfg: RunConfig, world: int | None = None) -> BatchPlan:
    """The batch layout of `cfg` on `world` training processes (default: `workers`, 1 in-process).

    With `optim.effective_batch` set, accumulation reaches it: `accumulate` = effective / (batch x workers), which
    must divide; with `optim.scale_lr` the micro-batches stay as they are (`accumulate` or 1) and the lr schedule
    is scaled linearly by achieved / effective. Without it, `accumulate` (or 1) is used as is.
    """
    o, batch = cfg.optim, cfg.data.batch_size
    world = world or max(cfg.workers, 1)
    per_step = batch * world
    target = o.effective_batch
    if not target or o.scale_lr:
        steps = o.accumulate or 1
        scale = per_step * steps / target if target else 1.0
        return BatchPlan(batch, world, steps, per_step * steps, scale)
    steps = o.accumulate or target // per_step
    if per_step * steps != target:
        layout = (f"x optim.accumulate={o.accumulate} = {per_step * steps} images per update" if o.accumulate
                  else f"= {per_step} images per step")
        raise UserError(f"optim.effective_batch={target} cannot be reached with data.batch_size={batch} x "
                        f"{world} worker(s) {layout}; choose numbers that divide it, or set optim.scale_lr=true "
                        f"to scale the lr instead")
    return BatchPlan(batch, world, steps, target, 1.0)


def parse_stages(text: str) -> tuple[int, ...]:
    """"1,2,3,4" -> (1, 2, 3, 4); stages are 1-based stage indices in 1..4."""
    try:
        stages = tuple(int(s) for s in str(text).replace(" ", "").split(",") if s)
    except ValueError:
        raise UserError(f"method.stages must be a comma list of stage indices 1..4, got {text!r}") from None
    if not stages or any(s not in (1, 2, 3, 4) for s in stages) or len(set(stages)) != len(stages):
        raise UserError(f"method.stages must be distinct stage indices from 1, 2, 3, 4, got {text!r}")
    return tuple(sorted(stages))


def parse_stage_weights(text: str, n_stages: int) -> tuple[float, ...]:
    if not text:
        return tuple(1.0 / n_stages for _ in range(n_stages))
    try:
        weights = tuple(float(w) for w in str(text).split(","))
    except ValueError:
        raise UserError(f"method.stage_weights must be a comma list of numbers, got {text!r}") from None
    if len(weights) != n_stages:
        raise UserError(f"method.stage_weights has {len(weights)} values for {n_stages} stages: {text!r}")
    return weights


def config_hash(cfg: RunConfig) -> str:
    """Stable short hash of everything that defines the run except its name and output location."""
    flat = {k: v for k, v in flatten(cfg).items() if k not in ("name", "output_dir")}
    return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]
