"""Experiment tracking (`--track tensorboard|mlflow|wandb`) through Ray Tune's own logger callbacks, adapted so
that each run logs its resolved config as the flat dotted keys (`method.uhkd.alpha`, `optim.lr`, ...) and, per epoch,
every loss term, top-1/top-5, lr, images/s and epoch time with the epoch as the step.

A sweep hands the callbacks to Tune; a single `python -m uhkd.train` run drives the same callbacks through
`RunTracker` with a `RunTrial` standing in for Tune's trial. The flags and their checks are `uhkd.track_options`."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import TRAINING_ITERATION

from .errors import one_line
from .track_options import SQLITE, TrackOptions, mlflow_command, mlflow_store
from .ray_internals import mlflow_runs, start_wandb_run, wait_for_wandb_files

EPOCH_METRICS = ("top1", "top5", "best_top1", "loss", "lr", "images_per_s", "epoch_time_s")


def mlflow_uri(given: str) -> str:
    uri = mlflow_store(given)
    if uri.startswith("file:"):  # asked for by name: MLflow 3 keeps its file store behind this opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def mlflow_lines(uri: str, experiment: str, run_id: str = "") -> list[str]:
    """Where MLflow holds the experiment (one run of it with `run_id`) and the MLflow command that reads it back."""
    from mlflow.tracking import MlflowClient

    if uri.startswith(SQLITE) and not Path(uri[len(SQLITE):]).is_file():  # opening it would create an empty one
        return [f"mlflow: no store {uri} on this machine (under Ray Client it is on the head node)"]
    try:
        found = MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception as exc:  # MLflow and its stores (SQLAlchemy, HTTP) raise many types
        return [f"mlflow: cannot read experiment {experiment!r} back from {uri}: {one_line(exc, 200)}"]
    if found is None:
        return [f"mlflow: no experiment {experiment!r} in {uri} (nothing was logged)"]
    where = f"experiment {experiment!r} (id {found.experiment_id}) in {uri}"
    if run_id:
        return [f"mlflow: run {run_id} of {where}; read it back with:",
                f"  {mlflow_command(uri, f'runs describe --run-id {run_id}')}"]
    return [f"mlflow: {where}, one run per trial; list them with:",
            f"  {mlflow_command(uri, f'runs list --experiment-id {found.experiment_id}')}"]


ConfigOf = Callable[[Any], dict[str, Any]]


def run_trial_config(trial: "RunTrial") -> dict[str, Any]:
    return dict(trial.config)


def trial_params(trial: Any, config_of: ConfigOf) -> dict[str, Any]:
    """The trial's resolved run config as flat dotted keys (what `trials.parquet` holds: `config_of(trial)`), plus
    `pair`."""
    flat = config_of(trial)
    flat["pair"] = f"{flat['model.teacher']}:{flat['model.student']}"
    return {k: ("" if v is None else v) for k, v in flat.items()}


def epoch_metrics(result: dict) -> dict[str, float]:
    """The finite per-epoch numbers of one report."""
    keys = [*EPOCH_METRICS, *sorted(k for k in result if k.startswith("loss_"))]
    return {k: float(result[k]) for k in keys if isinstance(result.get(k), (int, float))
            and not isinstance(result.get(k), bool) and math.isfinite(result[k])}


def _step_result(result: dict) -> tuple[int, dict] | None:
    """(epoch, metrics with the epoch as Tune's iteration), None for a report without an epoch."""
    if result.get("epoch") is None:
        return None
    epoch = int(result["epoch"])
    return epoch, {**epoch_metrics(result), "epoch": epoch, TRAINING_ITERATION: epoch}


class MLflowTracking(MLflowLoggerCallback):
    config_of: ConfigOf = staticmethod(run_trial_config)

    def log_trial_start(self, trial: Any) -> None:
        runs = mlflow_runs(self)
        if runs is None:
            super().log_trial_start(trial)
        elif trial not in runs:
            tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id}
            run = self.mlflow_util.start_run(tags=tags, run_name=str(trial))
            runs[trial] = run.info.run_id
            self.mlflow_util.log_params(run_id=runs[trial], params_to_log=trial_params(trial, self.config_of))

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        stepped = _step_result(result)
        runs = mlflow_runs(self)
        if stepped is not None and runs is None:
            super().log_trial_result(iteration, trial, stepped[1])
        elif stepped is not None:
            if trial not in runs:
                self.log_trial_start(trial)
            epoch, metrics = stepped
            metrics.pop(TRAINING_ITERATION)
            self.mlflow_util.log_metrics(run_id=runs[trial], metrics_to_log=metrics, step=epoch)


