"""UHKD training-step time over KD training-step time, same pair, batch and student, measured interleaved in one
process; plus the `sca=conv_bn` order (SPEC §1.1: 1.43 on CPU) and the peak memory of each method.

    python benchmarks/step_time.py                      # ViT-S -> ResNet18 at 224 batch 8, tiny pair at 32, CPU
    python benchmarks/step_time.py --device cuda --batch 128 --amp bf16

A step = forward (teacher under no_grad), sum of the loss terms, backward, SGD step. Times are medians over
`--steps` interleaved repetitions after `--warmup`. On a shared machine use `--threads 1 --clock cpu`: the
process's CPU time per step does not count the time other processes hold the cores. Peak memory: on CPU the peak RSS (VmHWM, Linux) of a subprocess that runs only
that method (it includes the models and the interpreter); on CUDA `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from uhkd.config import build_config
from uhkd.methods import build_method
from uhkd.models import create_stage_model, load_teacher

VARIANTS = {"kd": {"method.name": "kd"}, "uhkd": {"method.name": "uhkd"},
            "uhkd_conv_bn": {"method.name": "uhkd", "method.sca": "conv_bn"}}
PAIRS = [  # (teacher, student, img_size, scale, batch or None = --batch)
    ("vit_small_patch16_224", "resnet18", 224, "full", None),
    ("vit_small_patch16_224", "resnet18", 32, "tiny", 64),
]


def setup(teacher: str, student: str, img_size: int, scale: str, variants: list[str], device: str):
    torch.manual_seed(0)
    s = create_stage_model(student, num_classes=100, img_size=img_size, scale=scale)
    t = load_teacher(teacher, "", num_classes=100, img_size=img_size, scale=scale)
    out = {}
    for name in variants:
        cfg = build_config(None, {**VARIANTS[name], "model.student": student, "model.teacher": teacher,
                                  "model.scale": scale, "data.img_size": img_size})
        d = build_method(cfg, s, t).to(device).train()
        params = list(d.student.parameters()) + d.extra_parameters()
        out[name] = (d, torch.optim.SGD(params, lr=1e-3, momentum=0.9))
    return out


def step(distiller, opt, x, y, amp: str) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        _, terms = distiller(x, y)
    sum(terms.values()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def batch(img_size: int, n: int, device: str):
    return torch.rand(n, 3, img_size, img_size, device=device), torch.randint(0, 100, (n,), device=device)


def time_pair(args, teacher, student, img_size, scale, n) -> dict[str, float]:
    runs = setup(teacher, student, img_size, scale, list(VARIANTS), args.device)
    x, y = batch(img_size, n, args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, (d, opt) in runs.items():  # interleaved: load changes hit every method alike
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = clock()
            step(d, opt, x, y, args.amp)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_mb(args, teacher, student, img_size, scale, n, variant) -> float:
    """Peak memory of `--memory-of variant` for this pair, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-of", variant, "--device", args.device, "--amp", args.amp,
           "--pair", json.dumps([teacher, student, img_size, scale, n]), "--threads", str(args.threads)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def memory_child(args) -> None:
    teacher, student, img_size, scale, n = json.loads(args.pair)
    (d, opt), = setup(teacher, student, img_size, scale, [args.memory_of], args.device).values()
    x, y = batch(img_size, n, args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step(d, opt, x, y, args.amp)
    if args.device == "cuda":
        print(torch.cuda.max_memory_allocated() / 2 ** 20)
    else:  # VmHWM: peak RSS of this process image (ru_maxrss would carry the parent's peak over fork + exec)
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        print(int(status["VmHWM"].split()[0]) / 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8, help="batch of the 224x224 pair")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="off", choices=["off", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (CPU only)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-of", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--pair", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_child(args)
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu measures CPU time: use it with --device cpu")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; amp {args.amp}; {args.clock} clock; median of {args.steps} interleaved steps after "
          f"{args.warmup} warm-up")
    print(f"{'teacher -> student':42} {'size':>4} {'batch':>5} {'kd ms':>8} {'uhkd ms':>8} {'ratio':>6} "
          f"{'conv_bn ms':>10} {'ratio':>6} {'peak MB kd / uhkd / conv_bn':>28}")
    for teacher, student, img_size, scale, n in PAIRS:
        n = n or args.batch
        t = time_pair(args, teacher, student, img_size, scale, n)
        mem = "" if args.no_memory else " / ".join(
            f"{peak_memory_mb(args, teacher, student, img_size, scale, n, v):.0f}" for v in VARIANTS)
        label = f"{teacher} -> {student}" + (" (tiny)" if scale == "tiny" else "")
        print(f"{label:42} {img_size:>4} {n:>5} {t['kd'] * 1e3:8.1f} {t['uhkd'] * 1e3:8.1f} "
              f"{t['uhkd'] / t['kd']:6.3f} {t['uhkd_conv_bn'] * 1e3:10.1f} {t['uhkd_conv_bn'] / t['kd']:6.3f} "
              f"{mem:>28}", flush=True)


if __name__ == "__main__":
    main()
