"""Shared pieces of the analysis scripts: reading sweep Parquet, filters that explain an empty result,
mean ± std cells, display names, table rendering and figure saving."""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from uhkd.errors import UserError, one_line
from uhkd.storage import check_folder
from uhkd.sweep.results import EPOCHS, PARTS, TRIALS, merged_table, open_location, wide

RESULTS_HELP = ("a trials.parquet file, a sweep folder holding trials.parquet (and epochs.parquet), or a results "
                "root holding several sweep folders (concatenated); local paths or pyarrow URIs (file://, s3://, gs://)")


def find_tables(results: str | Path, name: str) -> tuple[pafs.FileSystem, list[str]]:
    """Where the `name` tables (trials.parquet / epochs.parquet) that `results` designates are: one path per sweep,
    whose file may not exist yet while its sweep runs (its rows are still part files beside it)."""
    fs, root = open_location(str(results))
    try:
        info = fs.get_file_info(root)
    except OSError as exc:
        raise UserError(f"results path {str(results)!r} cannot be reached: {one_line(exc, 200)}") from None

    def stored(path: str) -> bool:
        folder = path.rsplit("/", 1)[0]
        return (fs.get_file_info(path).type == pafs.FileType.File
                or fs.get_file_info(f"{folder}/{PARTS}").type == pafs.FileType.Directory)

    if info.type == pafs.FileType.File:
        folder, base = root.rsplit("/", 1)
        # A trials file may have any name; the epochs file is its sibling.
        path = root if name == TRIALS and base != EPOCHS else f"{folder}/{name}"
        paths = [path] if stored(path) else []
    elif info.type == pafs.FileType.Directory:
        direct = f"{root.rstrip('/')}/{name}"
        if stored(direct):
            paths = [direct]
        else:
            subdirs = [i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory]
            paths = sorted(p for p in (f"{d}/{name}" for d in subdirs) if stored(p))
    else:
        raise UserError(f"results path {str(results)!r} does not exist; give {RESULTS_HELP}")
    if not paths:
        raise UserError(f"no {name} found at {str(results)!r}; give {RESULTS_HELP}")
    return fs, paths


def _read(results: str | Path, name: str) -> pd.DataFrame:
    fs, paths = find_tables(results, name)
    try:
        tables = [merged_table(fs, p, name) for p in paths]
    except UserError as err:
        raise UserError(f"{err}; give {RESULTS_HELP} (a sweep's damaged table is rebuilt by continuing that sweep: "
                        f"python sweeps/<sweep>.py --resume --name <sweep>)") from None
    frames = [wide(t, name) for t in tables if t is not None and t.num_rows]
    if not frames:
        raise UserError(f"{name} at {str(results)!r} has no rows yet (no trial has finished)")
    return pd.concat(frames, ignore_index=True)


def read_trials(results: str | Path) -> pd.DataFrame:
    """All trial rows (one per trial) of the sweeps under `results`, each method parameter a column
    `method.<name>.<param>` (null where a row's method lacks it); version 2 tables read alike."""
    return _read(results, TRIALS)


def read_epochs(results: str | Path) -> pd.DataFrame:
    """All per-epoch rows of the sweeps under `results`, each loss term a column `loss_<term>` (null where a row's
    method lacks it)."""
    return _read(results, EPOCHS)


def require_columns(df: pd.DataFrame, columns: Iterable[str], purpose: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"results lack the column(s) {', '.join(missing)} needed for {purpose}")


def select(df: pd.DataFrame, filters: Mapping[str, object], what: str = "trials") -> pd.DataFrame:
    """Rows matching every `column == value` filter; `None` values are skipped.

    An empty result names the filter that emptied it, the filters applied before it and the values available."""
    applied: list[str] = []
    for column, value in filters.items():
        if value is None:
            continue
        require_columns(df, [column], f"the filter {column}={value!r}")
        kept = df[df[column] == value]
        if kept.empty:
            available = ", ".join(repr(v) for v in sorted(df[column].dropna().unique(), key=str)) or "none"
            among = f" among the {' '.join(applied)} {what}" if applied else ""
            raise UserError(f"no {what} with {column}={value!r}{among}; available {column} values: {available}")
        applied.append(f"{column}={value!r}")
        df = kept
    return df


