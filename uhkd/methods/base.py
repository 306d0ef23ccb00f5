"""What every method is made of: a `Distiller` subclass that declares itself — typed parameters, protocol defaults,
loss terms, what it reads from the teacher, its search space, its display name and reference key — in its own file.

The rest of the toolkit (config validation, `--help`, sweeps, tables, tests) reads these declarations from the
method registry (`uhkd.registry.METHODS`), so adding a method is adding one file (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, NamedTuple, get_type_hints

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError, choice_error
from ..losses import kd_loss
from ..models import StageModel
from ..registry import METHODS

SCALARS = (bool, int, float, str)
DOMAINS = ("loguniform", "uniform", "randint", "choice")


def param(default: Any, *, choices: tuple | None = None, low: float | None = None, high: float | None = None,
          low_open: bool = False, doc: str = "") -> Any:
    """A method parameter: a dataclass field whose metadata bounds its values (`low` <= value <= `high`, `low_open`:
    strictly above `low`; or one of `choices`) and says what it means (`doc`, for `--help` and the docs)."""
    return field(default=default, metadata={"choices": choices, "low": low, "high": high, "low_open": low_open,
                                            "doc": doc})


@dataclass(frozen=True)
class Protocol:
    """What a method's defaults may depend on: the benchmark protocol (`data.protocol`: cifar100, imagenet, other)
    and the student's family (`cnn` or `token`, `uhkd.models.model_family`)."""

    dataset: str
    family: str



@dataclass(frozen=True)
class LearningCheck:
    """How the registry's learning test measures that a method transfers something from the teacher: `agreement`
    (top-1 agreement of the student with the teacher's predictions) or the name of one of the method's own loss
    terms (its feature distance, lower is closer). `overrides`: parameter values for the check only, e.g. a
    shorter warm-up."""

    measure: str = "agreement"
    overrides: Mapping[str, Any] = field(default_factory=dict)


class TeacherUse(NamedTuple):
    needed: bool  # False: the method trains without a teacher
    stages: tuple[int, ...]  # teacher stage maps the method reads (() = logits only)
    logits: bool  # whether the method reads the teacher's logits


@dataclass(frozen=True)
class CrossEntropy:
    """The label term every method shares: `weight` x label-smoothed cross-entropy (`method.w_ce`,
    `method.label_smoothing`)."""

    weight: float = 1.0
    label_smoothing: float = 0.1

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.weight * F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


def hard_labels(target: Tensor) -> Tensor:
    """Class indices from indices (B,) or soft targets (B, C) such as mixup's: their argmax class."""
    return target.argmax(1) if target.ndim == 2 else target


