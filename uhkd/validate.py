"""Every name, value and path a command takes, checked together before Ray starts or any data loads: the problems
are collected and reported as one block (`error: 3 problems:` then one line each; one problem stays one line)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from .config import RunConfig, apply_overrides, build_config, coerce, flatten, validate
from .errors import UserError
from .hub import HUB, check_hub_weights
from .storage import exists


INT64 = 2**63 - 1  # the results tables' integers
# a run's integers beyond the config's own checks: a seed numpy takes, an epoch count that ends, image limits that
# are counts (-1 would drop one image, not mean "all")
BOUNDS = {"seed": (0, 2**32 - 1), "optim.epochs": (1, 100_000), "data.limit_train": (0, INT64),
          "data.limit_eval": (0, INT64), "optim.max_steps_per_epoch": (0, INT64)}


def out_of_bounds(what: str, value: int, key: str) -> str:
    """Why `value` (given as `what`: a flag or the key) is outside `BOUNDS[key]`, "" when it is inside."""
    low, high = BOUNDS[key]
    if value < low:
        return f"{what} must be >= {low}, got {value}"
    return f"{what} must be <= {high}, got {value}" if value > high else ""


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

    flat = flatten(cfg)
    for key, value in flat.items():
        problem = out_of_bounds(key, value, key) if key in BOUNDS else ""
        if not problem and isinstance(value, int) and not -INT64 - 1 <= value <= INT64:
            problem = f"{key} must fit in 64 bits, got {value}"
        if problem:
            problems.add(problem)
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
