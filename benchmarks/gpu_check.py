"""One prepared check of the CUDA path, in sections (`--only`; all by default), each printing `RESULT {json}` lines:

- `amp`: a short UHKD run under bf16, fp16 (GradScaler) and off finishes with finite losses;
- `step`: training-step throughput, FLOPs per image and MFU, UHKD / KD eager and compiled side by side at 224
  (benchmarks/step_time.py, ViT-S and Swin-T -> ResNet18);
- `epoch`: one 300-epoch CIFAR-100 run's projected GPU-hours per pair family (= student of the cifar100
  reproduce_tables grid) from a timed fraction of an epoch of the real training loop (on-device data path at 224,
  full evaluation, checkpoint) on a generated 50,000 + 10,000-image in-memory set, and the grid's total;
- `ray`: Ray Train on the GPU (`python -m uhkd.train --workers 1 --ray-train --gpus-per-worker 1`: nccl, bf16,
  channels-last; one worker trains in-process unless `--ray-train`) and a 2-trial quick sweep of one pair with
  `--gpus-per-trial 0.5` (needs Ray: benchmarks/gpu_ray_setup.sh installs it there).

    python benchmarks/gpu_check.py --out /tmp/gpu_check                 # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --small --only epoch    # dry mode: tiny models at 32 px, seconds

Projection of one run (per family, KD-like methods `scratch kd dkd dist` from the timed `kd` run, feature methods
`fitnet ofa uhkd` from the timed `uhkd` run, each with the family's first teacher of the grid; every family eager,
`--compiled-families` also with compile=on, the grid's total for both): epoch =
steps of a full epoch × the measured time per step + the measured evaluation time (scaled to the full evaluation
set) + the measured checkpoint time; run = 300 epochs of that. The first epoch of each timed run (torch.compile,
cuDNN autotuning, allocator warm-up) is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from uhkd.config import build_config
from uhkd.data import ArrayDataset, DatasetInfo
from uhkd.registry import DATASETS
from uhkd.sweep.spec import load_preset
from uhkd.train import run_in_process

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SECTIONS = ("amp", "step", "epoch", "ray")
GENERATED = "generated100"
KD_LIKE, FEATURE = ("scratch", "kd", "dkd", "dist"), ("fitnet", "ofa", "uhkd")


def result(section: str, **row) -> dict:
    print("RESULT", json.dumps({"section": section, **row}), flush=True)
    return row


def register_generated(n_train: int, n_eval: int) -> None:
    """CIFAR-100's shape: 32x32 uint8 images (resized to `data.img_size` on the device), 100 classes."""
    def load(root: str, train: bool, download: bool) -> ArrayDataset:
        n = n_train if train else n_eval
        rng = np.random.default_rng(int(train))
        return ArrayDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n))

    DATASETS.register(GENERATED)(DatasetInfo(GENERATED, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                                             True, 1.0, load, lambda root, download: None))


def run(out: Path, name: str, overrides: dict, gpus: float, preset: str = "quick", report=None) -> dict:
    base = {"workers": 0, "gpus_per_worker": gpus, "output_dir": str(out / name), "name": name}
    return run_in_process(build_config(preset, {**base, **overrides}), report=report, resume=False)


def amp_section(a, out: Path) -> None:
    for amp in ("bf16", "fp16", "off"):
        m = run(out, f"amp-{amp}", {"amp": amp, "optim.epochs": 1, "eval_teacher": False}, a.gpus)
        result("amp", amp=amp, status=m["status"], loss=m["loss"], images_per_s=m["images_per_s"])


def step_section(a) -> None:
    args = ["--device", a.device, "--pairs", "vit-s", "swin-t", "--batch", str(a.batch), "--steps", "20",
            "--warmup", "3", "--no-memory", "--compile", a.compile]
    if a.device == "cuda":
        args += ["--amp", "bf16"]
    if a.small:
        args = ["--device", a.device, "--pairs", "tiny", "--steps", "2", "--warmup", "1", "--no-memory",
                "--compile", "off"]
    script(str(BENCH / "step_time.py"), *args)


def grid() -> tuple[list[str], list[str], list[int], int]:
    """Pairs, methods, seeds and epochs of the cifar100 reproduce_tables grid (the sweep preset)."""
    preset = load_preset("cifar100")
    section = preset.section("reproduce_tables")
    budget = preset.budget("reproduce_tables")
    return list(section["pairs"]), list(section["methods"]), list(budget["seeds"]), int(budget["epochs"])


def time_family(a, out: Path, teacher: str, student: str, method: str, compile_setting: str) -> dict:
    """Seconds per training step, per evaluation pass and per checkpoint, from epoch 2 of a short real run."""
    stamps: list[float] = []
    overrides = {"data.dataset": GENERATED, "data.split": "final", "data.img_size": a.img_size,
                 "data.batch_size": a.batch, "model.scale": "tiny" if a.small else "full", "model.teacher": teacher,
                 "model.student": student, "method.name": method,
                 "optim.epochs": 2, "optim.max_steps_per_epoch": a.steps, "eval_teacher": False,
                 "model.random_teacher": True,
                 "compile": compile_setting, "data.loader_workers": 0}
    if a.small:  # the preset's effective batch would accumulate more steps than the dry mode runs
        overrides["optim.effective_batch"] = 0
        if method == "uhkd":  # the tiny models' maps at 32 px are smaller than the default 7x7 block
            overrides["method.uhkd.k"] = 3
    # the cifar100 run preset: the recipe of the student's family (RandAugment, mixup/cutmix for token students)
    metrics = run(out, f"epoch-{student}-{method}-{compile_setting}", overrides, a.gpus, "cifar100",
                  report=lambda m: stamps.append(time.perf_counter()))
    train_s = a.steps * a.batch / metrics["images_per_s"]
    return {"step_s": train_s / a.steps, "eval_s": metrics["epoch_time_s"] - train_s,
            "checkpoint_s": max(0.0, stamps[1] - stamps[0] - metrics["epoch_time_s"]), "status": metrics["status"]}


