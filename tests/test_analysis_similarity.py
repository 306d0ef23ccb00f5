"""Feature-similarity analysis on real tiny timm models and the offline MNIST-5k images."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.container import BarContainer

from analysis import similarity
from uhkd.models import create_stage_model, save_model_checkpoint

TINY = dict(num_classes=10, img_size=32, scale="tiny")


def test_channel_map_recovers_a_linear_relation():
    torch.manual_seed(0)
    student = torch.randn(6, 5, 4, 4)
    true = torch.randn(5, 3)
    teacher = torch.einsum("bchw,cd->bdhw", student, true)
    weights = similarity.fit_channel_map(student, teacher, ridge=1e-9)
    assert torch.allclose(weights, true, atol=1e-4)
    aligned = similarity.align(student, weights, (4, 4))
    sims = similarity.spectral_similarity(teacher, aligned, 3, "amplitude", "low")
    assert torch.allclose(sims["cosine"], torch.ones(6), atol=1e-5)
    assert torch.allclose(sims["pearson"], torch.ones(6), atol=1e-5)


def test_pearson_and_cosine_match_numpy():
    torch.manual_seed(1)
    a, b = torch.rand(3, 4, 5, 5), torch.rand(3, 4, 5, 5)
    sims = similarity.spectral_similarity(a, b, 3, "amplitude", "low")
    ta = torch.fft.fft2(a, norm="ortho").index_select(-2, torch.tensor([4, 0, 1]))
    ta = ta.index_select(-1, torch.tensor([4, 0, 1])).abs().flatten(1).numpy()  # bins -1, 0, 1
    tb = torch.fft.fft2(b, norm="ortho").index_select(-2, torch.tensor([4, 0, 1]))
    tb = tb.index_select(-1, torch.tensor([4, 0, 1])).abs().flatten(1).numpy()
    for i in range(3):
        cos = ta[i] @ tb[i] / np.linalg.norm(ta[i]) / np.linalg.norm(tb[i])
        assert sims["cosine"][i].item() == pytest.approx(cos, abs=1e-5)
        assert sims["pearson"][i].item() == pytest.approx(np.corrcoef(ta[i], tb[i])[0, 1], abs=1e-5)


def test_similarity_cli_identical_student_is_aligned(tmp_path, capsys):
    """Teacher and 'after' student share weights: the fitted map is the identity, similarity ~1 at every stage,
    above the randomly initialised 'before' student."""
    torch.manual_seed(123)  # not the CLI's --seed 0, which initialises the 'before' student
    ckpt = tmp_path / "r18.pt"
    save_model_checkpoint(ckpt, create_stage_model("resnet18", **TINY))
    out = tmp_path / "out"
    assert similarity.run(["--teacher", "resnet18", "--teacher-checkpoint", str(ckpt), "--student", "resnet18",
                           "--student-after", str(ckpt), "--dataset", "mnist5k", "--img-size", "32",
                           "--scale", "tiny", "--images", "16", "--k", "3", "--map-images", "2",
                           "--out-dir", str(out)]) == 0
    table = pd.read_csv(out / "similarity.csv")
    assert len(table) == 4 * 2 * 2 and set(table["n"]) == {16}
    after = table[table["student"] == "after"]
    before = table[table["student"] == "before"].set_index(["stage", "metric"])
    assert (after["mean"] > 0.99).all()
    # A random tiny ResNet's 1x1 stage-4 features barely vary between images (a constant fits them): compare 1-3.
    gain = after.set_index(["stage", "metric"])["mean"] - before["mean"]
    assert (gain.loc[[1, 2, 3]] > 0.005).all()
    for name in ("similarity_bars", "feature_maps"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF-")
    printed = capsys.readouterr().out
    assert f"wrote {out / 'similarity.csv'}" in printed


def test_similarity_heterogeneous_pair_figures_hold_the_table(tmp_path):
    torch.manual_seed(0)
    teacher = create_stage_model("deit_tiny_patch16_224", **TINY).eval()
    students = {s: create_stage_model("resnet18", **TINY).eval() for s in similarity.STUDENTS}
    images = similarity.evaluation_images("mnist5k", "", 32, 24)
    table, aligned, teacher_maps = similarity.similarity_table(teacher, students, images[12:], images[:12], k=7)
    assert [m.shape for m in aligned["after"]] == [m.shape for m in teacher_maps]
    assert table["mean"].between(-1, 1).all() and set(table["stage"]) == {1, 2, 3, 4}

    fig = similarity.plot_similarity(table)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        f"student {s}, mean ± std over images (n=12)" for s in similarity.STUDENTS]
    for ax, metric in zip(fig.axes, similarity.METRICS):
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        for container, label in zip(bars, similarity.STUDENTS):
            expected = table[(table["metric"] == metric) & (table["student"] == label)].sort_values("stage")
            assert [bar.get_height() for bar in container] == pytest.approx(expected["mean"].tolist())

    panels = similarity.map_panels(images, teacher_maps[0], {k: v[0] for k, v in aligned.items()}, 2)
    fig = similarity.plot_maps(panels, 1)
    assert [ax.get_title() for ax in fig.axes[:6]] == ["input", "teacher", "student before", "student after",
                                                        "|teacher − before|", "|teacher − after|"]
    diff = fig.axes[5].images[0].get_array()
    expected = np.abs(teacher_maps[0][0].mean(0).numpy() - aligned["after"][0][0].mean(0).numpy())
    assert np.allclose(diff, expected)


def test_similarity_errors(tmp_path, capsys):
    args = ["--teacher", "resnet18", "--teacher-checkpoint", str(tmp_path / "missing.pt"), "--student", "resnet18",
            "--student-after", str(tmp_path / "missing.pt"), "--dataset", "mnist5k", "--img-size", "32"]
    assert similarity.run(args) == 2
    assert capsys.readouterr().err == f"error: checkpoint file '{tmp_path / 'missing.pt'}' not found\n"
