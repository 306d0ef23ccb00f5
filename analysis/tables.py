"""The paper's comparison table (UHKD Tables 1-2 layout) from sweep results.

Rows are teacher→student pairs grouped by student family; columns are the teacher's top-1 (mean over its
checkpoints: every trial of a pair evaluates the same checkpoint again) and one column per method present in the
results (the student trained alone, `scratch`, then each distillation method), in the method registry's order with
its display names; every cell is mean ± std over seeds with the number of seeds. Results without a distilled trial
(the teachers sweep, `--tag teacher`; a grid of `scratch` alone) give one row per model trained alone.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis.common import (RESULTS_HELP, Stat, cli, dedupe_runs, display_names, ok_trials, pair_label,
                             published_results, read_trials, render, require_columns, select, signed, write_text)
from uhkd.errors import OneLineParser, UserError

FAMILIES = {"cnn": "CNN students", "vit": "ViT students", "mlp": "MLP students"}
CLAIM = "uhkd_max_gain_over_ofa"
METRICS = {"best_top1": "best-epoch", "last_top1": "last-epoch"}


def method_columns(present: set[str]) -> list[str]:
    """The methods present, in the registry's order (publication year; `scratch` first), then any the registry
    lacks (a plugin not loaded here) by name."""
    from uhkd.methods import registered

    known = [cls.name for cls in registered() if cls.name in present]
    return known + sorted(present - set(known))


def method_header(name: str) -> str:
    from uhkd.methods import method_class

    try:
        return method_class(name).display
    except UserError:
        return name


def reference_key(name: str) -> str:
    """The method's key in the published-results reference file."""
    from uhkd.methods import method_class

    try:
        return method_class(name).reference
    except UserError:
        return name


@dataclass
class Row:
    family: str
    teacher: str
    student: str
    teacher_top1: Stat
    cells: dict[str, Stat]  # the table's metric
    other: dict[str, Stat]  # the other top-1 (last-epoch when the table is best-epoch, and vice versa)
    borrowed: dict[str, str] = field(default_factory=dict)  # method -> `weights_from` of settings searched elsewhere

    @property
    def best(self) -> list[str]:
        """The method(s) with the highest mean in this row, compared at the 2 decimals shown."""
        means = {m: round(s.mean, 2) for m, s in self.cells.items() if s.n}
        top = max(means.values(), default=math.nan)
        return [m for m, v in means.items() if v == top]

    @property
    def gain(self) -> float:
        """UHKD's mean minus OFA's mean (NaN when either is missing)."""
        none = Stat(math.nan, math.nan, 0)
        return self.cells.get("uhkd", none).mean - self.cells.get("ofa", none).mean


@dataclass
class Table:
    dataset: str
    metric: str
    methods: list[str]  # the method columns, in order
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def compares_uhkd_with_ofa(self) -> bool:
        return {"uhkd", "ofa"} <= set(self.methods)

    @property
    def alone(self) -> bool:
        """Models trained alone, no teacher → student pair: no Teacher column."""
        return all(not r.teacher for r in self.rows)


def _student_kind(name: str) -> str:
    from uhkd.models import model_kind  # lazy: importing models pulls in timm

    return model_kind(name)


