"""UHKD ablations (docs/method.md) on chosen pairs x seeds, on the final protocol: the component switches (tags "full",
"w/o FTM", "w/o SRA", "sca=conv_bn", "single level", "w/o KL", "beta=0") and the one-factor curves over β, α, k and
band that the preset lists (tags "beta=0.5", "k=5", "band=high", ...; a point equal to full UHKD is the "full" run).
Each trial's `tag` column names its variant.

    python sweeps/ablations.py                          # quick: one tiny pair, one seed
    python sweeps/ablations.py --preset cifar100 --data-root DIR --teacher-dir DIR --only components,beta
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from uhkd.errors import UserError, choice_error
from uhkd.sweep.cli import SweepOptions, pairs_flag, sweep_parser
from uhkd.sweep.runner import main, pairs, seeds
from uhkd.sweep.spec import Sweep, load_preset

COMPONENTS: dict[str, dict[str, Any]] = {
    "full": {},
    "w/o FTM": {"method.uhkd.spectrum": "none"},
    "w/o SRA": {"method.uhkd.sra": False},
    "sca=conv_bn": {"method.uhkd.sca": "conv_bn"},
    "single level": {"method.uhkd.stages": "4"},
    "w/o KL": {"method.uhkd.alpha": 0.0},
    "beta=0": {"method.uhkd.beta": 0.0},
}


def parser() -> argparse.ArgumentParser:
    p = sweep_parser("sweeps/ablations.py", __doc__)
    pairs_flag(p)
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="components and/or curve names (beta, alpha, k, band), comma list (default: all)")
    return p


def curve_tag(param: str, value: Any) -> str:
    return f"{param}={value:g}" if isinstance(value, float) else f"{param}={value}"


def variants(curves: dict[str, list], only: list[str] | None, full: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """tag -> overrides: the component switches, then each curve point (a UHKD parameter's value) that differs
    from full UHKD."""
    groups = {"components": COMPONENTS, **{param: {curve_tag(param, v): {f"method.uhkd.{param}": v} for v in values}
                                          for param, values in curves.items()}}
    for name in only or []:
        if name not in groups:
            raise choice_error("ablation group", name, groups)
    out: dict[str, dict[str, Any]] = {"full": {}}
    for name, group in groups.items():
        if only and name not in only:
            continue
        for tag, overrides in group.items():
            if tag not in out and any(full.get(k) != v for k, v in overrides.items()):
                out[tag] = overrides
    return out


def build(args: argparse.Namespace, opts: SweepOptions) -> Sweep:
    from uhkd.config import build_config, flatten
    from uhkd.methods import resolve_method

    preset = load_preset(opts.preset)
    defaults = build_config(preset.run_preset, {**preset.run("ablations"), **opts.sets, "method.name": "uhkd"})
    full = flatten(dataclasses.replace(defaults, method=resolve_method(defaults)))
    tags = variants(preset.section("ablations").get("curves") or {}, args.only, full)
    if len(tags) < 2:
        raise UserError("nothing to ablate: every selected variant equals full UHKD")
    cells = {f"{tag} | {pair} s{seed}": {"pair": pair, "seed": seed, "tag": tag, **overrides}
             for seed in seeds("ablations", preset, opts) for pair in pairs("ablations", preset, opts)
             for tag, overrides in tags.items()}
    return Sweep("ablations", preset, cells=cells, force={"method.name": "uhkd", "data.split": "final"})


if __name__ == "__main__":
    sys.exit(main(parser(), build))
