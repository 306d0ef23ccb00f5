"""Feature similarity between a teacher and a student before and after distillation (UHKD Figures 1, 3, 4, 5).

Per stage: cosine similarity and Pearson correlation between the teacher's features and the aligned student's,
in FTM's spectral space (the k×k band of the 2-D DFT amplitudes of SRR, before SRT's token normalisation, which
would make the two measures nearly equal), on a batch of evaluation images; a grouped bar chart of both, and
feature / difference maps of a few images.

Alignment: the student's stage map is resized (bilinear) to the teacher's grid and mapped to the teacher's
channels by a bias-free linear channel map (the form of UHKD's SCA) fitted by ridge least squares on a separate
batch of images (so the measure is held out), independently for each student. A channel map commutes with the DFT,
so the same aligned map serves the spectral measures and the spatial maps. --student-before may be omitted: the
"before" student is then the randomly initialised network.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from analysis.common import cli, pair_label, save_figure
from uhkd.data import get_dataset, load_split, with_transform
from uhkd.data.augment import get_recipe, image_transform
from uhkd.errors import OneLineParser, UserError
from uhkd.frequency import BANDS, SPECTRA, spectral_tokens
from uhkd.models import StageModel, create_stage_model, load_teacher

STUDENTS = ("before", "after")
METRICS = ("cosine", "pearson")


def evaluation_images(dataset: str, root: str, img_size: int, n: int, seed: int = 0) -> torch.Tensor:
    """`n` distinct evaluation images (a seeded choice), float (n, 3, img_size, img_size) in [0, 1]."""
    _, evalset = load_split(dataset, root, "final")
    if len(evalset) < n:
        raise UserError(f"{dataset} has {len(evalset)} evaluation images; {n} are needed (lower --images)")
    evalset = with_transform(evalset, image_transform(get_recipe("none"), img_size, False,
                                                      get_dataset(dataset).eval_crop_pct))
    chosen = np.random.default_rng(seed).permutation(len(evalset))[:n]
    return torch.stack([evalset[int(i)][0] for i in chosen])


@torch.no_grad()
def stage_maps(model: StageModel, images: torch.Tensor, batch: int = 64) -> list[torch.Tensor]:
    """The 4 NCHW stage maps of `images` (float32, in chunks of `batch`)."""
    chunks = [model(images[i:i + batch])[1] for i in range(0, len(images), batch)]
    return [torch.cat([c[s] for c in chunks]).float() for s in range(len(chunks[0]))]


def _to_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def fit_channel_map(student: torch.Tensor, teacher: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """W (C_s × C_t) minimising ‖S W − T‖² + λ‖W‖² over the pixels of the student map resized to the teacher grid,
    with λ = `ridge` × the mean diagonal of SᵀS (scale-free)."""
    s = _to_grid(student, teacher.shape[-2:]).permute(0, 2, 3, 1).reshape(-1, student.shape[1]).double()
    t = teacher.permute(0, 2, 3, 1).reshape(-1, teacher.shape[1]).double()
    gram = s.T @ s
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), s.T @ t).float()


def align(student: torch.Tensor, weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The student map on the teacher's grid and channels."""
    return torch.einsum("bchw,cd->bdhw", _to_grid(student, size), weights)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=1, eps=1e-12)


def spectral_similarity(teacher: torch.Tensor, aligned: torch.Tensor, k: int, spectrum: str,
                        band: str) -> dict[str, torch.Tensor]:
    """Per image: cosine and Pearson between the SRR representations (k×k band × channels, flattened)."""
    t = spectral_tokens(teacher, k, spectrum, band).flatten(1)
    s = spectral_tokens(aligned, k, spectrum, band).flatten(1)
    return {"cosine": _cosine(t, s),
            "pearson": _cosine(t - t.mean(1, keepdim=True), s - s.mean(1, keepdim=True))}


