"""The flags every sweep script shares, checked before anything starts."""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from ..config import parse_set
from ..errors import OneLineParser
from ..plugins import add_plugin_flag, load as load_plugins
from ..track_options import TrackOptions, add_track_flags, track_options
from ..validate import Problems, out_of_bounds
from .spec import load_preset, preset_names

ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
MAX_NAME = 100  # a sweep name is a folder name (and an experiment name in the trackers)
RESOURCE_STEP = 0.0001  # Ray counts resources in steps of this; a smaller positive amount is none
# what `python -m uhkd.train`'s flags are called on a sweep (an unknown flag is named with its likely one)
TRAIN_FLAGS = {"--teacher": "--pairs TEACHER:STUDENT", "--student": "--pairs TEACHER:STUDENT",
               "--teacher-checkpoint": "--teacher-dir", "--output": "--results",
               "--gpus-per-worker": "--gpus-per-trial", "--dataset": "--set data.dataset=NAME",
               "--pretrained": "--set model.pretrained_file=hub|FILE", "--download": "--set data.download=true"}


@dataclass
class SweepOptions:
    """The shared flags; `None` = the preset's budget (or automatic)."""

    preset: str = "quick"
    cluster: str = "auto"
    num_samples: int | None = None
    max_concurrent: int | None = None
    epochs: int | None = None
    seeds: tuple[int, ...] | None = None
    gpus_per_trial: float | None = None
    workers_per_trial: int | None = None
    cpus_per_worker: float | None = None
    data_root: str = ""
    teacher_dir: str = "teachers"
    results: str = "results"
    name: str = ""
    resume: bool = False
    seed: int = 0
    sets: dict[str, str] = field(default_factory=dict)
    pairs: tuple[str, ...] | None = None
    track: TrackOptions = field(default_factory=TrackOptions)  # its experiment is set to the sweep name
    trial_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per trial and worker


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and RESOURCE_STEP <= v < math.inf for v in value.values()):
        raise argparse.ArgumentTypeError(f'expected a JSON object of resource name -> number >= {RESOURCE_STEP:g} '
                                         f'such as \'{{"worker_node": 1}}\', got {text!r}')
    taken = sorted(set(value) & {"CPU", "GPU", "cpu", "gpu", "memory"})
    if taken:
        raise argparse.ArgumentTypeError(f"{', '.join(taken)}: use --cpus-per-worker / --gpus-per-trial instead")
    return {str(k): float(v) for k, v in value.items()}


def _pairs(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def sweep_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                      hints=TRAIN_FLAGS)
    g = p.add_argument_group("shared sweep flags")
    g.add_argument("--cluster", default="auto", metavar="auto|local|ADDRESS",
                   help="auto: attach to RAY_ADDRESS or the cluster `ray start --head` started here, else start an "
                        "embedded local one; local: always embedded; HOST:PORT or ray://HOST:PORT: attach")
    g.add_argument("--preset", default="quick", help=f"one of {', '.join(preset_names())} (default quick)")
    g.add_argument("--num-samples", type=int, help="trials of a search sweep (default: the preset's)")
    g.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    g.add_argument("--epochs", type=int, help="epochs per trial (default: the preset's)")
    g.add_argument("--seeds", type=_seeds, help="run seeds, comma list (default: the preset's)")
    g.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (default: 1 when the "
                                                        "cluster has GPUs, else 0; quick: 0)")
    g.add_argument("--workers-per-trial", type=int, help="training processes per trial: 0 or 1 = the trial's own "
                                                         "process (no Ray Train), 2 or more = a Ray Train "
                                                         "TorchTrainer of that many workers")
    g.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker, fractions allowed")
    g.add_argument("--data-root", default="", help="dataset folder (cifar100 archive folder, ImageNet root)")
    g.add_argument("--teacher-dir", default="teachers", metavar="DIR_OR_URI",
                   help="teacher checkpoints, <timm name>.pth: a folder or a URI (default teachers)")
    g.add_argument("--results", default="results", metavar="DIR_OR_URI",
                   help="results root: a folder or a pyarrow filesystem URI such as s3://bucket/path; every "
                        "table, checkpoint and exported student of a sweep goes under <results>/<sweep name>/")
    g.add_argument("--trial-resources", type=_resources, default={}, metavar="JSON",
                   help='custom Ray resources each trial (and each of its Ray Train workers) reserves, e.g. '
                        '\'{"gpu_node": 1}\' to run trials only on nodes started with --resources=\'{"gpu_node": 8}\'')
    g.add_argument("--name", default="", help="sweep name (default <sweep>-<preset>-<timestamp>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep --name (default: the latest of this sweep and preset)")
    g.add_argument("--seed", type=int, default=0, help="seed of the search (Optuna sampler)")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field for every trial by its dotted key, e.g. --set optim.lr=0.01; a method's "
                        "parameter, --set method.dkd.beta=8, for that method's trials (repeatable)")
    add_plugin_flag(g)
    add_track_flags(g)
    return p


