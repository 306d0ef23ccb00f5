"""The Tune function trainable: one sweep trial = one run of `uhkd.train`, in the trial's own process for runs of at
most one worker (checkpoints through `tune.report`), on a Ray Train `TorchTrainer` for two or more.

A trial's Tune config holds everything the trial needs (module globals do not reach trial actors):
`_preset` (run preset), `_run` (fixed overrides), `_sweep_dir` (the sweep's location: a folder or a URI),
`_teacher_dir` (a location), `_resources` (custom Ray resources each worker reserves), `_plugins` (the modules of
the user's `--plugin`s, which Ray ships to the workers and each trial imports), optionally `cell`
(grid sweeps: this trial's own cell, `{"label": ..., "set": overrides}`) and the sampled hyperparameters under
their dotted config keys, plus `pair` ("teacher:student"). `run_config` turns it into the `RunConfig`, on the trial and on the driver (for the
Parquet row) alike.

Where a trial's checkpoints go: `<sweep>/tune/<trial id>/checkpoint_*` (Tune's trial folder) in-process,
`<sweep>/train/<trial id>/checkpoint_*` (its Ray Train run) otherwise. Each is a `uhkd.trainer` checkpoint folder; the
driver finds the last one from the trial's Tune results (`trial_checkpoint`), never on a worker's disk.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import pyarrow.fs as pafs

from ..config import RunConfig, build_config, flatten, in_process, is_config_key, method_key
from ..errors import UserError
from ..plugins import import_modules
from ..storage import METRICS_LOG, STUDENT, join, open_location

def split_pair(pair: str) -> tuple[str, str]:
    """"teacher:student" -> (teacher, student); the teacher may be empty (a student trained from scratch)."""
    teacher, sep, student = str(pair).partition(":")
    if not sep or not student:
        raise UserError(f"a pair is 'teacher:student' (timm names), got {pair!r}")
    return teacher, student


def teacher_path(teacher_dir: str, teacher: str) -> str:
    return join(teacher_dir, f"{teacher}.pth")


LABELS = ("tag", "weights_from")  # cell entries that label the trial's row instead of configuring its run


def trial_overrides(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(dotted overrides, labels) of a trial config: fixed overrides < grid cell < sampled values; the labels are
    the cell's `LABELS` ("" when absent). The fixed overrides' parameters of other methods than the trial's (a
    grid's `--set method.dkd.beta=8` in its kd cells) do not apply."""
    cell = dict(config["cell"]["set"]) if "cell" in config else {}
    labels = {key: str(cell.pop(key, "")) for key in LABELS}
    sampled = {k: v for k, v in config.items() if is_config_key(k) or k == "pair"}
    method = {**config.get("_run", {}), **cell, **sampled}.get("method.name")
    overrides = {k: v for k, v in config.get("_run", {}).items()
                 if method is None or method_key(k) is None or method_key(k)[0] == method}
    overrides.update(cell)
    overrides.update(sampled)
    if "pair" in overrides:
        overrides["model.teacher"], overrides["model.student"] = split_pair(overrides.pop("pair"))
    teacher = overrides.get("model.teacher", "")
    if teacher and config.get("_teacher_dir") and "model.teacher_checkpoint" not in overrides:
        overrides["model.teacher_checkpoint"] = teacher_path(config["_teacher_dir"], teacher)
    return overrides, labels


def run_config(config: Mapping[str, Any], trial_id: str) -> RunConfig:
    """The resolved run of a trial (method defaults filled in): what it trains, and the Parquet config columns."""
    from ..methods import resolve_method

    import_modules(config.get("_plugins", ()))
    overrides, _ = trial_overrides(config)
    cfg = build_config(config["_preset"], overrides)
    runs = "tune" if in_process(cfg.workers) else "train"
    return dataclasses.replace(cfg, name=trial_id, method=resolve_method(cfg),
                               output_dir=join(config["_sweep_dir"], runs, trial_id))


def flat_run_config(trial: Any) -> dict[str, Any]:
    """A Tune trial's resolved run as flat dotted keys, what its `trials.parquet` row holds (for the trackers)."""
    return flatten(run_config(trial.config, trial.trial_id))


def trial_checkpoint(trial: Any, run_folder: str) -> tuple[list[dict], str]:
    """(every report logged in the trial's last checkpoint, the location of its exported student or "") from the
    checkpoint the trial's Tune results name: Tune's own for in-process trials, `checkpoint_path` (what Ray
    Train's TuneReportCallback adds) for Ray Train trials. Read in `run_folder`, the trial's run folder where the
    sweep is now (a moved sweep's results name the old one); ([], "") when the trial reported no checkpoint."""
    path = trial.last_result.get("checkpoint_path") or (trial.checkpoint.path if trial.checkpoint else "")
    if not path:
        return [], ""
    location = join(run_folder, os.path.basename(path.rstrip("/")))
    fs, folder = open_location(location)
    try:
        with fs.open_input_stream(f"{folder}/{METRICS_LOG}") as f:
            reports = [json.loads(line) for line in f.readall().decode().splitlines()]
    except OSError:
        reports = []
    student = fs.get_file_info(f"{folder}/{STUDENT}").type == pafs.FileType.File
    return reports, join(location, STUDENT) if student else ""


def train_trial(config: dict) -> None:
    """Tune function trainable. Each epoch's metrics become one Tune result (so ASHA can stop the trial)."""
    from ray import tune

    try:
        _train(config)
    except UserError as err:  # a configuration error: retrying cannot help, so the trial ends failed at once
        # NaN scores: Tune's reporter sorts ended trials by them (a missing one breaks the sort)
        tune.report({"status": "failed", "failure_reason": str(err), "top1": math.nan, "best_top1": math.nan})


def _train(config: dict) -> None:
    from ray import tune

    from ..train import fit_ray_train, run_in_trial

    cfg = run_config(config, tune.get_context().get_trial_id())
    if in_process(cfg.workers):
        run_in_trial(cfg)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    fit_ray_train(cfg, storage_path=join(config["_sweep_dir"], "train"), run_name=cfg.name,
                  callbacks=[TuneReportCallback()], resources=config.get("_resources"))