class WandbTracking(WandbLoggerCallback):
    config_of: ConfigOf = staticmethod(run_trial_config)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        wait_for_wandb_files(self)
        if self.kwargs.get("mode") != "offline":  # offline runs need no account (Ray's setup insists on a key)
            super().setup(*args, **kwargs)

    def log_trial_start(self, trial: Any) -> None:
        if not start_wandb_run(
                self, trial, [*self.excludes, "config"], id=trial.trial_id, name=str(trial), resume=False,
                reinit=True, allow_val_change=True, group=self.group or trial.experiment_dir_name,
                project=self.project, config=trial_params(trial, self.config_of), **self.kwargs):
            super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        stepped = _step_result(result)
        if stepped is not None:
            super().log_trial_result(iteration, trial, stepped[1])


class TensorBoardTracking(TBXLoggerCallback):
    """Event files in each trial's folder (`<results>/<sweep>/tune/<trial>/`, or the run's output folder), the
    metrics under `ray/tune/<name>` by epoch, the searched values as hparams."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        stepped = _step_result(result)
        if stepped is not None:
            super().log_trial_result(iteration, trial, stepped[1])


def callbacks(options: TrackOptions, config_of: ConfigOf = run_trial_config) -> list[Any]:
    """One Tune logger callback per tracker of `options`; `config_of(trial)` gives a trial's resolved run config
    as flat dotted keys (a sweep's: `uhkd.sweep.trainable.flat_run_config`)."""
    out: list[Any] = []
    for name in options.trackers:
        if name == "tensorboard":
            out.append(TensorBoardTracking())
        elif name == "mlflow":
            out.append(MLflowTracking(mlflow_uri(options.mlflow_uri), experiment_name=options.experiment))
        else:
            out.append(WandbTracking(
                project=options.wandb_project or os.environ.get("WANDB_PROJECT") or "uhkd", group=options.experiment,
                mode=os.environ.get("WANDB_MODE", "offline"), dir=os.environ.get("WANDB_DIR") or os.getcwd()))
    for callback in out:
        if hasattr(callback, "config_of"):
            callback.config_of = config_of
    return out


def read_back(options: TrackOptions) -> list[str]:
    """After a sweep (`options.experiment` = its name): where MLflow holds its runs and how to list them."""
    return mlflow_lines(mlflow_uri(options.mlflow_uri), options.experiment) if "mlflow" in options.trackers else []


@dataclass(eq=False)
class RunTrial:
    """What Ray's logger callbacks read of a Tune trial, for one `uhkd.train` run: `config` is already flat."""

    trial_id: str
    config: dict[str, Any]
    local_path: str
    experiment_dir_name: str
    evaluated_params: dict[str, Any] = field(default_factory=dict)
    checkpoint: Any = None

    def init_local_path(self) -> None:
        os.makedirs(self.local_path, exist_ok=True)

    def __str__(self) -> str:
        return self.trial_id


class RunTracker:
    """The tracking callbacks of one run outside Tune: `start`, `result(metrics)` per epoch, `end(failed)`."""

    def __init__(self, options: TrackOptions, run_name: str, flat_config: dict[str, Any], output_dir: str) -> None:
        self.trial = RunTrial(run_name, flat_config, output_dir, options.experiment)
        self.callbacks: Sequence[Any] = callbacks(options)

    def start(self) -> None:
        if any(isinstance(c, WandbTracking) for c in self.callbacks):
            _ensure_ray()  # W&B logs from a Ray actor
        for c in self.callbacks:
            c.setup()
            c.log_trial_start(self.trial)

    def result(self, metrics: dict) -> None:
        for c in self.callbacks:
            c.log_trial_result(int(metrics.get("epoch") or 0), self.trial, metrics)

    def end(self, failed: bool) -> None:
        for c in self.callbacks:
            c.log_trial_end(self.trial, failed=failed)
            c.on_experiment_end([self.trial])

    def read_back(self) -> list[str]:
        """Where the trackers that have an experiment and a run id (MLflow) hold this run, and how to read it."""
        return [line for c in self.callbacks if isinstance(c, MLflowTracking)
                for line in mlflow_lines(c.tracking_uri, c.experiment_name, mlflow_runs(c)[self.trial])]


def _ensure_ray() -> None:
    import ray

    from .ray_session import start_local

    if not ray.is_initialized():
        start_local(num_cpus=1)
