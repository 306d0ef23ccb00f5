"""UHKD training-step time over KD training-step time, same pair, batch and student, measured interleaved in one
process; the `sca=conv_bn` order (docs/method.md#sca-the-channel-projection); the 2025 baselines RSD and PAT beside
them (published: RSD's epoch close to KD's, PAT's ~3.2x; docs/baselines.md#pat); with `--compile`, the same steps
under torch.compile (the trainer's `compile` switch); model FLOPs per image and the FLOP utilisation (MFU) of each
step; peak memory.

    python benchmarks/step_time.py                      # ViT-S / Swin-T -> ResNet18 at 224 batch 8, tiny pair at 32, CPU
    python benchmarks/step_time.py --device cuda --batch 128 --amp bf16 --compile on

A step = forward (teacher under no_grad; PAT's prompted teacher pass with gradients to its prompts), sum of the
loss terms, backward, SGD step. Times are medians over `--steps` interleaved repetitions after `--warmup`
(compiled variants compile during their first warm-up step). On a shared machine use `--threads 1 --clock cpu`: the
process's CPU time per step does not count the time other processes hold the cores.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one eager step (forward of teacher and student, backward of
the student and the method's modules: matrix products, convolutions, attention; elementwise work is not counted),
divided by the batch. MFU = FLOPs per image × images/s ÷ `--peak-tflops` (default 790 TFLOP/s: the 8192³ bf16
matrix product measured on the H200 machines we use; the H200 SXM datasheet says 989 dense) and ÷ the peak of a
large matrix product measured here in the step's dtype (`matmul` column), so CPU runs get a meaningful ratio too.

Peak memory: on CPU the peak RSS (VmHWM, Linux) of a subprocess that runs only that method (it includes the models
and the interpreter); on CUDA `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from uhkd.config import build_config
from uhkd.methods import build_method
from uhkd.models import create_stage_model, load_teacher
from uhkd.trainer import compiled

VARIANTS = {"kd": {"method.name": "kd"}, "uhkd": {"method.name": "uhkd"},
            "uhkd_conv_bn": {"method.name": "uhkd", "method.uhkd.sca": "conv_bn"},
            "rsd": {"method.name": "rsd"}, "pat": {"method.name": "pat"}}
COMPILED = ("kd", "uhkd")  # the variants also timed compiled with --compile
PAIRS = {  # name: (teacher, student, img_size, scale, batch or None = --batch)
    "vit-s": ("vit_small_patch16_224", "resnet18", 224, "full", None),
    "swin-t": ("swin_tiny_patch4_window7_224", "resnet18", 224, "full", None),
    "tiny": ("vit_small_patch16_224", "resnet18", 32, "tiny", 64),
}


def setup(teacher: str, student: str, img_size: int, scale: str, variants: list[str], device: str):
    torch.manual_seed(0)
    s = create_stage_model(student, num_classes=100, img_size=img_size, scale=scale)
    t = load_teacher(teacher, "", num_classes=100, img_size=img_size, scale=scale)
    out = {}
    for name in variants:
        cfg = build_config(None, {**VARIANTS[name], "model.student": student, "model.teacher": teacher,
                                  "model.scale": scale, "data.img_size": img_size})
        d = build_method(cfg, s, t).to(device).train()
        if device == "cuda":
            d.to(memory_format=torch.channels_last)
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
    x = torch.rand(n, 3, img_size, img_size, device=device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 100, (n,), device=device)


def flops_per_image(distiller, opt, x, y, amp: str) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step(distiller, opt, x, y, amp)
    return counter.get_total_flops() / len(x)


def matmul_tflops(device: str, amp: str) -> float:
    """TFLOP/s of a large square matrix product here, in the step's dtype (bf16 under --amp bf16)."""
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(13):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times[3:]) / 1e12


def time_pair(args, teacher, student, img_size, scale, n) -> dict[str, dict[str, float]]:
    runs = setup(teacher, student, img_size, scale, list(VARIANTS), args.device)
    x, y = batch(img_size, n, args.device)
    flops = {name: flops_per_image(d, opt, x, y, args.amp) for name, (d, opt) in runs.items()}
    if args.compile != "off":
        for name in COMPILED:
            d, opt = runs[name]
            runs[f"{name}+compile"] = (compiled(d, args.compile, torch.device(args.device)), opt)
            flops[f"{name}+compile"] = flops[name]
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
    return {name: {"s": statistics.median(ts), "flops": flops[name]} for name, ts in times.items()}


