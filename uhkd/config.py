"""Typed configuration of one distillation run (= one sweep trial).

A run is a `RunConfig` of four sections. Every field has a flat dotted key (`optim.lr`, `seed`): the same key is
used by `--set key=value`, by the sweeps' search spaces and as the Parquet column name. A method's own parameters
live in its namespace, `method.<name>.<param>` (`method.dkd.beta`); their types, bounds and defaults are the
method's declarations (`uhkd.methods`). Presets are small YAML files in `uhkd/presets/` that override the defaults.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import yaml

from .errors import UserError, choice_error

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass
class ModelConfig:
    student: str = "resnet18"
    teacher: str = "vit_small_patch16_224"  # "" = no teacher (method `scratch`)
    teacher_checkpoint: str = ""  # local file; "" = none: a run that distils is refused unless random_teacher
    random_teacher: bool = False  # distil from a randomly initialised teacher when there is no checkpoint (quick)
    pretrained_file: str = ""  # local ImageNet weight file the student starts from (teacher fine-tuning, docs/protocol.md#recipes)
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
    augment: str = "cnn"  # cnn | vit | none  (docs/protocol.md#recipes)
    device_data: bool = True  # in-memory datasets: uint8 tensor on the training device, batched augmentation
    loader_workers: int = 4
    limit_train: int = 0  # 0 = all images; >0 keeps a seeded random N (tests, smoke runs)
    limit_eval: int = 0
    download: bool = False
    mean: str = ""  # per-channel statistics, comma lists in [0, 1] units; "" = the dataset's (computed for `folder`)
    std: str = ""
    protocol: str = "other"  # cifar100 | imagenet | other: the benchmark protocol whose method defaults apply


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
    """The method and the label term every method shares. `params` holds the values set for the running method's
    own parameters (`method.<name>.<param>`, by param name); the others take the method's defaults for the run's
    protocol (`uhkd.methods.method_params`)."""

    name: str = "uhkd"
    w_ce: float = 1.0
    label_smoothing: float = 0.1
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    seed: int = 0
    name: str = ""
    output_dir: str = ""  # where checkpoints go; "" = runs/<name>
    workers: int = 1  # training processes: 0 or 1 = in the calling process (no Ray Train), >= 2 = a Ray Train
    # TorchTrainer of that many workers (`in_process`)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    amp: str = "auto"  # auto (bf16 where supported on GPU, off on CPU) | bf16 | fp16 | off
    compile: str = "auto"  # torch.compile the training step: auto (on for CUDA, off on CPU) | on | cudagraphs | off
    threads: int = 0  # torch threads per worker; 0 = cpus_per_worker rounded up
    eval_teacher: bool = True
    max_failures: int = 2  # Ray Train worker-group restarts


RAY_TRAIN_MIN_WORKERS = 2


def in_process(workers: int) -> bool:
    """What `workers` means everywhere (`python -m uhkd.train --workers`, a sweep's `--workers-per-trial`, a preset's
    `workers`): 0 or 1 trains in the calling process, without Ray Train's start-up; 2 or more on a Ray Train
    `TorchTrainer` of that many workers. (`uhkd.train --ray-train` puts a one-worker run on Ray Train, for checks of
    that path on one GPU.)"""
    return workers < RAY_TRAIN_MIN_WORKERS


CHOICES: dict[str, tuple[str, ...]] = {
    "model.scale": ("full", "tiny"),
    "model.isotropic_blocks": ("uhkd", "ofa"),
    "data.split": ("tune", "final"),
    "data.augment": ("cnn", "vit", "none"),
    "data.protocol": ("cifar100", "imagenet", "other"),
    "optim.optimizer": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "step"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "compile": ("auto", "on", "cudagraphs", "off"),
}


def _leaf_types() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for top in fields(RunConfig):
        hint = get_type_hints(RunConfig)[top.name]
        if dataclasses.is_dataclass(hint):
            for sub in fields(hint):
                if sub.name != "params":
                    out[f"{top.name}.{sub.name}"] = get_type_hints(hint)[sub.name]
        else:
            out[top.name] = hint
    return out


LEAF_TYPES: dict[str, Any] = _leaf_types()  # every key but the methods' own parameters


def method_key(key: str) -> tuple[str, str] | None:
    """`method.<name>.<param>` -> (name, param); None for any other key."""
    parts = key.split(".")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "method" else None


def is_config_key(key: str) -> bool:
    """A key of `LEAF_TYPES` or of the form `method.<name>.<param>` (whether that method has it is for `coerce`)."""
    return key in LEAF_TYPES or method_key(key) is not None


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """All fields as `{dotted key: scalar}`: the hyperparameter columns, the method's parameters as
    `method.<name>.<param>`."""
    flat: dict[str, Any] = {}
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict):
            params = value.pop("params", {})
            flat.update({f"{key}.{k}": v for k, v in value.items()})
            flat.update({f"{key}.{value['name']}.{k}": v for k, v in params.items()})
        else:
            flat[key] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> RunConfig:
    return apply_overrides(RunConfig(), flat)


def unknown_key(key: str) -> UserError:
    """The error for a key no config field has: the keys of its section if that is one, else the sections. A bare
    `method.<param>` names the methods that have such a parameter."""
    from .methods import method_keys

    section = key.partition(".")[0] + "."
    same = [k for k in LEAF_TYPES if k.startswith(section)]
    if section == "method.":
        owners = method_keys(key.partition(".")[2])
        if owners:
            return UserError(f"unknown config key {key!r}: method parameters are set per method, as "
                             f"method.<name>.<param>: {', '.join(owners)}")
        same += ["method.<name>.<param>"]
    listed = same or sorted({k.partition(".")[0] + ".*" if "." in k else k for k in LEAF_TYPES})
    return choice_error("config key", key, [*LEAF_TYPES, *method_keys(key.rpartition(".")[2])], listed)


def check_key(key: str) -> None:
    """Raise the error for a key no config field and no registered method's parameter has."""
    if method_key(key):
        from .methods import method_param

        method_param(key)
    elif key not in LEAF_TYPES:
        raise unknown_key(key)


