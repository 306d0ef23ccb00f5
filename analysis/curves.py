"""Per-epoch training curves from epochs.parquet joined with trials.parquet.

curves.png has one row per teacher→student pair (their scales differ): top-1 on the evaluation set, with the
teacher's top-1 as a dashed reference line, and the training loss; loss_terms.png has each weighted loss term, a row
per pair. A panel draws one line per method: the mean over its seeds, a ± std band where two or more trials
contribute, n in the legend. Where trials of a pair and method differ in more than the seed (a search), each
configuration is its own line: a mean never mixes hyperparameters. A student trained from scratch appears in every
pair of that student. Trials the scheduler stopped early are dashed and end in ×, failed ones dotted; a line goes on
dotted past the epoch where one of its trials ended (its band only where two trials remain).

Choose trials with --trial (one line each), filter with --dataset/--sweep/--pair/--method/--tag, group with
--group-by (any trials.parquet columns).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.common import (RESULTS_HELP, cli, figure_title, integer_ticks, line_colors, pair_label, panel_rows,
                             percent_axis, read_epochs, read_trials, require_columns, row_legend, save_figure,
                             select, teacher_line)
from analysis.sweep_report import value_text, varying_params
from uhkd.errors import OneLineParser, UserError

KEYS = ["sweep", "trial_id"]
MAIN = ("top1", "loss")
STYLE = {"ok": "-", "stopped": "--", "failed": ":"}
SWEEP_SEP = "|"
LABELS = {"top1": "top-1", "loss": "training loss"}


def placed(trials: pd.DataFrame) -> pd.DataFrame:
    """`trials` with their `panel`: the pair (with several sweeps, `<sweep>|<pair>`: their evaluation sets and
    teachers may differ); a teacher-less trial (scratch) is placed in every pair of its student in its sweep (its row
    repeated), or in a panel of its own when no pair has that student."""
    parts = []
    for _, own in trials.groupby("sweep", sort=True):
        alone = own["pair"].astype(str).str.startswith(":")
        distilled = own[~alone].assign(panel=own.loc[~alone, "pair"])
        pairs = list(dict.fromkeys(distilled["pair"]))
        parts += [distilled, *(own[alone & (own["pair"] == f":{p.split(':')[1]}")].assign(panel=p) for p in pairs)]
        students = {f":{p.split(':')[1]}" for p in pairs}
        parts.append(own[alone & ~own["pair"].isin(students)].assign(panel=own.loc[alone, "pair"]))
    out = pd.concat(parts)
    return out.assign(panel=out["sweep"] + SWEEP_SEP + out["panel"]) if trials["sweep"].nunique() > 1 else out


def panel_title(panel: str) -> str:
    sweep, _, pair = panel.rpartition(SWEEP_SEP)
    return f"{pair_label(pair)}\n{sweep}" if sweep else pair_label(pair)


def configuration_labels(trials: pd.DataFrame) -> pd.Series:
    """The method, and where the trials of a sweep, pair and method differ in more than the seed, what tells them
    apart: their tag where each has one (the ablation variants: `uhkd [w/o KL]`), else the values that differ
    (`uhkd alpha=0.7572 beta=3.63`)."""
    labels = trials["method"].astype(str)
    for _, same in trials.groupby(["sweep", "pair", "method"], sort=False):
        varying = [p for p in varying_params(same) if p != "pair"]
        if not varying:
            continue
        tags = same["tag"].fillna("") if "tag" in same.columns else pd.Series("", index=same.index)
        if (tags != "").all() and tags.nunique() == same.groupby(varying, dropna=False).ngroups:
            labels[same.index] += " [" + tags + "]"
            continue
        for i, row in same[varying].iterrows():
            labels[i] += "".join(f" {key.rsplit('.', 1)[-1]}={value_text(v)}" for key, v in row.items())
    return labels


def _status(statuses: pd.Series) -> str:
    counts = statuses.value_counts()
    return counts.index[0] if len(counts) == 1 else ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def curve_data(trials: pd.DataFrame, epochs: pd.DataFrame, group_by: Sequence[str] | None = None,
               trial_ids: Sequence[str] = ()) -> pd.DataFrame:
    """Long table (panel, group, metric, epoch, mean, std, n, trials, status, teacher_top1, teachers) over the chosen
    trials: n = trials with a value at that epoch, trials = the group's, status = theirs (`ok`, `stopped`, `failed`
    or counts), teacher_top1 = the mean of the panel's distinct teacher measurements (teachers of them). Metrics:
    top1, loss and every loss_<term> column that has values. Groups: `group_by` columns, else one per configuration
    (`configuration_labels`)."""
    require_columns(epochs, [*KEYS, "epoch", "top1"], "training curves")
    require_columns(trials, [*KEYS, "pair", "method", "status", *(group_by or [])], "grouping the training curves")
    if trial_ids:
        unknown = sorted(set(trial_ids) - set(trials["trial_id"]))
        if unknown:
            some = ", ".join(sorted(trials["trial_id"])[:8])
            raise UserError(f"unknown trial id(s) {', '.join(unknown)}; {len(trials)} trials, e.g. {some}")
        trials = trials[trials["trial_id"].isin(trial_ids)]
    if group_by:
        shown = [c for c in group_by if c != "pair"]
        labels = trials[shown].astype(str).agg(" ".join, axis=1) if shown else pd.Series("all", index=trials.index)
    else:
        labels = configuration_labels(trials)
    teacher = trials["teacher_top1"] if "teacher_top1" in trials.columns else pd.Series(np.nan, index=trials.index)
    trials = placed(trials.assign(group=labels, teacher_top1=teacher))
    joined = epochs.merge(trials[[*KEYS, "panel", "group"]], on=KEYS, how="inner")
    if joined.empty:
        raise UserError("no epoch rows for the selected trials (epochs.parquet and trials.parquet share no trial_id)")
    metrics = ["top1"] + [c for c in ("loss", *sorted(c for c in joined.columns if c.startswith("loss_")))
                          if c in joined.columns and joined[c].notna().any()]
    long = joined.melt(id_vars=["panel", "group", "epoch"], value_vars=metrics, var_name="metric")
    stats = long.dropna(subset=["value"]).groupby(["panel", "group", "metric", "epoch"], sort=False)["value"]
    stats = stats.agg(["mean", "std", "count"]).rename(columns={"count": "n"}).reset_index()
    groups = trials.groupby(["panel", "group"], sort=False).agg(trials=("trial_id", "size"),
                                                               status=("status", _status))
    teachers = trials.groupby("panel", sort=False)["teacher_top1"].agg(
        teacher_top1=lambda v: v.dropna().round(6).unique().mean() if v.notna().any() else np.nan,
        teachers=lambda v: v.dropna().round(6).nunique())
    stats = stats.join(groups, on=["panel", "group"]).join(teachers, on="panel")
    stats["metric"] = pd.Categorical(stats["metric"], categories=metrics, ordered=True)
    stats = stats.sort_values(["panel", "metric", "group", "epoch"],
                              key=lambda c: c.map(panel_title) if c.name == "panel" else c)
    return stats.reset_index(drop=True).astype({"metric": str})


def legend_labels(rows: pd.DataFrame) -> dict[str, str]:
    """Per group of a panel: its name, n, how its trials ended, and its last top-1 with every trial contributing
    (lines near each other stay readable)."""
    labels = {}
    for group, line in rows.groupby("group", sort=False):
        status = line["status"].iloc[0]
        top1 = line[(line["metric"] == "top1") & (line["n"] == line["trials"])]
        last = f": top-1 {top1['mean'].iloc[-1]:.2f}% at epoch {top1['epoch'].iloc[-1]}" if len(top1) else ""
        labels[group] = f"{group} (n={line['trials'].iloc[0]}{'' if status == 'ok' else f', {status}'}){last}"
    return labels


def _draw(ax, lines: pd.DataFrame, colors: dict, labels: dict) -> None:
    """One line per group: solid while every trial of the group contributes, dotted after; the band where n ≥ 2."""
    for group, line in lines.groupby("group", sort=False):
        x, mean = line["epoch"].to_numpy(), line["mean"].to_numpy()
        std, n = np.nan_to_num(line["std"].to_numpy()), line["n"].to_numpy()
        trials, status, color = int(line["trials"].iloc[0]), line["status"].iloc[0], colors[group]
        full = int((n == trials).sum()) or 1  # trials only end, so every trial contributes to a prefix of epochs
        ax.plot(x[:full], mean[:full], STYLE.get(status, "-"), color=color, label=labels[group])
        if full < len(x):
            ax.plot(x[full - 1:], mean[full - 1:], ":", color=color)
        if (n >= 2).any():
            ax.fill_between(x, mean - std, mean + std, where=n >= 2, alpha=0.2, color=color, linewidth=0)
        if status in ("stopped", "failed"):
            ax.plot(x[-1:], mean[-1:], "x", color=color, markersize=7, markeredgewidth=2)


def plot_panels(data: pd.DataFrame, metrics: Sequence[str], title: str = "") -> Figure:
    """A row per panel (pair), a column per metric of `metrics` that the pair has (no empty slot), one line per
    group; the teacher's top-1 on top-1 axes; a legend per row."""
    panels = list(dict.fromkeys(data["panel"]))
    have = {p: [m for m in metrics if ((data["panel"] == p) & (data["metric"] == m)).any()] for p in panels}
    panels = [p for p in panels if have[p]]
    if not panels:
        raise UserError(f"no values of {', '.join(metrics)} to plot")
    fig = Figure(layout="constrained")
    colors = line_colors(data["group"])
    widest = max(len(group) for group in data["group"]) + 26
    entries = data.groupby("panel")["group"].nunique().max() + 1  # the legend beside a row sets its height
    grid = panel_rows(fig, [len(have[p]) for p in panels], height=max(2.9, 0.6 + 0.21 * entries),
                      legend=1.2 + 0.06 * widest)
    for panel, axes in zip(panels, grid):
        rows = data[data["panel"] == panel]
        labels = legend_labels(rows)
        for ax, metric in zip(axes, have[panel]):
            _draw(ax, rows[rows["metric"] == metric], colors, labels)
            if metric == "top1":
                teacher_line(ax, rows["teacher_top1"].iloc[0], int(rows["teachers"].iloc[0]))
                percent_axis(ax.yaxis)
            ax.set_title(panel_title(panel), fontsize="medium")
            ax.set_ylabel(LABELS.get(metric, f"{metric.removeprefix('loss_')} loss term (weighted)"))
            ax.set_xlabel("epoch")
            integer_ticks(ax.xaxis)
            ax.grid(alpha=0.3)
        row_legend(axes)
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(data: pd.DataFrame, title: str = "") -> Figure:
    """Top-1 (with the teacher's) and training loss, a row per pair."""
    return plot_panels(data, MAIN, title)


