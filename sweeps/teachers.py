"""Teacher checkpoints `<teacher-dir>/<timm name>.pth`, which the other sweeps load by name (`--teacher-dir` may be
a URI such as s3://bucket/teachers: the teachers are uploaded there and every node fetches them once).

cifar100: fine-tunes ImageNet-pretrained timm teachers on CIFAR-100 (docs/protocol.md#recipes: AdamW 5e-5, cosine, warm-up 20, clip
5) from local weight files `<pretrained-dir>/<timm name>.{safetensors,pth,bin}`, each teacher one trial (in its
own process, or a Ray Train TorchTrainer with --workers-per-trial 2 or more).
imagenet: the pretrained models are the teachers; their weight files are converted, nothing trains.
quick: trains the tiny teachers from scratch on the offline digits (the other quick sweeps do this by themselves
when the checkpoints are missing).

    python sweeps/teachers.py --preset cifar100 --pretrained-dir weights/ --data-root data/ --teacher-dir teachers/
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from uhkd.errors import UserError
from uhkd.storage import copy, join
from uhkd.sweep.cli import SweepOptions, parse, sweep_parser
from uhkd.sweep.runner import main, seeds
from uhkd.sweep.spec import Sweep, SweepPreset, load_preset
from uhkd.sweep.teachers import install, pretrained_file, teachers_sweep
from uhkd.sweep.trainable import teacher_path


def parser() -> argparse.ArgumentParser:
    p = sweep_parser("sweeps/teachers.py", __doc__)
    p.hints.update({flag: "--models" for flag in ("--teacher", "--student", "--pairs")})
    p.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                   help="timm names, comma list (default: the preset's teachers)")
    p.add_argument("--pretrained-dir", default="", help="local ImageNet weight files by timm name")
    return p


def models(args: argparse.Namespace, preset: SweepPreset) -> list[str]:
    from uhkd.models import model_kind

    names = args.models or list(preset.section("teachers").get("models") or [])
    for name in names:
        model_kind(name)
    if not names:
        raise UserError(f"preset {preset.name!r} lists no teachers; give --models")
    return names


def build(args: argparse.Namespace, opts: SweepOptions) -> Sweep:
    preset = load_preset(opts.preset)
    if preset.name != "quick" and not args.pretrained_dir:
        raise UserError(f"{preset.name} teachers start from ImageNet weights: give --pretrained-dir DIR holding "
                        f"<timm name>.safetensors|.pth|.bin files")
    return teachers_sweep(preset, models(args, preset), seeds("teachers", preset, opts)[0], args.pretrained_dir)


def convert(args: argparse.Namespace, opts: SweepOptions, preset: SweepPreset) -> int:
    """Presets whose teachers are the pretrained models themselves: weight file -> teacher checkpoint."""
    from uhkd.config import build_config
    from uhkd.data import get_dataset
    from uhkd.models import create_stage_model, save_model_checkpoint

    if not args.pretrained_dir:
        raise UserError("give --pretrained-dir DIR holding <timm name>.safetensors|.pth|.bin ImageNet weight files")
    cfg = build_config(preset.run_preset, {**preset.run("teachers"), **opts.sets})
    classes = get_dataset(cfg.data.dataset, cfg.data.root).num_classes
    teacher_dir = join(opts.teacher_dir)
    for name in models(args, preset):
        weights = pretrained_file(args.pretrained_dir, name)
        model = create_stage_model(name, num_classes=classes, img_size=cfg.data.img_size, scale=cfg.model.scale,
                                   pretrained_file=weights)
        target = teacher_path(teacher_dir, name)
        with tempfile.TemporaryDirectory(prefix="uhkd-teacher-") as tmp:  # the teacher dir may be a URI
            save_model_checkpoint(Path(tmp) / f"{name}.pth", model, source=weights)
            copy(str(Path(tmp) / f"{name}.pth"), target)
        print(f"teacher {name}: {target}")
    return 0


def run(argv: list[str] | None = None) -> int:
    p = parser()
    try:
        args, opts = parse(p, argv)
        preset = load_preset(opts.preset)
        if preset.section("teachers").get("finetune", True) is False:
            return convert(args, opts, preset)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return main(p, build, argv, after=lambda outcome, o: install(list(outcome.tables.trials.values()),
                                                                 join(o.teacher_dir)))


if __name__ == "__main__":
    sys.exit(run())
