"""Teacher checkpoints `<teacher dir>/<timm name>.pth`, the files every other sweep loads by name (the teacher
dir is a folder or a URI; trials fetch a URI's teachers into their node's cache).

A teacher trains like a student of method `scratch` (starting from local ImageNet weights where the preset
fine-tunes, docs/protocol.md#recipes); its exported student becomes the teacher checkpoint. Presets that do not
fine-tune (ImageNet) convert the local weight files directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from ..storage import copy, join
from .spec import Sweep, SweepPreset
from .trainable import teacher_path

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
TAG = "teacher"
CARRIED = frozenset({"model.scale", "model.isotropic_blocks", "optim.max_steps_per_epoch", "amp", "threads"})


def pretrained_file(pretrained_dir: str, model: str) -> str:
    """The local ImageNet weight file of `model` in `pretrained_dir` (`<timm name><suffix>`)."""
    for suffix in WEIGHT_SUFFIXES:
        path = Path(pretrained_dir).expanduser() / f"{model}{suffix}"
        if path.is_file():
            return str(path.resolve())
    raise UserError(f"no ImageNet weight file for {model} in {pretrained_dir!r} (expected {model}"
                    f"{'|'.join(WEIGHT_SUFFIXES)})")


def teachers_sweep(preset: SweepPreset, models: Sequence[str], seed: int, pretrained_dir: str = "") -> Sweep:
    """One trial per teacher: trained as a `scratch` student on the final split (all training images)."""
    cells = {}
    for model in models:
        cell = {"model.student": model, "model.teacher": "", "seed": seed, "tag": TAG}
        if pretrained_dir:
            cell["model.pretrained_file"] = pretrained_file(pretrained_dir, model)
        cells[model] = cell
    return Sweep("teachers", preset, cells=cells, force={"method.name": "scratch", "data.split": "final"})


def install(rows: Sequence[dict], teacher_dir: str, out: Callable[[str], None] = print) -> list[str]:
    """Copy each finished teacher trial's exported student (a location on the results filesystem) to
    `<teacher dir>/<model>.pth`; each target appears whole. Returns "<model>: <reason>" of each teacher that did
    not finish."""
    failed = [r for r in rows if r["status"] != "ok" or not r["student_checkpoint"]]
    for row in rows:
        if row in failed:
            continue
        target = teacher_path(teacher_dir, row["student"])
        copy(row["student_checkpoint"], target)
        out(f"teacher {row['student']}: top-1 {row['best_top1']:.2f} -> {target}")
    return [f"{r['student']}: {r['failure_reason'] or r['status']}" for r in failed]
