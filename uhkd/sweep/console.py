"""The sweep's console: the plan as it starts (`plan_lines`), one line per trial per epoch as results arrive
(`LiveLines`, a Tune callback on the driver, instead of Tune's periodic status table) with an estimate of the time
left, and at the end a summary (`summary_lines`): counts, the best trial per pair with its searched values (or the
sweep's own table), failures, and the analysis commands to run next."""
from __future__ import annotations

import math
import shlex
import sys
import time
from typing import Any, Callable

from ray import tune

from ..config import in_process
from ..errors import UserError
from ..storage import join
from ..trainer import epoch_line
from .search import startup_trials
from .trainable import LABELS, trial_overrides

# config columns that differ between trials without being searched
NOT_SEARCHED = {"name", "output_dir", "model.teacher_checkpoint", "model.teacher", "model.student", "seed",
                "cpus_per_worker", "gpus_per_worker", "workers", "threads"}
# cell entries a trial's line already shows in its head (`trial_pair`)
IN_HEAD = {"pair", "model.teacher", "model.student", *LABELS}


def trial_pair(config: dict) -> str:
    overrides, labels = trial_overrides(config)
    tag = labels.get("tag", "")
    pair = f"{overrides.get('model.teacher', '')}:{overrides.get('model.student', '')}"
    return f"{pair} [{tag}]" if tag else pair


def plan_lines(name: str, planned: int, epochs: list[int], concurrent: int, workers: int, location: str,
               shares: dict[str, int] | None = None, seed: int = 0) -> list[str]:
    """What a new sweep is about to run: trials, epochs, how many at once and how each trains; for a search
    (`shares`: trials per pair) each pair's trials and random start-up, and which pairs are not searched at all."""
    span = f"{min(epochs)}" if min(epochs) == max(epochs) else f"{min(epochs)}-{max(epochs)}"
    how = ("each in its Tune trial's own process (no Ray Train)" if in_process(workers) else
           f"each a Ray Train run of {workers} workers")
    lines = [f"sweep {name}: {planned} trial(s) of {span} epoch(s), {concurrent} at once, {how}; results in "
             f"{shlex.quote(location)}"]
    if shares:
        each = ", ".join(f"{pair} {n} ({startup_trials(n)} random)" for pair, n in shares.items())
        lines.append(f"search: each pair its own TPE study, seeded from --seed {seed} and the pair; trials per pair "
                     f"(of them random start-up, before TPE models the pair): {each}")
        unsearched = [pair for pair, n in shares.items() if n <= startup_trials(n)]
        if unsearched:
            lines.append(f"note: {', '.join(unsearched)}: no more trials than the random start-up, so a smoke test, "
                         f"not a search (raise --num-samples for a search)")
    return lines


