"""The sweep's console: one line per trial per epoch as results arrive (`LiveLines`, a Tune callback on the driver,
instead of Tune's periodic status table), and at the end a summary (`summary_lines`): counts, the best trial per pair
with its searched values, failures, and the analysis commands to run next."""
from __future__ import annotations

import math
import shlex
import sys
from typing import Any

from ray import tune

from ..trainer import epoch_line
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


class LiveLines(tune.Callback):
    """`trial <id> <pair> epoch e/E loss ... (terms) top1 ...` per report, and a line when a trial starts, is
    stopped by the scheduler, finishes or fails, on stdout. (Tune pickles its callbacks with the experiment state,
    so this one holds no output function; and it writes to sys.stdout itself, since Ray Train may replace `print`
    in a process that ran a TorchTrainer.)"""

    @staticmethod
    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def _head(self, trial: Any) -> str:
        return f"trial {trial.trial_id} {trial_pair(trial.config)}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        values = " ".join(f"{k}={_short(v)}" for k, v in trial_values(trial).items())
        self.out(f"{self._head(trial)}: started{' ' + values if values else ''}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("epoch") is None or result.get("status") == "failed":
            return
        epochs = int(trial.config.get("_run", {}).get("optim.epochs") or 0) or "?"
        terms = tuple(k[len("loss_"):] for k in result if k.startswith("loss_"))
        self.out(f"{self._head(trial)} {epoch_line(result, epochs, terms)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get("status") == "failed":
            self.out(f"{self._head(trial)}: failed: {last.get('failure_reason')}")
            return
        how = "finished" if last.get("status") == "ok" else f"stopped by the scheduler after epoch {last.get('epoch')}"
        self.out(f"{self._head(trial)}: {how}, best top1 {_short(last.get('best_top1'))}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from .callbacks import error_reason

        self.out(f"{self._head(trial)}: failed: {error_reason(trial)}")


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


def summary_lines(rows: list[dict], folder: str, planned: int, minutes: float, name: str) -> list[str]:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "stopped", "failed")}
    lines = [f"sweep {name}: {len(rows)}/{planned} trials recorded "
             f"({', '.join(f'{n} {s}' for s, n in counts.items())}) in {minutes:.1f} min"]
    scored = [r for r in rows if r["status"] != "failed" and math.isfinite(r.get("best_top1") or math.nan)]
    if scored:
        keys = searched_keys(rows)
        lines.append("best trial per pair:")
        header = ["pair", "trial", "top1", "epoch", "epochs", "status", *keys]
        table = [header]
        for pair in sorted({r["pair"] for r in scored}):
            best = max((r for r in scored if r["pair"] == pair), key=lambda r: r["best_top1"])
            tag = f" [{best['tag']}]" if best.get("tag") else ""
            table.append([pair + tag, best["trial_id"], f"{best['best_top1']:.2f}", str(best["best_epoch"]),
                          f"{best['epochs_run']}/{best['epochs']}", best["status"],
                          *(_short(best.get(k)) for k in keys)])
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"failed: trial {r['trial_id']} {r['pair']} {r['method']}: {r['failure_reason']}")
    lines.append(f"tables: {folder}/trials.parquet, {folder}/epochs.parquet")
    lines += ["next:", *("  " + c for c in next_commands(rows, folder))]
    return lines


def next_commands(rows: list[dict], folder: str) -> list[str]:
    """The analysis commands for this sweep's folder."""
    where = shlex.quote(folder)
    if not rows:
        return [f"python analysis/sweep_report.py {where} --include-stopped --out-dir figures"]
    dataset, split = rows[0]["dataset"], rows[0]["split"]
    tags = {r.get("tag") or "" for r in rows}
    if tags == {"teacher"}:
        table = f"python analysis/tables.py {where} --dataset {shlex.quote(dataset)} --tag teacher"
    elif tags - {""}:
        table = f"python analysis/ablations.py {where} --out-dir figures"
    else:
        table = f"python analysis/tables.py {where} --dataset {shlex.quote(dataset)} --split {split}"
    return [table, f"python analysis/sweep_report.py {where} --include-stopped --out-dir figures"]
