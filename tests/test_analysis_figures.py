"""The figures of the analysis scripts, checked on the matplotlib Figure objects they return, from small hand-written
results: whole-number epoch ticks, titles naming sweep/dataset/split, per-cent top-1 axes, a row per pair, the
teacher's top-1 as a reference line, n in the legends, one line per configuration of a search, bands only where two
trials remain, stopped trials drawn apart, shared configurations visible, no empty panel, importances only from
enough trials."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from test_analysis import CONVNEXT, DEIT, R18, SWIN, ablation_rows, trial, write_results

from analysis import ablations, common, curves, sweep_report

PAIR = f"{SWIN}:{R18}"


def epochs_of(row: dict, top1: list[float], terms: tuple[str, ...] = ("ce", "kl")) -> list[dict]:
    """epochs.parquet rows of one trial: top-1 per epoch as given, each loss term 1/epoch, the loss their sum."""
    return [{"schema_version": 1, "sweep": row["sweep"], "trial_id": row["trial_id"], "epoch": e, "top1": v,
             "top5": 99.0, "loss": len(terms) / e, **{f"loss_{t}": 1.0 / e for t in terms}, "lr": 0.1}
            for e, v in enumerate(top1, start=1)]


def drawn(fig):
    """`fig` laid out and drawn (tick labels exist only then)."""
    FigureCanvasAgg(fig).draw()
    return fig


def percent_ticks(ax) -> bool:
    texts = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    return bool(texts) and all(t.endswith("%") for t in texts)


def is_whole(values) -> bool:
    return all(float(v).is_integer() for v in values)


def labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []


def row_labels(axes) -> list[str]:
    return [label for ax in axes for label in labels(ax)]


def test_curves_have_a_row_per_pair_whole_epochs_percent_titles_teacher_and_n(tmp_path):
    rows = [trial(SWIN, R18, m, s, 96.0) for m in ("kd", "uhkd") for s in (0, 1)]
    rows += [trial("", R18, "scratch", s, 95.0, pair=f":{R18}") for s in (0, 1)]
    rows += [trial(CONVNEXT, DEIT, "kd", 0, 30.0, teacher_top1=91.0)]
    epochs = []
    for row in rows:
        base = 28.0 if row["student"] == DEIT else 94.0
        terms = ("ce", "kl", "feat") if row["method"] == "uhkd" else ("ce",) if row["method"] == "scratch" else \
            ("ce", "kl")
        epochs += epochs_of(row, [base + row["seed"] + e for e in range(4)], terms)
    results = write_results(tmp_path / "main", rows, epochs)
    trials, epochs = common.read_trials(results), common.read_epochs(results)
    data = curves.curve_data(trials, epochs)
    fig = drawn(curves.plot_curves(data, common.figure_title(trials, "Training curves")))

    assert fig.get_suptitle() == "Training curves\nmain · cifar100 · final split: the test set"
    assert len(fig.axes) == 4  # 2 pairs x (top-1, loss), and the scratch student drawn in its pair, not alone
    for ax in fig.axes:
        assert ax.lines and is_whole(ax.get_xticks()) and ax.get_xlabel() == "epoch"
    deit_top1, deit_loss, swin_top1, swin_loss = fig.axes  # rows in the order of the pair names
    assert {ax.get_title() for ax in (swin_top1, swin_loss)} == {"Swin-T→ResNet18"}
    assert {ax.get_title() for ax in (deit_top1, deit_loss)} == {"ConvNeXt-T→DeiT-T"}
    assert percent_ticks(swin_top1) and percent_ticks(deit_top1) and not percent_ticks(swin_loss)
    # teacher_top1 is 89 + seed in the rows: two checkpoints, their mean; scratch rows have none
    (teacher,) = [line for line in swin_top1.lines if line.get_linestyle() == "--"]
    assert set(teacher.get_ydata()) == {89.5}
    assert row_labels([swin_loss]) == [f"{m} (n=2): top-1 97.50% at epoch 4" for m in ("kd", "scratch", "uhkd")] + [
        "teacher 89.50% (mean of 2 checkpoints)"]
    assert row_labels([deit_loss]) == ["kd (n=1): top-1 31.00% at epoch 4", "teacher 91.00%"]
    (deit,) = [line for line in deit_top1.lines if line.get_linestyle() == "-"]
    assert deit.get_ydata().tolist() == [28.0, 29.0, 30.0, 31.0]  # its own axis, not the ResNet18 one
    uhkd = data[(data["panel"] == PAIR) & (data["group"] == "uhkd") & (data["metric"] == "top1")]
    assert uhkd["mean"].tolist() == [94.5, 95.5, 96.5, 97.5] and uhkd["n"].tolist() == [2] * 4
    assert uhkd["std"].tolist() == pytest.approx([math.sqrt(0.5)] * 4)

    terms = curves.plot_panels(data, curves.loss_terms(data))
    assert [ax.get_ylabel() for ax in terms.axes] == [  # the DeiT row has no feat panel, and no empty slot
        "ce loss term (weighted)", "kl loss term (weighted)",
        "ce loss term (weighted)", "feat loss term (weighted)", "kl loss term (weighted)"]
    assert all(ax.lines and is_whole(ax.get_xticks()) for ax in terms.axes)


def test_search_curves_draw_each_configuration_and_end_bands_where_a_trial_stopped(tmp_path):
    """A search: a mean never mixes hyperparameters; where one seed of a configuration stopped, its band ends there
    and its mean goes on dotted; a stopped trial is dashed and ends in x."""
    rows = [trial(SWIN, R18, "uhkd", s, 90.0, sweep="hpo", split="tune", **{"method.uhkd.alpha": 0.5}) for s in (0, 1)]
    rows += [trial(SWIN, R18, "uhkd", 0, 90.0, sweep="hpo", split="tune", **{"method.uhkd.alpha": 1.0}),
             trial(SWIN, R18, "uhkd", 0, 80.0, sweep="hpo", split="tune", status="stopped",
                   **{"method.uhkd.alpha": 2.0})]
    rows[1]["status"] = "stopped"
    epochs = (epochs_of(rows[0], [60.0, 70.0, 80.0]) + epochs_of(rows[1], [62.0, 72.0])
              + epochs_of(rows[2], [50.0, 60.0, 70.0]) + epochs_of(rows[3], [40.0, 45.0]))
    results = write_results(tmp_path / "hpo", rows, epochs)
    trials = common.read_trials(results)
    data = curves.curve_data(trials, common.read_epochs(results))
    fig = curves.plot_curves(data, common.figure_title(trials, "Training curves"))
    top1 = fig.axes[0]
    assert fig.get_suptitle().endswith("hpo · cifar100 · tune split: the held-out part of the training set")
    mixed_label, ok_label, stopped_label = ("uhkd alpha=0.5 (n=2, ok 1, stopped 1): top-1 71.00% at epoch 2",
                                            "uhkd alpha=1 (n=1): top-1 70.00% at epoch 3",
                                            "uhkd alpha=2 (n=1, stopped): top-1 45.00% at epoch 2")
    assert row_labels(fig.axes) == [mixed_label, ok_label, stopped_label, "teacher 89.50% (mean of 2 checkpoints)"]
    by_label = {line.get_label(): line for line in top1.lines}
    mixed = by_label[mixed_label]
    assert mixed.get_xdata().tolist() == [1, 2] and mixed.get_ydata().tolist() == [61.0, 71.0]
    (after,) = [line for line in top1.lines if line.get_linestyle() == ":"]
    assert after.get_xdata().tolist() == [2, 3] and after.get_ydata().tolist() == [71.0, 80.0]
    (band,) = [c for c in top1.collections if isinstance(c, PolyCollection)]
    assert band.get_paths()[0].vertices[:, 0].max() == 2  # only where both seeds have a value
    assert by_label[ok_label].get_ydata().tolist() == [50.0, 60.0, 70.0]
    stopped = by_label[stopped_label]
    assert stopped.get_linestyle() == "--" and stopped.get_xdata().tolist() == [1, 2]
    (end,) = [line for line in top1.lines if line.get_marker() == "x"]
    assert (end.get_xdata().tolist(), end.get_ydata().tolist()) == ([2], [45.0])


def test_parallel_coordinates_show_shared_configurations_and_stopped_trials():
    rows = [trial(SWIN, R18, "uhkd", s, 70.0 + s, **{"method.uhkd.beta": 1.0}) for s in range(3)]
    rows += [trial(SWIN, R18, "uhkd", 0, 60.0, **{"method.uhkd.beta": 2.0}),
             trial(SWIN, R18, "uhkd", 0, 50.0, status="stopped", **{"method.uhkd.beta": 4.0})]
    trials = pd.DataFrame(rows)
    fig, data = sweep_report.parallel_coordinates(trials, ["method.uhkd.beta"], "best_top1",
                                                  common.figure_title(trials, "best-epoch top-1"))
    drawn(fig)
    ax = fig.axes[0]
    assert fig.get_suptitle() == "best-epoch top-1\nmain · cifar100 · final split: the test set"
    paths = [line for line in ax.lines if line.get_linestyle() != "None"]
    assert len(paths) == 5 and data["shared"].tolist() == [1, 1, 3, 3, 3]  # in top-1 order
    shared = [line.get_ydata()[0] for line in paths[2:]]
    assert len(set(shared)) == 3 and max(shared) - min(shared) <= sweep_report.SHARED_SPREAD  # side by side
    assert data["method.uhkd.beta"].tolist()[2:] == [0.0, 0.0, 0.0]  # unspread positions
    assert [line.get_linestyle() for line in paths] == ["--", "-", "-", "-", "-"]  # the stopped trial: lowest
    ends = [line.get_marker() for line in ax.lines if line.get_linestyle() == "None"]
    assert ends == ["x", "o", "o", "o", "o"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "finished (n=4)", "stopped early by the scheduler (n=1)", "1 configuration run 3×: their lines side by side"]
    assert ax.get_xticklabels()[-1].get_text() == "best-epoch top-1"


def test_sweep_report_on_a_grid_with_unused_parameters_and_importances_only_from_enough_trials(tmp_path, capsys):
    """A grid where each method's parameters are null on the other methods' rows (which pandas 3 keeps as NaN through
    astype(str)); a pair with six trials gets a note instead of importances."""
    rows = [trial("", R18, "scratch", s, 90.0 + s, pair=f":{R18}") for s in (0, 1)]
    rows += [trial(SWIN, R18, m, s, 91.0 + s, **extra) for m, extra in (
        ("kd", {"method.kd.alpha": 1.0}), ("ofa", {}), ("uhkd", {"method.uhkd.alpha": 0.7572})) for s in (0, 1)]
    results = write_results(tmp_path / "grid", rows)
    out = tmp_path / "out"
    assert sweep_report.run([str(results), "--include-stopped", "--out-dir", str(out)]) == 0
    md = (out / "sweep_report.md").read_text()
    assert "| :resnet18 | 90.50 ± 0.71 (n=2) | scratch | n/a |" in md
    (note,) = [line for line in md.splitlines() if line.startswith(f"- {PAIR}: ")]
    # varying: method.name, kd's alpha, the 8 UHKD parameters of `trial` (each null on the other methods' rows)
    assert note == (f"- {PAIR}: left out, 6 trials for 10 varying hyperparameters; importances need at least 50 "
                    f"trials (max(10, 5 per hyperparameter))")
    assert PAIR not in (out / "importances.csv").read_text()
    trials = sweep_report.ok_trials(common.read_trials(results))[0]
    fig, data = sweep_report.parallel_coordinates(trials, ["pair", "method.name", "method.kd.alpha",
                                                           "method.uhkd.alpha"], "best_top1")
    assert sorted(set(data["method.uhkd.alpha"])) == [0.0, 1.0]  # 0.7572 and n/a as categories
    assert len(fig.axes[0].lines) == 2 * len(rows) and data.notna().all().all()


def test_ablation_figure_has_a_row_per_pair_percent_whole_k_teacher_and_n(tmp_path):
    rows = ablation_rows()
    for row in rows:
        row["method.uhkd.k"] = 5 if row["tag"] == "k=5" else 7
    rows += [trial(SWIN, R18, "uhkd", s, 79.0 + s, tag="k=5", **{"method.uhkd.k": 5}) for s in range(2)]
    trials = common.read_trials(write_results(tmp_path / "abl", rows))
    data = ablations.curve_data(trials)
    fig = drawn(ablations.plot_curves(data, title=common.figure_title(trials, "UHKD ablations")))
    assert fig.get_suptitle() == "UHKD ablations\nmain · cifar100 · final split: the test set"
    titles = [(ax.get_title(), ax.get_xlabel()) for ax in fig.axes]
    assert titles == [("Swin-T→ResNet18", "β"), ("Swin-T→ResNet18", "k"), ("Swin-T→ResNet18", "band"),
                      ("ViT-S→ResNet18", "β"), ("ViT-S→ResNet18", "band")]  # k only measured on one pair
    beta, k = fig.axes[:2]
    assert [line.get_xdata().tolist() for line in beta.lines if line.get_marker() == "o"] == [[0.0, 0.5, 1.0, 2.0]]
    assert is_whole(k.get_xticks()) and [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["low", "high",
                                                                                                 "full"]
    for ax in fig.axes:
        assert percent_ticks(ax)
        (teacher,) = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert set(teacher.get_ydata()) == {89.5}  # teacher_top1 89 + seed: the mean of the two
    assert row_labels(fig.axes[:3]) == ["UHKD, mean ± std over seeds (n=2 per point)",
                                        "teacher 89.50% (mean of 2 checkpoints)"]