class LiveLines(tune.Callback):
    """`trial <id> <pair> epoch e/E loss ... (terms) top1 ...` per report, and a line when a trial starts, is
    stopped by the scheduler, finishes or fails, on stdout; once every trial running at once has reported an epoch,
    and at each trial's end, the time left at the pace so far (`planned` trials of at most `epochs` epochs,
    `concurrent` at once). (Tune pickles its callbacks with the experiment state, so this one holds no output
    function; and it writes to sys.stdout itself, since Ray Train may replace `print` in a process that ran a
    TorchTrainer.)"""

    def __init__(self, planned: int = 0, epochs: int = 0, concurrent: int = 1) -> None:
        self.planned, self.epochs, self.concurrent = planned, epochs, concurrent
        self.started = 0.0  # this session's first trial start (time.monotonic)
        self.reported = 0  # epochs reported in this session
        self.done: dict[str, int] = {}  # trial id -> its last reported epoch

    def __getstate__(self) -> dict:  # the pace is this session's: a resumed sweep measures it again
        return {"planned": self.planned, "epochs": self.epochs, "concurrent": self.concurrent}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @staticmethod
    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def _head(self, trial: Any) -> str:
        return f"trial {trial.trial_id} {trial_pair(trial.config)}"

    def _epochs(self, trial: Any) -> int:
        return int(trial.config.get("_run", {}).get("optim.epochs") or 0) or self.epochs

    def time_left(self, trials: list) -> str:
        """"about N min left" at this session's pace (wall time per reported epoch), "" before any report: the
        epochs the unfinished trials and the trials not started yet may still run (ASHA may stop some sooner)."""
        if not self.reported or not self.planned:
            return ""
        ended = ("TERMINATED", "ERROR")
        left = sum(self._epochs(t) - self.done.get(t.trial_id, 0) for t in trials if t.status not in ended)
        left += max(0, self.planned - len(trials)) * self.epochs
        if not left:
            return ""
        seconds = left * (time.monotonic() - self.started) / self.reported
        return f"about {_duration(seconds)} left ({left} trial-epoch(s) at most, {self.concurrent} at once)"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started = self.started or time.monotonic()
        values = " ".join(f"{k}={_short(v)}" for k, v in trial_values(trial).items())
        self.out(f"{self._head(trial)}: started{' ' + values if values else ''}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("epoch") is None or result.get("status") == "failed":
            return
        terms = tuple(k[len("loss_"):] for k in result if k.startswith("loss_"))
        self.out(f"{self._head(trial)} {epoch_line(result, self._epochs(trial) or '?', terms)}")
        first_round = trial.trial_id not in self.done and len(self.done) + 1 == min(self.concurrent, self.planned)
        self.done[trial.trial_id] = int(result["epoch"])
        self.reported += 1
        left = self.time_left(trials) if first_round else ""
        if left:  # once every trial of the first round has reported an epoch
            self.out(f"estimate: {left}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self.done[trial.trial_id] = self._epochs(trial)  # it runs no more epochs, whatever its status says yet
        if last.get("status") == "failed":
            self.out(f"{self._head(trial)}: failed: {last.get('failure_reason')}")
            return
        how = "finished" if last.get("status") == "ok" else f"stopped by the scheduler after epoch {last.get('epoch')}"
        left = self.time_left(trials)
        self.out(f"{self._head(trial)}: {how}, best top1 {_short(last.get('best_top1'))}{'; ' + left if left else ''}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from .callbacks import error_reason

        self.done[trial.trial_id] = self._epochs(trial)
        self.out(f"{self._head(trial)}: failed: {error_reason(trial)}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def trial_values(trial: Any) -> dict[str, Any]:
    """What sets this trial apart beyond its pair and tag: its grid cell's entries, then its sampled values."""
    cell = trial.config.get("cell", {}).get("set", {})
    values = {k: v for k, v in cell.items() if k not in IN_HEAD}
    values.update({k: v for k, v in trial.evaluated_params.items() if k not in ("pair", "cell")})
    return values


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def searched_keys(rows: list[dict]) -> list[str]:
    """The config columns (dotted keys) whose values differ between the sweep's trials."""
    keys = sorted({k for r in rows for k in r if "." in k} - NOT_SEARCHED)
    return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


def summary_lines(rows: list[dict], location: str, planned: int, minutes: float, name: str, search: bool = True,
                  table: Callable[[list[dict]], list[str]] | None = None) -> list[str]:
    """The end of a sweep: counts, the best trial per pair (or, given `table`, the lines it makes of the rows, last),
    failures, where the tables are (`location`: the sweep's folder as the user gave the results root) and the
    analysis commands that run on them (`search`: a search sweep, else a grid)."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "stopped", "failed")}
    lines = [f"sweep {name}: {len(rows)}/{planned} trials recorded "
             f"({', '.join(f'{n} {s}' for s, n in counts.items())}) in {minutes:.1f} min"]
    scored = [r for r in rows if r["status"] != "failed" and math.isfinite(r.get("best_top1") or math.nan)]
    if scored and table is None:
        lines += best_trials(rows, scored)
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"failed: trial {r['trial_id']} {r['pair']} {r['method']}: {r['failure_reason']}")
    lines.append(f"tables: {shlex.quote(join(location, 'trials.parquet'))}, "
                 f"{shlex.quote(join(location, 'epochs.parquet'))}")
    if not scored:
        return lines + ["nothing to analyse: no trial finished"]
    lines += ["next:", *("  " + c for c in next_commands(scored, location, search))]
    if table is not None:
        try:
            lines += table(rows)
        except UserError as err:
            lines.append(f"no table: {err}")
    return lines


def best_trials(rows: list[dict], scored: list[dict]) -> list[str]:
    """The best trial per pair, with every config value that varied in the sweep."""
    keys = searched_keys(rows)
    header = ["pair", "trial", "top1", "epoch", "epochs", "status", *keys]
    table = [header]
    for pair in sorted({r["pair"] for r in scored}):
        best = max((r for r in scored if r["pair"] == pair), key=lambda r: r["best_top1"])
        tag = f" [{best['tag']}]" if best.get("tag") else ""
        table.append([pair + tag, best["trial_id"], f"{best['best_top1']:.2f}", str(best["best_epoch"]),
                      f"{best['epochs_run']}/{best['epochs']}", best["status"], *(_short(best.get(k)) for k in keys)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["best trial per pair:", *("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                                      for row in table)]


def next_commands(rows: list[dict], location: str, search: bool = True) -> list[str]:
    """The analysis commands that run on this sweep's finished trials `rows` at `location` (quoted for a shell):
    its table (of the teachers alone for the teachers sweep, the ablation table for tagged variants), then the
    search report of a search or the training curves of a grid."""
    where = shlex.quote(location)
    dataset, split = shlex.quote(rows[0]["dataset"]), rows[0]["split"]
    tags = {r.get("tag") or "" for r in rows}
    if tags == {"teacher"}:
        table = f"python -m analysis.tables {where} --dataset {dataset} --tag teacher"
    elif tags - {""}:
        table = f"python -m analysis.ablations {where} --out-dir figures"
    else:
        table = f"python -m analysis.tables {where} --dataset {dataset} --split {split}"
    if search:
        return [table, f"python -m analysis.sweep_report {where} --include-stopped --out-dir figures"]
    return [table, f"python -m analysis.curves {where} --out-dir figures"]
