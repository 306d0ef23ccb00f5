"""Distillation methods (mdistiller style): `build_method(cfg, student, teacher) -> Distiller`.

Registered names: scratch, kd, dkd, dist, fitnet, ofa, uhkd (`uhkd.registry.METHODS`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from ..config import MethodConfig, RunConfig, validate
from ..models import StageModel
from ..registry import METHODS
from . import fitnet, logit, ofa, uhkd  # noqa: F401  (register the methods)
from .base import Distiller

__all__ = ["Distiller", "TeacherUse", "build_method", "resolve_method", "teacher_use"]


def resolve_method(cfg: RunConfig) -> MethodConfig:
    """A copy of `cfg.method` whose `None` fields that the method uses hold its defaults (SPEC §2)."""
    cls = METHODS.get(cfg.method.name)
    fill = {k: v for k, v in cls.defaults(cfg).items() if getattr(cfg.method, k) is None}
    return dataclasses.replace(cfg.method, **fill)


class TeacherUse(NamedTuple):
    needed: bool  # False: the method trains without a teacher
    stages: tuple[int, ...]  # teacher stage maps the method reads (() = logits only)
    logits: bool  # whether the method reads the teacher's logits


def teacher_use(cfg: RunConfig) -> TeacherUse:
    """What the method reads from the teacher: pass to `load_teacher(stages=..., needs_logits=...)` (OR the
    logits with teacher evaluation) so unused layers are pruned."""
    method = resolve_method(cfg)
    cls = METHODS.get(method.name)
    return TeacherUse(cls.needs_teacher, cls.teacher_stages(method), cls.uses_teacher_logits(method))


def build_method(cfg: RunConfig, student: StageModel, teacher: StageModel | None) -> Distiller:
    """The method `cfg.method.name` around `student` (and the frozen `teacher`), its extra modules built from the
    models' stage shapes."""
    validate(cfg)
    method = resolve_method(cfg)
    return METHODS.get(method.name)(method, student, teacher)
