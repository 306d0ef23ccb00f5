"""Search a method's parameters per heterogeneous teacher-student pair (UHKD's α, β, τ and spectrum form by default;
`--method NAME` searches the space NAME declares): the sample budget split across the preset's pairs, each pair
with its own Optuna TPE study (seeded) and its own ASHA brackets stopping on validation top-1 each epoch
(uhkd/sweep/search.py), the `tune` split only (a seeded 90/10 split of the training set; never the test set). A
trial of one worker trains in its Tune trial's own process; two or more workers make it a Ray Train TorchTrainer.

    python sweeps/hetero_pairs.py                      # quick preset: offline digits, tiny models, a few minutes
    python sweeps/hetero_pairs.py --method dkd         # DKD's own search space instead of UHKD's
    python sweeps/hetero_pairs.py --preset cifar100 --data-root DIR --teacher-dir DIR --cluster auto
"""
from __future__ import annotations

import argparse
import sys

from ray import tune

from uhkd.errors import UserError
from uhkd.sweep.cli import SweepOptions, pairs_flag, sweep_parser
from uhkd.sweep.runner import main, pairs
from uhkd.sweep.spec import Sweep, domain, load_preset, search_space


def parser() -> argparse.ArgumentParser:
    p = sweep_parser("sweeps/hetero_pairs.py", __doc__)
    pairs_flag(p)
    p.add_argument("--method", default="uhkd", help="the method whose declared search space is searched (default "
                                                    "uhkd; any registered method or a --plugin's)")
    p.add_argument("--study", default="", metavar="DB",
                   help="SQLite file keeping the Optuna studies (one per pair), so later sweeps warm-start from them")
    p.add_argument("--objective", default="accuracy", choices=("accuracy", "pareto"),
                   help="accuracy: best top-1; pareto: best top-1 against --pareto-metric (multi-objective)")
    p.add_argument("--pareto-metric", default="student_params", choices=("student_params", "images_per_s"))
    return p


def build(args: argparse.Namespace, opts: SweepOptions) -> Sweep:
    from uhkd.methods import method_class

    preset = load_preset(opts.preset)
    method_class(args.method)
    pair_list = pairs("hetero_pairs", preset, opts)
    samples = opts.num_samples or int(preset.budget("hetero_pairs").get("num_samples", 1))
    if samples < len(pair_list):
        raise UserError(f"--num-samples {samples} is fewer than the {len(pair_list)} pairs; the search splits the "
                        f"samples across the pairs (at least one each): raise it or give fewer --pairs")
    searched = search_space(preset, args.method)
    if not searched:
        raise UserError(f"method {args.method!r} declares no search space: nothing to search (reproduce_tables "
                        f"runs it with its defaults)")
    space = {"pair": tune.choice(pair_list), **{key: domain(key, spec) for key, spec in searched.items()}}
    return Sweep("hetero_pairs", preset, method=args.method, space=space,
                 force={"method.name": args.method, "data.split": "tune"}, asha=True, objective=args.objective,
                 pareto_metric=args.pareto_metric, study=args.study)


if __name__ == "__main__":
    sys.exit(main(parser(), build))