def epoch_section(a, out: Path) -> None:
    pairs, methods, seeds, epochs = grid()
    register_generated(a.train_images, a.eval_images)
    steps_full = a.train_images // a.batch
    eval_scale = 10_000 / a.eval_images  # CIFAR-100's test set
    families: dict[str, str] = {}
    for pair in pairs:
        teacher, student = pair.split(":")
        families.setdefault(student, teacher)
    if a.families:
        families = {s: t for s, t in families.items() if s in a.families}
    # every family eager; compiling costs about a minute per run, so only `--compiled-families` are also compiled
    settings = {s: ["off"] + (["on"] if s in a.compiled_families else []) for s in families}
    print(f"epoch projection: {steps_full} steps of batch {a.batch} at {a.img_size} px per epoch, {epochs} epochs, "
          f"evaluation over 10,000 images", flush=True)
    hours: dict[tuple[str, str, str], float] = {}
    for student, teacher in families.items():
        for setting in settings[student]:
            for method in ("kd", "uhkd"):
                t = time_family(a, out, teacher, student, method, setting)
                epoch_s = steps_full * t["step_s"] + eval_scale * t["eval_s"] + t["checkpoint_s"]
                h = hours[student, method, setting] = epochs * epoch_s / 3600
                result("epoch", family=student, teacher=teacher, method=method, compile=setting, epoch_s=epoch_s,
                       run_gpu_hours=h, run_gpu_minutes=60 * h, **t)
    print(f"\n{'family (student)':22} {'compile':>8} {'KD-like run GPU-min':>20} {'feature run GPU-min':>20}")
    for student in families:
        for setting in settings[student]:
            print(f"{student:22} {setting:>8} {60 * hours[student, 'kd', setting]:20.1f} "
                  f"{60 * hours[student, 'uhkd', setting]:20.1f}")
    for setting in ("off", "best"):
        total = n = 0
        for pair in pairs:
            teacher, student = pair.split(":")
            if student not in families:
                continue
            for method in methods:
                if method == "scratch" and pair != f"{families[student]}:{student}":
                    continue  # scratch runs once per student and seed
                kind = "uhkd" if method in FEATURE else "kd"
                total += len(seeds) * min(hours[student, kind, s] for s in settings[student]
                                          if setting == "best" or s == setting)
                n += len(seeds)
        label = "eager" if setting == "off" else f"compiled for {', '.join(a.compiled_families) or 'none'}"
        print(f"grid (cifar100 reproduce_tables, {len(families)} families, {label}): {n} trials, "
              f"{total:.1f} GPU-hours", flush=True)
        result("epoch", grid=setting, grid_trials=n, grid_gpu_hours=total, families=list(families))


def ray_section(a, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    gpus = ["--gpus-per-worker", "1"] if a.device == "cuda" else []
    script("-m", "uhkd.train", "--preset", "quick", "--workers", "1", "--ray-train", *gpus, "--epochs", "2",
           "--output", str(out / "ray-train" / "run"), env=env)
    result("ray", check="uhkd.train --workers 1 --ray-train" + (" --gpus-per-worker 1" if gpus else ""), status="ok")
    trial_gpus = ["--gpus-per-trial", "0.5"] if a.device == "cuda" else []
    script(str(ROOT / "sweeps" / "hetero_pairs.py"), "--preset", "quick", "--cluster", "local", "--num-samples", "2",
           "--pairs", "convnext_tiny:resnet18", "--epochs", "2", *trial_gpus, "--results", str(out / "results"),
           "--teacher-dir", str(out / "teachers"), env=env)
    result("ray", check="hetero_pairs quick, 2 trials" + (" --gpus-per-trial 0.5" if trial_gpus else ""),
           status="ok")


def script(*args: str, env: dict | None = None) -> None:
    print("$ python", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, env=env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="", help="run folders (default: a temporary folder)")
    p.add_argument("--only", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true",
                   help="dry mode: tiny models at 32 px, 512 + 128 generated images, 2 steps, ResNet18 family only")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "cudagraphs", "off"], help="step section")
    p.add_argument("--families", nargs="*", default=None, help="students to time (default: all of the grid)")
    p.add_argument("--compiled-families", nargs="*", default=["resnet18"],
                   help="epoch: students also timed under compile=on (all are timed eager)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed training steps per epoch")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: use --device cpu --small for the dry mode")
    a.gpus = 1 if a.device == "cuda" else 0
    a.img_size, a.train_images, a.eval_images = 224, 50_000, 10_000
    if a.small:
        a.img_size, a.train_images, a.eval_images, a.batch, a.steps = 32, 512, 128, 32, 2
        a.families, a.compiled_families = a.families or ["resnet18"], []
    print(f"torch {torch.__version__}, " + (f"{torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}"
                                            if a.device == "cuda" else "CPU"), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        out = Path(a.out or tmp).resolve()
        for section in a.only:
            start = time.perf_counter()
            {"amp": lambda: amp_section(a, out), "step": lambda: step_section(a),
             "epoch": lambda: epoch_section(a, out), "ray": lambda: ray_section(a, out)}[section]()
            print(f"section {section}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