def build_table(trials: pd.DataFrame, dataset: str, *, metric: str = "best_top1", split: str | None = "final",
                tag: str | None = "", sweep: str | None = None) -> Table:
    """Aggregate finished trials of `dataset` into the comparison table (see the module docstring)."""
    require_columns(trials, ["dataset", "teacher", "student", "method", "seed", "status", *METRICS, "teacher_top1"],
                    "the comparison table")
    other = next(m for m in METRICS if m != metric)
    trials = select(trials, {"dataset": dataset, "split": split, "tag": tag, "sweep": sweep})
    trials, status_note = ok_trials(trials)
    trials, repeats = dedupe_runs(trials)
    notes = [status_note]
    if repeats:
        notes.append(f"{repeats} repeated runs (same config and seed) dropped; the latest kept")
    methods = method_columns(set(trials["method"]))
    distilled = trials[trials["method"] != "scratch"]
    scratch = trials[trials["method"] == "scratch"]
    rows = []
    if distilled.empty:  # models trained alone: a row each
        notes.append(f"no distilled trials: each model trained alone ({', '.join(methods)})"
                     + ("; the teachers sweep's rows, the top-1 of each teacher checkpoint it wrote"
                        if tag == "teacher" else ""))
        for student, alone in scratch.groupby("student", sort=False):
            rows.append(Row(_student_kind(student), "", student, Stat(math.nan, math.nan, 0),
                            {"scratch": Stat.of(alone[metric])}, {"scratch": Stat.of(alone[other])}))
    for (teacher, student), pair in distilled.groupby(["teacher", "student"], sort=False):
        def stats(column: str) -> dict[str, Stat]:
            return {m: Stat.of((scratch.loc[scratch["student"] == student] if m == "scratch" else
                                pair.loc[pair["method"] == m])[column]) for m in methods}

        borrowed = {m: _borrowed(pair[pair["method"] == m], f"{teacher}:{student}") for m in methods}
        rows.append(Row(_student_kind(student), teacher, student, teacher_stat(pair), stats(metric), stats(other),
                        {m: b for m, b in borrowed.items() if b}))
    order = list(FAMILIES)
    rows.sort(key=lambda r: (order.index(r.family) if r.family in order else len(order), r.student, r.teacher))
    notes.insert(0, f"{dataset}: {METRICS[metric]} top-1 (%), mean ± sample std over seeds (n = seeds)"
                 + (f", split {split}" if split else ""))
    notes.insert(1, "best-epoch = the highest top-1 over the epochs on the evaluation set, the published tables' "
                 "convention (OFA-KD reports its best epoch); picking the epoch on the test set is optimistic"
                 + ("; --last gives last-epoch top-1" if metric == "best_top1" else
                    "; this table is last-epoch (--last)") + "; the CSV carries both")
    if split == "tune":
        notes.append("split tune: the evaluation set is the seeded 10% held out of the training set, which the "
                     "teachers trained on (sweeps/teachers.py trains on the final split), so the Teacher column is "
                     "optimistic; tune-split numbers rank settings, they are not comparable with published ones")
    if any(r.borrowed for r in rows):
        notes.append("‡ settings searched on another pair (no finished hetero_pairs trial of this pair): "
                     + "; ".join(f"{method_header(m)} on {pair_label(f'{r.teacher}:{r.student}')} from trial {b}"
                                 for r in rows for m, b in r.borrowed.items()))
    if "model.scale" in trials.columns and set(trials["model.scale"]) - {"full"}:
        notes.append(f"model.scale: {', '.join(sorted(set(trials['model.scale'])))} (scaled-down models)")
    return Table(dataset, metric, methods, rows, notes)


def teacher_stat(pair: pd.DataFrame) -> Stat:
    """The teacher's top-1 of a pair's trials: every trial evaluates its teacher checkpoint again on the same set,
    so each checkpoint counts once (the mean of its trials), n = checkpoints. A run without one (a random teacher,
    `model.random_teacher`) has a teacher of its own per seed."""
    source = (pair["model.teacher_checkpoint"].fillna("") if "model.teacher_checkpoint" in pair.columns
              else pd.Series("", index=pair.index))
    source = source.where(source != "", "random teacher, seed " + pair["seed"].astype(str))
    return Stat.of(pair.groupby(source)["teacher_top1"].mean())


def _borrowed(trials: pd.DataFrame, pair: str) -> str:
    """The `weights_from` values ("<trial id> <pair>") of trials whose settings come from another pair."""
    if "weights_from" not in trials.columns:  # results written before the column existed
        return ""
    sources = sorted({w for w in trials["weights_from"].dropna() if w and w.split(" ", 1)[-1] != pair})
    return ", ".join(sources)


def _published_lookup(dataset: str) -> dict[tuple[str, str, str], tuple[float, str]]:
    """(teacher timm name, student timm name, method) -> (top-1, confidence); teacher rows use method "teacher"."""
    pub = published_results()
    pub = pub[pub["dataset"] == dataset]
    return {(t, s, m): (v, c) for t, s, m, v, c in
            zip(pub["teacher_timm"], pub["student_timm"], pub["method"], pub["top1"], pub["confidence"])}


def gain_footer(table: Table) -> str:
    """UHKD's gain over OFA against the paper's claim (the abstract's headline number)."""
    gains = [(r.gain, r) for r in table.rows if not math.isnan(r.gain)]
    claim = _published_lookup(table.dataset).get(("", "", CLAIM))
    claimed = (f"paper's claim (UHKD abstract): max {signed(claim[0])}" if claim
               else f"no published claim for {table.dataset}")
    if not gains:
        return f"UHKD − OFA: no pair has both UHKD and OFA results; {claimed}"
    best_gain, best_row = max(gains, key=lambda g: g[0])
    mean_gain = sum(g for g, _ in gains) / len(gains)
    pair = pair_label(f"{best_row.teacher}:{best_row.student}")
    return (f"UHKD − OFA over {len(gains)} pairs: mean {signed(mean_gain)}, max {signed(best_gain)} ({pair}); "
            f"{claimed}")


