"""Per-channel mean and standard deviation of a dataset's training images (in [0, 1] units), computed once from a
seeded sample and cached under `$XDG_CACHE_HOME/uhkd/dataset-stats/` (default `~/.cache`)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

SAMPLE = 2000  # images; the statistics of a few thousand images are stable to the third decimal


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uhkd" / "dataset-stats"


class Stats(NamedTuple):
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str  # where they come from: "computed from N training images, cached in PATH" or "cached in PATH"


def cached_stats(key: str, dataset: Any) -> Stats:
    """Mean and std of `dataset` (items `(PIL image, label)`), read from the cache entry `key` when there is one."""
    path = cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        entry = json.loads(path.read_text())
        if entry.get("key") == key:
            return Stats(tuple(entry["mean"]), tuple(entry["std"]), f"cached in {path}")
    mean, std = channel_stats(dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "mean": mean, "std": std}))
    os.replace(tmp, path)  # several workers may compute it at once: the last complete write wins
    return Stats(mean, std, f"computed from {min(len(dataset), SAMPLE)} training images, cached in {path}")


def channel_stats(dataset: Any, sample: int = SAMPLE) -> tuple[tuple[float, ...], tuple[float, ...]]:
    n = len(dataset)
    picks = np.sort(np.random.default_rng(0).permutation(n)[:sample]) if n > sample else np.arange(n)
    total, total_sq, pixels = np.zeros(3), np.zeros(3), 0
    for i in picks:
        image = np.asarray(dataset[int(i)][0].convert("RGB"), dtype=np.float64) / 255
        flat = image.reshape(-1, 3)
        total += flat.sum(0)
        total_sq += (flat ** 2).sum(0)
        pixels += len(flat)
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean ** 2, 1e-12))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
