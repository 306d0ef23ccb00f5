"""Faults a long sweep meets, each run on real processes and measured the same way: the trials planned, the rows
written, rows lost (a trial that ended without its row, or a row written before the fault that changed or vanished),
rows duplicated, epochs retrained (an epoch with two different records, each its time and loss: in Tune's result log,
or in the epoch logs of the trial's checkpoints as they were right after the fault and at the end), epochs abandoned
(those of a run left without a row, its trial replaced by a new one) and the outcome. Kill moments come from the
driver's own output lines. `benchmarks/faults.py` prints the scenarios as a table; `tests/test_faults.py` runs them
and asserts on them.

Every sweep here is the quick preset on tiny models (a few steps per epoch), in-process trials unless the scenario
needs Ray Train, on clusters this script starts on free local ports and stops.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .realstack import answers, free_port, free_ports, processes_with_env

ROOT = Path(__file__).resolve().parent.parent

PAIR = "convnext_tiny:resnet18"  # the two fastest tiny models
SMALL = ["--set", "data.limit_train=192", "--set", "data.limit_eval=64", "--set", "data.batch_size=32",
         "--set", "optim.max_steps_per_epoch=6"]
TIMEOUT = 300


@dataclass
class Outcome:
    scenario: str
    planned: int = 0
    written: int = 0
    lost: int = 0
    duplicated: int = 0
    retrained: int = 0  # epochs a trial trained twice
    abandoned: int = 0  # epochs of runs without a row, whose trial a new one replaced (`measure`)
    outcome: str = ""
    lines: list[str] = field(default_factory=list)  # what the user saw (error lines), for the tests

    def row(self) -> list[str]:
        return [self.scenario, str(self.planned), str(self.written), str(self.lost), str(self.duplicated),
                str(self.retrained), str(self.abandoned), self.outcome]


# --- the pieces every scenario uses --------------------------------------------------------------------------------

def env(ray_tmp: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**base, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}


def make_teachers(folder: Path) -> str:
    """Random-init tiny teacher checkpoints (teacher quality does not matter here)."""
    from uhkd.models import create_stage_model, save_model_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "convnext_tiny.pth").is_file():
        model = create_stage_model("convnext_tiny", num_classes=10, img_size=32, scale="tiny")
        save_model_checkpoint(folder / "convnext_tiny.pth", model)
    return str(folder)


@dataclass
class Bench:
    """A scratch folder per scenario: results root, teachers, a private RAY_TMPDIR; `sweep()` builds argv."""

    work: Path
    teachers: str = ""
    ray_tmp: str = ""

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.teachers = make_teachers(self.work.parent / "teachers")
        self.ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # Ray's socket paths must stay short

    @property
    def results(self) -> Path:
        return self.work / "results"

    def sweep(self, name: str, *extra: str, samples: int = 3, epochs: int = 3, resume: bool = False,
              cluster: str = "local", concurrent: int = 1, results: Path | None = None) -> list[str]:
        argv = [sys.executable, str(ROOT / "sweeps" / "hetero_pairs.py"), "--cluster", cluster, "--results",
                str(results or self.results), "--name", name]
        if resume:
            return [*argv, "--resume"]
        return [*argv, "--teacher-dir", self.teachers, "--pairs", PAIR, "--num-samples", str(samples), "--epochs",
                str(epochs), "--max-concurrent", str(concurrent), "--workers-per-trial", "0", *SMALL, *extra]

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        """A driver in its own process group (so its embedded cluster can be cleaned up with it)."""
        return subprocess.Popen(argv, env=env(self.ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True, **kw)

    def call(self, argv: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        proc = self.start(argv)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            kill_group(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def close(self) -> None:
        """Ends what is left of the clusters started here (an embedded cluster's processes are in sessions of
        their own, out of reach of `kill_group`; they end with their driver, this makes sure), removes the temp."""
        for pid in processes_with_env(f"RAY_TMPDIR={self.ray_tmp}"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def rows(results: Path, name: str) -> "list[dict]":
    """The sweep's trial rows as readers see them (compacted or still in part files)."""
    from uhkd.sweep.results import SweepTables

    return list(SweepTables(str(results), name).load().trials.values())


def run_logs(results: Path, name: str) -> dict[str, list[dict]]:
    """Per trial, every epoch report Tune logged (`tune/<trial>/result.json`, appended across resumes, in order).
    A resumed run that had already ended reports its last epoch again unchanged: only a report of an epoch with
    other numbers (trained again) counts as a repeat."""
    out = {}
    for log in sorted((results / name / "tune").glob("*/result.json")):
        seen, reports = set(), []
        for line in log.read_text().splitlines():
            report = json.loads(line) if line.strip() else {}
            if report.get("epoch") and _record(report) not in seen:
                seen.add(_record(report))
                reports.append(report)
        out[log.parent.name] = reports
    return out


