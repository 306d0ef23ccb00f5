"""Sweep overhead on the quick preset: how much of a sweep's time is Ray start-up and per-trial start-up rather than
training, and how many epochs ASHA saves against running the same sampled trials to completion.

Runs the quick hetero_pairs sweep three times on one embedded cluster, with the same seeded Optuna suggestions:
Ray Train trials with ASHA, Ray Train trials without ASHA, and in-process trials (no Ray Train) with ASHA. A trial's
start-up is its wall time (from Tune starting its actor to its end) minus the time of its epochs (training +
evaluation, as the run measures them); the sweep's overhead also counts actor creation and scheduling gaps: the
trial slots it held (wall time x trials at once) minus the epochs' time. Teachers
are trained first (outside the timings) when --teacher-dir lacks them.

    python benchmarks/sweep_overhead.py [--num-samples 4] [--epochs 3]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import pandas as pd


def measure(label: str, sweep, opts, log) -> dict:  # noqa: ANN001  (Sweep, SweepOptions, file)
    from uhkd.sweep.runner import run

    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        outcome = run(sweep, opts, out=lambda line: print(line, file=log))
    wall = time.perf_counter() - start
    trials = pd.DataFrame(list(outcome.tables.trials.values()))
    epochs = pd.DataFrame(list(outcome.tables.epochs.values()))
    trial_s, epoch_s, n = trials["wall_time_s"].sum(), epochs["epoch_time_s"].sum(), len(trials)
    slot_s = wall * outcome.concurrent  # trial slots the sweep held, idle or busy
    return {"sweep": label, "trials": n, "at once": outcome.concurrent, "wall s": wall, "trial s": trial_s,
            "epochs s": epoch_s, "start-up s/trial": (trial_s - epoch_s) / n,
            "start-up share": (trial_s - epoch_s) / trial_s, "overhead s/trial": (slot_s - epoch_s) / n,
            "overhead share": (slot_s - epoch_s) / slot_s, "epochs run": int(trials["epochs_run"].sum()),
            "stopped": int((trials["status"] == "stopped").sum()), "best top1": trials["best_top1"].max()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-dir", default="teachers")
    p.add_argument("--results", default="", help="default: a temporary folder")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from sweeps import hetero_pairs
    from uhkd.sweep.cli import options
    from uhkd.sweep.cluster import connect
    from uhkd.sweep.runner import plan
    from uhkd.sweep.teachers import train_teachers

    results = args.results or tempfile.mkdtemp(prefix="uhkd-overhead-")
    Path(results).mkdir(parents=True, exist_ok=True)
    argv = ["--cluster", "local", "--results", results, "--teacher-dir", args.teacher_dir, "--seed", str(args.seed),
            "--num-samples", str(args.num_samples), "--epochs", str(args.epochs)]
    ns = hetero_pairs.parser().parse_args(argv)
    opts = options(ns)
    sweep = hetero_pairs.build(ns, opts)

    start = time.perf_counter()
    print(connect("local"))
    ray_start = time.perf_counter() - start
    with open(Path(results) / "benchmark.log", "w") as log:
        missing = plan(sweep, opts, "check").missing
        if missing:
            with contextlib.redirect_stdout(log):
                train_teachers(sweep.preset, missing, opts, out=lambda line: print(line, file=log))
        rows = [measure("Ray Train, ASHA", sweep, dataclasses.replace(opts, name="train-asha"), log),
                measure("Ray Train, to completion", dataclasses.replace(sweep, asha=False),
                        dataclasses.replace(opts, name="train-full"), log),
                measure("in-process, ASHA", sweep,
                        dataclasses.replace(opts, name="inproc-asha", workers_per_trial=0), log)]
    table = pd.DataFrame(rows).set_index("sweep")
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format",
                           "{:.2f}".format):
        print(table.T)
    first = rows[0]
    print(f"\nquick hetero_pairs, {args.num_samples} trials x {args.epochs} epochs, {os.cpu_count()} CPUs "
          f"(results in {results})")
    print(f"Ray start-up (embedded cluster): {ray_start:.1f} s = "
          f"{ray_start / (ray_start + first['wall s']):.0%} of the sweep's wall time")
    for row in (rows[0], rows[2]):
        print(f"{row['sweep']}: start-up {row['start-up s/trial']:.1f} s per trial = {row['start-up share']:.0%} of "
              f"trial time; all overhead {row['overhead s/trial']:.1f} s per trial = {row['overhead share']:.0%} of "
              f"the trial slots' time (training + evaluation: {1 - row['overhead share']:.0%})")
    print(f"epochs with ASHA / to completion: {rows[0]['epochs run']} / {rows[1]['epochs run']} = "
          f"{rows[0]['epochs run'] / rows[1]['epochs run']:.2f}; best top-1 {rows[0]['best top1']:.2f} vs "
          f"{rows[1]['best top1']:.2f}")
    print(f"sweep wall time, Ray Train / in-process trials (both ASHA): {rows[0]['wall s'] / rows[2]['wall s']:.2f}")


if __name__ == "__main__":
    main()