def ok_trials(df: pd.DataFrame, keep: Sequence[str] = ("ok",)) -> tuple[pd.DataFrame, str]:
    """Trials whose `status` is in `keep` (default: finished ones), and a note saying how many others were
    excluded."""
    require_columns(df, ["status"], "keeping finished trials")
    kept = df[df["status"].isin(keep)]
    statuses = "/".join(keep)
    if kept.empty:
        counts = ", ".join(f"{k}: {v}" for k, v in df["status"].value_counts().sort_index().items())
        raise UserError(f"no trial with status {statuses} among {len(df)} trials ({counts})")
    excluded = df.loc[~df["status"].isin(keep), "status"].value_counts().sort_index()
    note = f"{len(kept)} trials with status {statuses}; " + (
        f"{int(excluded.sum())} excluded ({', '.join(f'{k}: {v}' for k, v in excluded.items())})"
        if len(excluded) else "none excluded")
    return kept, note


def dedupe_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the latest row of runs repeated with the same config and seed (same `config_hash`), e.g. a sweep
    re-run under another name in the same results root, so repeats do not count as extra seeds."""
    if "config_hash" not in df.columns or df.empty:
        return df, 0
    order = df.sort_values("finished_at") if "finished_at" in df.columns else df
    keyed = order[order["config_hash"].fillna("") != ""]
    kept = pd.concat([keyed.drop_duplicates("config_hash", keep="last"),
                      order[order["config_hash"].fillna("") == ""]])
    return kept.sort_index(), len(df) - len(kept)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof=1; NaN for one value) and count of a cell's values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stat":
        arr = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=float)
        if arr.size == 0:
            return cls(math.nan, math.nan, 0)
        return cls(float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan, int(arr.size))

    def text(self, digits: int = 2, unit: str = "") -> str:
        """`mean ± std (n=N)`; with a `unit` (what n counts, when not seeds) `mean (1 unit)` or
        `mean ± std (n=N units)`."""
        if self.n == 0:
            return "—"
        std = f" ± {self.std:.{digits}f}" if self.n > 1 else ""
        count = f"n={self.n}" if not unit else f"1 {unit}" if self.n == 1 else f"n={self.n} {unit}s"
        return f"{self.mean:.{digits}f}{std} ({count})"


def signed(value: float, digits: int = 2) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:+.{digits}f}"


def published_results() -> pd.DataFrame:
    """The published numbers shipped with the toolkit (docs/protocol.md#published-numbers): one row per number with its source."""
    with resources.files("uhkd").joinpath("reference/published_results.csv").open() as handle:
        table = pd.read_csv(handle, keep_default_na=False)
    table["top1"] = table["top1"].astype(float)
    return table


# timm names missing from the published table (which names every other model the paper uses).
_EXTRA_NAMES = {"mixer_b16_224": "Mixer-B/16", "resnet34": "ResNet34", "resnet50": "ResNet50",
                "swin_nano_patch4_window7_224": "Swin-N", "swin_pico_patch4_window7_224": "Swin-P"}


def display_names() -> dict[str, str]:
    """timm name -> the paper's short name (ResNet18, Swin-T, ...)."""
    return dict(_display_names())


@lru_cache(maxsize=1)
def _display_names() -> dict[str, str]:
    # read once: pair_label is mapped over every row of a table
    pub = published_results()
    names = dict(_EXTRA_NAMES)
    for timm_col, short_col in (("teacher_timm", "teacher"), ("student_timm", "student")):
        names.update({t: s for t, s in zip(pub[timm_col], pub[short_col]) if t and s})
    return names


def pair_label(pair: str) -> str:
    """"swin_tiny_patch4_window7_224:resnet18" -> "Swin-T→ResNet18"; ":resnet18" (no teacher) -> "ResNet18"."""
    names = _display_names()
    teacher, _, student = pair.partition(":")
    student = names.get(student, student)
    return f"{names.get(teacher, teacher)}→{student}" if teacher else student


def render(header: Sequence[str], rows: Sequence[Sequence[str]], fmt: str, notes: Sequence[str] = (),
           bold: Iterable[tuple[int, int]] = ()) -> str:
    """A text table in `md`, `latex` or `csv`; `bold` holds (row, column) cells to emphasise (md/latex)."""
    bold = set(bold)
    if fmt == "csv":
        return pd.DataFrame(list(rows), columns=list(header)).to_csv(index=False)

    def cell(i: int, j: int, text: str) -> str:
        if fmt == "latex":
            text = _latex_escape(text)
            return f"\\textbf{{{text}}}" if (i, j) in bold else text
        return f"**{text}**" if (i, j) in bold else text

    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell(i, j, t) for j, t in enumerate(r)) + " |" for i, r in enumerate(rows)]
        return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"
    if fmt == "latex":
        lines = [f"\\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}", "\\toprule",
                 " & ".join(_latex_escape(h) for h in header) + " \\\\", "\\midrule"]
        lines += [" & ".join(cell(i, j, t) for j, t in enumerate(r)) + " \\\\" for i, r in enumerate(rows)]
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines + [f"% {n}" for n in notes]) + "\n"
    raise UserError(f"unknown format {fmt!r}; valid choices: csv, latex, md")