def _record(report: dict) -> tuple:
    """What tells two trainings of one epoch apart: its time and loss (equal only for the same training)."""
    return report.get("epoch"), report.get("epoch_time_s"), report.get("loss")


Records = dict[str, dict[int, set]]  # trial -> epoch -> the distinct records of its training(s)


def epoch_records(results: Path, name: str) -> Records:
    """Every epoch record of each trial: those its checkpoints hold (`metrics.jsonl`: every epoch so far, in each
    `checkpoint_*` folder of its Tune folder or Ray Train run) and those Tune logged. An epoch with two different
    records was trained twice."""
    out: Records = {}
    logs = [*(results / name).glob("tune/*/checkpoint_*/metrics.jsonl"),
            *(results / name).glob("train/*/checkpoint_*/metrics.jsonl")]
    reports = [(log.parent.parent.name, json.loads(line)) for log in logs
               for line in log.read_text().splitlines() if line.strip()]
    reports += [(trial, m) for trial, log in run_logs(results, name).items() for m in log]
    for trial, report in reports:
        if report.get("epoch") and report.get("status") != "failed":
            out.setdefault(trial, {}).setdefault(int(report["epoch"]), set()).add(_record(report))
    return out


def retrained(*snapshots: Records) -> int:
    """Epochs trained more than once: the records of each (trial, epoch) over all `snapshots` (taken before and
    after a fault) beyond the first."""
    merged: Records = {}
    for snapshot in snapshots:
        for trial, epochs in snapshot.items():
            for epoch, records in epochs.items():
                merged.setdefault(trial, {}).setdefault(epoch, set()).update(records)
    return sum(len(records) - 1 for epochs in merged.values() for records in epochs.values())


def logged_epochs(results: Path, name: str) -> dict[str, list[int]]:
    return {t: [m["epoch"] for m in log] for t, log in run_logs(results, name).items()}


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = TIMEOUT,
             poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            tail = proc.stderr.read()[-400:] if proc.stderr else ""
            raise RuntimeError(f"exit {proc.returncode} before the fault could be injected: {' '.join(tail.split())}")
        if time.monotonic() > deadline:
            raise RuntimeError("timed out before the fault could be injected")
        time.sleep(poll)


def epochs_logged(bench: Bench, name: str, n: int) -> Callable[[], bool]:
    return lambda: sum(len(e) for e in logged_epochs(bench.results, name).values()) >= n


def measure(bench: Bench, scenario: str, name: str, planned: int, before: list[dict], outcome: str,
            lines: list[str] = (), records: Records | None = None, results: Path | None = None) -> Outcome:
    """The sweep `name` measured after a fault: `before`, its rows and `records`, its epoch records as they were
    right after the fault (`epoch_records`); `results`, where it is now (default the bench's results root)."""
    results = results or bench.results
    after = rows(results, name)
    ids = [r["trial_id"] for r in after]
    by_id = {r["trial_id"]: r for r in after}
    changed = [r["trial_id"] for r in before if _result(by_id.get(r["trial_id"], {})) != _result(r)]
    logs = run_logs(results, name)
    ended = {t for t, log in logs.items() if log and log[-1]["status"] in ("ok", "failed")}
    now = epoch_records(results, name)
    # a run no trial row belongs to (found from its checkpoints' records: Tune's log of it may never have been
    # synced): the resumed sweep replaced its trial by a new one, and its epochs were for nothing
    orphaned = {t: len(epochs) for t, epochs in now.items() if t not in by_id and t not in ended}
    lost = len(changed) + len(ended - set(ids)) + max(0, planned - len(set(ids)) - len(ended - set(ids)))
    lines = [*lines, *(f"row of trial {t} changed or vanished" for t in changed),
             *(f"run {t} ({n} epochs) has no trial row" for t, n in orphaned.items())]
    return Outcome(scenario, planned, len(after), lost, len(ids) - len(set(ids)), retrained(records or {}, now),
                   sum(orphaned.values()), outcome, list(lines))


def _result(row: dict) -> tuple:
    """What a trial row reports (a row rebuilt from the run's log may differ in when it was written, not in this)."""
    return tuple(row.get(k) for k in ("status", "epochs_run", "best_top1", "best_epoch", "last_top1"))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:") or "Traceback" in line]


# Epochs of about a second (the tiny models' default is a quarter): a fault applied at a printed line lands seconds
# before the sweep could end, on a loaded machine too.
LONGER = ("--set", "data.limit_train=1280", "--set", "optim.max_steps_per_epoch=40")
# A trial has ended (its row is written before its line) and the next one has trained its first epoch.
MID_SWEEP = r"(?s): (?:finished|stopped by the scheduler after epoch \d+), best top1 .* epoch 1/"


