"""Sweep report: the best configuration per pair, Optuna hyperparameter importances and a parallel-coordinates plot.

One section per sweep. Hyperparameters are the run-config columns (flat dotted keys) that vary among a sweep's
finished trials; teacher and student appear as `pair`, seeds are averaged (a configuration's score is its mean over
seeds). Importances come from an Optuna study rebuilt from the trial rows of each pair (one completed Optuna trial
per row); --study sqlite:///path.db adds the importances of the sweep's own persisted study.
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

from analysis.common import (RESULTS_HELP, Stat, cli, dedupe_runs, ok_trials, pair_label, read_trials, render,
                             require_columns, save_figure, select, write_text)
from uhkd.config import LEAF_TYPES, method_key
from uhkd.errors import UserError

# Run identity and location, not hyperparameters; teacher and student are reported together as `pair`.
NOT_SEARCHED = {"seed", "name", "output_dir", "data.root", "model.teacher_checkpoint", "model.pretrained_file",
                "model.teacher", "model.student"}
EVALUATORS = {
    "fanova": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0),
    "ped-anova": optuna.importance.PedAnovaImportanceEvaluator,
    "mdi": lambda: optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0),
}


def varying_params(trials: pd.DataFrame) -> list[str]:
    """Config columns (and `pair`) with more than one distinct value among `trials`: the run's fields and the
    methods' parameters (`method.<name>.<param>`)."""
    keys = ["pair"] + [k for k in trials.columns if (k in LEAF_TYPES or method_key(k)) and k not in NOT_SEARCHED]
    return [k for k in keys if k in trials.columns and trials[k].astype(str).nunique() > 1]


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


def _text(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _distribution(values: pd.Series) -> optuna.distributions.BaseDistribution:
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values) or values.isna().any():
        return optuna.distributions.CategoricalDistribution(sorted(values.astype(str).unique()))
    low, high = values.min(), values.max()
    if pd.api.types.is_integer_dtype(values):
        return optuna.distributions.IntDistribution(int(low), int(high))
    return optuna.distributions.FloatDistribution(float(low), float(high), log=low > 0 and high / low >= 100)


def rebuilt_study(trials: pd.DataFrame, params: Sequence[str], metric: str) -> optuna.Study:
    """A maximising in-memory study holding one completed trial per row (value = `metric`)."""
    dists = {p: _distribution(trials[p]) for p in params}
    study = optuna.create_study(direction="maximize")
    for _, row in trials.iterrows():
        values = {p: str(row[p]) if isinstance(d, optuna.distributions.CategoricalDistribution)
                  else int(row[p]) if isinstance(d, optuna.distributions.IntDistribution) else float(row[p])
                  for p, d in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=float(row[metric])))
    return study


def importances(study: optuna.Study, evaluator: str) -> dict[str, float]:
    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    return optuna.importance.get_param_importances(study, evaluator=EVALUATORS[evaluator](), target=target)


def parallel_coordinates(trials: pd.DataFrame, params: Sequence[str], metric: str) -> tuple[Figure, pd.DataFrame]:
    """Each trial a line across one axis per parameter and the metric, values scaled to [0, 1] per axis
    (log scale for positive ranges spanning ≥ 100×, categories evenly spaced); colour = metric.
    Returns the figure and the plotted positions (one row per trial, in line order)."""
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
            scaled[name] = values.astype(str).map(dict(zip(choices, pos))).to_numpy(float)
            ticks[name] = list(zip(pos, choices))
        else:
            x = np.log10(values.to_numpy(float)) if getattr(dist, "log", False) else values.to_numpy(float)
            span = x.max() - x.min()
            scaled[name] = (x - x.min()) / span if span else np.full(len(x), 0.5)
            ticks[name] = [(0.0 if span else 0.5, f"{values.min():.4g}")] + ([(1.0, f"{values.max():.4g}")]
                                                                             if span else [])
    data = pd.DataFrame(scaled, index=trials.index)
    fig = Figure(figsize=(max(4.0, 1.6 * len(axes_names)), 4), layout="constrained")
    ax = fig.subplots()
    norm = Normalize(trials[metric].min(), trials[metric].max())
    cmap = colormaps["viridis"]
    for (_, row), value in zip(data.iterrows(), trials[metric]):
        ax.plot(range(len(axes_names)), row.to_numpy(), color=cmap(norm(value)), alpha=0.8)
    for i, name in enumerate(axes_names):
        for y, label in ticks[name]:
            ax.text(i, y, f" {label}", fontsize=7, va="center")
    ax.set_xticks(range(len(axes_names)), axes_names, rotation=20)
    ax.set_yticks([])
    ax.grid(axis="x", color="k", alpha=0.6)
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label=metric)
    return fig, data


def _importance_table(records: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in records for c in r if c != "scope"))
    return render(["Scope", *cols], [[r["scope"], *(f"{r[c]:.3f}" if c in r else "—" for c in cols)]
                                     for r in records], "md")


def sweep_section(trials: pd.DataFrame, metric: str, evaluator: str) -> tuple[list[str], list[dict], list[str]]:
    """Markdown lines of one sweep (best configuration per pair, per-pair importances), the importance records
    (scope = pair) and the sweep's varying parameters ([] when nothing varies)."""
    params = varying_params(trials)
    if not params:
        return ["No hyperparameter varies among these trials.", ""], [], []
    best = best_configs(trials, params, metric)
    config = [p for p in params if p != "pair"]
    rows = [[r["pair"], Stat(r["mean"], r["std"], int(r["n"])).text(), *(_text(r[p]) for p in config), r["trials"]]
            for _, r in best.iterrows()]
    lines = ["### Best configuration per pair", "", render(["Pair", metric, *config, "trials"], rows, "md"),
             "### Hyperparameter importances", ""]
    records = []
    for pair, group in trials.groupby("pair", sort=True):
        own = [p for p in config if group[p].astype(str).nunique() > 1]
        if own and len(group) >= 2:
            records.append({"scope": pair, **importances(rebuilt_study(group, own, metric), evaluator)})
    lines += ([f"Optuna {evaluator} importances of {metric} per pair (normalised to sum 1 per row)", "",
               _importance_table(records)] if records else
              ["No pair has two or more trials with a varying hyperparameter.", ""])
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
    p = argparse.ArgumentParser(prog="analysis/sweep_report.py", description=__doc__,
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
            figures += save_figure(parallel_coordinates(group, params, metric)[0], out / stem)
    if args.study:
        study = _load_study(args.study, args.study_name)
        imp = {"scope": f"study {study.study_name}", **importances(study, args.evaluator)}
        records.append(imp)
        text += [f"## Optuna study {study.study_name}", "",
                 f"Optuna {args.evaluator} importances of the study's objective", "", _importance_table([imp])]
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
