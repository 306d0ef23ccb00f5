"""Per-epoch training curves (validation top-1, total loss and each loss term) from epochs.parquet joined with
trials.parquet.

Choose trials with --trial, filter with --method/--pair/--dataset/--sweep, and aggregate with --group-by: every
group is one line, the mean over its trials at each epoch with a ± std band (default: one line per pair and method;
with --trial, one line per trial).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.common import (RESULTS_HELP, cli, line_colors, pair_label, read_epochs, read_trials, require_columns,
                             save_figure, select)
from uhkd.errors import UserError

KEYS = ["sweep", "trial_id"]


def curve_data(trials: pd.DataFrame, epochs: pd.DataFrame, group_by: Sequence[str],
               trial_ids: Sequence[str] = ()) -> pd.DataFrame:
    """Long table (group, metric, epoch, mean, std, n) over the chosen trials; metrics = top1, loss and every
    loss_<term> column that has values."""
    require_columns(epochs, [*KEYS, "epoch", "top1"], "training curves")
    require_columns(trials, [*KEYS, *group_by], "grouping the training curves")
    if trial_ids:
        unknown = sorted(set(trial_ids) - set(trials["trial_id"]))
        if unknown:
            some = ", ".join(sorted(trials["trial_id"])[:8])
            raise UserError(f"unknown trial id(s) {', '.join(unknown)}; {len(trials)} trials, e.g. {some}")
        trials = trials[trials["trial_id"].isin(trial_ids)]
    joined = epochs.merge(trials[[*KEYS, *(c for c in group_by if c not in KEYS)]], on=KEYS, how="inner")
    if joined.empty:
        raise UserError("no epoch rows for the selected trials (epochs.parquet and trials.parquet share no trial_id)")
    metrics = ["top1"] + [c for c in ("loss", *sorted(c for c in joined.columns if c.startswith("loss_")))
                          if c in joined.columns and joined[c].notna().any()]
    labels = joined[list(group_by)].astype(str)
    if "pair" in labels:
        labels["pair"] = labels["pair"].map(pair_label)
    joined["group"] = labels.agg(" ".join, axis=1)
    long = joined.melt(id_vars=["group", "epoch"], value_vars=metrics, var_name="metric").dropna(subset=["value"])
    stats = long.groupby(["metric", "group", "epoch"], sort=False)["value"].agg(["mean", "std", "count"])
    stats = stats.rename(columns={"count": "n"}).reset_index()
    stats["metric"] = pd.Categorical(stats["metric"], categories=metrics, ordered=True)
    return stats.sort_values(["metric", "group", "epoch"]).reset_index(drop=True).astype({"metric": str})


def plot_curves(data: pd.DataFrame) -> Figure:
    """One panel per metric, one line per group in `data` order (x = epoch, y = mean) with a ± std band."""
    metrics = list(dict.fromkeys(data["metric"]))
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = line_colors(data["group"])
    for ax, metric in zip(axes, metrics):
        for group, line in data[data["metric"] == metric].groupby("group", sort=False):
            x, mean, std = line["epoch"].to_numpy(), line["mean"].to_numpy(), np.nan_to_num(line["std"].to_numpy())
            ax.plot(x, mean, label=group, color=colors[group])
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=colors[group])
        ax.set_title("validation top-1 (%)" if metric == "top1" else metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    return fig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analysis/curves.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help=RESULTS_HELP)
    p.add_argument("--trial", nargs="+", default=[], metavar="ID", help="only these trial ids")
    p.add_argument("--group-by", nargs="+", default=None, metavar="COL",
                   help="trials.parquet columns whose values make one line (default: pair method; "
                        "trial_id with --trial)")
    for column in ("dataset", "sweep", "pair", "method", "tag"):
        p.add_argument(f"--{column}", default=None, help=f"only trials with this {column}")
    p.add_argument("--out-dir", default="analysis_out", help="folder for curves.png/pdf/csv (default analysis_out)")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    trials = select(read_trials(args.results), {c: getattr(args, c) for c in ("dataset", "sweep", "pair", "method",
                                                                             "tag")})
    group_by = args.group_by or (["trial_id"] if args.trial else ["pair", "method"])
    data = curve_data(trials, read_epochs(args.results), group_by, args.trial)
    out = Path(args.out_dir)
    paths = save_figure(plot_curves(data), out / "curves")
    data.to_csv(out / "curves.csv", index=False, float_format="%.10g")
    return [*paths, out / "curves.csv"]


def run(argv: Sequence[str] | None = None) -> int:
    return cli(main, parser(), argv)


if __name__ == "__main__":
    raise SystemExit(run())