def wait_for_line(proc: subprocess.Popen, pattern: str, ready: Callable[[], bool] = lambda: True) -> None:
    """Until the driver `proc` has printed a line matching `pattern` (a regular expression) and `ready` holds,
    looking every 20 ms: a fault applied then lands at that moment. (A poll of the sweep's files, every few tenths
    of a second and slow to read on a loaded machine, let faults land after the sweep had finished.)"""
    wait_for(lambda: re.search(pattern, _peek(proc), re.MULTILINE) is not None and ready(), proc, poll=0.02)


def interrupt_then_resume(bench: Bench, scenario: str, fault: int | Callable[[subprocess.Popen], None], *,
                          between: Callable[[], None] = lambda: None, samples: int = 3, epochs: int = 3,
                          after_line: str = MID_SWEEP, ready: Callable[[], bool] = lambda: True,
                          extra: tuple = LONGER, cluster: str = "local", results_after: Path | None = None,
                          ) -> tuple[Outcome, subprocess.CompletedProcess, str]:
    """Start a sweep (`extra` settings, default LONGER epochs); once it printed a line matching `after_line`
    (default MID_SWEEP) and `ready` holds, apply `fault` (a signal for the driver, or a function of the driver's
    process); run `between`, then --resume it (results root `results_after`, default the same). Returns the
    measurement (epoch records taken right after the fault), the resume's process and the first driver's stderr;
    `outcome` says the first driver's exit code and how long it took after the fault."""
    name = "sw"
    first = bench.start(bench.sweep(name, *extra, samples=samples, epochs=epochs, cluster=cluster))
    try:
        wait_for_line(first, after_line, ready)
        faulted = time.monotonic()
        fault(first) if callable(fault) else first.send_signal(fault)
        _, first_err = first.communicate(timeout=180)
        took = time.monotonic() - faulted
    finally:
        kill_group(first)
    before, records = rows(bench.results, name), epoch_records(bench.results, name)
    between()
    second = bench.call(bench.sweep(name, resume=True, results=results_after))
    (bench.work / "first.err").write_text(first_err)
    (bench.work / "resume.err").write_text(second.stderr)
    outcome = f"exit {first.returncode} ({took:.0f} s) then --resume exit {second.returncode}"
    result = measure(bench, scenario, name, samples, before, outcome, error_lines(second.stderr), records,
                     results_after)
    return result, second, first_err


# --- the scenarios -------------------------------------------------------------------------------------------------

def driver_sigkill(bench: Bench) -> Outcome:
    return interrupt_then_resume(bench, "driver SIGKILLed, then --resume", signal.SIGKILL)[0]


def driver_sigterm(bench: Bench) -> Outcome:
    result, _, first_err = interrupt_then_resume(bench, "SIGTERM to the driver, then --resume", signal.SIGTERM)
    result.lines = [line for line in first_err.splitlines() if "--resume --name sw" in line] + result.lines
    return result


def early_kill(bench: Bench) -> Outcome:
    """SIGKILL to the driver as soon as Tune has written `tune/tuner.pkl` (right after the driver's `sweep sw: ...`
    line, before Tune's first state save): --resume starts the search afresh under the same name, with the
    settings the sweep stored, and says so."""
    tuner = bench.results / "sw" / "tune" / "tuner.pkl"
    result, second, _ = interrupt_then_resume(bench, "driver SIGKILLed before Tune saved state, then --resume",
                                              signal.SIGKILL, after_line=r"^sweep sw: \d+ trial", ready=tuner.is_file)
    result.lines = [line for line in second.stdout.splitlines() if "sweep sw: " in line][:1] + result.lines
    return result


def epoch_kill(bench: Bench) -> Outcome:
    """SIGKILL to the driver as soon as it prints a trial's first epoch: the trial's folder holds that epoch's
    checkpoint, which Tune's saved state (up to 2 s old) does not name; the resumed trial continues from it."""
    return interrupt_then_resume(bench, "driver SIGKILLed right after an epoch, then --resume", signal.SIGKILL,
                                 after_line=r" epoch 1/3 ")[0]


def stopped_kill(bench: Bench) -> Outcome:
    """SIGKILL to the driver as soon as ASHA stopped a trial: its `stopped` row is written while Tune's saved state
    still has it running; the resumed sweep does not continue it. Epochs of a second, so that Tune saved its state
    while the trial ran."""
    return interrupt_then_resume(bench, "driver SIGKILLed right after ASHA stopped a trial, then --resume",
                                 signal.SIGKILL, samples=4, after_line="stopped by the scheduler")[0]


def torn_state(bench: Bench) -> Outcome:
    """SIGKILL to the driver at a trial's first epoch line once Tune saved its state, which is then cut off as a kill
    while Tune copies it into the sweep's folder leaves it (stopped_kill meets that now and then): --resume sets it
    aside and starts afresh, keeping the trials with rows; the trial running at the kill is replaced by a new one
    (its run, without a row, abandoned)."""
    def states() -> list[Path]:
        return sorted((bench.results / "sw" / "tune").glob("experiment_state-*.json"))

    def cut_off() -> None:
        state = states()[-1]
        state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])

    result, second, _ = interrupt_then_resume(bench, "driver SIGKILLed, Tune's state cut off, then --resume",
                                              signal.SIGKILL, after_line=r" epoch 1/3 ", ready=lambda: bool(states()),
                                              between=cut_off)
    result.lines = [line for line in second.stdout.splitlines() if "was cut off while being saved" in line][:1] + \
        result.lines
    return result


