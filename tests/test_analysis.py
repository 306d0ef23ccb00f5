"""Analysis scripts on small hand-written results whose expected tables and curves are known."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit.realstack import free_port

from analysis import ablations, common, curves, sweep_report, tables
from uhkd.sweep.results import epoch_record, epochs_schema, trial_record, trials_schema

PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF-"
_ids = itertools.count()

SWIN, VITS, CONVNEXT = "swin_tiny_patch4_window7_224", "vit_small_patch16_224", "convnext_tiny"
R18, DEIT = "resnet18", "deit_tiny_patch16_224"


def trial(teacher: str, student: str, method: str, seed: int, top1: float, **extra) -> dict:
    """One trials.parquet row (the columns the analysis reads)."""
    n = next(_ids)
    uhkd = {"method.uhkd.alpha": 1.0, "method.uhkd.beta": 1.0, "method.uhkd.k": 7, "method.uhkd.band": "low",
            "method.uhkd.spectrum": "amplitude", "method.uhkd.sra": True, "method.uhkd.sca": "linear",
            "method.uhkd.stages": "1,2,3,4"}
    row = {"schema_version": 3, "sweep": "main", "trial_id": f"t{n:03d}", "preset": "cifar100", "tag": "",
           "dataset": "cifar100", "teacher": teacher, "student": student, "method": method,
           "pair": f"{teacher}:{student}", "seed": seed, "split": "final", "model.scale": "full",
           "method.name": method, **(uhkd if method == "uhkd" else {}), "optim.lr": 0.05, "epochs": 3, "epochs_run": 3, "best_top1": top1, "last_top1": top1 - 1.0,
           "teacher_top1": math.nan if method == "scratch" else 89.0 + seed,  # a teacher checkpoint per seed
           "model.teacher_checkpoint": "" if method == "scratch" else f"/teachers/{teacher}-{seed}.pth",
           "status": "ok",
           "failure_reason": "", "config_hash": f"h{n:03d}",
           "finished_at": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=n)}
    row.update(extra)
    return row


def write_results(folder: Path, rows: list[dict], epochs: list[dict] | None = None) -> Path:
    """The rows as a sweep stores them (schema 3: method parameters and loss terms in their map columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([trial_record(r) for r in rows], schema=trials_schema()),
                   folder / "trials.parquet")
    if epochs is not None:
        pq.write_table(pa.Table.from_pylist([epoch_record(r) for r in epochs], schema=epochs_schema()),
                       folder / "epochs.parquet")
    return folder


def table_rows() -> list[dict]:
    rows = [trial(SWIN, R18, "kd", s, v) for s, v in enumerate([78.0, 79.0, 80.0])]
    rows += [trial(SWIN, R18, "ofa", s, v) for s, v in enumerate([80.0, 81.0])]
    rows += [trial(SWIN, R18, "uhkd", s, v) for s, v in enumerate([85.0, 86.0, 87.0])]
    rows += [trial("", R18, "scratch", s, v, pair=f":{R18}") for s, v in enumerate([74.0, 76.0])]
    rows += [trial(CONVNEXT, DEIT, "kd", 0, 70.0), trial(CONVNEXT, DEIT, "dkd", 0, 78.0)]
    rows += [trial(CONVNEXT, DEIT, "ofa", s, v) for s, v in enumerate([75.0, 77.0])]
    rows += [trial(CONVNEXT, DEIT, "uhkd", s, 76.5) for s in range(2)]
    # Never counted: failed / stopped trials, the tuning split, ablation variants, another dataset, a repeat.
    rows += [trial(SWIN, R18, "uhkd", 3, 99.0, status="failed", failure_reason="OOM"),
             trial(SWIN, R18, "kd", 4, 99.0, status="stopped"),
             trial(SWIN, R18, "uhkd", 5, 99.0, split="tune"),
             trial(SWIN, R18, "uhkd", 6, 99.0, tag="w/o SRA"),
             trial(SWIN, R18, "uhkd", 7, 99.0, dataset="imagenet1k")]
    rows.append(dict(rows[0], trial_id="repeat", best_top1=78.0, last_top1=77.0,
                     finished_at=rows[0]["finished_at"] + pd.Timedelta(days=1)))
    return rows


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return write_results(tmp_path_factory.mktemp("results") / "main", table_rows())


