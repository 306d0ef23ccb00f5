"""The Tune function trainable: one sweep trial = one run of `uhkd.train` (a Ray Train `TorchTrainer`, or the same
loop in the trial's own process when `workers=0`).

A trial's Tune config holds everything the trial needs (module globals do not reach trial actors):
`_preset` (run preset), `_run` (fixed overrides), `_train_storage` (absolute folder of the trials' runs),
`_teacher_dir`, optionally `cell` + `_cells` (grid sweeps: label -> overrides) and the sampled hyperparameters
under their dotted config keys, plus `pair` ("teacher:student"). `run_config` turns it into the `RunConfig`, on the
trial and on the driver (for the Parquet row) alike.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..config import LEAF_TYPES, RunConfig, build_config
from ..errors import UserError
from ..trainer import METRICS_LOG


def split_pair(pair: str) -> tuple[str, str]:
    """"teacher:student" -> (teacher, student); the teacher may be empty (a student trained from scratch)."""
    teacher, sep, student = str(pair).partition(":")
    if not sep or not student:
        raise UserError(f"a pair is 'teacher:student' (timm names), got {pair!r}")
    return teacher, student


def teacher_path(teacher_dir: str, teacher: str) -> str:
    return os.path.join(teacher_dir, f"{teacher}.pth")


LABELS = ("tag", "weights_from")  # cell entries that label the trial's row instead of configuring its run


def trial_overrides(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(dotted overrides, labels) of a trial config: fixed overrides < grid cell < sampled values; the labels are
    the cell's `LABELS` ("" when absent)."""
    overrides = dict(config.get("_run", {}))
    cell = dict(config["_cells"][config["cell"]]) if "cell" in config else {}
    labels = {key: str(cell.pop(key, "")) for key in LABELS}
    overrides.update(cell)
    overrides.update({k: v for k, v in config.items() if k in LEAF_TYPES or k == "pair"})
    if "pair" in overrides:
        overrides["model.teacher"], overrides["model.student"] = split_pair(overrides.pop("pair"))
    teacher = overrides.get("model.teacher", "")
    if teacher and config.get("_teacher_dir") and "model.teacher_checkpoint" not in overrides:
        overrides["model.teacher_checkpoint"] = teacher_path(config["_teacher_dir"], teacher)
    return overrides, labels


def run_config(config: Mapping[str, Any], trial_id: str) -> RunConfig:
    """The resolved run of a trial (method defaults filled in): what it trains, and the Parquet config columns."""
    from ..methods import resolve_method

    overrides, _ = trial_overrides(config)
    cfg = build_config(config["_preset"], overrides)
    return dataclasses.replace(cfg, name=trial_id, method=resolve_method(cfg),
                               output_dir=os.path.join(config["_train_storage"], trial_id))


def logged_metrics(output_dir: str) -> list[dict]:
    """The metrics lines the run appended to `<output_dir>/metrics.jsonl` once each epoch was checkpointed."""
    path = Path(output_dir) / METRICS_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


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

    from ..train import fit_ray_train, run_in_process

    cfg = run_config(config, tune.get_context().get_trial_id())
    ended = (logged_metrics(cfg.output_dir) or [{}])[-1]
    if ended.get("status") in ("ok", "failed"):
        # A resumed trial whose run ended just before the interruption: the run returns without reporting again,
        # so hand Tune its final metrics here (else the trial would look stopped early).
        tune.report(ended)
        return
    if cfg.workers == 0:
        import torch

        torch.set_num_threads(cfg.threads or max(1, math.ceil(cfg.cpus_per_worker)))
        run_in_process(cfg, report=tune.report, resume=True)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    fit_ray_train(cfg, storage_path=config["_train_storage"], run_name=cfg.name, callbacks=[TuneReportCallback()])