def moved(bench: Bench) -> Outcome:
    """The sweep folder moved (a new disk) while the sweep is stopped, then --resume --results NEW: the sweep
    continues there, its rows, checkpoints and Tune state all under NEW, nothing written at the old place."""
    new = bench.work / "moved"
    result, _, _ = interrupt_then_resume(bench, "sweep folder moved, then --resume --results NEW", signal.SIGINT,
                                         between=lambda: shutil.move(bench.results, new), results_after=new)
    result.outcome += f"; old place {'written again' if bench.results.exists() else 'untouched'}"
    return result


def group_sigterm(bench: Bench) -> Outcome:
    """SIGTERM to the driver's whole process group with an embedded cluster (what Slurm's scancel and time limits,
    `timeout` and Kubernetes send): the driver stops like on Ctrl-C (Tune's state saved, tables compacted,
    resume hint, exit 130); --resume finishes the sweep."""
    parts: list[Path] = []
    result, _, first_err = interrupt_then_resume(
        bench, "SIGTERM to the process group, then --resume", lambda proc: os.killpg(proc.pid, signal.SIGTERM),
        between=lambda: parts.extend((bench.results / "sw" / "parts").glob("*")))
    result.lines = [line for line in first_err.splitlines() if "--resume --name sw" in line] + result.lines
    result.outcome += f"; {len(parts)} part file(s) left uncompacted"
    return result


def head_lost(bench: Bench) -> Outcome:
    """The head of the attached cluster (a `ray start --head` on this machine) killed mid-sweep: the driver says so
    in one line with the resume hint and exits 130 within seconds (Ray's core worker alone waits 60 s, then exits
    1 with a line of its own); --resume on a new embedded cluster finishes the sweep."""
    port = free_port()
    head = ray_start(bench, "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false")
    try:
        wait_for(lambda: answers(port), head, timeout=120)
        result, _, first_err = interrupt_then_resume(bench, "attached cluster's head lost, then --resume",
                                                     lambda _: kill_group(head), cluster=f"127.0.0.1:{port}")
    finally:
        stop(head)
    result.lines = error_lines(first_err) + result.lines
    return result


def bad_input(bench: Bench) -> Outcome:
    """Absurd values and damaged files, each refused in one line (exit 2) before anything starts: flags (a --name
    too long for a folder, a seed or an epoch count beyond range, `--epochs 2.5`, a CPU share below Ray's
    resolution, a negative image limit), a teacher file that loading with weights_only refuses, and, in a stopped
    sweep, a garbage part file, a foreign Parquet file as trials.parquet and a sweep.json holding a string, a count
    as text or resources as a name. Once repaired, --resume completes the sweep."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    huge = "9" * 23
    flags = [["--name", "n" * 300], ["--name", "n" * 5000], ["--seed", huge], ["--seeds", huge], ["--epochs", huge],
             ["--epochs", "2.5"], ["--cpus-per-worker", "1e-300"], ["--set", "data.limit_train=-1"]]
    refusals: list[subprocess.CompletedProcess] = []
    started: list[str] = []
    for i, extra in enumerate(flags):
        refusals.append(bench.call(bench.sweep(f"b{i}", *extra)))
        started += [f"b{i}"] if (bench.results / f"b{i}").exists() else []
    teachers = bench.work / "pickled-teacher"
    teachers.mkdir()
    torch.save({"state_dict": argparse.Namespace(epoch=1)}, teachers / "convnext_tiny.pth")  # not weights only
    argv = bench.sweep("t")
    argv[argv.index("--teacher-dir") + 1] = str(teachers)
    refusals.append(bench.call(argv))
    started += ["t"] if (bench.results / "t").exists() else []

    folder = bench.results / "sw"
    manifest = folder / "sweep.json"

    def replaced(path: Path, write: Callable[[Path], None]) -> None:
        """`path` damaged by `write` for one --resume, then restored."""
        good = path.read_bytes() if path.exists() else None
        path.parent.mkdir(exist_ok=True)
        write(path)
        refusals.append(bench.call(bench.sweep("sw", resume=True)))
        path.unlink()
        if good is not None:
            path.write_bytes(good)

    def damage() -> None:
        replaced(folder / "parts" / "garbage.trials.parquet", lambda p: p.write_bytes(b"not parquet"))
        replaced(folder / "trials.parquet", lambda p: pq.write_table(pa.table({"trial_id": ["x"], "n": [1]}), p))
        fields = json.loads(manifest.read_text())
        for bad in ("a string", {**fields, "planned": str(fields["planned"])}, {**fields, "resources": "cpu"}):
            replaced(manifest, lambda p: p.write_text(json.dumps(bad)))

    result, _, _ = interrupt_then_resume(bench, "absurd values, damaged files", signal.SIGINT, between=damage)
    one_line = [r for r in refusals if r.returncode == 2 and len(error_lines(r.stderr)) == 1
                and error_lines(r.stderr)[0].startswith("error: ")]
    result.lines = [line for r in refusals for line in error_lines(r.stderr)] + result.lines
    result.outcome = (f"{len(one_line)}/{len(refusals)} refused in one line, {len(started)} started; "
                      f"{result.outcome}")
    return result


def trial_checkpoint_corrupted(bench: Bench) -> Outcome:
    """Interrupted with a trial half-way (one trial, so that ASHA stops none); its newest checkpoint is then
    truncated: the resumed trial falls back to the checkpoint before it and says so (one epoch trained again, or
    none when the truncated one was saved while the driver stopped and Tune never logged its epoch)."""
    def truncate_latest() -> None:
        for trial, log in run_logs(bench.results, "sw").items():
            if log[-1].get("status") == "running":
                ckpt = sorted((bench.results / "sw" / "tune" / trial).glob("checkpoint_*/checkpoint.pt"))[-1]
                ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])

    result, second, _ = interrupt_then_resume(bench, "trial checkpoint truncated, then --resume", signal.SIGINT,
                                              between=truncate_latest, samples=1, epochs=5,
                                              after_line=r" epoch 2/5 ")
    result.lines += [line for line in worker_logs(bench) if "falling back" in line]
    return result


def worker_logs(bench: Bench) -> list[str]:
    """The lines Ray's workers wrote to stderr (trials print there; the sweep does not forward them)."""
    return [line for log in sorted(Path(bench.ray_tmp).glob("ray/session_2*/logs/**/worker-*.err"))
            for line in log.read_text(errors="replace").splitlines()]


