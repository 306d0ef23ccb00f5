"""The fixed grid behind the paper tables: every pair of a preset x every method x seeds, on the final protocol
(train/test). UHKD uses the best weights hetero_pairs found for the pair (read from its trials.parquet; the best
UHKD trial overall where a pair has none, recorded as borrowed in the `weights_from` column), or the method
defaults, and --uhkd-set overrides either. A method that
needs no teacher (`scratch`) runs once per student and seed (pair ":<student>").

    python sweeps/reproduce_tables.py                  # quick: scratch, kd, ofa, uhkd on 2 tiny pairs x 2 seeds
    python sweeps/reproduce_tables.py --preset cifar100 --data-root DIR --teacher-dir DIR --weights-from results/hetero_pairs-cifar100-...
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uhkd.config import parse_set
from uhkd.errors import UserError
from uhkd.registry import METHODS
from uhkd.sweep.cli import SweepOptions, pairs_flag, sweep_parser
from uhkd.sweep.results import TRIALS, open_location
from uhkd.sweep.runner import main, pairs, seeds
from uhkd.sweep.spec import Sweep, SweepPreset, load_preset
from uhkd.sweep.trainable import split_pair


def parser() -> argparse.ArgumentParser:
    p = sweep_parser("sweeps/reproduce_tables.py", __doc__)
    pairs_flag(p)
    p.add_argument("--methods", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                   help="comma list (default: the preset's)")
    p.add_argument("--weights-from", default="auto", metavar="auto|none|PATH",
                   help="UHKD weights: auto = the latest hetero_pairs-<preset>-* sweep under --results; PATH = its "
                        "trials.parquet or sweep folder; none = method defaults")
    p.add_argument("--uhkd-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a UHKD setting for the uhkd trials only, e.g. --uhkd-set method.beta=2 (repeatable)")
    return p


def _trials_file(source: str, preset: SweepPreset, opts: SweepOptions) -> tuple[pafs.FileSystem, str] | None:
    if source == "none":
        return None
    if source != "auto":
        fs, path = open_location(source)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            path = f"{path}/{TRIALS}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise UserError(f"--weights-from {source!r}: no {TRIALS} there")
        return fs, path
    fs, root = open_location(opts.results)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    prefix = f"hetero_pairs-{preset.name}-"
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith(prefix))
    found = [f"{p}/{TRIALS}" for p in found if fs.get_file_info(f"{p}/{TRIALS}").type == pafs.FileType.File]
    return (fs, found[-1]) if found else None


def uhkd_weights(source: str, preset: SweepPreset, opts: SweepOptions, pair_list: list[str]) -> dict[str, dict]:
    """Per pair, the searched UHKD settings of the best finished hetero_pairs trial ({} = method defaults; the best
    trial of any pair where the pair has none) and `weights_from` = "<trial id> <pair>" of that trial (a row label
    of the cell's results, so tables can mark borrowed settings)."""
    located = _trials_file(source, preset, opts)
    if located is None:
        print("uhkd weights: method defaults (no hetero_pairs results to read)")
        return {}
    fs, path = located
    keys = list((preset.section("hetero_pairs").get("space") or {}))
    trials = pq.read_table(path, filesystem=fs).to_pandas()
    done = trials[(trials["status"] == "ok") & (trials["method"] == "uhkd")].dropna(subset=["best_top1"])
    if done.empty:
        raise UserError(f"{path} has no finished UHKD trial to take weights from (use --weights-from none)")
    weights = {}
    for pair in pair_list:
        rows = done[done["pair"] == pair]
        best = (rows if len(rows) else done).sort_values("best_top1").iloc[-1]
        weights[pair] = {k: _plain(best[k]) for k in keys}
        print(f"uhkd weights for {pair}: {weights[pair]} (trial {best['trial_id']}"
              f"{'' if len(rows) else ' of ' + best['pair'] + ': BORROWED, this pair has no finished trial'}, "
              f"top-1 {best['best_top1']:.2f}, {path})")
        weights[pair]["weights_from"] = f"{best['trial_id']} {best['pair']}"
    return weights


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def build(args: argparse.Namespace, opts: SweepOptions) -> Sweep:
    import uhkd.methods  # noqa: F401  (registers the methods)

    preset = load_preset(opts.preset)
    methods = args.methods or list(preset.section("reproduce_tables").get("methods") or [])
    for method in methods:
        METHODS.get(method)
    pair_list = pairs("reproduce_tables", preset, opts)
    for pair in pair_list:
        split_pair(pair)
    weights = uhkd_weights(args.weights_from, preset, opts, pair_list) if "uhkd" in methods else {}
    extra = parse_set(args.uhkd_set)
    cells: dict[str, dict] = {}
    for seed in seeds("reproduce_tables", preset, opts):
        for pair in pair_list:
            teacher, student = split_pair(pair)
            for method in methods:
                if not METHODS.get(method).needs_teacher:
                    cells[f"{method} {student} s{seed}"] = {"pair": f":{student}", "method.name": method, "seed": seed}
                    continue
                cell = {"pair": pair, "method.name": method, "seed": seed}
                if method == "uhkd":
                    cell.update({**weights.get(pair, {}), **extra})
                cells[f"{method} {pair} s{seed}"] = cell
    return Sweep("reproduce_tables", preset, cells=cells, force={"data.split": "final"})


if __name__ == "__main__":
    sys.exit(main(parser(), build))
