"""Training-batch throughput of the two data paths for the same recipe, side by side:

- per image: a DataLoader running the recipe's PIL transforms in worker processes, batches copied to the device;
- on device: all uint8 images as one tensor on the device, whole batches cropped/flipped/RandAugmented there.

Both include the batch part of the recipe (random erasing, mixup/cutmix) on the device.

    python benchmarks/augment_throughput.py --img-size 224 --recipe vit --loader-workers 8
"""
from __future__ import annotations

import argparse
import time

import torch

from uhkd.config import DataConfig
from uhkd.data.loader import WorkerData


def images_per_s(data: WorkerData, device: torch.device, epochs: int) -> float:
    def drain(epoch: int) -> int:
        n = 0
        for images, _ in data.train_batches(epoch):
            n += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n

    drain(0)  # warm-up: loader workers, kernels, allocator
    start = time.perf_counter()
    n = sum(drain(epoch) for epoch in range(1, epochs + 1))
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k", help="an in-memory dataset: mnist5k or cifar100")
    p.add_argument("--data-root", default="")
    p.add_argument("--img-size", type=int, nargs="+", default=[32, 224])
    p.add_argument("--recipe", nargs="+", default=["cnn", "vit"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="batches per timed epoch")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads in this process (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {name}; {args.dataset}, batch {args.batch_size}, {args.steps} batches x {args.epochs} epochs, "
          f"{args.loader_workers} loader workers")
    print(f"{'recipe':>6} {'size':>5} {'per-image img/s':>16} {'on-device img/s':>16} {'ratio':>7}")
    for recipe in args.recipe:
        for size in args.img_size:
            rates = []
            for on_device in (False, True):
                cfg = DataConfig(dataset=args.dataset, root=args.data_root, img_size=size, augment=recipe,
                                 batch_size=args.batch_size, device_data=on_device,
                                 loader_workers=args.loader_workers)
                data = WorkerData(cfg, 0, device, max_steps_per_epoch=args.steps)
                rates.append(images_per_s(data, device, args.epochs))
            print(f"{recipe:>6} {size:>5} {rates[0]:>16.0f} {rates[1]:>16.0f} {rates[1] / rates[0]:>6.1f}x",
                  flush=True)


if __name__ == "__main__":
    main()
