"""Sweep overhead on the quick preset: Ray's fixed share of the sweep's wall time with the current defaults beside
the previous ones (every trial a Ray Train run), and how many epochs ASHA saves against running the same sampled
trials to completion.

Runs the quick hetero_pairs sweep three times on one embedded cluster, with the same seeded Optuna suggestions:
the defaults with ASHA, the defaults without ASHA, and Ray Train trials (2 workers) with ASHA, the path every
trial took before. A trial's start-up is its wall time (from Tune starting its actor to its end) minus the time of
its epochs (training + evaluation, as the run measures them). Ray's fixed share of a sweep's wall time is everything but training and
evaluation: Ray's own start, actor creation, scheduling gaps and trial start-up, i.e. 1 - (epochs' time / trials at
once) / (Ray start + sweep wall time). Teachers are trained first (outside the timings) when --teacher-dir lacks
them.

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

    start, began = time.perf_counter(), pd.Timestamp.now(tz="UTC")
    with contextlib.redirect_stdout(log):
        outcome = run(sweep, opts, out=lambda line: print(line, file=log))
    wall, ended = time.perf_counter() - start, pd.Timestamp.now(tz="UTC")
    trials = pd.DataFrame(list(outcome.tables.trials.values()))
    epochs = pd.DataFrame(list(outcome.tables.epochs.values()))
    trial_s, epoch_s, n = trials["wall_time_s"].sum(), epochs["epoch_time_s"].sum(), len(trials)
    slot_s = wall * outcome.concurrent  # trial slots the sweep held, idle or busy
    first, last_start, last = trials["started_at"].min(), trials["started_at"].max(), trials["finished_at"].max()
    # where the slots' time goes besides epochs: before the first trial starts (checks, Tune's set-up, the trial
    # actors' start and imports); slots idle between the first start and the last end, split into the tail (a
    # slot whose trial ended after the last trial started has nothing left to run) and the gaps Tune leaves
    # between one trial and the next in a slot; and after the last trial (tables, clean-up)
    idle = outcome.concurrent * (last - first).total_seconds() - trial_s
    tail = sum((last - end).total_seconds() for end in trials["finished_at"] if end >= last_start)
    phases = {"before first trial s": (first - began).total_seconds(), "gaps between trials s": idle - tail,
              "tail s": tail, "after last trial s": (ended - last).total_seconds()}
    return {"sweep": label, "trials": n, "at once": outcome.concurrent, "wall s": wall, **phases, "trial s": trial_s,
            "epochs s": epoch_s, "start-up s/trial": (trial_s - epoch_s) / n,
            "start-up share": (trial_s - epoch_s) / trial_s, "overhead s/trial": (slot_s - epoch_s) / n,
            "busy slot s": epoch_s / outcome.concurrent,
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
    from uhkd.sweep.runner import plan, train_teachers

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
        # every trial a Ray Train run (2 workers: one worker may train in the trial's own process), with the
        # preset's CPUs split over its workers
        train_workers = 2
        cpus = sweep.preset.run(sweep.kind)["cpus_per_worker"] / train_workers
        rows = [measure("defaults, ASHA", sweep, dataclasses.replace(opts, name="defaults-asha"), log),
                measure("defaults, to completion", dataclasses.replace(sweep, asha=False),
                        dataclasses.replace(opts, name="defaults-full"), log),
                measure(f"Ray Train x{train_workers}, ASHA", sweep, dataclasses.replace(
                    opts, name="train-asha", workers_per_trial=train_workers, cpus_per_worker=cpus), log)]
    for row in rows:
        row["Ray fixed share"] = 1 - row["busy slot s"] / (ray_start + row["wall s"])
    table = pd.DataFrame(rows).set_index("sweep")
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format",
                           "{:.2f}".format):
        print(table.T)
    print(f"\nquick hetero_pairs, {args.num_samples} trials x {args.epochs} epochs, {os.cpu_count()} CPUs "
          f"(results in {results}); Ray start-up (embedded cluster) {ray_start:.1f} s")
    for row in (rows[0], rows[2]):
        print(f"{row['sweep']}: Ray's fixed share of the sweep's wall time {row['Ray fixed share']:.0%} (target <= "
              f"25%); trial start-up {row['start-up s/trial']:.1f} s = {row['start-up share']:.0%} of trial time")
    print(f"epochs with ASHA / to completion: {rows[0]['epochs run']} / {rows[1]['epochs run']} = "
          f"{rows[0]['epochs run'] / rows[1]['epochs run']:.2f}; best top-1 {rows[0]['best top1']:.2f} vs "
          f"{rows[1]['best top1']:.2f}")
    print(f"sweep wall time, Ray Train trials / defaults (both ASHA): {rows[2]['wall s'] / rows[0]['wall s']:.2f}")


if __name__ == "__main__":
    main()