def _latex_escape(text: str) -> str:
    for raw, escaped in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"),
                         ("±", "$\\pm$"), ("→", "$\\to$"), ("—", "--"), ("−", "$-$"), ("Δ", "$\\Delta$"),
                         ("†", "\\dag{}")):
        text = text.replace(raw, escaped)
    return text


SPLITS = {"final": "final split: the test set", "tune": "tune split: the held-out part of the training set"}


def figure_title(trials: pd.DataFrame, what: str) -> str:
    """`what`, then the sweep(s), dataset(s) and split(s) of `trials`: every figure says what it shows."""
    def values(column: str) -> list[str]:
        return sorted(trials[column].dropna().astype(str).unique()) if column in trials.columns else []

    splits = [SPLITS.get(s, f"split {s}") for s in values("split")]
    where = [w for w in (", ".join(values("sweep")), ", ".join(values("dataset")), "; ".join(splits)) if w]
    line = " · ".join(where)
    return f"{what}\n" + (line if len(line) <= 110 else "\n".join(where))


def panel_rows(fig: Figure, counts: Sequence[int], width: float = 3.6, height: float = 2.9,
               legend: float = 0.0) -> list[list]:
    """Axes in rows of `counts[i]` panels each and no empty slot (a row with fewer panels has wider ones); `legend`
    inches more on the right for legends beside the rows."""
    fig.set_size_inches(width * max(counts) + legend, height * len(counts))
    if len(set(counts)) == 1:
        return [list(row) for row in fig.subplots(len(counts), counts[0], squeeze=False)]
    return [list(row.subplots(1, n, squeeze=False)[0]) for row, n in zip(fig.subfigures(len(counts), 1), counts)]


def integer_ticks(axis) -> None:
    """Ticks at whole numbers only (epochs, k)."""
    axis.set_major_locator(MaxNLocator(integer=True))


def percent_axis(axis) -> None:
    """Tick labels of a 0-100 top-1 axis in per cent, with the digits the ticks need (95%, 95.5%)."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.6g}%"))


def teacher_line(ax, top1: float, checkpoints: int = 1) -> None:
    """The teacher's top-1 on the same evaluation set as a dashed reference line (none when unknown); `checkpoints`:
    how many distinct measurements `top1` is the mean of."""
    if not pd.isna(top1):
        mean = f" (mean of {checkpoints} checkpoints)" if checkpoints > 1 else ""
        ax.axhline(top1, color="0.35", linestyle="--", linewidth=1, label=f"teacher {top1:.2f}%{mean}")


def row_legend(axes: Sequence) -> None:
    """One legend beside a row of panels, holding every labelled line of the row once (reference lines last)."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = sorted(handles, key=lambda label: label.startswith("teacher "))
    axes[-1].legend([handles[label] for label in order], order, loc="upper left", bbox_to_anchor=(1.02, 1),
                    fontsize="small", frameon=False)


def line_colors(labels: Iterable[str]) -> dict[str, tuple]:
    """One colour per label, the same in every panel of a figure."""
    labels = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write `stem.png` and `stem.pdf`; returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def write_text(text: str, out: str | None) -> list[Path]:
    """Write to `out`, or print to stdout when no file is given."""
    if not out:
        sys.stdout.write(text)
        return []
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return [path]


def check_outputs(args: argparse.Namespace) -> None:
    """Where a script will write, checked before it reads anything: `--out-dir` a folder this user can create or
    write into, `--out` a file in one."""
    if getattr(args, "out_dir", None):
        check_folder(args.out_dir, "--out-dir")
    if getattr(args, "out", None):
        if Path(args.out).expanduser().is_dir():
            raise UserError(f"--out {args.out!r} is a folder; give a file name")
        check_folder(str(Path(args.out).expanduser().resolve().parent), f"the folder of --out {args.out!r},")


def cli(main: Callable[[argparse.Namespace], list[Path]], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Parse, check the outputs, run, print the output paths; a `UserError` becomes one `error:` line and exit
    status 2."""
    args = parser.parse_args(argv)
    try:
        check_outputs(args)
        outputs = main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in outputs:
        print(f"wrote {path}")
    return 0
