"""One prepared check of the CUDA path (run on a GPU machine; no Ray needed, runs are in-process):

1. AMP: a short UHKD run under bf16 and under fp16 (GradScaler) finishes with finite losses;
2. the on-device data path against the per-image DataLoader path (benchmarks/augment_throughput.py);
3. training-step throughput, UHKD / KD side by side at 224×224 (benchmarks/step_time.py);
4. a short real distillation on the offline MNIST digits: a teacher trained here, then KD and UHKD students,
   and a full-size ViT-S → ResNet18 pair at 224×224 for images/s with bf16 + channels-last.

    python benchmarks/gpu_check.py --out /tmp/gpu_check
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from uhkd.config import build_config
from uhkd.train import run_in_process

BENCH = Path(__file__).resolve().parent


def run(out: Path, name: str, overrides: dict, gpus: float = 1) -> dict:
    base = {"workers": 0, "gpus_per_worker": gpus, "output_dir": str(out / name), "name": name}
    cfg = build_config("quick", {**base, **overrides})
    start = time.perf_counter()
    metrics = run_in_process(cfg, resume=False)
    metrics["wall_s"] = time.perf_counter() - start
    keep = ("status", "failure_reason", "top1", "best_top1", "teacher_top1", "images_per_s", "epoch_time_s", "loss",
            "student_params", "extra_params", "wall_s")
    row = {"run": name, **{k: metrics.get(k) for k in keep}}
    print("RESULT", json.dumps(row), flush=True)
    return row


def script(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check_runs")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--skip", nargs="*", default=[], choices=["amp", "data", "step", "distill"])
    a = p.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = Path(a.out).resolve()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}")
    rows = []
    if "amp" not in a.skip:
        for amp in ("bf16", "fp16", "off"):
            rows.append(run(out, f"amp-{amp}", {"amp": amp, "optim.epochs": 1, "eval_teacher": False}))
    if "data" not in a.skip:
        script(str(BENCH / "augment_throughput.py"), "--device", "cuda", "--img-size", "32", "224",
               "--batch-size", "256", "--loader-workers", "8", "--steps", "15")
    if "step" not in a.skip:
        script(str(BENCH / "step_time.py"), "--device", "cuda", "--amp", "bf16", "--batch", "64", "--steps", "20",
               "--no-memory")
    if "distill" not in a.skip:
        teacher = run(out, "teacher-deit", {"model.student": "deit_tiny_patch16_224", "model.teacher": "",
                                            "model.scale": "full", "method.name": "scratch",
                                            "optim.epochs": a.epochs})
        ckpt = str(out / "teacher-deit" / "student.pt")
        pair = {"model.teacher": "deit_tiny_patch16_224", "model.teacher_checkpoint": ckpt,
                "model.student": "resnet18", "model.scale": "full", "optim.epochs": a.epochs}
        rows += [teacher] + [run(out, f"{m}-deit-resnet18", {**pair, "method.name": m})
                             for m in ("scratch", "kd", "uhkd")]
        full = {"model.scale": "full", "data.img_size": 224, "data.batch_size": 128, "optim.epochs": 1,
                "optim.max_steps_per_epoch": 30, "model.teacher": "vit_small_patch16_224",
                "model.student": "resnet18", "data.limit_eval": 512, "method.k": 7}
        rows += [run(out, f"{m}-vits-resnet18-224", {**full, "method.name": m}) for m in ("kd", "uhkd")]
    print("\nSUMMARY")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
