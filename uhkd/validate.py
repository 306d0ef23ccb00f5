"""Every name, value and path a command takes, checked together before Ray starts or any data loads: the problems
are collected and reported as one block (`error: 3 problems:` then one line each; one problem stays one line)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from .config import RunConfig, apply_overrides, build_config, coerce, validate
from .errors import UserError
from .hub import HUB, check_hub_weights
from .storage import exists


class Problems:
    """Runs checks, keeping each one's `UserError` line (in order, once) instead of stopping at the first."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        if problem not in self.found:
            self.found.append(problem)

    def check(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, or None after recording its `UserError`."""
        try:
            return fn(*args)
        except UserError as err:
            self.add(str(err))
            return None

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise UserError(self.found[0])
        if self.found:
            raise UserError(f"{len(self.found)} problems:\n" + "\n".join(f"  {p}" for p in self.found))


def checked_config(preset: str | None, overrides: Mapping[str, Any], problems: Problems | None = None) -> RunConfig:
    """`build_config(preset, overrides)` after checking every override, name, dataset and path of the run; all
    problems are raised together."""
    problems = problems or Problems()
    cfg = collect_problems(preset, overrides, problems)
    problems.raise_any()
    return cfg


def collect_problems(preset: str | None, overrides: Mapping[str, Any], problems: Problems, *,
                     teacher_file: bool = True, dataset: bool = True) -> RunConfig:
    """The run's config, with every problem of its overrides, names and paths added to `problems` (the config is
    then built from the overrides that are good). `teacher_file=False` leaves the teacher checkpoint's existence
    to the caller, `dataset=False` the dataset's files."""
    good = {}
    for key, value in overrides.items():
        try:
            coerce(key, value)
            good[key] = value
        except UserError as err:
            problems.add(str(err))
    cfg = problems.check(build_config, preset, good)
    if cfg is None:  # a config-level problem: still check the names and paths the command gave
        base = problems.check(build_config, preset, {}) or RunConfig()
        cfg = apply_overrides(base, good)
        problems.check(validate, cfg)
    check_run(cfg, problems, teacher_file=teacher_file, dataset=dataset)
    return cfg


def check_run(cfg: RunConfig, problems: Problems, *, teacher_file: bool = True, dataset: bool = True) -> None:
    """The names (models, method, dataset), the dataset's files and the weight/checkpoint paths of one run."""
    import uhkd.data  # noqa: F401  (registers the datasets)
    import uhkd.methods  # noqa: F401  (registers the methods)

    from .models import model_kind
    from .registry import DATASETS, METHODS

    m = cfg.model
    for name in (m.teacher, m.student):
        if name:
            problems.check(model_kind, name)
    problems.check(METHODS.get, cfg.method.name)
    info = problems.check(DATASETS.get, cfg.data.dataset)
    if info is not None and dataset:
        problems.check(info.check, str(Path(cfg.data.root).expanduser()) if cfg.data.root else "", cfg.data.download)
    paths = {"teacher checkpoint": m.teacher_checkpoint if teacher_file else "",
             "pretrained weight file": m.pretrained_file}
    for what, path in paths.items():
        if path and path != HUB and problems.check(exists, path) is False:
            problems.add(f"{what} {path!r} not found")
    if m.pretrained_file == HUB and m.student:
        problems.check(check_hub_weights, m.student)
