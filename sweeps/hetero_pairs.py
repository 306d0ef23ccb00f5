"""Search UHKD's loss weights per heterogeneous teacher-student pair: α, β (log-uniform), τ and the spectrum form,
the sample budget split across the preset's pairs, each pair with its own Optuna TPE study (seeded) and its own
ASHA brackets stopping on validation top-1 each epoch (uhkd/sweep/search.py), the `tune` split only (a seeded 90/10
split of the training set; never the test set). Every trial is a Ray Train TorchTrainer run.

    python sweeps/hetero_pairs.py                      # quick preset: offline digits, tiny models, a few minutes
    python sweeps/hetero_pairs.py --preset cifar100 --data-root DIR --teacher-dir DIR --cluster auto
"""
from __future__ import annotations

import argparse
import sys

from ray import tune

from uhkd.errors import UserError
from uhkd.sweep.cli import SweepOptions, pairs_flag, sweep_parser
from uhkd.sweep.runner import main, pairs
from uhkd.sweep.spec import Sweep, domain, load_preset


def parser() -> argparse.ArgumentParser:
    p = sweep_parser("sweeps/hetero_pairs.py", __doc__)
    pairs_flag(p)
    p.add_argument("--study", default="", metavar="DB",
                   help="SQLite file keeping the Optuna studies (one per pair), so later sweeps warm-start from them")
    p.add_argument("--objective", default="accuracy", choices=("accuracy", "pareto"),
                   help="accuracy: best top-1; pareto: best top-1 against --pareto-metric (multi-objective)")
    p.add_argument("--pareto-metric", default="student_params", choices=("student_params", "images_per_s"))
    return p


def build(args: argparse.Namespace, opts: SweepOptions) -> Sweep:
    preset = load_preset(opts.preset)
    section = preset.section("hetero_pairs")
    pair_list = pairs("hetero_pairs", preset, opts)
    samples = opts.num_samples or int(preset.budget("hetero_pairs").get("num_samples", 1))
    if samples < len(pair_list):
        raise UserError(f"--num-samples {samples} is fewer than the {len(pair_list)} pairs; the search splits the "
                        f"samples across the pairs (at least one each): raise it or give fewer --pairs")
    space = {"pair": tune.choice(pair_list)}
    space.update({key: domain(key, spec) for key, spec in (section.get("space") or {}).items()})
    return Sweep("hetero_pairs", preset, space=space, force={"method.name": "uhkd", "data.split": "tune"},
                 asha=True, objective=args.objective, pareto_metric=args.pareto_metric, study=args.study)


if __name__ == "__main__":
    sys.exit(main(parser(), build))