def coerce(key: str, value: Any) -> Any:
    """Convert `value` (possibly a string from the command line or YAML) to the type of field `key`."""
    if method_key(key):
        from .methods import coerce_method_param

        return coerce_method_param(key, value)
    if key not in LEAF_TYPES:
        raise unknown_key(key)
    from .methods.base import coerce_scalar

    return coerce_scalar(f"config key {key!r}", LEAF_TYPES[key], value)


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted-key overrides applied (values coerced to the field types). `method.name` goes
    first: a new method starts from its own defaults, and a parameter of any other method is an error."""
    cfg = dataclasses.replace(
        cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in fields(cfg)
                if dataclasses.is_dataclass(getattr(cfg, f.name))}
    )
    cfg.method.params = dict(cfg.method.params)
    if "method.name" in overrides:
        name = coerce("method.name", overrides["method.name"])
        if name != cfg.method.name:
            cfg.method.name, cfg.method.params = name, {}
    for key, value in overrides.items():
        if owner := method_key(key):
            value = coerce(key, value)
            if owner[0] != cfg.method.name:
                raise UserError(f"{key} sets a parameter of method {owner[0]!r}, but this run's method is "
                                f"{cfg.method.name!r}; set method.{cfg.method.name}.<param> or choose --method "
                                f"{owner[0]}")
            cfg.method.params[owner[1]] = value
            continue
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
        check_key(key)
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


def build_config(preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults <- preset <- the preset's recipe for the student's family (cnn / token) <- overrides.

    The family recipe is chosen after the overrides are known, so `--set model.student=deit_tiny_patch16_224`
    gets the ViT/MLP-student recipe (docs/protocol.md); explicit overrides always win. A preset's parameters of
    methods other than the run's do not apply; an override's do not either, and are an error.
    """
    from .models import model_family  # lazy: keeps config import light

    overrides = dict(overrides or {})
    raw = load_preset(preset) if preset else {}
    by_family = raw.pop("by_student_family", {}) or {}
    base = _flatten_mapping(raw)
    student = str(overrides.get("model.student", base.get("model.student", ModelConfig.student)))
    layers = {**base, **_flatten_mapping(by_family.get(model_family(student), {}) or {})}
    method = str(overrides.get("method.name", layers.get("method.name", MethodConfig.name)))
    layers = {k: v for k, v in layers.items() if method_key(k) is None or method_key(k)[0] == method}
    cfg = apply_overrides(RunConfig(), {**layers, **overrides})
    validate(cfg)
    return cfg


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def validate(cfg: RunConfig) -> None:
    """Config-level checks that need no model or data (names of models and datasets are checked where built): the
    choices and bounds of the fields, the method's name and its parameters."""
    from .methods import method_params

    flat = flatten(cfg)
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise choice_error(key, flat[key], choices)
    for key in ("method.w_ce", "method.label_smoothing", "optim.lr", "optim.weight_decay"):
        if not _finite_non_negative(flat[key]):
            raise UserError(f"{key} must be a finite non-negative number, got {flat[key]!r}")
    method_params(cfg)
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


def config_hash(cfg: RunConfig) -> str:
    """Stable short hash of everything that defines the run except its name and output location."""
    flat = {k: v for k, v in flatten(cfg).items() if k not in ("name", "output_dir")}
    return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]