def peak_memory_mb(args, pair: str, variant: str) -> float:
    """Peak memory of `--memory-of variant` for this pair, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-of", variant, "--device", args.device, "--amp", args.amp,
           "--pairs", pair, "--batch", str(args.batch), "--threads", str(args.threads)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def memory_child(args) -> None:
    teacher, student, img_size, scale, n = PAIRS[args.pairs[0]]
    n = n or args.batch
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
    p.add_argument("--batch", type=int, default=8, help="batch of the 224x224 pairs")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="off", choices=["off", "bf16"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "cudagraphs", "off"],
                   help="also time kd and uhkd under torch.compile (auto: on for cuda, off on cpu)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the chip's peak for MFU (default: H200 bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (CPU only)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-of", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_child(args)
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu measures CPU time: use it with --device cpu")
    if args.compile == "auto":
        args.compile = "on" if args.device == "cuda" else "off"
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    matmul = matmul_tflops(args.device, args.amp)
    print(f"device: {device}; amp {args.amp}; compile {args.compile}; {args.clock} clock; median of {args.steps} "
          f"interleaved steps after {args.warmup} warm-up; MFU against {args.peak_tflops:g} TFLOP/s (peak) and "
          f"{matmul:.3g} TFLOP/s (a large matrix product measured here)", flush=True)
    header = (f"{'variant':14} {'ms/step':>9} {'img/s':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU peak':>9} "
              f"{'MFU matmul':>10} {'peak MB':>8}")
    for pair in args.pairs:
        teacher, student, img_size, scale, n = PAIRS[pair]
        n = n or args.batch
        t = time_pair(args, teacher, student, img_size, scale, n)
        label = f"{teacher} -> {student}" + (" (tiny)" if scale == "tiny" else "")
        print(f"\n{label}, {img_size}x{img_size}, batch {n}\n{header}")
        for name, r in t.items():
            ips = n / r["s"]
            achieved = r["flops"] * ips / 1e12
            mem = "" if args.no_memory or name not in VARIANTS else f"{peak_memory_mb(args, pair, name):.0f}"
            print(f"{name:14} {r['s'] * 1e3:9.1f} {ips:9.0f} {r['flops'] / 1e9:10.2f} {achieved:8.3g} "
                  f"{100 * achieved / args.peak_tflops:8.2f}% {100 * achieved / matmul:9.1f}% {mem:>8}")
        ratios = [f"uhkd/kd time {t['uhkd']['s'] / t['kd']['s']:.3f}",
                  f"conv_bn/kd {t['uhkd_conv_bn']['s'] / t['kd']['s']:.3f}",
                  f"rsd/kd {t['rsd']['s'] / t['kd']['s']:.3f}", f"pat/kd {t['pat']['s'] / t['kd']['s']:.3f}",
                  f"uhkd/kd FLOPs {t['uhkd']['flops'] / t['kd']['flops']:.3f}",
                  f"pat/kd FLOPs {t['pat']['flops'] / t['kd']['flops']:.3f}"]
        if "uhkd+compile" in t:
            ratios += [f"compiled uhkd/kd time {t['uhkd+compile']['s'] / t['kd+compile']['s']:.3f}",
                       f"compile speed-up kd {t['kd']['s'] / t['kd+compile']['s']:.2f}x "
                       f"uhkd {t['uhkd']['s'] / t['uhkd+compile']['s']:.2f}x",
                       f"compiled uhkd images/s / eager kd images/s {t['kd']['s'] / t['uhkd+compile']['s']:.3f}"]
        print("ratios: " + "; ".join(ratios), flush=True)
        print("RESULT", json.dumps({"pair": pair, "batch": n, "amp": args.amp, "compile": args.compile,
                                    **{name: {"ms": r["s"] * 1e3, "gflop_per_image": r["flops"] / 1e9}
                                       for name, r in t.items()}}), flush=True)


if __name__ == "__main__":
    main()
