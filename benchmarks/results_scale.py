"""What one trial's end costs the sweep driver as a sweep grows: the previous way (every trial end rewrote both
Parquet tables whole, on Tune's event loop) beside the part files of `uhkd.sweep.results.SweepTables` (one trial's
rows, two small files), at 100, 1,000 and 10,000 trials already recorded, measured side by side in one run; plus
the one-off compaction at the sweep's end and a live reader's merge of the part files.

    python benchmarks/results_scale.py [--trials 100,1000,10000] [--epochs 20] [--repeats 5]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa

from uhkd.sweep.results import EPOCHS, TRIALS, SweepTables, epochs_schema, merged_table, trials_schema, \
    write_atomic

SAMPLE = {pa.int32(): 1, pa.int64(): 7, pa.float64(): 0.5, pa.string(): "convnext_tiny", pa.bool_(): True,
          pa.timestamp("us", tz="UTC"): datetime(2026, 1, 1, tzinfo=timezone.utc)}


def rows(trial_id: str, epochs: int) -> tuple[dict, list[dict]]:
    """A trial row and its epoch rows, every column filled (as wide as the real tables)."""
    trial = {f.name: SAMPLE[f.type] for f in trials_schema()} | {"trial_id": trial_id, "sweep": "s"}
    per_epoch = [{f.name: SAMPLE[f.type] for f in epochs_schema()} | {"trial_id": trial_id, "sweep": "s", "epoch": e}
                 for e in range(1, epochs + 1)]
    return trial, per_epoch


def rewrite_whole(folder: Path, trials: list[dict], epochs: list[dict]) -> None:
    """The previous trial end: both tables rebuilt from every row in memory and written whole."""
    fs = SweepTables(str(folder.parent), folder.name).fs
    write_atomic(pa.Table.from_pylist(trials, schema=trials_schema()), fs, f"{folder}/{TRIALS}")
    write_atomic(pa.Table.from_pylist(epochs, schema=epochs_schema()), fs, f"{folder}/{EPOCHS}")


def timed(action, repeats: int) -> float:  # noqa: ANN001  (a callable)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(n: int, epochs: int, repeats: int, root: Path) -> dict:
    old_trials, old_epochs = [], []
    for i in range(n - 1):
        trial, per_epoch = rows(f"t{i:05d}", epochs)
        old_trials.append(trial)
        old_epochs.extend(per_epoch)
    new_trial, new_epochs = rows("tlast", epochs)

    previous = root / f"previous-{n}"
    previous.mkdir()
    rewrite = timed(lambda: rewrite_whole(previous, [*old_trials, new_trial], [*old_epochs, *new_epochs]), repeats)

    tables = SweepTables(str(root), f"parts-{n}")
    for i, trial in enumerate(old_trials):  # the other n - 1 trials' part files
        tables.write_trial(trial, old_epochs[i * epochs:(i + 1) * epochs])
    part = timed(lambda: tables.write_trial(new_trial, new_epochs), repeats)
    start = time.perf_counter()
    live = merged_table(tables.fs, f"{tables.folder}/{TRIALS}", TRIALS)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    compacted = SweepTables(str(root), f"parts-{n}").compact()
    compact_s = time.perf_counter() - start
    assert live.num_rows == len(compacted.trials) == n and len(compacted.epochs) == n * epochs
    shutil.rmtree(previous)
    shutil.rmtree(tables.folder)
    return {"trials": n, "rewrite whole (previous) s": rewrite, "part files (now) s": part,
            "previous / now": rewrite / part, "live read of parts s": read_s, "compaction once s": compact_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", default="100,1000,10000", help="comma list of sweep sizes")
    p.add_argument("--epochs", type=int, default=20, help="epoch rows per trial")
    p.add_argument("--repeats", type=int, default=5, help="writes timed per size (median)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="uhkd-scale-"))
    try:
        table = pd.DataFrame([measure(int(n), args.epochs, args.repeats, root) for n in args.trials.split(",")])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"cost of one trial's end on the sweep driver ({args.epochs} epoch rows per trial, median of "
          f"{args.repeats}, local disk)")
    with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
        print(table.set_index("trials").to_string())
    first, last = table.iloc[0], table.iloc[-1]
    print(f"from {first.trials} to {last.trials} trials: previous x{last.iloc[1] / first.iloc[1]:.1f}, "
          f"now x{last.iloc[2] / first.iloc[2]:.1f}")


if __name__ == "__main__":
    main()
