"""The fixed grid behind the paper tables: every pair of a preset x every method x seeds, on the final protocol
(train/test). Every method that hetero_pairs searched runs, per pair, the settings of its best finished trial there
(the best trial of any pair where a pair has none, recorded as borrowed in the `weights_from` column); the others
run their defaults, and `--set method.<name>.<param>=...` overrides either for that method's cells. A method that
needs no teacher (`scratch`) runs once per student and seed (pair ":<student>").

    python sweeps/reproduce_tables.py                  # quick: scratch, kd, ofa, rsd, uhkd on 2 tiny pairs x 2 seeds
    python sweeps/reproduce_tables.py --preset cifar100 --data-root DIR --teacher-dir DIR --weights-from results/hetero_pairs-cifar100-...
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from uhkd.errors import UserError
from uhkd.sweep.cli import SweepOptions, pairs_flag, sweep_parser
from uhkd.sweep.results import TRIALS, merged_table, open_location, wide
from uhkd.sweep.runner import main, pairs, seeds
from uhkd.sweep.spec import Sweep, SweepPreset, load_preset, search_space
from uhkd.sweep.trainable import split_pair


def parser() -> argparse.ArgumentParser:
    p = sweep_parser("sweeps/reproduce_tables.py", __doc__)
    pairs_flag(p)
    p.add_argument("--methods", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                   help="comma list (default: the preset's)")
    p.add_argument("--weights-from", default="auto", metavar="auto|none|PATH",
                   help="searched settings: auto = for each method, the latest hetero_pairs-<preset>-* sweep under "
                        "--results that searched it; PATH = a hetero_pairs trials.parquet or sweep folder; none = "
                        "every method's defaults")
    return p


def _sweeps(source: str, preset: SweepPreset, opts: SweepOptions) -> list[tuple[pafs.FileSystem, str]]:
    """The hetero_pairs tables to take settings from, newest first."""
    if source == "none":
        return []
    if source != "auto":
        fs, path = open_location(source)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            path = f"{path}/{TRIALS}"
        if merged_table(fs, path, TRIALS) is None:
            raise UserError(f"--weights-from {source!r}: no {TRIALS} there")
        return [(fs, path)]
    fs, root = open_location(opts.results)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    prefix = f"hetero_pairs-{preset.name}-"
    found = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith(prefix)),
                   reverse=True)
    return [(fs, f"{p}/{TRIALS}") for p in found]


def searched_settings(source: str, preset: SweepPreset, opts: SweepOptions, methods: list[str],
                      pair_list: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """`{method: {pair: overrides}}` for every method with a finished hetero_pairs trial: the searched values of the
    pair's best trial (of any pair's where this one has none) and `weights_from` = "<trial id> <pair>" of that trial
    (a row label, so tables can mark borrowed settings)."""
    settings: dict[str, dict[str, dict[str, Any]]] = {}
    for fs, path in _sweeps(source, preset, opts):
        table = merged_table(fs, path, TRIALS)
        if table is None:
            continue
        trials = wide(table, TRIALS)
        done = trials[(trials["status"] == "ok") & trials["best_top1"].notna()]
        for method in sorted(set(done["method"]) & set(methods) - set(settings)):
            keys = [k for k in search_space(preset, method) if k in done.columns]
            settings[method] = {pair: _best(done[done["method"] == method], pair, keys, path) for pair in pair_list}
    for method in methods:
        if method not in settings:
            print(f"{method}: its defaults (no finished hetero_pairs trial of it to take settings from)")
    return settings


def _best(done: pd.DataFrame, pair: str, keys: list[str], path: str) -> dict[str, Any]:
    rows = done[done["pair"] == pair]
    best = (rows if len(rows) else done).sort_values("best_top1").iloc[-1]
    chosen = {k: _plain(best[k]) for k in keys}
    borrowed = "" if len(rows) else f" of {best['pair']}: BORROWED, this pair has no finished trial"
    print(f"{best['method']} on {pair}: {' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in chosen.items())} "
          f"(trial {best['trial_id']}{borrowed}, top-1 {best['best_top1']:.2f}, {path})")
    return {**chosen, "weights_from": f"{best['trial_id']} {best['pair']}"}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def build(args: argparse.Namespace, opts: SweepOptions) -> Sweep:
    from uhkd.methods import method_class

    preset = load_preset(opts.preset)
    methods = args.methods or list(preset.section("reproduce_tables").get("methods") or [])
    classes = {m: method_class(m) for m in methods}
    pair_list = pairs("reproduce_tables", preset, opts)
    for pair in pair_list:
        split_pair(pair)
    settings = searched_settings(args.weights_from, preset, opts, methods, pair_list)
    cells: dict[str, dict] = {}
    for seed in seeds("reproduce_tables", preset, opts):
        for pair in pair_list:
            teacher, student = split_pair(pair)
            for method, cls in classes.items():
                if not cls.needs_teacher:
                    cells[f"{method} {student} s{seed}"] = {"pair": f":{student}", "method.name": method, "seed": seed}
                    continue
                explicit = {k: v for k, v in opts.sets.items() if k.startswith(f"method.{method}.")}
                cells[f"{method} {pair} s{seed}"] = {"pair": pair, "method.name": method, "seed": seed,
                                                     **settings.get(method, {}).get(pair, {}), **explicit}
    return Sweep("reproduce_tables", preset, cells=cells, force={"data.split": "final"})


def comparison_table(rows: list[dict]) -> list[str]:
    """The sweep's comparison table (`python -m analysis.tables`' Markdown), the last lines of its summary."""
    from analysis.tables import build_table, format_table

    table = build_table(pd.DataFrame(rows), rows[0]["dataset"])
    return ["comparison table:", *format_table(table).rstrip("\n").splitlines()]


if __name__ == "__main__":
    sys.exit(main(parser(), build, table=comparison_table))