def refused_then_repaired(bench: Bench, scenario: str, damage: Callable[[], None], repair: Callable[[], None],
                          repaired: str) -> Outcome:
    """Interrupt the sweep, `damage` a file of it, --resume (refused in one line), `repair`, --resume again."""
    refused: list[subprocess.CompletedProcess] = []

    def between() -> None:
        damage()
        refused.append(bench.call(bench.sweep("sw", resume=True)))
        repair()

    result, _, _ = interrupt_then_resume(bench, scenario, signal.SIGINT, between=between)
    result.lines = error_lines(refused[0].stderr) + result.lines
    result.outcome = f"exit {refused[0].returncode}, {repaired}: {result.outcome}"
    return result


def trials_parquet_corrupted(bench: Bench) -> Outcome:
    """trials.parquet truncated while the sweep is stopped: --resume refuses in one line; with the file moved
    aside, --resume rebuilds every row from the trials' own records."""
    table = bench.results / "sw" / "trials.parquet"
    return refused_then_repaired(bench, "trials.parquet truncated, then --resume",
                                 lambda: table.write_bytes(table.read_bytes()[:100]),
                                 lambda: table.rename(table.with_name("trials.parquet.corrupt")), "moved aside")


def sweep_json_corrupted(bench: Bench) -> Outcome:
    """sweep.json truncated while the sweep is stopped: --resume refuses in one line; restored, it continues."""
    manifest = bench.results / "sw" / "sweep.json"
    good: list[bytes] = []

    def truncate() -> None:
        good.append(manifest.read_bytes())
        manifest.write_bytes(good[0][: len(good[0]) // 2])

    return refused_then_repaired(bench, "sweep.json truncated, then --resume", truncate,
                                 lambda: manifest.write_bytes(good[0]), "restored")


def two_resumes(bench: Bench) -> Outcome:
    """Two --resume of one interrupted sweep at once: one continues it, the other refuses in one line. One trial
    of many epochs, so that the first resume is still running when the second has started (Python and torch take
    seconds to import)."""
    refused: list[subprocess.CompletedProcess] = []

    def race() -> None:
        one = bench.start(bench.sweep("sw", resume=True))
        try:
            wait_for(lambda: (bench.results / "sw" / ".lock").is_file() and "ray:" in _peek(one), one, timeout=120)
            refused.append(bench.call(bench.sweep("sw", resume=True)))
            one.communicate(timeout=TIMEOUT)
        finally:
            kill_group(one)

    result, second, _ = interrupt_then_resume(bench, "two --resume at once", signal.SIGINT, between=race,
                                              samples=1, epochs=80, after_line=r" epoch 2/80 ", extra=())
    result.lines = error_lines(refused[0].stderr) + result.lines
    result.outcome = f"second exit {refused[0].returncode}; {result.outcome}"
    return result


def _peek(proc: subprocess.Popen) -> str:
    """What the driver printed so far, without blocking (its stdout is read to the end by communicate later)."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], 0)
    if ready:
        proc._peeked = getattr(proc, "_peeked", "") + os.read(proc.stdout.fileno(), 65536).decode()
    return getattr(proc, "_peeked", "")


def two_sweeps_one_root(bench: Bench) -> Outcome:
    """Two sweeps writing to one results root at once, plus a third given the first one's name: the two finish
    with their own rows; the third refuses in one line."""
    a, b = bench.start(bench.sweep("a", samples=2, epochs=2)), bench.start(bench.sweep("b", samples=2, epochs=2))
    try:
        wait_for(lambda: (bench.results / "a" / ".lock").is_file(), a, timeout=120)
        same = bench.call(bench.sweep("a", samples=2, epochs=2))
        for label, proc in (("a", a), ("b", b)):
            (bench.work / f"{label}.err").write_text(proc.communicate(timeout=TIMEOUT)[1])
    finally:
        kill_group(a)
        kill_group(b)
    one, two = measure(bench, "", "a", 2, [], ""), measure(bench, "", "b", 2, [], "")
    return Outcome("two sweeps on one root at once", 4, one.written + two.written, one.lost + two.lost,
                   one.duplicated + two.duplicated, one.retrained + two.retrained, one.abandoned + two.abandoned,
                   f"exit {a.returncode} and {b.returncode}; same name: exit {same.returncode}",
                   error_lines(same.stderr))


def teacher_checkpoint_truncated(bench: Bench) -> Outcome:
    broken = bench.work / "teachers"
    broken.mkdir()
    good = Path(bench.teachers) / "convnext_tiny.pth"
    (broken / good.name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    argv = bench.sweep("sw", samples=1)
    argv[argv.index("--teacher-dir") + 1] = str(broken)
    done = bench.call(argv)
    return Outcome("teacher checkpoint truncated", 1, len(rows(bench.results, "sw")),
                   outcome=f"exit {done.returncode} before any trial", lines=error_lines(done.stderr))


def cifar_archive_corrupted(bench: Bench) -> Outcome:
    """A truncated CIFAR-100 archive and one whose pickle tries to run a command: one line each, nothing run."""
    lines, codes = [], []
    marker = bench.work / "pwned"
    for label, payload in (("truncated", None), ("crafted", f"touch {marker}")):
        root = bench.work / label
        root.mkdir()
        if payload is None:
            (root / "cifar-100-python.tar.gz").write_bytes(_cifar_archive()[:300])
        else:
            (root / "cifar-100-python.tar.gz").write_bytes(_cifar_archive(_Evil(payload)))
        done = bench.call([sys.executable, "-m", "uhkd.train", "--dataset", "cifar100", "--data-root", str(root),
                           "--preset", "quick", "--workers", "0", "--output", str(bench.work / f"run-{label}"),
                           "--student", "resnet18", "--method", "scratch", "--set", "data.img_size=32"])
        lines += error_lines(done.stderr)
        codes.append(done.returncode)
    ran = "the crafted command ran" if marker.exists() else "nothing ran"
    return Outcome("CIFAR archive truncated / crafted", outcome=f"exit {codes[0]} and {codes[1]}; {ran}",
                   lines=lines)


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204
        return os.system, (self.command,)


def _cifar_archive(extra: object = None) -> bytes:
    """A small CIFAR-100 python archive (train + test pickles); `extra` is pickled into the train batch."""
    import io
    import pickle
    import tarfile

    import numpy as np

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for part in ("train", "test"):
            batch = {b"data": np.zeros((8, 3072), np.uint8), b"fine_labels": list(range(8))}
            if extra is not None and part == "train":
                batch[b"extra"] = extra
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{part}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return out.getvalue()


def nan_storm(bench: Bench) -> Outcome:
    """A grid where half the trials diverge (lr 1e12): the sweep finishes, the failed ones listed with reasons."""
    code = f"""
import sys
from uhkd.sweep.cli import SweepOptions
from uhkd.sweep.runner import run
from uhkd.sweep.spec import Sweep, load_preset
cells = {{f"{{kind}}{{i}}": {{"pair": "{PAIR}", "method.name": "kd", "seed": i,
          **({{"optim.optimizer": "sgd", "optim.lr": 1e12}} if kind == "nan" else {{}})}}
         for kind in ("ok", "nan") for i in range(2)}}
opts = SweepOptions(cluster="local", results={str(bench.results)!r}, teacher_dir={bench.teachers!r},
                    workers_per_trial=0, epochs=2, max_concurrent=2, name="sw",
                    sets={{"data.limit_train": "192", "data.limit_eval": "64", "data.batch_size": "32",
                           "optim.max_steps_per_epoch": "4"}})
run(Sweep("grid", load_preset("quick"), cells=cells, force={{"data.split": "final"}}), opts)
"""
    done = bench.call([sys.executable, "-c", code])
    failed = [r for r in rows(bench.results, "sw") if r["status"] == "failed"]
    listed = [line for line in done.stdout.splitlines() if line.startswith("failed: trial")]
    result = measure(bench, "NaN storm (half the trials diverge)", "sw", 4, [],
                     f"exit {done.returncode}; {len(failed)} failed, {len(listed)} listed with reasons",
                     listed + error_lines(done.stderr))
    return result


def worker_sigkill(bench: Bench) -> Outcome:
    """SIGKILL to a running trial's process (an in-process trial: the Tune actor itself) once it printed its second
    epoch: Tune restarts the trial, which continues from its checkpoint."""
    name = "sw"
    first = bench.start(bench.sweep(name, *LONGER, samples=2, epochs=4))
    try:
        wait_for_line(first, r" epoch 2/4 ")
        victims = trial_processes(bench.ray_tmp)
        for pid in victims[:1]:
            os.kill(pid, signal.SIGKILL)
        _, err = first.communicate(timeout=TIMEOUT)
    finally:
        kill_group(first)
    return measure(bench, "a trial's worker SIGKILLed", name, 2, [],
                   f"{min(len(victims), 1)} killed; exit {first.returncode}", error_lines(err))


def trial_processes(ray_tmp: str) -> list[int]:
    """Pids of Tune trial actors (`ray::ImplicitFunc`) of the cluster whose processes run with RAY_TMPDIR=ray_tmp."""
    return [pid for pid, cmd in processes_with_env(f"RAY_TMPDIR={ray_tmp}").items()
            if cmd.startswith("ray::ImplicitFunc")]


def ray_start(bench: Bench, *flags: str) -> subprocess.Popen:
    """`ray start --block` with every port free and local, in its own process group (kill it to lose the node)."""
    ports = ["--node-manager-port", "--object-manager-port", "--runtime-env-agent-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
    if "--head" in flags:
        ports.append("--ray-client-server-port")
    argv = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--node-ip-address=127.0.0.1",
            "--disable-usage-stats", *(f"{flag}={port}" for flag, port in zip(ports, free_ports(len(ports)))), *flags]
    return subprocess.Popen(argv, env=env(bench.ray_tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        kill_group(proc, signal.SIGTERM)
        kill_group(proc)


@contextlib.contextmanager
def two_nodes(bench: Bench) -> Iterator[tuple[str, subprocess.Popen]]:
    """A head (1 CPU) and a second node (1 CPU, its own temp dir) on this machine; yields the head's address and
    the second node's process."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = ray_start(bench, "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false")
    node, node_tmp = None, tempfile.mkdtemp(prefix="rn", dir="/tmp")
    try:
        wait_for(lambda: answers(port), head, timeout=120)
        node = ray_start(bench, f"--address={address}", "--num-cpus=1", f"--temp-dir={node_tmp}")
        wait_for(lambda: _alive_nodes(address, bench) >= 2, node)
        yield address, node
    finally:
        stop(node)
        stop(head)
        shutil.rmtree(node_tmp, ignore_errors=True)


def _alive_nodes(address: str, bench: Bench) -> int:
    code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env(bench.ray_tmp), capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:  # a loaded machine: ask again
        return 0
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


def node_lost(bench: Bench) -> Outcome:
    """Two trials at once on a two-node cluster (one per node); the second node dies mid-trial: its trial is
    restarted by Tune on the head from its checkpoint (the trial folders are on this machine's disk)."""
    name = "sw"
    with two_nodes(bench) as (address, node):
        first = bench.start(bench.sweep(name, samples=2, epochs=4, cluster=address, concurrent=2))
        try:
            wait_for(lambda: sum(bool(e) for e in logged_epochs(bench.results, name).values()) >= 2, first)
            kill_group(node)
            _, err = first.communicate(timeout=TIMEOUT)
        finally:
            kill_group(first)
    return measure(bench, "a Ray worker node lost", name, 2, [], f"exit {first.returncode}", error_lines(err))


def results_disk_full(bench: Bench) -> Outcome:
    """Results on a small tmpfs (in a private mount namespace) filled while the sweep runs: one line saying so,
    the rows written before stay readable; after freeing space, --resume completes the sweep."""
    out = bench.work / "disk_full.json"
    inner = [sys.executable, "-m", "testkit.faults", str(bench.work), str(out)]  # the sweep, on the small disk
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", *inner] if os.geteuid() else
                          ["unshare", "--mount", *inner], env=env(bench.ray_tmp), cwd=ROOT, capture_output=True,
                          text=True, timeout=2 * TIMEOUT)
    if not out.is_file():
        return Outcome("results disk fills", outcome=f"could not run: {(done.stderr or done.stdout)[-300:]}")
    return Outcome(**json.loads(out.read_text()))


def _inner_disk_full(work: Path, out: Path) -> None:
    bench = Bench(work)
    bench.results.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(bench.results)], check=True)
    filler = bench.results / "filler"
    first = bench.start(bench.sweep("sw", *LONGER, samples=3, epochs=3))
    try:
        wait_for_line(first, MID_SWEEP)
        with open(filler, "wb", buffering=0) as f:
            for chunk in (1 << 20, 1 << 12, 1):  # to the last byte: a tiny trial's checkpoint is < 1 MB
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * chunk)
        _, first_err = first.communicate(timeout=TIMEOUT)
    finally:
        kill_group(first)
    before, records = rows(bench.results, "sw"), epoch_records(bench.results, "sw")  # readable on a full disk
    (work / "first.err").write_text(first_err)
    filler.unlink()
    second = bench.call(bench.sweep("sw", resume=True))
    (work / "resume.err").write_text(second.stderr)
    result = measure(bench, "results disk fills, then --resume", "sw", 3, before,
                     f"exit {first.returncode}, {len(before)} row(s) readable; --resume exit {second.returncode}",
                     error_lines(first_err) + error_lines(second.stderr), records)
    bench.close()
    out.write_text(json.dumps(result.__dict__))


