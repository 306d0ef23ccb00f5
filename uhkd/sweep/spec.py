"""Sweep presets (`uhkd/sweep/presets/<name>.yaml`: pairs, search spaces, budgets) and the `Sweep` a script builds.

A preset has a run preset (`run_preset`, one of `uhkd/presets`), fixed config overrides (`run`), a default
`budget`, and one section per sweep (`teachers`, `hetero_pairs`, `reproduce_tables`, `ablations`) that may add its
own `run` and `budget`. A method's search space is its own declaration (`search_space` in its file); a preset's
`hetero_pairs.space.<method>` adds or replaces entries for that preset. Entries are `{loguniform: [lo, hi]}`,
`{uniform: [lo, hi]}`, `{randint: [lo, hi]}` or `{choice: [...]}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import UserError, choice_error

PRESET_DIR = Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class SweepPreset:
    name: str
    run_preset: str
    raw: Mapping[str, Any]

    def section(self, sweep: str) -> Mapping[str, Any]:
        return self.raw.get(sweep) or {}

    def run(self, sweep: str) -> dict[str, Any]:
        """Fixed overrides of every trial of `sweep`."""
        return {**(self.raw.get("run") or {}), **(self.section(sweep).get("run") or {})}

    def budget(self, sweep: str) -> dict[str, Any]:
        return {**(self.raw.get("budget") or {}), **(self.section(sweep).get("budget") or {})}


def load_preset(name: str) -> SweepPreset:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise choice_error("sweep preset", name, preset_names())
    raw = yaml.safe_load(path.read_text()) or {}
    return SweepPreset(name, raw.get("run_preset", name), raw)


def search_space(preset: SweepPreset, method: str) -> dict[str, Any]:
    """`method`'s hetero_pairs search space under `preset`, by dotted key (`method.<name>.<param>`): the method's
    own declaration, with the preset's entries for it added or replacing."""
    from ..methods import method_class, param_fields

    cls = method_class(method)
    own = (preset.section("hetero_pairs").get("space") or {}).get(method) or {}
    for param in own:
        if param not in param_fields(cls):
            raise choice_error(f"parameter in preset {preset.name!r} hetero_pairs.space.{method}", param,
                               param_fields(cls))
    return {f"method.{method}.{k}": v for k, v in {**cls.search_space, **own}.items()}


def domain(key: str, spec: Any) -> Any:
    """A Tune search domain from a search-space entry such as `{loguniform: [0.05, 20]}`."""
    from ray import tune

    from ..methods.base import DOMAINS

    if not (isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in DOMAINS):
        raise UserError(f"search space entry {key!r} must be one of {', '.join(DOMAINS)} as a one-key mapping, "
                        f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(list(args))
    low, high = args
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](low, high)


@dataclass
class Sweep:
    """What one sweep script asks the runner for.

    Search sweeps give `space` (Tune domains by dotted config key, and `pair`) and are searched per pair by Optuna
    with ASHA (`uhkd.sweep.search`); grid sweeps give `cells` (label -> dotted overrides, optionally `pair` and `tag`), each run once.
    `force` are overrides the sweep's protocol requires (a conflicting `--set` is an error)."""

    kind: str
    preset: SweepPreset
    method: str = ""  # the method a search sweep searches (its studies are named after it)
    space: dict[str, Any] = field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    force: dict[str, Any] = field(default_factory=dict)
    asha: bool = False
    objective: str = "accuracy"  # accuracy | pareto (best top-1 against `pareto_metric`)
    pareto_metric: str = "student_params"
    study: str = ""  # SQLite file of a persistent Optuna study ("" = in memory)