def pairs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=_pairs, help="teacher:student pairs, comma list (default: the preset's)")


def options(args: argparse.Namespace) -> SweepOptions:
    """Validated shared options; every bad value is listed (one `UserError`, one line per problem). The plugins are
    imported first: their methods are names and keys like any other."""
    load_plugins(args.plugin)
    problems = Problems()
    problems.check(load_preset, args.preset)
    cluster = args.cluster.strip()
    if cluster not in ("auto", "local") and not ADDRESS.match(cluster):
        problems.add(f"--cluster must be auto, local, HOST:PORT or ray://HOST:PORT, got {cluster!r}")
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--max-concurrent", args.max_concurrent, 1),
                             ("--workers-per-trial", args.workers_per_trial, 0)):
        if value is not None and value < low:
            problems.add(f"{flag} must be >= {low}, got {value}")
    for flag, values, key in (("--epochs", [args.epochs], "optim.epochs"), ("--seeds", args.seeds or [], "seed"),
                              ("--seed", [args.seed], "seed")):  # the search's seed: numpy's range too
        for problem in (out_of_bounds(flag, v, key) for v in values if v is not None):
            if problem:
                problems.add(problem)
    if args.gpus_per_trial is not None and not (args.gpus_per_trial == 0 or
                                                RESOURCE_STEP <= args.gpus_per_trial < float("inf")):
        problems.add(f"--gpus-per-trial must be 0 or >= {RESOURCE_STEP:g}, got {args.gpus_per_trial}")
    if args.cpus_per_worker is not None and not RESOURCE_STEP <= args.cpus_per_worker < float("inf"):
        problems.add(f"--cpus-per-worker must be >= {RESOURCE_STEP:g}, got {args.cpus_per_worker}")
    if args.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=+\-]*", args.name):
        problems.add(f"--name may hold letters, digits and _.=+- only, got {args.name[:MAX_NAME]!r}")
    elif len(args.name) > MAX_NAME:
        problems.add(f"--name is at most {MAX_NAME} characters, got {len(args.name)}")
    sets: dict[str, str] = {}
    for item in args.sets:
        sets.update(problems.check(parse_set, [item]) or {})
    track = problems.check(track_options, args) or TrackOptions()
    problems.raise_any()
    return SweepOptions(
        preset=args.preset, cluster=cluster, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
        epochs=args.epochs, seeds=args.seeds, gpus_per_trial=args.gpus_per_trial,
        workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker, data_root=args.data_root,
        teacher_dir=args.teacher_dir, results=args.results, name=args.name, resume=args.resume, seed=args.seed,
        sets=sets, pairs=getattr(args, "pairs", None), trial_resources=args.trial_resources,
        track=track)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, SweepOptions]:
    args = parser.parse_args(argv)
    return args, options(args)