def ray_job_stop(bench: Bench) -> Outcome:
    """The quick sweep submitted with `ray job submit` to a `ray start --head` cluster, stopped with
    `ray job stop` (SIGTERM): it saves and prints the resume hint; a second submission with --resume finishes it."""
    ray = str(Path(sys.executable).with_name("ray"))
    port, dash = free_ports(2)
    head = ray_start(bench, "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}")
    address = f"http://127.0.0.1:{dash}"
    runtime = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    try:
        wait_for(lambda: answers(dash), head, timeout=180)

        def submit(argv: list[str], *flags: str) -> subprocess.CompletedProcess:
            return subprocess.run([ray, "job", "submit", "--address", address, "--runtime-env-json", runtime,
                                   *flags, "--", *argv[:1], *argv[1:]], env=env(bench.ray_tmp),
                                  capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)

        first = submit([a if a != "local" else "auto" for a in bench.sweep("sw", samples=1, epochs=30)], "--no-wait")
        job = next(iter(re.findall(r"raysubmit_[A-Za-z0-9]+", first.stdout)), None)  # the CLI colours it
        if job is None:
            raise RuntimeError(f"ray job submit failed: {' '.join((first.stdout + first.stderr)[-400:].split())}")
        wait_for(epochs_logged(bench, "sw", 2), head)
        stopped = subprocess.run([ray, "job", "stop", "--address", address, job], env=env(bench.ray_tmp),
                                 capture_output=True, text=True, timeout=180)
        if stopped.returncode:
            raise RuntimeError(f"ray job stop failed: {' '.join((stopped.stdout + stopped.stderr)[-400:].split())}")
        logs = subprocess.run([ray, "job", "logs", "--address", address, job], env=env(bench.ray_tmp),
                              capture_output=True, text=True, timeout=60).stdout
        (bench.work / "job.log").write_text(logs)
        before, records = rows(bench.results, "sw"), epoch_records(bench.results, "sw")
        second = submit([a if a != "local" else "auto" for a in bench.sweep("sw", resume=True)])
    finally:
        stop(head)
    hint = [line for line in logs.splitlines() if "--resume --name sw" in line]
    return measure(bench, "ray job submit, ray job stop, --resume", "sw", 1, before,
                   f"stopped: {'hint printed' if hint else 'no hint'}; resubmitted: exit {second.returncode}",
                   hint + error_lines(second.stdout + second.stderr), records)


