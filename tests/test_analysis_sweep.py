"""Analysis scripts on the Parquet tables of real quick sweeps (reproduce_tables and ablations), run once per test
session on the shared local Ray cluster: the tables and figures must hold exactly the numbers of the trial rows."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import ablations, curves, similarity, sweep_report, tables
from analysis.common import read_epochs, read_trials
from sweeps import ablations as ablation_sweep
from sweeps import reproduce_tables
from uhkd.models import create_stage_model, save_model_checkpoint
from uhkd.sweep.runner import main as run_sweep

PAIR = "swin_tiny_patch4_window7_224:resnet18"
TINY = ["--preset", "quick", "--pairs", PAIR, "--epochs", "1", "--workers-per-trial", "0",
        "--set", "data.limit_train=256", "--set", "data.limit_eval=128"]


@pytest.fixture(scope="session")
def quick_results(tmp_path_factory, ray_local) -> Path:
    """A results root with a reproduce_tables sweep (scratch, kd, ofa, rsd, uhkd x seeds 0, 1) and an ablations sweep
    (full UHKD and the β curve points), one epoch each, against an untrained tiny teacher checkpoint."""
    root = tmp_path_factory.mktemp("quick")
    teachers = root / "teachers"
    torch.manual_seed(0)
    save_model_checkpoint(teachers / "swin_tiny_patch4_window7_224.pth",
                          create_stage_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=32,
                                             scale="tiny"))
    common = [*TINY, "--results", str(root / "results"), "--teacher-dir", str(teachers)]
    assert run_sweep(reproduce_tables.parser(), reproduce_tables.build,
                     [*common, "--seeds", "0,1", "--name", "tables", "--weights-from", "none"]) == 0
    assert run_sweep(ablation_sweep.parser(), ablation_sweep.build,
                     [*common, "--seeds", "0", "--name", "ablations", "--only", "beta"]) == 0
    return root / "results"


@pytest.fixture(scope="session")
def table_trials(quick_results) -> pd.DataFrame:
    return read_trials(quick_results / "tables")


def md_cells(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip().strip("*") for c in line.strip("|").split("|")]


def test_table_matches_the_trial_rows(quick_results, table_trials, tmp_path, capsys):
    assert len(table_trials) == 10 and set(table_trials["status"]) == {"ok"}
    assert tables.run([str(quick_results), "--dataset", "mnist5k"]) == 0
    text = capsys.readouterr().out
    cells = dict(zip(md_cells(text, "Teacher → Student (best-epoch top-1 %)"), md_cells(text, "Swin-T → ResNet18")))
    by_method = table_trials.groupby("method")["best_top1"]
    for header, method in (("Scratch", "scratch"), ("KD", "kd"), ("OFA", "ofa"), ("RSD", "rsd"), ("UHKD", "uhkd")):
        values = by_method.get_group(method)
        assert cells[header] == f"{values.mean():.2f} ± {values.std():.2f} (n=2)"
    assert not {"DKD", "DIST", "FitNet", "PAT"} & set(cells)  # not run: no column
    gain = by_method.get_group("uhkd").mean() - by_method.get_group("ofa").mean()
    assert cells["Δ UHKD−OFA"] == f"{gain:+.2f}"
    assert "10 trials with status ok; none excluded" in text and "model.scale: tiny" in text

    out = tmp_path / "last.csv"
    assert tables.run([str(quick_results), "--dataset", "mnist5k", "--last", "--format", "csv", "--out",
                       str(out)]) == 0
    row = pd.read_csv(out).iloc[0]
    last = table_trials.groupby("method")["last_top1"]
    assert row["kd_mean"] == pytest.approx(last.get_group("kd").mean(), abs=1e-4)
    assert row["teacher_mean"] == pytest.approx(table_trials["teacher_top1"].dropna().mean(), abs=1e-4)
    assert row["scratch_n"] == 2 and row["uhkd_n"] == 2


def test_curves_match_the_epoch_rows(quick_results, tmp_path):
    out = tmp_path / "curves"
    assert curves.run([str(quick_results / "tables"), "--method", "uhkd", "--out-dir", str(out)]) == 0
    data = pd.read_csv(out / "curves.csv")
    epochs, trials = read_epochs(quick_results / "tables"), read_trials(quick_results / "tables")
    uhkd = epochs[epochs["trial_id"].isin(trials.loc[trials["method"] == "uhkd", "trial_id"])]
    assert set(data["metric"]) == {"top1", "loss", "loss_ce", "loss_kl", "loss_feat"}
    for metric in ("top1", "loss_feat"):
        assert data.loc[data["metric"] == metric, "mean"].iloc[0] == pytest.approx(uhkd[metric].mean())
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_ablations_match_the_tagged_rows(quick_results, tmp_path):
    trials = read_trials(quick_results / "ablations").set_index("tag")
    assert sorted(trials.index) == ["beta=0.2", "beta=5", "full"]
    out = tmp_path / "abl"
    assert ablations.run([str(quick_results), "--sweep", "ablations", "--out-dir", str(out)]) == 0
    md = (out / "ablation_table.md").read_text()
    full = trials.loc["full", "best_top1"]
    assert md_cells(md, "full") == ["full", f"{full:.2f} (n=1)"]
    beta = trials.loc["beta=5", "best_top1"]
    assert md_cells(md, "beta=5") == ["beta=5", f"{beta:.2f} (n=1) (Δ {beta - full:+.2f})"]

    data = ablations.curve_data(read_trials(quick_results / "ablations"))
    fig = ablations.plot_curves(data)
    assert [ax.get_xlabel() for ax in fig.axes] == ["β"]
    assert fig.axes[0].lines[0].get_xdata().tolist() == [0.2, 1.0, 5.0]
    assert fig.axes[0].lines[0].get_ydata().tolist() == [trials.loc[t, "best_top1"] for t in ("beta=0.2", "full",
                                                                                              "beta=5")]


def test_sweep_report_on_the_grid(quick_results, table_trials, tmp_path):
    out = tmp_path / "report"
    assert sweep_report.run([str(quick_results), "--sweep", "tables", "--out-dir", str(out)]) == 0
    md = (out / "sweep_report.md").read_text()
    best = table_trials[table_trials["pair"] == PAIR].groupby("method")["best_top1"].mean()
    cells = md_cells(md, PAIR)
    chosen = next(m for m in best.index if m in cells)
    assert cells[1].startswith(f"{best.max():.2f}") and best[chosen] == best.max()
    assert (out / "parallel_coordinates.pdf").read_bytes().startswith(b"%PDF-")


def test_similarity_on_exported_students(quick_results, table_trials, tmp_path):
    rows = table_trials[table_trials["seed"] == 0].set_index("method")
    out = tmp_path / "sim"
    assert similarity.run(["--teacher", "swin_tiny_patch4_window7_224",
                           "--teacher-checkpoint", rows.loc["uhkd", "model.teacher_checkpoint"],
                           "--student", "resnet18", "--student-before", rows.loc["scratch", "student_checkpoint"],
                           "--student-after", rows.loc["uhkd", "student_checkpoint"], "--dataset", "mnist5k",
                           "--img-size", "32", "--scale", "tiny", "--images", "8", "--k", "3",
                           "--out-dir", str(out)]) == 0
    table = pd.read_csv(out / "similarity.csv")
    assert len(table) == 16 and table["mean"].between(-1, 1).all()
    assert (out / "similarity_bars.pdf").read_bytes().startswith(b"%PDF-")
