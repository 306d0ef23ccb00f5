"""The `--track tensorboard|mlflow|wandb` flags and their checks, without importing Ray or any tracker (the
callbacks that log are `uhkd.tracking`). The tracker packages are the optional extra `pip install -e ".[track]"`."""
from __future__ import annotations

import importlib.util
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import UserError, choice_error

MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
EXTRA = 'pip install -e ".[track]"'
MLFLOW_DEFAULT = "mlflow.db"  # MLflow 3's own default store: sqlite:///mlflow.db in the working folder
SQLITE = "sqlite:///"


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


def mlflow_store(given: str) -> str:
    """The MLflow tracking URI to log to: `given`, else $MLFLOW_TRACKING_URI, else MLflow 3's default SQLite file
    `mlflow.db` in the working folder. A plain path is a SQLite file; a relative SQLite path is made absolute, so
    that the printed read-back command works from any folder. MLflow 3 reads a file store (`file:` URIs, ./mlruns)
    only behind MLFLOW_ALLOW_FILE_STORE=true: a plain folder is refused rather than taken for one."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI") or MLFLOW_DEFAULT
    if uri.startswith(SQLITE):
        path = uri[len(SQLITE):]
        return uri if not path or path.startswith("/") else SQLITE + str(Path(path).resolve())
    if "://" in uri or uri.startswith("file:") or uri.startswith("databricks"):
        return uri
    path = Path(uri).expanduser()
    if path.is_dir():
        raise UserError(f"--mlflow-uri {uri!r} is a folder (an MLflow file store, which MLflow 3 keeps in maintenance "
                        f"mode); give a SQLite file such as {path / MLFLOW_DEFAULT}, a tracking server "
                        f"http://HOST:PORT, or file:{path} to keep logging to that file store")
    return SQLITE + str(path.resolve())


def mlflow_command(uri: str, args: str) -> str:
    """A shell command running MLflow's own CLI (`python -m mlflow <args>`) on the store `uri`."""
    env = f"MLFLOW_TRACKING_URI={shlex.quote(uri)}"
    if uri.startswith("file:"):
        env = f"MLFLOW_ALLOW_FILE_STORE=true {env}"
    return f"{env} python -m mlflow {args}"


@dataclass
class TrackOptions:
    trackers: tuple[str, ...] = ()
    experiment: str = "uhkd"  # MLflow experiment / W&B group: the sweep name, or "uhkd.train"
    mlflow_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder
    wandb_project: str = ""  # "" = $WANDB_PROJECT, else "uhkd"


def add_track_flags(p: Any) -> None:
    """`--track`, `--mlflow-uri`, `--wandb-project` on an argparse parser (or argument group)."""
    p.add_argument("--track", action="append", default=[], metavar="tensorboard|mlflow|wandb",
                   help=f"log every run's config and per-epoch metrics (repeatable or a comma list; {EXTRA})")
    p.add_argument("--mlflow-uri", default="", help="MLflow tracking URI: sqlite:///FILE (or a plain FILE path), "
                                                    "http://HOST:PORT or file:DIR (default $MLFLOW_TRACKING_URI, "
                                                    "else sqlite:///mlflow.db in the working folder)")
    p.add_argument("--wandb-project", default="", help="W&B project (default $WANDB_PROJECT, else uhkd); offline "
                                                       "unless WANDB_MODE=online")


def track_options(args: Any, experiment: str = "uhkd") -> TrackOptions:
    """The checked flags: known, installed trackers and, with mlflow, the store it logs to."""
    trackers = parse_trackers(args.track)
    uri = mlflow_store(args.mlflow_uri) if "mlflow" in trackers else args.mlflow_uri
    return TrackOptions(trackers, experiment, uri, args.wandb_project)
