"""Sweep report: the best configuration per pair, Optuna hyperparameter importances and a parallel-coordinates plot.

One section per sweep. Hyperparameters are the run-config columns (flat dotted keys) that vary among a sweep's
finished trials; teacher and student appear as `pair`, seeds are averaged (a configuration's score is its mean over
seeds). Importances come from an Optuna study rebuilt from the trial rows of each pair (one completed Optuna trial
per row), only for a pair with enough trials (max(10, 5 per varying hyperparameter); else the report says why);
--study sqlite:///path.db adds the importances of the sweep's own persisted study. The plot draws one line per trial
(trials sharing a configuration side by side), stopped trials dashed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.common import (RESULTS_HELP, Stat, cli, dedupe_runs, figure_title, ok_trials, pair_label, percent_axis,
                             read_trials, render, require_columns, save_figure, select, write_text)
from uhkd.config import LEAF_TYPES, method_key
from uhkd.errors import OneLineParser, UserError

METRIC_NAMES = {"best_top1": "best-epoch top-1", "last_top1": "last-epoch top-1"}
SHARED_SPREAD = 0.12  # of an axis: the most that separates the lines of trials sharing a configuration
# Run identity and location, not hyperparameters; teacher and student are reported together as `pair`.
NOT_SEARCHED = {"seed", "name", "output_dir", "data.root", "model.teacher_checkpoint", "model.pretrained_file",
                "model.teacher", "model.student"}
MIN_TRIALS, MIN_TRIALS_PER_PARAM = 10, 5
EVALUATORS = {
    "fanova": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0),
    "ped-anova": optuna.importance.PedAnovaImportanceEvaluator,
    "mdi": lambda: optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0),
}


def varying_params(trials: pd.DataFrame) -> list[str]:
    """Config columns (and `pair`) with more than one distinct value among `trials`: the run's fields and the
    methods' parameters (`method.<name>.<param>`); a value and none count as two (a method without that parameter)."""
    keys = ["pair"] + [k for k in trials.columns if (k in LEAF_TYPES or method_key(k)) and k not in NOT_SEARCHED]
    return [k for k in keys if k in trials.columns and categories(trials[k]).nunique() > 1]


def importance_minimum(params: int) -> int:
    """Trials a pair needs before its importances mean something: fANOVA fits a random forest to them."""
    return max(MIN_TRIALS, MIN_TRIALS_PER_PARAM * params)


def best_configs(trials: pd.DataFrame, params: Sequence[str], metric: str) -> pd.DataFrame:
    """Per pair, the configuration with the highest mean `metric` over its seeds (the first one on ties)."""
    config = [p for p in params if p != "pair"]
    records = []
    for pair, group in trials.groupby("pair", sort=True):
        scored = [(Stat.of(g[metric]), key, g) for key, g in
                  (group.groupby(config, sort=False, dropna=False) if config else [((), group)])]
        stat, key, rows = max(scored, key=lambda s: s[0].mean)
        records.append({"pair": pair, "mean": stat.mean, "std": stat.std, "n": stat.n, **dict(zip(config, key)),
                        "trials": ",".join(rows["trial_id"].astype(str))})
    return pd.DataFrame(records)


def value_text(value: object) -> str:
    """A config value as shown: floats to 4 significant digits, `n/a` where the trial's method has no such
    parameter (a null)."""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def categories(values: pd.Series) -> pd.Series:
    """Values as category names (`value_text`), so that a null is a category of its own."""
    return values.map(value_text)


def _distribution(values: pd.Series) -> optuna.distributions.BaseDistribution:
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values) or values.isna().any():
        return optuna.distributions.CategoricalDistribution(sorted(categories(values).unique()))
    low, high = values.min(), values.max()
    if pd.api.types.is_integer_dtype(values):
        return optuna.distributions.IntDistribution(int(low), int(high))
    return optuna.distributions.FloatDistribution(float(low), float(high), log=low > 0 and high / low >= 100)


def rebuilt_study(trials: pd.DataFrame, params: Sequence[str], metric: str) -> optuna.Study:
    """A maximising in-memory study holding one completed trial per row (value = `metric`)."""
    dists = {p: _distribution(trials[p]) for p in params}
    names = {p: categories(trials[p]) for p, d in dists.items()
             if isinstance(d, optuna.distributions.CategoricalDistribution)}
    study = optuna.create_study(direction="maximize")
    for i, row in trials.iterrows():
        values = {p: names[p][i] if p in names else int(row[p])
                  if isinstance(d, optuna.distributions.IntDistribution) else float(row[p]) for p, d in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=float(row[metric])))
    return study


def importances(study: optuna.Study, evaluator: str) -> dict[str, float]:
    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    return optuna.importance.get_param_importances(study, evaluator=EVALUATORS[evaluator](), target=target)


