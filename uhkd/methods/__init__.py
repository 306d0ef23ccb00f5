"""Distillation methods, one file each (mdistiller-style `Distiller`s that declare themselves: uhkd/methods/base.py).

Every module of this package is imported here, so a new method file registers itself; user methods come in as
plugins (`uhkd.plugins`). Everything else reads the registry: `registered()` in table order, `method_params(cfg)`
for a run's resolved parameters, `build_method(cfg, student, teacher)` for its `Distiller`.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from ..errors import choice_error
from ..models import StageModel, model_family
from ..registry import METHODS
from .base import (CrossEntropy, Distiller, LearningCheck, Protocol, TeacherUse, by_year, coerce_param, make_params,
                   param, param_fields, register_method)

if TYPE_CHECKING:  # the config layer sits above the methods: it checks method parameters against the registry
    from ..config import MethodConfig, RunConfig

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CrossEntropy", "Distiller", "LearningCheck", "Protocol", "TeacherUse", "build_method",
           "coerce_method_param", "method_class", "method_keys", "method_param", "method_params", "param",
           "register_method", "registered", "resolve_method", "teacher_use"]


def method_class(name: str) -> type[Distiller]:
    return METHODS.get(name)


def registered() -> list[type[Distiller]]:
    """Every registered method (plugins included) in table order: by publication year, then name."""
    return by_year([METHODS.get(name) for name in METHODS.names()])


def protocol(cfg: "RunConfig") -> Protocol:
    return Protocol(cfg.data.protocol, model_family(cfg.model.student))


def method_params(cfg: "RunConfig") -> Any:
    """The run's method parameters (the method's `Params`): its defaults <- its defaults for the run's protocol and
    student family <- the values the run sets."""
    return make_params(METHODS.get(cfg.method.name), protocol(cfg), cfg.method.params)


def resolve_method(cfg: "RunConfig") -> "MethodConfig":
    """A copy of `cfg.method` whose `params` hold every parameter of the method (what a results row records)."""
    return dataclasses.replace(cfg.method, params=dataclasses.asdict(method_params(cfg)))


def method_param(key: str) -> type[Distiller]:
    """The method whose parameter `method.<name>.<param>` is; an unknown method or parameter is a `UserError`."""
    _, name, leaf = key.split(".")
    if name not in METHODS:
        raise choice_error(f"method {name!r} in config key", key, METHODS.names())
    cls = METHODS.get(name)
    if leaf not in param_fields(cls):
        raise choice_error("config key", key, [f"method.{name}.{p}" for p in param_fields(cls)]
                           or [f"(none: method {name!r} has no parameters)"])
    return cls


def coerce_method_param(key: str, value: Any) -> Any:
    """`value` for `method.<name>.<param>`, of that parameter's type and within its bounds."""
    return coerce_param(method_param(key), key, value)


def method_keys(leaf: str) -> list[str]:
    """`method.<name>.<leaf>` for every method that has a parameter `leaf`."""
    return [f"method.{cls.name}.{leaf}" for cls in registered() if leaf in param_fields(cls)]


def teacher_use(cfg: "RunConfig") -> TeacherUse:
    """What the method reads from the teacher: pass to `load_teacher(stages=..., needs_logits=...)` (OR the
    logits with teacher evaluation) so unused layers are pruned."""
    return METHODS.get(cfg.method.name).teacher_use(method_params(cfg))


def build_method(cfg: "RunConfig", student: StageModel, teacher: StageModel | None) -> Distiller:
    """The method `cfg.method.name` around `student` (and the frozen `teacher`), its extra modules built from the
    models' stage shapes."""
    cls = METHODS.get(cfg.method.name)
    return cls(method_params(cfg), CrossEntropy(cfg.method.w_ce, cfg.method.label_smoothing), student, teacher)
