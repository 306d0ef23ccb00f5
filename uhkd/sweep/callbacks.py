"""Tune callbacks on the sweep driver: the Parquet rows of each trial as it ends, and the release of the worker
placement groups that early-stopped Ray Train trials leave behind."""
from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
from ray import tune

import uhkd

from ..config import RunConfig, batch_plan, config_hash, flatten
from ..errors import one_line
from ..ray_internals import ended_jobs, live_actors, other_jobs_running, placement_groups_of_dead_creators
from .results import SweepTables
from .trainable import run_config, trial_checkpoint, trial_overrides

MIN_FREE_BYTES = 32 * 2**20  # below this on a local results disk the sweep stops (checked every Tune step)
EPOCH_KEYS = ("epoch", "top1", "top5", "loss", "lr", "images_per_s", "epoch_time_s")


def git_commit() -> str:
    """The toolkit's git commit (+"-dirty" with uncommitted changes), "" outside a git checkout."""
    root = Path(uhkd.__file__).resolve().parent.parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return ""
        return head.stdout.strip() + ("-dirty" if git("diff", "--quiet", "HEAD").returncode else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def error_reason(trial: Any) -> str:
    """The trial's exception as one line (the original exception inside Ray's wrappers where there is one). Read
    from the driver's copy of the error files: the storage copy is written later."""
    from ray import cloudpickle

    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and os.path.isfile(pickled):
        with open(pickled, "rb") as f:
            exc = cloudpickle.load(f)
        cause = getattr(exc, "cause", None) or exc
        return one_line(f"{type(cause).__name__}: {cause}")
    if text and os.path.isfile(text):  # "Failure # n (occurred at ...)" then the error text
        return one_line("\n".join(Path(text).read_text().splitlines()[1:]))
    return "trial failed (no error recorded)"


def _num(value: Any, kind: type = float) -> Any:
    """`value` as `kind`; None when missing, and for a non-finite value of an integer column (float columns keep
    NaN, as the results schema allows)."""
    if value is None or isinstance(value, str):
        return None
    if kind is int:
        return int(value) if math.isfinite(value) else None
    return float(value)


class ParquetResults(tune.Callback):
    """Collects each trial's per-epoch results and writes its rows (part files of the sweep's Parquet tables) when
    it ends (finished, failed or stopped). Its state (epoch rows of unfinished trials, their start times) is saved
    with the Tune experiment, so a resumed sweep keeps the epochs reported before the interruption."""

    def __init__(self, results: str, sweep: str, preset: str) -> None:
        self.results, self.sweep, self.preset = results, sweep, preset
        self.version, self.commit = uhkd.__version__, git_commit()
        self._epochs: dict[str, dict[int, dict]] = {}
        self._started: dict[str, datetime] = {}
        self._active: dict[str, float] = {}  # seconds run in earlier sessions (before an interruption)
        self._session: dict[str, float] = {}  # monotonic start of the current session
        self._tables: SweepTables | None = None
        self._final: set[str] | None = None  # trials with an "ok" or "stopped" row before this session: final

    def setup(self, **info: Any) -> None:
        self._tables = SweepTables(self.results, self.sweep)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._reconcile(trials)
        self._check_space()

    def _check_space(self) -> None:
        """Stop the sweep while its saved state is still whole: Tune's own sync of that state to a full disk
        truncates it (and then --resume cannot read it)."""
        if "://" in self.results:
            return
        free = shutil.disk_usage(self._tables.folder if os.path.isdir(self._tables.folder) else self.results).free
        if free < MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, f"No space left on device: {free // 2**20} MiB free under {self.results}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._reconcile(trials)  # a resumed sweep with nothing left to run takes no step

    def _reconcile(self, trials: list) -> None:
        """Once, before this session runs anything: write the rows of trials that ended in an earlier session
        without their row reaching the tables (the driver killed in between, a full disk)."""
        if self._final is not None:
            return
        written = SweepTables(self.results, self.sweep).load().trials
        self._final = {t for t, row in written.items() if row["status"] in ("ok", "stopped")}
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in written:
                self._finish(trial, error_reason(trial) if trial.status == "ERROR" else "")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._started.setdefault(trial.trial_id, datetime.now(timezone.utc))
        self._session[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" in result:
            self._epochs.setdefault(trial.trial_id, {})[int(result["epoch"])] = dict(result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error_reason(trial))

    def _elapsed(self, trial_id: str) -> float:
        start = self._session.get(trial_id)
        return self._active.get(trial_id, 0.0) + (time.monotonic() - start if start is not None else 0.0)

    def _finish(self, trial: Any, error: str) -> None:
        assert self._tables is not None
        # no row while the disk is (nearly) full: Tune's saved state may then lack the trial, and --resume would run
        # a replacement beside its row; without the row, the replacement is the trial's one row
        self._check_space()
        if trial.trial_id in (self._final or ()):
            # finished or stopped before a driver crash that Tune's saved state does not know of: its row stands as
            # written (a failed row may be replaced: --resume continues trials that crashed)
            return
        cfg = run_config(trial.config, trial.trial_id)
        # Epochs the run checkpointed but Tune never received (an interruption between the two) are in the log its
        # last checkpoint carries, on the results filesystem.
        logged, student = trial_checkpoint(trial, cfg.output_dir)
        by_epoch = {int(m["epoch"]): m for m in logged}
        by_epoch.update(self._epochs.get(trial.trial_id, {}))
        if not by_epoch and trial.last_result.get("epoch") is not None:
            by_epoch = {int(trial.last_result["epoch"]): trial.last_result}
        reports = [by_epoch[e] for e in sorted(by_epoch)]
        row = self.trial_row(trial, cfg, reports, error, student)
        self._tables.write_trial(row, [self.epoch_row(r) for r in reports])
        for table in (self._epochs, self._started, self._active, self._session):
            table.pop(trial.trial_id, None)

    def trial_row(self, trial: Any, cfg: RunConfig, reports: list[dict], error: str, student: str) -> dict:
        _, labels = trial_overrides(trial.config)
        done = [r for r in reports if r.get("status") != "failed"]
        last = reports[-1] if reports else dict(trial.last_result or {})  # a failure before the first epoch
        if error:
            status, reason = "failed", error
        elif last.get("status") in ("ok", "failed"):
            status, reason = last["status"], last.get("failure_reason", "")
        else:  # ended without finishing or failing: stopped early by the scheduler
            status, reason = "stopped", ""
        speeds = [r["images_per_s"] for r in done if isinstance(r.get("images_per_s"), (int, float))]
        m = cfg.model
        return {
            **flatten(cfg), "trial_id": trial.trial_id, "preset": self.preset, **labels,
            "dataset": cfg.data.dataset, "teacher": m.teacher, "student": m.student, "method": cfg.method.name,
            "pair": f"{m.teacher}:{m.student}", "split": cfg.data.split,
            "epochs": cfg.optim.epochs, "epochs_run": max((int(r["epoch"]) for r in done), default=0),
            "best_top1": _num(last.get("best_top1")), "best_top5": _num(last.get("best_top5")),
            "best_epoch": _num(last.get("best_epoch"), int) or None,
            "last_top1": _num(done[-1]["top1"]) if done else None,
            "last_top5": _num(done[-1]["top5"]) if done else None,
            "teacher_top1": _num(last.get("teacher_top1")), "student_params": _num(last.get("student_params"), int),
            "extra_params": _num(last.get("extra_params"), int),
            "images_per_s": sum(speeds) / len(speeds) if speeds else None,
            "wall_time_s": self._elapsed(trial.trial_id), **batch_plan(cfg).columns(cfg),
            "status": status, "failure_reason": reason,
            "student_checkpoint": student if status != "failed" else "",
            "config_hash": config_hash(cfg), "toolkit_version": self.version, "git_commit": self.commit,
            "started_at": self._started.get(trial.trial_id), "finished_at": datetime.now(timezone.utc),
        }

    @staticmethod
    def epoch_row(report: dict) -> dict:
        row = {k: report.get(k) for k in EPOCH_KEYS}
        row.update({k: v for k, v in report.items() if k.startswith("loss_")})
        row["epoch"] = int(row["epoch"])
        return row

    def get_state(self) -> dict:
        return {"epochs": self._epochs, "started": self._started,
                "active": {t: self._elapsed(t) for t in set(self._active) | set(self._session)}}

    def set_state(self, state: dict) -> None:
        self._epochs, self._started, self._active = state["epochs"], state["started"], state["active"]
        self._session = {}


class ReleaseStoppedTrainRuns(tune.Callback):
    """Frees what Ray Train runs that Tune stopped early leave behind: their workers' placement groups and their
    detached `PlacementGroupCleaner` actors.

    When Tune stops a Train-in-Tune trial (ASHA, Ctrl-C), the trial actor and its Train controller are killed. Each
    `fit()` also started a detached cleaner meant to remove the workers' group once the controller is gone, but it
    asks the State API (the dashboard) whether the controller lives: without a dashboard it never learns, so the
    group stays reserved (later trials wait forever) and the cleaner lives until the cluster stops (~110 MB each).
    The GCS tables say enough without the State API: a group's creator actor and whether it died, a cleaner's owner
    (the controller's worker). A live trial's controller is alive, so its group and cleaner are never touched; at
    the sweep's end every cleaner of this job goes (no Train run of the sweep is left to guard), and so does the
    cluster-wide `AutoscalingCoordinator` actor the first Train run started, when no other job is running. The
    cleaners of jobs that have ended (a sweep driver SIGKILLed on this cluster earlier) go at any step.
    """

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            release_orphaned_groups()
            stop_cleaners(orphaned_only=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._last = 0.0  # look again at the next step (the controller's death is recorded shortly after)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        release_orphaned_groups()
        stop_cleaners(orphaned_only=False)
        stop_coordinator_if_alone()


def _job_id() -> bytes:
    return bytes.fromhex(ray.get_runtime_context().get_job_id())


def release_orphaned_groups() -> int:
    """Remove this job's placement groups whose creating actor has died; returns how many."""
    from ray.util.placement_group import remove_placement_group

    orphaned = placement_groups_of_dead_creators(_job_id())
    for group in orphaned:
        remove_placement_group(group)
    return len(orphaned)


CLEANER = "PlacementGroupCleaner"  # Ray Train's detached per-run actor (ray.train.v2 ... placement_group_cleaner)
COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")  # (name, namespace): shared by Train and Data


def stop_cleaners(orphaned_only: bool) -> int:
    """Kill the live Ray Train cleaner actors of this job (only those whose controller has died with
    `orphaned_only`) and of every job that has ended (a sweep driver killed before it could end its own; its
    controllers died with it); returns how many. A handle to an unnamed actor cannot be made from its id, so a
    zero-CPU task on the cleaner's node ends its process (Ray then records the detached actor as dead)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ended, alive = ended_jobs(), live_actors()
    live_workers, mine = {a.worker_id for a in alive}, _job_id()
    by_node: dict[str, list[int]] = {}
    for actor in alive:
        ours = actor.job_id == mine and not (orphaned_only and actor.owner_worker_id in live_workers)
        if actor.class_name == CLEANER and (ours or actor.job_id in ended):
            by_node.setdefault(actor.node_id, []).append(actor.pid)
    if not by_node:
        return 0
    kill = ray.remote(num_cpus=0, max_retries=0)(_kill_processes)
    ray.get([kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pids)
             for node, pids in by_node.items()], timeout=120)
    return sum(map(len, by_node.values()))


def _kill_processes(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass


def stop_coordinator_if_alone() -> bool:
    """Kill Ray's detached, cluster-wide AutoscalingCoordinator actor (started by the first Train run, ~110 MB)
    when this is the cluster's only live job; whoever needs it next starts it again. Returns whether it did."""
    if other_jobs_running(ray.get_runtime_context().get_job_id()):
        return False
    try:
        actor = ray.get_actor(COORDINATOR[0], namespace=COORDINATOR[1])
    except ValueError:  # none running
        return False
    ray.kill(actor)
    return True