def similarity_table(teacher: StageModel, students: dict[str, StageModel], fit_images: torch.Tensor,
                     eval_images: torch.Tensor, k: int = 7, spectrum: str = "amplitude", band: str = "low",
                     ridge: float = 1e-3) -> tuple[pd.DataFrame, dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Long table (stage, student, metric, mean, std, n) over `eval_images`; also the aligned student maps and
    the teacher maps of `eval_images` per stage (for the feature-map figure)."""
    t_fit, t_eval = stage_maps(teacher, fit_images), stage_maps(teacher, eval_images)
    records, aligned = [], {}
    for label, student in students.items():
        s_fit, s_eval = stage_maps(student, fit_images), stage_maps(student, eval_images)
        aligned[label] = []
        for stage, (sf, se, tf, te) in enumerate(zip(s_fit, s_eval, t_fit, t_eval), start=1):
            mapped = align(se, fit_channel_map(sf, tf, ridge), te.shape[-2:])
            aligned[label].append(mapped)
            k_eff = min(k, *te.shape[-2:], *se.shape[-2:])
            for metric, values in spectral_similarity(te, mapped, k_eff, spectrum, band).items():
                records.append({"stage": stage, "student": label, "metric": metric, "mean": values.mean().item(),
                                "std": values.std().item() if len(values) > 1 else math.nan, "n": len(values)})
    return pd.DataFrame(records), aligned, t_eval


def plot_similarity(table: pd.DataFrame, title: str = "") -> Figure:
    """Two panels (cosine, Pearson); per stage one bar per student (containers in `STUDENTS` order), ± std."""
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    axes = fig.subplots(1, len(METRICS))
    stages = sorted(table["stage"].unique())
    labels = [s for s in STUDENTS if s in set(table["student"])]
    width = 0.8 / len(labels)
    for ax, metric in zip(axes, METRICS):
        for i, label in enumerate(labels):
            rows = table[(table["metric"] == metric) & (table["student"] == label)].set_index("stage").loc[stages]
            ax.bar(np.arange(len(stages)) + (i - (len(labels) - 1) / 2) * width, rows["mean"], width,
                   yerr=rows["std"].fillna(0), capsize=3,
                   label=f"student {label}, mean ± std over images (n={int(rows['n'].iloc[0])})")
        ax.set_xticks(range(len(stages)), [f"stage {s}" for s in stages])
        ax.set_title("cosine similarity" if metric == "cosine" else "Pearson correlation")
        ax.set_ylim(min(0.0, table["mean"].min() - 0.05), 1.0)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def map_panels(images: torch.Tensor, teacher: torch.Tensor, aligned: dict[str, torch.Tensor],
               count: int) -> list[list[tuple[str, np.ndarray]]]:
    """Per image: (title, 2-D array) for the input, the teacher's channel-mean map, each aligned student's and
    each |teacher − student| difference."""
    rows = []
    for i in range(min(count, len(images))):
        t = teacher[i].mean(0).numpy()
        row = [("input", images[i].permute(1, 2, 0).numpy()), ("teacher", t)]
        row += [(f"student {label}", a[i].mean(0).numpy()) for label, a in aligned.items()]
        row += [(f"|teacher − {label}|", np.abs(t - a[i].mean(0).numpy())) for label, a in aligned.items()]
        rows.append(row)
    return rows


def plot_maps(panels: list[list[tuple[str, np.ndarray]]], stage: int, what: str = "") -> Figure:
    """One row per image; feature maps share a colour scale per row, differences use the same scale; `what` (the
    pair and images) heads the title."""
    cols = len(panels[0])
    fig = Figure(figsize=(1.9 * cols, 1.9 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), cols, squeeze=False)
    for ax_row, row in zip(axes, panels):
        maps = [a for title, a in row if title != "input"]
        low, high = min(a.min() for a in maps), max(a.max() for a in maps)
        for ax, (title, array) in zip(ax_row, row):
            if title == "input":
                ax.imshow(array.clip(0, 1))
            else:
                ax.imshow(array, cmap="magma" if title.startswith("|") else "viridis", vmin=low, vmax=high)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"{what + ': ' if what else ''}stage {stage} features (channel mean), aligned to the teacher")
    return fig


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="analysis/similarity.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher timm name, e.g. swin_tiny_patch4_window7_224")
    p.add_argument("--teacher-checkpoint", required=True, help="teacher checkpoint file (uhkd model checkpoint)")
    p.add_argument("--student", required=True, help="student timm name, e.g. resnet18")
    p.add_argument("--student-before", default="", help="student checkpoint before UHKD (e.g. the scratch or KD "
                   "student of the pair); default: the randomly initialised student")
    p.add_argument("--student-after", required=True, help="student checkpoint after UHKD (trials.parquet column "
                   "student_checkpoint)")
    p.add_argument("--dataset", default="cifar100", help="evaluation images from this dataset (default cifar100)")
    p.add_argument("--data-root", default="", help="dataset folder")
    p.add_argument("--img-size", type=int, default=224, help="input size the checkpoints were trained at")
    p.add_argument("--scale", default="full", help="model.scale of the checkpoints (full | tiny)")
    p.add_argument("--isotropic-blocks", default="uhkd", help="stage ends of isotropic models (uhkd | ofa)")
    p.add_argument("--images", type=int, default=64, help="images measured (and as many more to fit the "
                   "alignment; default 64)")
    p.add_argument("--k", type=int, default=7, help="frequency block size (default 7)")
    p.add_argument("--spectrum", default="amplitude", choices=[s for s in SPECTRA if s != "none"])
    p.add_argument("--band", default="low", choices=BANDS)
    p.add_argument("--map-images", type=int, default=4, help="images in the feature-map figure (default 4)")
    p.add_argument("--map-stage", type=int, default=1, choices=(1, 2, 3, 4), help="stage shown in the maps")
    p.add_argument("--seed", type=int, default=0, help="image choice and the random 'before' student")
    p.add_argument("--out-dir", default="analysis_out", help="folder for similarity.csv, similarity_bars.png/pdf "
                   "and feature_maps.png/pdf (default analysis_out)")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    if args.images < 2:
        raise UserError(f"--images must be >= 2, got {args.images}")
    num_classes = get_dataset(args.dataset).num_classes
    common = dict(num_classes=num_classes, img_size=args.img_size, scale=args.scale,
                  isotropic_blocks=args.isotropic_blocks)
    teacher = load_teacher(args.teacher, args.teacher_checkpoint, **common)
    torch.manual_seed(args.seed)
    students = {"before": create_stage_model(args.student, checkpoint=args.student_before, **common).eval(),
                "after": create_stage_model(args.student, checkpoint=args.student_after, **common).eval()}
    images = evaluation_images(args.dataset, args.data_root, args.img_size, 2 * args.images, args.seed)
    table, aligned, teacher_maps = similarity_table(teacher, students, images[args.images:], images[:args.images],
                                                    args.k, args.spectrum, args.band)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "similarity.csv", index=False, float_format="%.6f")
    pair = pair_label(f"{args.teacher}:{args.student}")
    title = (f"Features of {pair}, student aligned to the teacher\n"
             f"{args.dataset} test images · {args.k}×{args.k} {args.band}-frequency {args.spectrum} spectrum")
    bars = save_figure(plot_similarity(table, title), out / "similarity_bars")
    stage = args.map_stage - 1
    panels = map_panels(images[:args.images], teacher_maps[stage], {k: v[stage] for k, v in aligned.items()},
                        args.map_images)
    maps = plot_maps(panels, args.map_stage, f"{pair}, {args.dataset} test images")
    return [out / "similarity.csv", *bars, *save_figure(maps, out / "feature_maps")]


def run(argv: Sequence[str] | None = None) -> int:
    return cli(main, parser(), argv)


if __name__ == "__main__":
    raise SystemExit(run())
