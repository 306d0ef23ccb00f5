"""UHKD ablations from sweep results: the component table and top-1 curves against β, α, k and band.

Component table: rows are the trials' `tag` (the ablation sweep tags full UHKD "full" and each variant by its switch,
e.g. "w/o FTM", "w/o SRA", "sca=conv_bn", "single level", "w/o KL", "beta=0"), one column per pair, each cell mean ±
std over seeds and its difference to "full".

Curves: for each of method.uhkd.beta, .alpha, .k and .band, the UHKD trials of a pair that keep every other
ablation switch at the pair's most common value ("one factor at a time"), top-1 against the value: a row of panels
per pair (their scales differ), the mean over seeds with ± std error bars at the measured values, n in the legend and
the teacher's top-1 as a dashed reference line.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.common import (RESULTS_HELP, Stat, cli, dedupe_runs, figure_title, integer_ticks, line_colors, ok_trials,
                             pair_label, panel_rows, percent_axis, read_trials, render, require_columns, row_legend,
                             save_figure, select, signed, teacher_line, write_text)
from uhkd.errors import OneLineParser, UserError

SWITCHES = tuple(f"method.uhkd.{p}" for p in ("spectrum", "sra", "sca", "stages", "alpha", "beta", "k", "band"))
CURVE_PARAMS = tuple(f"method.uhkd.{p}" for p in ("beta", "alpha", "k", "band"))
SYMBOLS = {"method.uhkd.beta": "β", "method.uhkd.alpha": "α", "method.uhkd.k": "k", "method.uhkd.band": "band"}
CATEGORY_ORDER = {"method.uhkd.band": ("low", "high", "full")}
FULL = "full"


def component_table(trials: pd.DataFrame, metric: str = "best_top1") -> pd.DataFrame:
    """Long table: one row per (tag, pair) of tagged trials with mean, std, n and the difference to "full"."""
    require_columns(trials, ["tag", "pair", metric], "the component-ablation table")
    tagged = trials[trials["tag"].fillna("") != ""]
    if tagged.empty:
        raise UserError("no tagged trials for the component-ablation table (the ablation sweep tags each variant, "
                        "e.g. 'full', 'w/o FTM'); found only untagged trials")
    records = []
    for (tag, pair), group in tagged.groupby(["tag", "pair"], sort=False):
        stat = Stat.of(group[metric])
        records.append({"tag": tag, "pair": pair, "mean": stat.mean, "std": stat.std, "n": stat.n})
    table = pd.DataFrame(records)
    full = table[table["tag"] == FULL].set_index("pair")["mean"]
    table["delta_vs_full"] = table["mean"] - table["pair"].map(full)
    tags = [FULL] if FULL in set(table["tag"]) else []
    tags += [t for t in dict.fromkeys(tagged["tag"]) if t != FULL]
    table["tag"] = pd.Categorical(table["tag"], categories=tags, ordered=True)
    return table.sort_values(["tag", "pair"]).reset_index(drop=True).astype({"tag": str})


def format_component_table(table: pd.DataFrame, fmt: str = "md") -> str:
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.4f")
    pairs = list(dict.fromkeys(table["pair"]))
    header = ["Variant", *(pair_label(p) for p in pairs)]
    rows = []
    for tag, group in table.groupby("tag", sort=False):
        by_pair = group.set_index("pair")
        row = [tag]
        for pair in pairs:
            if pair not in by_pair.index:
                row.append("—")
                continue
            rec = by_pair.loc[pair]
            text = Stat(rec["mean"], rec["std"], int(rec["n"])).text()
            row.append(text if tag == FULL or math.isnan(rec["delta_vs_full"])
                       else f"{text} (Δ {signed(rec['delta_vs_full'])})")
        rows.append(row)
    notes = ["top-1 (%), mean ± sample std over seeds; Δ = variant − full"]
    return render(header, rows, fmt, notes=notes)


def _held_fixed(group: pd.DataFrame, param: str) -> pd.DataFrame:
    """Rows of `group` whose other ablation switches equal their most common value in the group."""
    keep = np.ones(len(group), dtype=bool)
    for key in SWITCHES:
        if key == param or key not in group.columns:
            continue
        values = group[key].astype(str)
        keep &= (values == values.mode().iloc[0]).to_numpy()
    return group[keep]


def curve_data(trials: pd.DataFrame, metric: str = "best_top1") -> pd.DataFrame:
    """Long table (param, pair, value, x, mean, std, n) of the ablation curves; lines with < 2 values are dropped."""
    require_columns(trials, ["method", "pair", metric], "the ablation curves")
    uhkd = trials[trials["method"] == "uhkd"]
    present = [p for p in CURVE_PARAMS if p in uhkd.columns]
    if not present:
        raise UserError(f"results lack the column(s) {', '.join(CURVE_PARAMS)} needed for the ablation curves")
    records = []
    for param in present:
        for pair, group in uhkd.groupby("pair", sort=True):
            fixed = _held_fixed(group, param)
            points = [(value, Stat.of(rows[metric])) for value, rows in fixed.groupby(param, sort=True)]
            if len(points) < 2:
                continue
            order = CATEGORY_ORDER.get(param)
            if order:
                points.sort(key=lambda p: order.index(p[0]) if p[0] in order else len(order))
            teachers = fixed["teacher_top1"].dropna().round(6).unique() if "teacher_top1" in fixed else []
            for i, (value, stat) in enumerate(points):
                records.append({"param": param, "pair": pair, "value": value, "x": i if order else float(value),
                                "mean": stat.mean, "std": stat.std, "n": stat.n,
                                "teacher_top1": teachers.mean() if len(teachers) else math.nan,
                                "teachers": len(teachers)})
    if not records:
        raise UserError(f"no UHKD pair has trials at two or more values of {', '.join(present)} with the other "
                        "switches fixed; nothing to plot")
    return pd.DataFrame(records)


def plot_curves(data: pd.DataFrame, metric: str = "best_top1", title: str = "") -> Figure:
    """A row of panels per pair, one per parameter it has a curve for (no empty slot): mean top-1 at each measured
    value with ± std error bars, the teacher's top-1 dashed; whole-number ticks for whole-number values (k)."""
    pairs = list(dict.fromkeys(data["pair"]))
    params = {pair: list(dict.fromkeys(data.loc[data["pair"] == pair, "param"])) for pair in pairs}
    fig = Figure(layout="constrained")
    colors = line_colors(data["pair"])
    for pair, axes in zip(pairs, panel_rows(fig, [len(params[p]) for p in pairs], width=3.4, legend=2.4)):
        for ax, param in zip(axes, params[pair]):
            line = data[(data["pair"] == pair) & (data["param"] == param)]
            n = sorted(set(line["n"]))
            seeds = f"n={n[0]}" if len(n) == 1 else f"n={n[0]}–{n[-1]}"
            ax.errorbar(line["x"], line["mean"], yerr=line["std"].fillna(0), marker="o", capsize=3,
                        color=colors[pair], label=f"UHKD, mean ± std over seeds ({seeds} per point)")
            teacher_line(ax, line["teacher_top1"].iloc[0], int(line["teachers"].iloc[0]))
            if param in CATEGORY_ORDER:
                ax.set_xticks(line["x"], line["value"].astype(str))
            elif all(float(v).is_integer() for v in line["x"]):
                integer_ticks(ax.xaxis)
            ax.set_title(pair_label(pair), fontsize="medium")
            ax.set_xlabel(SYMBOLS[param])
            ax.set_ylabel("best-epoch top-1" if metric == "best_top1" else "last-epoch top-1")
            percent_axis(ax.yaxis)
            ax.grid(alpha=0.3)
        row_legend(axes)
    if title:
        fig.suptitle(title)
    return fig


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="analysis/ablations.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help=RESULTS_HELP)
    p.add_argument("--out-dir", default="analysis_out", help="folder for ablation_table.* and ablation_curves.png/"
                   "pdf (default analysis_out)")
    p.add_argument("--format", default="md", choices=("md", "latex", "csv"), help="table format (default md)")
    p.add_argument("--last", action="store_true", help="use last-epoch top-1 instead of best-epoch")
    p.add_argument("--dataset", default=None, help="only trials of this dataset")
    p.add_argument("--sweep", default=None, help="only trials of this sweep")
    p.add_argument("--split", default=None, help="only trials of this data split")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    metric = "last_top1" if args.last else "best_top1"
    trials = select(read_trials(args.results), {"dataset": args.dataset, "sweep": args.sweep, "split": args.split})
    trials, note = ok_trials(trials)
    trials, _ = dedupe_runs(trials)
    out_dir = Path(args.out_dir)
    outputs: list[Path] = []
    skipped = []
    try:
        table = format_component_table(component_table(trials, metric), args.format)
        outputs += write_text(table, str(out_dir / f"ablation_table.{'tex' if args.format == 'latex' else args.format}"))
    except UserError as exc:
        skipped.append(f"component table: {exc}")
    try:
        title = figure_title(trials, "UHKD ablations: top-1 against one factor, the others at their most common value")
        outputs += save_figure(plot_curves(curve_data(trials, metric), metric, title), out_dir / "ablation_curves")
    except UserError as exc:
        skipped.append(f"curves: {exc}")
    if not outputs:
        raise UserError("; ".join(skipped))
    print(note)
    for line in skipped:
        print(f"skipped {line}")
    return outputs


def run(argv: Sequence[str] | None = None) -> int:
    return cli(main, parser(), argv)


if __name__ == "__main__":
    raise SystemExit(run())
