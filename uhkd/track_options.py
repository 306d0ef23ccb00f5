"""The `--track tensorboard|mlflow|wandb` flags and their checks, without importing Ray or any tracker (the
callbacks that log are `uhkd.sweep.tracking`). The tracker packages are the optional extra `pip install -e ".[track]"`."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import UserError, choice_error

MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
EXTRA = 'pip install -e ".[track]"'


def parse_trackers(values: Iterable[str], modules: Mapping[str, str] = MODULES) -> tuple[str, ...]:
    """`["mlflow,tensorboard", "wandb"]` -> the tracker names, each checked to be known and its package
    (`modules[name]`) installed."""
    names = tuple(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))
    for name in names:
        if name not in modules:
            raise choice_error("tracker", name, modules)
        if importlib.util.find_spec(modules[name]) is None:
            raise UserError(f"--track {name} needs the {modules[name]} package, which is not installed: {EXTRA}")
    return names


@dataclass
class TrackOptions:
    trackers: tuple[str, ...] = ()
    experiment: str = "uhkd"  # MLflow experiment / W&B group: the sweep name, or "uhkd.train"
    mlflow_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else the file store ./mlruns
    wandb_project: str = ""  # "" = $WANDB_PROJECT, else "uhkd"


def add_track_flags(p: Any) -> None:
    """`--track`, `--mlflow-uri`, `--wandb-project` on an argparse parser (or argument group)."""
    p.add_argument("--track", action="append", default=[], metavar="tensorboard|mlflow|wandb",
                   help=f"log every run's config and per-epoch metrics (repeatable or a comma list; {EXTRA})")
    p.add_argument("--mlflow-uri", default="", help="MLflow tracking URI: a file store path, sqlite:///FILE or "
                                                    "http://HOST:PORT (default $MLFLOW_TRACKING_URI, else ./mlruns)")
    p.add_argument("--wandb-project", default="", help="W&B project (default $WANDB_PROJECT, else uhkd); offline "
                                                       "unless WANDB_MODE=online")


def track_options(args: Any, experiment: str) -> TrackOptions:
    return TrackOptions(parse_trackers(args.track), experiment, args.mlflow_uri, args.wandb_project)