SCENARIOS: dict[str, Callable[[Bench], Outcome]] = {
    "driver_sigkill": driver_sigkill, "driver_sigterm": driver_sigterm, "worker_sigkill": worker_sigkill,
    "node_lost": node_lost, "disk_full": results_disk_full, "two_sweeps": two_sweeps_one_root,
    "two_resumes": two_resumes, "teacher_checkpoint": teacher_checkpoint_truncated,
    "trial_checkpoint": trial_checkpoint_corrupted, "trials_parquet": trials_parquet_corrupted,
    "cifar_archive": cifar_archive_corrupted, "sweep_json": sweep_json_corrupted, "nan_storm": nan_storm,
    "ray_job": ray_job_stop, "early_kill": early_kill, "epoch_kill": epoch_kill, "stopped_kill": stopped_kill,
    "torn_state": torn_state, "moved": moved, "group_sigterm": group_sigterm, "head_lost": head_lost,
    "bad_input": bad_input,
}


def run_scenario(key: str, work: Path) -> Outcome:
    bench = Bench(work / key)
    try:
        return SCENARIOS[key](bench)
    finally:
        bench.close()


if __name__ == "__main__":  # `results_disk_full`'s sweep, inside its private mount namespace
    _inner_disk_full(Path(sys.argv[1]), Path(sys.argv[2]))