def format_table(table: Table, fmt: str = "md", published: bool = False) -> str:
    """Render as Markdown / LaTeX (formatted cells, best bold) or CSV (numeric columns)."""
    pub = _published_lookup(table.dataset) if published else {}

    def pub_of(row: Row, column: str) -> tuple[float, str] | None:
        ref = reference_key(column) if column != "teacher" else column
        key = ((row.teacher, "", "teacher") if column == "teacher" else
               ("", row.student, ref) if column == "scratch" else (row.teacher, row.student, ref))
        return pub.get(key)

    columns = [*([] if table.alone else ["teacher"]), *table.methods]
    lead = 1 + len(columns) - len(table.methods)  # table columns before the first method's
    gain = table.compares_uhkd_with_ofa
    other = next(m for m in METRICS if m != table.metric).split("_")[0]  # "last" or "best"
    if fmt == "csv":
        records = []
        for row in table.rows:
            rec = {"family": row.family, "teacher": row.teacher, "student": row.student}
            for col in columns:
                stat = row.teacher_top1 if col == "teacher" else row.cells[col]
                rec.update({f"{col}_mean": stat.mean, f"{col}_std": stat.std, f"{col}_n": stat.n})
                if col != "teacher":
                    alt = row.other[col]
                    rec.update({f"{col}_{other}_mean": alt.mean, f"{col}_{other}_std": alt.std})
                if published:
                    value = pub_of(row, col)
                    rec[f"{col}_published"] = value[0] if value else math.nan
                    rec[f"{col}_diff"] = stat.mean - value[0] if value else math.nan
            rec.update({"best": ";".join(row.best), "metric": table.metric,
                        **({"uhkd_gain_over_ofa": row.gain} if gain else {}),
                        **{f"{m}_settings_borrowed_from": row.borrowed.get(m, "") for m in table.methods}})
            records.append(rec)
        return pd.DataFrame(records).to_csv(index=False, float_format="%.4f")

    names = display_names()
    header = [f"{'Model' if table.alone else 'Teacher → Student'} ({METRICS[table.metric]} top-1 %)",
              *([] if table.alone else ["Teacher"]),
              *("Trained alone" if table.alone else method_header(m) for m in table.methods),
              *(["Δ UHKD−OFA"] if gain else [])]
    rows: list[list[str]] = []
    bold = []
    conflict = False
    for family in dict.fromkeys(r.family for r in table.rows):
        label = FAMILIES.get(family, f"{family} students")
        rows.append([f"*{label}*" if fmt == "md" else label] + [""] * (len(header) - 1))
        for row in (r for r in table.rows if r.family == family):
            student = names.get(row.student, row.student)
            cells = [f"{names.get(row.teacher, row.teacher)} → {student}" if row.teacher else student]
            for col in columns:
                stat = row.teacher_top1 if col == "teacher" else row.cells[col]
                text = stat.text(unit="checkpoint" if col == "teacher" else "")
                if published:
                    value = pub_of(row, col)
                    if value is None:
                        text += " / pub n/a"
                    else:
                        mark = "†" if value[1] == "conflict" else ""
                        conflict |= bool(mark)
                        diff = f" (Δ {signed(stat.mean - value[0])})" if stat.n else ""
                        text += f" / pub {value[0]:.2f}{mark}{diff}"
                cells.append(text + ("‡" if col in row.borrowed else ""))
            if len(table.methods) > 1:
                bold += [(len(rows), lead + table.methods.index(m)) for m in row.best]
            if gain:
                cells.append(signed(row.gain))
            rows.append(cells)
    notes = [*table.notes, *([gain_footer(table)] if gain else []),
             *(["bold: best method of the row"] if len(table.methods) > 1 else [])]
    if published and not pub:
        notes.append(f"no published numbers for {table.dataset} in uhkd/reference/published_results.csv")
    elif published:
        notes.append("pub = published top-1 (uhkd/reference/published_results.csv), Δ = ours − published, "
                     "pub n/a = no published value" + ("; † = sources disagree" if conflict else ""))
    return render(header, rows, fmt, notes=notes, bold=bold)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="analysis/tables.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help=RESULTS_HELP)
    p.add_argument("--dataset", required=True, help="dataset column value: cifar100, imagenet1k, mnist5k, ...")
    p.add_argument("--format", default="md", choices=("md", "latex", "csv"), help="output format (default md)")
    p.add_argument("--out", default="", help="output file (default: print to stdout)")
    p.add_argument("--last", action="store_true", help="use last-epoch top-1 (last_top1) instead of best_top1")
    p.add_argument("--published", action="store_true",
                   help="put the published numbers beside ours with the difference")
    p.add_argument("--split", default="final", help="only trials of this data split (default final; '' = any)")
    p.add_argument("--tag", default="", help="only trials with this tag (default '' = untagged, i.e. not ablation "
                   "variants; '*' = any tag)")
    p.add_argument("--sweep", default=None, help="only trials of this sweep (default: every sweep)")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    table = build_table(read_trials(args.results), args.dataset, metric="last_top1" if args.last else "best_top1",
                        split=args.split or None, tag=None if args.tag == "*" else args.tag, sweep=args.sweep)
    return write_text(format_table(table, args.format, published=args.published), args.out)


def run(argv: Sequence[str] | None = None) -> int:
    return cli(main, parser(), argv)


if __name__ == "__main__":
    raise SystemExit(run())