def parallel_coordinates(trials: pd.DataFrame, params: Sequence[str], metric: str,
                         title: str = "") -> tuple[Figure, pd.DataFrame]:
    """Each trial a line across one axis per parameter and the metric, values scaled to [0, 1] per axis (log scale
    for positive ranges spanning ≥ 100×, categories evenly spaced); colour = metric; stopped trials dashed, ending
    in ×. Trials sharing a configuration (the same value on every parameter axis) are drawn side by side, the legend
    says how many.
    Returns the figure and the plotted positions before that spread (one row per trial, in line order), with
    `shared` = k and `status`."""
    axes_names = [*params, metric]
    trials = trials.sort_values(metric, kind="stable")
    if "pair" in params:
        trials = trials.assign(pair=trials["pair"].map(pair_label))
    scaled, ticks = {}, {}
    for name in axes_names:
        values = trials[name]
        dist = _distribution(values)
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            choices = list(dist.choices)
            pos = np.linspace(0, 1, len(choices)) if len(choices) > 1 else np.array([0.5])
            scaled[name] = categories(values).map(dict(zip(choices, pos))).to_numpy(float)
            ticks[name] = list(zip(pos, choices))
        else:
            x = np.log10(values.to_numpy(float)) if getattr(dist, "log", False) else values.to_numpy(float)
            span = x.max() - x.min()
            scaled[name] = (x - x.min()) / span if span else np.full(len(x), 0.5)
            unit = "%" if name == metric else ""
            ticks[name] = [(0.0 if span else 0.5, f"{values.min():.4g}{unit}")] + (
                [(1.0, f"{values.max():.4g}{unit}")] if span else [])
    data = pd.DataFrame(scaled, index=trials.index)
    config = data[list(params)].round(9).apply(tuple, axis=1)
    shared = config.map(config.value_counts()).to_numpy()
    spread = (config.groupby(config).cumcount().to_numpy() - (shared - 1) / 2) * np.minimum(
        0.02, SHARED_SPREAD / np.maximum(shared - 1, 1))
    status = trials["status"] if "status" in trials.columns else pd.Series("ok", index=trials.index)
    fig = Figure(figsize=(max(5.0, 1.7 * len(axes_names)), 4.4), layout="constrained")
    ax = fig.subplots()
    norm = Normalize(trials[metric].min(), trials[metric].max())
    cmap = colormaps["viridis"]
    for (_, row), value, offset, stopped in zip(data.iterrows(), trials[metric], spread, status == "stopped"):
        ys = row.to_numpy() + np.r_[np.full(len(params), offset), 0.0]
        ax.plot(range(len(axes_names)), ys, "--" if stopped else "-", color=cmap(norm(value)), alpha=0.85)
        ax.plot(len(params), ys[-1], "x" if stopped else "o", color=cmap(norm(value)), markersize=6)
    for i, name in enumerate(axes_names):
        for y, label in ticks[name]:
            ax.annotate(label, (i, y), xytext=(6, 0), textcoords="offset points", fontsize=7, va="center",
                        bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_xticks(range(len(axes_names)), [*params, METRIC_NAMES.get(metric, metric)], rotation=20)
    ax.set_xlim(-0.3, len(axes_names) - 0.6)
    ax.set_yticks([])
    ax.grid(axis="x", color="k", alpha=0.6)
    colorbar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label=f"{METRIC_NAMES.get(metric, metric)}")
    percent_axis(colorbar.ax.yaxis)
    counts = status.value_counts()
    handles = [Line2D([], [], color="0.3", linestyle="-", marker="o", label=f"finished (n={counts.get('ok', 0)})")]
    if counts.get("stopped", 0):
        handles.append(Line2D([], [], color="0.3", linestyle="--", marker="x",
                              label=f"stopped early by the scheduler (n={counts['stopped']})"))
    sizes = config.value_counts().value_counts().sort_index()
    if sizes.index.max() > 1:
        repeated = ", ".join(f"{n} configuration{'s' * (n > 1)} run {k}×" for k, n in sizes.items() if k > 1)
        handles.append(Line2D([], [], color="0.3", linewidth=0.8,
                              label=f"{repeated}: their lines side by side"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig, data.assign(shared=shared, status=status)


def _importance_table(records: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in records for c in r if c != "scope"))
    return render(["Scope", *cols], [[r["scope"], *(f"{r[c]:.3f}" if c in r else "—" for c in cols)]
                                     for r in records], "md")


def sweep_section(trials: pd.DataFrame, metric: str, evaluator: str) -> tuple[list[str], list[dict], list[str]]:
    """Markdown lines of one sweep (best configuration per pair, per-pair importances or why there are none), the
    importance records (scope = pair) and the sweep's varying parameters ([] when nothing varies)."""
    params = varying_params(trials)
    if not params:
        return ["No hyperparameter varies among these trials.", ""], [], []
    best = best_configs(trials, params, metric)
    config = [p for p in params if p != "pair"]
    rows = [[r["pair"], Stat(r["mean"], r["std"], int(r["n"])).text(), *(value_text(r[p]) for p in config), r["trials"]]
            for _, r in best.iterrows()]
    lines = ["### Best configuration per pair", "", render(["Pair", metric, *config, "trials"], rows, "md"),
             "### Hyperparameter importances", ""]
    records, notes = [], []
    for pair, group in trials.groupby("pair", sort=True):
        own = [p for p in config if categories(group[p]).nunique() > 1]
        if not own:
            continue
        if len(group) < importance_minimum(len(own)):
            notes.append(f"- {pair}: left out, {len(group)} trials for {len(own)} varying hyperparameters; "
                         f"importances need at least {importance_minimum(len(own))} trials (max({MIN_TRIALS}, "
                         f"{MIN_TRIALS_PER_PARAM} per hyperparameter))")
            continue
        records.append({"scope": pair, **importances(rebuilt_study(group, own, metric), evaluator)})
    if records:
        lines += [f"Optuna {evaluator} importances of {metric} per pair (normalised to sum 1 per row)", "",
                  _importance_table(records)]
    lines += (notes + [""] if notes else ["No pair has a varying hyperparameter.", ""] if not records else [])
    return lines, records, params


def _load_study(storage: str, name: str | None) -> optuna.Study:
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # SQLAlchemy raises its own types for unreachable or malformed URLs
        raise UserError(f"cannot open the Optuna storage {storage!r}: {exc}") from None
    if name is None and len(names) != 1:
        raise UserError(f"--study-name is needed: {storage!r} holds the studies {', '.join(names) or 'none'}")
    if name is not None and name not in names:
        raise UserError(f"unknown study {name!r} in {storage!r}; valid choices: {', '.join(sorted(names))}")
    return optuna.load_study(study_name=name or names[0], storage=storage)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="analysis/sweep_report.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help=RESULTS_HELP)
    p.add_argument("--sweep", default=None, help="only trials of this sweep")
    p.add_argument("--dataset", default=None, help="only trials of this dataset")
    p.add_argument("--method", default=None, help="only trials of this method")
    p.add_argument("--last", action="store_true", help="score configurations by last-epoch top-1")
    p.add_argument("--include-stopped", action="store_true", help="also count trials the scheduler stopped early, "
                   "with the best top-1 they reached (biased toward the configurations it kept)")
    p.add_argument("--evaluator", default="fanova", choices=sorted(EVALUATORS), help="Optuna importance evaluator "
                   "(default fanova, seeded)")
    p.add_argument("--study", default=None, metavar="URL", help="Optuna storage (sqlite:///path.db) whose study's "
                   "importances are added to the report")
    p.add_argument("--study-name", default=None, help="study in --study (needed when it holds several)")
    p.add_argument("--out-dir", default="analysis_out", help="folder for sweep_report.md, importances.csv and "
                   "parallel_coordinates[_<sweep>].png/pdf (default analysis_out)")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    metric = "last_top1" if args.last else "best_top1"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = select(read_trials(args.results), {"sweep": args.sweep, "dataset": args.dataset,
                                                "method": args.method})
    require_columns(trials, ["sweep", "pair", "trial_id", metric], "the sweep report")
    trials, note = ok_trials(trials, ("ok", "stopped") if args.include_stopped else ("ok",))
    trials, _ = dedupe_runs(trials)
    out = Path(args.out_dir)
    text, records, figures = ["# Sweep report", "", f"- {note}", ""], [], []
    sweeps = sorted(trials["sweep"].unique())
    for sweep in sweeps:
        group = trials[trials["sweep"] == sweep]
        lines, imp, params = sweep_section(group, metric, args.evaluator)
        text += [f"## Sweep {sweep} ({len(group)} trials)", "", *lines]
        records += [{"sweep": sweep, **r} for r in imp]
        if params:
            stem = "parallel_coordinates" if len(sweeps) == 1 else f"parallel_coordinates_{sweep}"
            title = figure_title(group, f"{METRIC_NAMES[metric]} and hyperparameters, one line per trial")
            figures += save_figure(parallel_coordinates(group, params, metric, title)[0], out / stem)
    if args.study:
        study = _load_study(args.study, args.study_name)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        searched = len({p for t in done for p in t.params})
        text += [f"## Optuna study {study.study_name}", ""]
        if len(done) < importance_minimum(searched):
            text += [f"Importances left out: {len(done)} completed trials for {searched} hyperparameters; they need "
                     f"at least {importance_minimum(searched)}.", ""]
        else:
            imp = {"scope": f"study {study.study_name}", **importances(study, args.evaluator)}
            records.append(imp)
            text += [f"Optuna {args.evaluator} importances of the study's objective", "", _importance_table([imp])]
    if not figures and not args.study:
        raise UserError(f"no hyperparameter varies within any sweep ({', '.join(sweeps)}); nothing to report "
                        "beyond the table of analysis/tables.py")
    outputs = write_text("\n".join(text), str(out / "sweep_report.md"))
    pd.DataFrame(records).to_csv(out / "importances.csv", index=False, float_format="%.4f")
    return [*outputs, out / "importances.csv", *figures]


def run(argv: Sequence[str] | None = None) -> int:
    return cli(main, parser(), argv)


if __name__ == "__main__":
    raise SystemExit(run())