def loss_terms(data: pd.DataFrame) -> list[str]:
    return sorted({m for m in data["metric"] if m.startswith("loss_")})


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="analysis/curves.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help=RESULTS_HELP)
    p.add_argument("--trial", nargs="+", default=[], metavar="ID", help="only these trial ids")
    p.add_argument("--group-by", nargs="+", default=None, metavar="COL",
                   help="trials.parquet columns whose values make one line (default: one line per method and "
                        "configuration; trial_id with --trial)")
    for column in ("dataset", "sweep", "pair", "method", "tag"):
        p.add_argument(f"--{column}", default=None, help=f"only trials with this {column}")
    p.add_argument("--out-dir", default="analysis_out", help="folder for curves.png/pdf, loss_terms.png/pdf and "
                                                             "curves.csv (default analysis_out)")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    trials = select(read_trials(args.results), {c: getattr(args, c) for c in ("dataset", "sweep", "pair", "method",
                                                                             "tag")})
    group_by = args.group_by or (["trial_id"] if args.trial else None)
    data = curve_data(trials, read_epochs(args.results), group_by, args.trial)
    shown = trials[trials["trial_id"].isin(args.trial)] if args.trial else trials
    out = Path(args.out_dir)
    paths = save_figure(plot_curves(data, figure_title(shown, "Training curves")), out / "curves")
    if loss_terms(data):
        paths += save_figure(plot_panels(data, loss_terms(data), figure_title(shown, "Loss terms")), out / "loss_terms")
    data.to_csv(out / "curves.csv", index=False, float_format="%.10g")
    return [*paths, out / "curves.csv"]


def run(argv: Sequence[str] | None = None) -> int:
    return cli(main, parser(), argv)


if __name__ == "__main__":
    raise SystemExit(run())