class Distiller(nn.Module):
    """`forward(images, target, epoch) -> (student logits, {term: weighted loss})`; the trainer sums the terms.

    `images` are in [0, 1] (each model normalises its own input); `target` is class indices (B,) or soft targets
    (B, C); `epoch` is the 0-based index of the current epoch (DKD's warm-up). Every learnable module other than
    the student and the teacher is an extra module (`extra_parameters()`): trained, counted apart, never exported
    with the student. The teacher is frozen and stays in eval mode.
    """

    name: ClassVar[str]  # registry key: `method.name`, `--method`
    display: ClassVar[str]  # table column header
    reference: ClassVar[str] = ""  # its `method` key in uhkd/reference/published_results.csv ("" = none)
    paper: ClassVar[str] = ""  # the citation
    code: ClassVar[str] = ""  # the authors' released code
    year: ClassVar[int] = 0  # publication year: the registry lists methods by (year, name)
    terms: ClassVar[tuple[str, ...]] = ("ce",)
    needs_teacher: ClassVar[bool] = True
    search_space: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # param -> {loguniform: [lo, hi]} | ... (hetero_pairs)
    learning_check: ClassVar[LearningCheck] = LearningCheck()

    @dataclass(frozen=True)
    class Params:
        """The method's own parameters (`--set method.<name>.<param>=...`, each a `param(...)` field of type bool,
        int, float or str); subclasses declare theirs. An optional `check(self)` validates across fields: it raises
        `UserError` with one line that starts with the parameter's name (reported as `method.<name>.<line>`)."""

    def __init__(self, p: Any, ce: CrossEntropy, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise UserError(f"method {self.name!r} needs a teacher (model.teacher); only methods that train without "
                            f"one (e.g. 'scratch') can run without")
        self.p, self.ce = p, ce
        self.student = student
        self.teacher = teacher.freeze() if self.needs_teacher else None

    @classmethod
    def protocol_defaults(cls, protocol: Protocol) -> dict[str, Any]:
        """Parameter values that differ from the `Params` defaults under `protocol`."""
        return {}

    @classmethod
    def teacher_use(cls, p: Any) -> TeacherUse:
        """What the method reads from the teacher with parameters `p` (unused layers are pruned)."""
        return TeacherUse(cls.needs_teacher, (), cls.needs_teacher)

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        return self.teacher.forward_logits(images).float()

    @torch.no_grad()
    def teacher_forward(self, images: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        logits, feats = self.teacher(images)
        return (None if logits is None else logits.float()), feats

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for name, module in self.named_children() if name not in ("student", "teacher")
                for p in module.parameters()]

    def extra_param_count(self) -> int:
        return sum(p.numel() for p in self.extra_parameters())

    def student_param_count(self) -> int:
        return sum(p.numel() for p in self.student.parameters())

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Student and extra modules (what a resumed run needs); the frozen teacher is left out."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"state does not match the method: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self


# ---- declarations read by the rest of the toolkit -------------------------------------------------------------

def param_fields(cls: type[Distiller]) -> dict[str, tuple[type, dataclasses.Field]]:
    """`{param: (scalar type, field)}` of a method's `Params`, in declaration order."""
    hints = get_type_hints(cls.Params)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls.Params)}


def coerce_scalar(what: str, base: type, value: Any) -> Any:
    """`value` (a string from the command line or YAML, or a number) as a `base` (bool, int, float, str)."""
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError
            return bool(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} needs a {base.__name__}, got {value!r}") from None