def md_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_read_trials_accepts_file_folder_root_and_uri(tmp_path):
    write_results(tmp_path / "a", [trial(SWIN, R18, "kd", 0, 70.0)])
    write_results(tmp_path / "b", [trial(SWIN, R18, "kd", 1, 72.0, sweep="b")])
    assert len(common.read_trials(tmp_path / "a" / "trials.parquet")) == 1
    assert len(common.read_trials(tmp_path / "a")) == 1
    assert sorted(common.read_trials(tmp_path)["best_top1"]) == [70.0, 72.0]
    assert len(common.read_trials(f"file://{tmp_path}")) == 2
    with pytest.raises(common.UserError, match="does not exist"):
        common.read_trials(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no trials.parquet found"):
        common.read_trials(tmp_path / "empty")
    store = f"s3://lab/res?endpoint_override=127.0.0.1:{free_port()}&scheme=http"  # nothing listens there
    with pytest.raises(common.UserError, match=r"^results path 's3://lab/res\?.*' cannot be reached: "):
        common.read_trials(store)


def test_bad_inputs_and_outputs_are_one_line_with_advice_this_command_can_follow(tmp_path, results, capsys):
    """Where a script writes is checked before it reads; a file that is not a results table gets advice that fits
    an analysis script (which has no --resume of its own)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not parquet")
    assert curves.run([str(results), "--out-dir", str(a_file)]) == 2
    assert capsys.readouterr().err == f"error: --out-dir '{a_file}' is a file, not a folder\n"
    assert tables.run([str(results), "--dataset", "cifar100", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --out '{tmp_path}' is a folder; give a file name\n"
    assert tables.run([str(a_file), "--dataset", "cifar100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: results table '{a_file}' ") and err.count("\n") == 1
    assert " run --resume" not in err and "python sweeps/<sweep>.py --resume --name <sweep>" in err
    assert a_file.read_text() == "not parquet"


def test_table_markdown_cells_best_and_gain(results, capsys):
    assert tables.run([str(results), "--dataset", "cifar100"]) == 0
    text = capsys.readouterr().out
    assert md_row(text, "Swin-T → ResNet18") == [
        "Swin-T → ResNet18", "90.00 ± 1.00 (n=3 checkpoints)", "75.00 ± 1.41 (n=2)", "79.00 ± 1.00 (n=3)", "—",
        "80.50 ± 0.71 (n=2)", "**86.00 ± 1.00 (n=3)**", "+5.50"]
    assert md_row(text, "ConvNeXt-T → DeiT-T") == [
        "ConvNeXt-T → DeiT-T", "89.50 ± 0.71 (n=2 checkpoints)", "—", "70.00 (n=1)", "**78.00 (n=1)**",
        "76.00 ± 1.41 (n=2)", "76.50 ± 0.00 (n=2)", "+0.50"]
    firsts = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert firsts[1:] == ["*CNN students*", "Swin-T → ResNet18", "*ViT students*", "ConvNeXt-T → DeiT-T"]
    assert "17 trials with status ok; 2 excluded (failed: 1, stopped: 1)" in text
    assert "1 repeated runs (same config and seed) dropped" in text
    assert ("UHKD − OFA over 2 pairs: mean +3.00, max +5.50 (Swin-T→ResNet18); "
            "paper's claim (UHKD abstract): max +5.59") in text
    # the header and the notes say which top-1 the cells are, and that the published best-epoch one is optimistic
    # one column per method present, in the registry's order, headed by its display name
    assert text.splitlines()[0] == ("| Teacher → Student (best-epoch top-1 %) | Teacher | Scratch | KD | DKD | OFA | "
                                    "UHKD | Δ UHKD−OFA |")
    assert "cifar100: best-epoch top-1 (%)" in text and "picking the epoch on the test set is optimistic" in text
    assert "‡" not in text and "split tune" not in text
    assert tables.run([str(results), "--dataset", "cifar100", "--split", "tune"]) == 0
    assert "split tune: the evaluation set is the seeded 10% held out of the training set, which the teachers " \
           "trained on" in capsys.readouterr().out


def test_table_last_epoch_and_csv(results, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert tables.run([str(results), "--dataset", "cifar100", "--last", "--format", "csv", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    csv = pd.read_csv(out).set_index("student")
    r18 = csv.loc[R18]
    assert (r18["uhkd_mean"], r18["uhkd_std"], r18["uhkd_n"]) == (85.0, 1.0, 3)
    assert (r18["scratch_mean"], r18["kd_mean"], r18["teacher_mean"]) == (74.0, 78.0, 90.0)
    assert r18["uhkd_gain_over_ofa"] == pytest.approx(5.5) and r18["best"] == "uhkd"
    assert csv.loc[DEIT, "best"] == "dkd" and csv.loc[DEIT, "family"] == "vit"
    assert "dist_mean" not in csv.columns and csv.loc[R18, "dkd_n"] == 0  # no DIST trial; no DKD on this pair
    # the CSV carries both top-1 figures: the table's (last) and the other (best = last + 1 in these rows)
    assert (r18["metric"], r18["uhkd_best_mean"], r18["uhkd_best_std"]) == ("last_top1", 86.0, 1.0)
    assert tables.run([str(results), "--dataset", "cifar100", "--last"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("| Teacher → Student (last-epoch top-1 %) |") and "cifar100: last-epoch top-1" in text
    assert tables.run([str(results), "--dataset", "cifar100", "--format", "csv", "--out", str(out)]) == 0
    best = pd.read_csv(out).set_index("student").loc[R18]
    assert (best["metric"], best["uhkd_mean"], best["uhkd_last_mean"]) == ("best_top1", 86.0, 85.0)


def test_table_marks_borrowed_uhkd_settings(tmp_path, capsys):
    """A UHKD cell whose settings were searched on another pair (reproduce_tables' `weights_from`) is marked."""
    rows = [dict(r, weights_from=f"x1 {SWIN}:{R18}" if r["method"] == "uhkd" else "") for r in table_rows()]
    rows = [dict(r, weights_from=f"x2 {SWIN}:{R18}") if r["method"] == "uhkd" and r["student"] == DEIT else r
            for r in rows]
    folder = write_results(tmp_path / "main", rows)
    assert tables.run([str(folder), "--dataset", "cifar100"]) == 0
    text = capsys.readouterr().out
    assert md_row(text, "ConvNeXt-T → DeiT-T")[6] == "76.50 ± 0.00 (n=2)‡"
    assert md_row(text, "Swin-T → ResNet18")[6] == "**86.00 ± 1.00 (n=3)**"  # its own pair's search: no mark
    assert "‡ settings searched on another pair" in text
    assert f"UHKD on ConvNeXt-T→DeiT-T from trial x2 {SWIN}:{R18}" in text
    assert tables.run([str(folder), "--dataset", "cifar100", "--format", "csv"]) == 0
    from io import StringIO
    csv = pd.read_csv(StringIO(capsys.readouterr().out), keep_default_na=False).set_index("student")
    assert csv.loc[DEIT, "uhkd_settings_borrowed_from"] == f"x2 {SWIN}:{R18}"
    assert csv.loc[R18, "uhkd_settings_borrowed_from"] == ""


def test_table_published_join(results, capsys):
    assert tables.run([str(results), "--dataset", "cifar100", "--published"]) == 0
    row = md_row(capsys.readouterr().out, "Swin-T → ResNet18")
    assert row[1] == "90.00 ± 1.00 (n=3 checkpoints) / pub 89.26 (Δ +0.74)"
    assert row[2] == "75.00 ± 1.41 (n=2) / pub 74.01 (Δ +0.99)"
    assert row[3] == "79.00 ± 1.00 (n=3) / pub 78.74 (Δ +0.26)"
    assert row[4] == "— / pub 80.26"  # no DKD run of ours on this pair, a published DKD number
    assert row[5] == "80.50 ± 0.71 (n=2) / pub 80.54 (Δ -0.04)"
    assert row[6] == "**86.00 ± 1.00 (n=3) / pub n/a**"


def test_table_teacher_with_one_checkpoint_counts_it_once(tmp_path, capsys):
    """Every trial of a pair evaluates the same teacher file again: one checkpoint, said so, not `± 0.00 (n=4)`."""
    rows = [trial(SWIN, R18, m, s, 80.0 + s, teacher_top1=90.0, **{"model.teacher_checkpoint": "/t/swin.pth"})
            for m in ("kd", "uhkd") for s in range(2)]
    assert tables.run([str(write_results(tmp_path / "one", rows)), "--dataset", "cifar100"]) == 0
    assert md_row(capsys.readouterr().out, "Swin-T → ResNet18")[1] == "90.00 (1 checkpoint)"


def test_table_of_models_trained_alone(tmp_path, capsys):
    """The teachers sweep's rows (`--tag teacher`, no distilled trial): one row per model, no Teacher column."""
    rows = [trial("", m, "scratch", 0, top1, pair=f":{m}", tag="teacher", teacher_top1=math.nan)
            for m, top1 in ((SWIN, 91.0), (CONVNEXT, 92.5))]
    assert tables.run([str(write_results(tmp_path / "teachers", rows)), "--dataset", "cifar100", "--tag",
                       "teacher"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "| Model (best-epoch top-1 %) | Trained alone |"
    assert md_row(text, "Swin-T") == ["Swin-T", "91.00 (n=1)"]
    assert md_row(text, "ConvNeXt-T") == ["ConvNeXt-T", "92.50 (n=1)"]
    assert "no distilled trials: each model trained alone" in text and "**" not in text


def test_table_published_csv_and_latex(results, capsys):
    assert tables.run([str(results), "--dataset", "cifar100", "--published", "--format", "csv"]) == 0
    from io import StringIO
    csv = pd.read_csv(StringIO(capsys.readouterr().out)).set_index("student")
    assert csv.loc[DEIT, "kd_published"] == 72.99 and csv.loc[DEIT, "kd_diff"] == pytest.approx(-2.99)
    assert math.isnan(csv.loc[DEIT, "uhkd_published"])
    assert tables.run([str(results), "--dataset", "cifar100", "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert "\\textbf{86.00 $\\pm$ 1.00 (n=3)}" in tex and tex.startswith("\\begin{tabular}{lrrrrrrr}")


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar10"], "no trials with dataset='cifar10'; available dataset values: 'cifar100', "
                               "'imagenet1k'"),
    (["--dataset", "imagenet1k", "--split", "tune"], "no trials with split='tune' among the dataset='imagenet1k'"),
    (["--dataset", "cifar100", "--sweep", "other"], "available sweep values: 'main'"),
])
def test_table_errors_name_the_filter(results, capsys, args, message):
    assert tables.run([str(results), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def ablation_rows() -> list[dict]:
    rows = []
    for pair, base in ((f"{SWIN}:{R18}", 80.0), (f"{VITS}:{R18}", 70.0)):
        teacher = pair.split(":")[0]
        for seed in range(2):
            add = lambda tag, delta, **kw: rows.append(  # noqa: E731
                trial(teacher, R18, "uhkd", seed, base + delta + seed, tag=tag, **kw))
            add("full", 0.0)
            add("w/o SRA", -2.0, **{"method.uhkd.sra": False})
            add("w/o FTM", -3.0, **{"method.uhkd.spectrum": "none"})
            for beta, delta in ((0.0, -4.0), (0.5, -1.0), (2.0, 0.5)):
                add(f"beta={beta:g}", delta, **{"method.uhkd.beta": beta})
            for band, delta in (("high", -5.0), ("full", -1.5)):
                add(f"band={band}", delta, **{"method.uhkd.band": band})
    return rows


def test_ablation_table_and_curves(tmp_path, capsys):
    results = write_results(tmp_path / "abl", ablation_rows())
    out = tmp_path / "out"
    assert ablations.run([str(results), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "ablation_table.md").read_text()
    assert md_row(md, "full") == ["full", "80.50 ± 0.71 (n=2)", "70.50 ± 0.71 (n=2)"]
    assert md_row(md, "w/o SRA") == ["w/o SRA", "78.50 ± 0.71 (n=2) (Δ -2.00)", "68.50 ± 0.71 (n=2) (Δ -2.00)"]
    assert md.splitlines()[0] == "| Variant | Swin-T→ResNet18 | ViT-S→ResNet18 |"
    for suffix, magic in ((".png", PNG_MAGIC), (".pdf", PDF_MAGIC)):
        path = out / f"ablation_curves{suffix}"
        assert path.read_bytes().startswith(magic) and f"wrote {path}" in printed

    trials = common.read_trials(results)
    data = ablations.curve_data(trials)
    assert sorted(set(data["param"])) == ["method.uhkd.band", "method.uhkd.beta"]  # alpha and k never vary
    beta = data[(data["param"] == "method.uhkd.beta") & (data["pair"] == f"{SWIN}:{R18}")]
    assert beta["x"].tolist() == [0.0, 0.5, 1.0, 2.0]
    assert beta["mean"].tolist() == [76.5, 79.5, 80.5, 81.0] and beta["n"].tolist() == [2, 2, 2, 2]
    band = data[(data["param"] == "method.uhkd.band") & (data["pair"] == f"{VITS}:{R18}")]
    assert band["value"].tolist() == ["low", "high", "full"] and band["mean"].tolist() == [70.5, 65.5, 69.0]

    fig = ablations.plot_curves(data)
    panels = [(pair, f"method.uhkd.{param}") for pair in (f"{SWIN}:{R18}", f"{VITS}:{R18}") for param in ("beta", "band")]
    for ax, (pair, param) in zip(fig.axes, panels, strict=True):  # a row of panels per pair
        expected = data[(data["param"] == param) & (data["pair"] == pair)]
        (line,) = [line for line in ax.lines if line.get_marker() == "o"]
        assert line.get_xdata().tolist() == expected["x"].tolist()
        assert line.get_ydata().tolist() == expected["mean"].tolist()
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["low", "high", "full"]


def test_ablations_error_when_nothing_to_show(tmp_path, capsys):
    results = write_results(tmp_path / "s", [trial(SWIN, R18, "uhkd", 0, 70.0)])
    assert ablations.run([str(results), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: component table: no tagged trials") and "curves: no UHKD pair" in err


def epoch_rows(trials: list[dict]) -> list[dict]:
    rows = []
    for t in trials:
        for epoch in (1, 2, 3):
            uhkd = t["method"] == "uhkd"
            rows.append({"schema_version": 1, "sweep": t["sweep"], "trial_id": t["trial_id"], "epoch": epoch,
                         "top1": 10.0 * epoch + t["seed"], "top5": 50.0, "loss": 3.0 / epoch,
                         "loss_ce": 2.0 / epoch, "loss_kl": 1.0 / epoch,
                         "loss_feature": 0.5 / epoch + t["seed"] if uhkd else None, "loss_dkd": None,
                         "lr": 0.1, "images_per_s": 100.0, "epoch_time_s": 1.0})
    return rows


def test_curves_grouped_and_per_trial(tmp_path, capsys):
    trials = [trial(SWIN, R18, m, s, 70.0) for m in ("kd", "uhkd") for s in (0, 2)]
    results = write_results(tmp_path / "s", trials, epoch_rows(trials))
    out = tmp_path / "out"
    assert curves.run([str(results), "--out-dir", str(out)]) == 0
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "curves.pdf").read_bytes().startswith(PDF_MAGIC)
    assert (out / "loss_terms.png").read_bytes().startswith(PNG_MAGIC)
    csv = pd.read_csv(out / "curves.csv")
    assert list(dict.fromkeys(csv["metric"])) == ["top1", "loss", "loss_ce", "loss_feature", "loss_kl"]
    top1 = csv[(csv["metric"] == "top1") & (csv["group"] == "uhkd")]
    assert top1["mean"].tolist() == [11.0, 21.0, 31.0] and top1["n"].tolist() == [2, 2, 2]
    assert top1["std"].tolist() == pytest.approx([math.sqrt(2)] * 3)
    assert set(csv.loc[csv["metric"] == "loss_feature", "group"]) == {"uhkd"}
    assert set(csv["panel"]) == {f"{SWIN}:{R18}"}

    data = curves.curve_data(common.read_trials(results), common.read_epochs(results), ["trial_id"],
                             [trials[1]["trial_id"]])
    fig = curves.plot_curves(data)
    assert [ax.get_ylabel() for ax in fig.axes] == ["top-1", "training loss"]
    assert fig.axes[0].lines[0].get_ydata().tolist() == [12.0, 22.0, 32.0]
    assert fig.axes[1].lines[0].get_ydata().tolist() == pytest.approx([3.0, 1.5, 1.0])
    assert curves.run([str(results), "--trial", "nope", "--out-dir", str(out)]) == 2
    assert "unknown trial id(s) nope" in capsys.readouterr().err


def report_rows() -> list[dict]:
    rows = []
    for (lr, beta), seed in itertools.product(itertools.product((1e-3, 1e-2, 1e-1), (0.5, 1.0, 2.0)), (0, 1)):
        # top-1 depends on the learning rate only: lr must get (nearly) all the importance.
        top1 = {1e-3: 60.0, 1e-2: 75.0, 1e-1: 70.0}[lr] + 0.1 * seed
        rows.append(trial(SWIN, R18, "uhkd", seed, top1, **{"optim.lr": lr, "method.uhkd.beta": beta}))
    rows.append(trial(SWIN, R18, "uhkd", 0, 99.0, status="stopped", **{"optim.lr": 0.5}))
    return rows


def test_sweep_report(tmp_path, capsys):
    results = write_results(tmp_path / "hpo", report_rows())
    out = tmp_path / "out"
    assert sweep_report.run([str(results), "--out-dir", str(out)]) == 0
    md = (out / "sweep_report.md").read_text()
    assert "18 trials with status ok; 1 excluded (stopped: 1)" in md
    best = md_row(md, f"{SWIN}:{R18}")
    assert best[:4] == [f"{SWIN}:{R18}", "75.05 ± 0.07 (n=2)", "0.01", "0.5"]  # beta ties: first kept
    imp = pd.read_csv(out / "importances.csv").set_index("scope")
    assert imp.loc[f"{SWIN}:{R18}", "sweep"] == "main" and imp.loc[f"{SWIN}:{R18}", "optim.lr"] > 0.9
    assert imp.loc[f"{SWIN}:{R18}", ["optim.lr", "method.uhkd.beta"]].sum() == pytest.approx(1.0)
    assert (out / "parallel_coordinates.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "parallel_coordinates.pdf").read_bytes().startswith(PDF_MAGIC)

    trials, _ = common.ok_trials(common.read_trials(results))
    params = sweep_report.varying_params(trials)
    assert params == ["optim.lr", "method.uhkd.beta"]
    fig, data = sweep_report.parallel_coordinates(trials, params, "best_top1")
    assert len(data) == 18
    ordered = trials.sort_values("best_top1", kind="stable")
    for (_, ys), (_, row) in zip(data.iterrows(), ordered.iterrows(), strict=True):
        assert ys["optim.lr"] == pytest.approx({1e-3: 0.0, 1e-2: 0.5, 1e-1: 1.0}[row["optim.lr"]])  # log scale
        assert ys["method.uhkd.beta"] == pytest.approx((row["method.uhkd.beta"] - 0.5) / 1.5)  # linear: range < 100x
        assert ys["best_top1"] == pytest.approx((row["best_top1"] - 60.0) / 15.1)


def test_sweep_report_from_optuna_storage(tmp_path, capsys):
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="hpo", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) * 10 + t.suggest_float("y", 0, 1) * 0.01, n_trials=20)
    results = write_results(tmp_path / "hpo", report_rows())
    out = tmp_path / "out"
    assert sweep_report.run([str(results), "--study", storage, "--out-dir", str(out)]) == 0
    imp = pd.read_csv(out / "importances.csv").set_index("scope")
    assert list(imp.index) == [f"{SWIN}:{R18}", "study hpo"] and imp.loc["study hpo", "x"] > 0.9
    assert "## Optuna study hpo" in (out / "sweep_report.md").read_text()
    assert sweep_report.run([str(results), "--study", storage, "--study-name", "zz", "--out-dir", str(out)]) == 2
    assert "unknown study 'zz'" in capsys.readouterr().err


def test_sweep_report_one_section_per_sweep_and_stopped_trials(tmp_path):
    write_results(tmp_path / "hpo", report_rows())
    other = [trial(SWIN, R18, "kd", 0, 50.0 + t, sweep="other", **{"method.kd.temperature": t}) for t in (1.0, 4.0)]
    write_results(tmp_path / "other", other)
    out = tmp_path / "out"
    assert sweep_report.run([str(tmp_path), "--include-stopped", "--out-dir", str(out)]) == 0
    md = (out / "sweep_report.md").read_text()
    assert "21 trials with status ok/stopped; none excluded" in md
    assert "## Sweep main (19 trials)" in md and "## Sweep other (2 trials)" in md
    assert md_row(md, f"{SWIN}:{R18}")[:3] == [f"{SWIN}:{R18}", "99.00 (n=1)", "0.5"]  # the stopped trial
    for sweep in ("main", "other"):
        assert (out / f"parallel_coordinates_{sweep}.png").read_bytes().startswith(PNG_MAGIC)