def coerce_param(cls: type[Distiller], key: str, value: Any) -> Any:
    """`value` for the parameter `method.<name>.<param>` = `key` of method `cls` (one it has), converted to its
    type and checked against its bounds."""
    base, f = param_fields(cls)[key.rsplit(".", 1)[1]]
    value = coerce_scalar(f"config key {key!r}", base, value)
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise choice_error(key, value, meta["choices"])
    if base is float and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        raise UserError(f"{key} must be {'>' if meta.get('low_open') else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise UserError(f"{key} must be <= {high:g}, got {value!r}")
    return value


def make_params(cls: type[Distiller], protocol: Protocol, explicit: Mapping[str, Any]) -> Any:
    """The method's parameters: `Params` defaults <- `protocol_defaults(protocol)` <- `explicit` (by param name),
    each value checked."""
    values = {**cls.protocol_defaults(protocol), **explicit}
    checked = {name: coerce_param(cls, f"method.{cls.name}.{name}", value) for name, value in values.items()}
    params = cls.Params(**checked)
    try:
        if hasattr(params, "check"):
            params.check()
    except UserError as err:
        raise UserError(f"method.{cls.name}.{err}") from None
    return params


def register_method(cls: type[Distiller]) -> type[Distiller]:
    """Class decorator: add a method to the registry after checking its declarations, so a plugin with a typo fails
    at import, in one line."""
    problems = [f"{attr} is not declared" for attr in ("name", "display") if not getattr(cls, attr, "")]
    if not problems:
        fields_ = param_fields(cls)
        problems += [f"parameter {p!r} has type {t!r}, not one of bool, int, float, str" for p, (t, _) in
                     fields_.items() if t not in SCALARS]
        problems += [f"search_space names {p!r}, which is not a parameter" for p in cls.search_space
                     if p not in fields_]
        problems += [f"search_space entry {p!r} is not a one-key mapping of {', '.join(DOMAINS)}"
                     for p, spec in cls.search_space.items()
                     if not (isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in DOMAINS)]
        if "ce" not in cls.terms:
            problems.append("terms must include 'ce'")
    if problems:
        raise UserError(f"method {getattr(cls, 'name', cls.__name__)!r} ({cls.__module__}): {'; '.join(problems)}")
    if cls.name in METHODS:
        other = METHODS.get(cls.name)
        raise UserError(f"method {cls.name!r} from {cls.__module__} is already registered by {other.__module__}; "
                        f"give it another name")
    return METHODS.register(cls.name)(cls)


# ---- the frame of feature methods -----------------------------------------------------------------------------

def parse_stages(text: str) -> tuple[int, ...]:
    """"1,2,3,4" -> (1, 2, 3, 4); stages are 1-based stage indices in 1..4."""
    try:
        stages = tuple(int(s) for s in str(text).replace(" ", "").split(",") if s)
    except ValueError:
        raise UserError(f"stages must be a comma list of stage indices 1..4, got {text!r}") from None
    if not stages or any(s not in (1, 2, 3, 4) for s in stages) or len(set(stages)) != len(stages):
        raise UserError(f"stages must be distinct stage indices from 1, 2, 3, 4, got {text!r}")
    return tuple(sorted(stages))


def parse_stage_weights(text: str, n_stages: int) -> tuple[float, ...]:
    """"" -> 1/L each; else a comma list of L finite non-negative numbers."""
    if not text:
        return tuple(1.0 / n_stages for _ in range(n_stages))
    try:
        weights = tuple(float(w) for w in str(text).split(","))
    except ValueError:
        raise UserError(f"stage_weights must be a comma list of numbers, got {text!r}") from None
    if len(weights) != n_stages:
        raise UserError(f"stage_weights has {len(weights)} values for {n_stages} stages: {text!r}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise UserError(f"stage_weights must be finite non-negative numbers, got {text!r}")
    return weights


class FeatureKD(Distiller):
    """CE + α·KD + β·Σ_l w_l·(loss of matched stage l): the frame of FitNet and UHKD. Subclasses build one module
    per matched stage (`self.stages`) in `__init__` and define `stage_loss`."""

    terms = ("ce", "kl", "feat")
    learning_check = LearningCheck("feat", overrides={"alpha": 0.0})

    @dataclass(frozen=True)
    class Params:
        alpha: float = param(1.0, low=0, doc="weight of the KL term on logits")
        beta: float = param(1.0, low=0, doc="weight of the feature term")
        temperature: float = param(1.0, low=0, low_open=True, doc="softmax temperature of the KL term")
        stages: str = param("1,2,3,4", doc="matched stages, a comma list of 1..4")
        stage_weights: str = param("", doc="one weight per matched stage, comma list; empty = 1/L each")

        def check(self) -> None:
            parse_stage_weights(self.stage_weights, len(parse_stages(self.stages)))

    def __init__(self, p: Any, ce: CrossEntropy, student: StageModel, teacher: StageModel | None) -> None:
        super().__init__(p, ce, student, teacher)
        self.stages = self.matched_stages(p)
        self.stage_weights = parse_stage_weights(p.stage_weights, len(parse_stages(p.stages))) if self.stages else ()

    @classmethod
    def matched_stages(cls, p: Any) -> tuple[int, ...]:
        """Stages with an extra module; none when the feature weight is 0 (an unused module would also break
        DistributedDataParallel)."""
        return parse_stages(p.stages) if p.beta > 0 else ()

    @classmethod
    def teacher_use(cls, p: Any) -> TeacherUse:
        return TeacherUse(True, cls.matched_stages(p), p.alpha > 0)

    def stage_loss(self, level: int, feat_s: Tensor, feat_t: Tensor) -> Tensor:
        """Loss of the `level`-th matched stage (index into `self.stages`)."""
        raise NotImplementedError

    def forward(self, images: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.p
        logits, feats_s = self.student(images)
        logits_t, feats_t = self.teacher_forward(images)
        zero = logits.new_zeros((), dtype=torch.float32)
        kl = p.alpha * kd_loss(logits.float(), logits_t, p.temperature) if p.alpha > 0 else zero
        feat = p.beta * sum((w * self.stage_loss(level, feats_s[s - 1], feats_t[s - 1])
                             for level, (s, w) in enumerate(zip(self.stages, self.stage_weights))), zero)
        return logits, {"ce": self.ce(logits, target), "kl": kl, "feat": feat}


def by_year(classes: list[type[Distiller]]) -> list[type[Distiller]]:
    return sorted(classes, key=lambda c: (c.year, c.name))

