"""Sweeps on real Ray (2 CPUs): a quick hetero_pairs sweep end to end (teachers trained first, Parquet tables with
the documented schema matching Tune's results), attaching to a `ray start` cluster, interrupt + --resume, a NaN trial
and a crashing trial recorded as failed while the others finish, and bad input failing before any trial."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from testkit.realstack import free_port

from uhkd.errors import UserError
from uhkd.sweep.cli import SweepOptions
from uhkd.sweep.results import EPOCHS, PARTS, TRIALS, SweepTables, epochs_schema, merged_table, \
    trials_schema
from uhkd.sweep.runner import concurrency, run, sweep_name, trial_bundles, trial_resources
from uhkd.sweep.spec import Sweep, load_preset

ROOT = Path(__file__).resolve().parent.parent
PAIR = "convnext_tiny:resnet18"  # the two fastest tiny models
SMALL = ["--set", "data.limit_train=192", "--set", "data.limit_eval=64", "--set", "data.batch_size=32"]
SMALL_SETS = {"data.limit_train": "192", "data.limit_eval": "64", "data.batch_size": "32"}


def _short_tmp() -> str:
    """A short private RAY_TMPDIR (Ray's unix socket paths must stay under 108 characters)."""
    return tempfile.mkdtemp(prefix="rt", dir="/tmp")


def _env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}


def _script(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweeps" / f"{name}.py")]


def test_schema_is_the_documented_contract():
    trials, epochs = trials_schema(), epochs_schema()
    assert trials.metadata[b"uhkd.schema_version"] == b"3"
    assert trials.names[:13] == ["schema_version", "sweep", "trial_id", "preset", "tag", "weights_from", "dataset",
                                 "teacher", "student", "method", "pair", "seed", "split"]
    assert trials.names[-26:] == [
        "method_params", "epochs", "epochs_run", "best_top1", "best_top5", "best_epoch", "last_top1", "last_top5",
        "teacher_top1", "student_params", "extra_params", "images_per_s", "wall_time_s", "batch_per_worker",
        "train_workers", "accumulation", "effective_batch", "lr_used", "status", "failure_reason",
        "student_checkpoint", "config_hash", "toolkit_version", "git_commit", "started_at", "finished_at"]
    types = dict(zip(trials.names, trials.types))
    assert types["schema_version"] == pa.int32() and types["seed"] == pa.int64()
    assert types["method_params"] == pa.map_(pa.string(), pa.string())
    assert types["method.name"] == pa.string() and types["method.w_ce"] == pa.float64()
    assert types["best_epoch"] == pa.int64() and types["finished_at"] == pa.timestamp("us", tz="UTC")
    assert epochs.names == ["schema_version", "sweep", "trial_id", "epoch", "top1", "top5", "loss", "losses", "lr",
                            "images_per_s", "epoch_time_s"]
    assert dict(zip(epochs.names, epochs.types))["losses"] == pa.map_(pa.string(), pa.float64())


def test_no_method_shapes_the_schema():
    """Method parameters and loss terms live in the two map columns: no column is named after one, so a new
    method (or a new loss term) leaves both tables' schema as it is."""
    from uhkd.methods import registered
    from uhkd.methods.base import param_fields

    names = set(trials_schema().names) | set(epochs_schema().names)
    for cls in registered():
        assert not {f"method.{p}" for p in param_fields(cls)} & names
        assert not {f"loss_{t}" for t in cls.terms} & names


def test_version_2_tables_read_in_the_version_3_shape(tmp_path):
    """A sweep folder written by schema 2 (one column per method field, one per loss term) reads as the same wide
    frame a version-3 folder gives: each row's parameters under its own method's namespace."""
    from analysis.common import read_epochs, read_trials

    folder = tmp_path / "old"
    folder.mkdir()
    pq.write_table(pa.table({
        "schema_version": pa.array([2, 2], pa.int32()), "sweep": ["old", "old"], "trial_id": ["a", "b"],
        "method": ["uhkd", "kd"], "pair": [PAIR, PAIR], "status": ["ok", "ok"], "best_top1": [50.0, 40.0],
        "method.name": ["uhkd", "kd"], "method.alpha": [0.5, 2.0], "method.beta": [3.0, None],
        "method.gamma": pa.array([None, None], pa.float64()), "method.k": [7, 7], "method.sra": [True, True],
        "method.temperature": [1.0, 4.0]}), folder / TRIALS)
    pq.write_table(pa.table({"schema_version": pa.array([2, 2], pa.int32()), "sweep": ["old", "old"],
                             "trial_id": ["a", "b"], "epoch": [1, 1], "loss_ce": [2.0, 2.5],
                             "loss_feat": [0.5, None], "loss_kl": [0.1, 0.2]}), folder / EPOCHS)
    trials = read_trials(folder).set_index("trial_id")
    assert trials.loc["a", ["method.uhkd.alpha", "method.uhkd.beta", "method.uhkd.k", "method.uhkd.sra"]].tolist() \
        == [0.5, 3.0, 7, True]
    assert trials.loc["b", ["method.kd.alpha", "method.kd.temperature"]].tolist() == [2.0, 4.0]
    assert pd.isna(trials.loc["b", "method.uhkd.alpha"]) and "method.kd.beta" not in trials.columns
    epochs = read_epochs(folder).set_index("trial_id")
    assert epochs.loc["a", ["loss_ce", "loss_feat", "loss_kl"]].tolist() == [2.0, 0.5, 0.1]
    assert pd.isna(epochs.loc["b", "loss_feat"])


def same_schema(stored: pa.Schema, expected: pa.Schema) -> bool:
    """Names, types and the schema version (Parquet renames a map's entries field, which is no difference)."""
    return stored.equals(expected) and stored.metadata == expected.metadata


def _rows(trial_id: str, top1: float, epochs: int) -> tuple[dict, list[dict]]:
    trial = {"trial_id": trial_id, "best_top1": top1, "status": "ok", "pair": PAIR}
    return trial, [{"epoch": e, "top1": top1 - epochs + e} for e in range(1, epochs + 1)]


def test_a_trial_end_writes_only_its_part_files_compacted_once(tmp_path):
    """Each trial's end adds two part files (nothing else is rewritten); readers merge them with the compacted
    tables, a resumed trial's new part replaces its rows, and compaction leaves the two documented files."""
    from analysis.common import read_epochs, read_trials

    tables = SweepTables(str(tmp_path), "s")
    for i in range(3):
        tables.write_trial(*_rows(f"t{i}", 50.0 + i, epochs=2))
    folder = tmp_path / "s"
    assert sorted(p.name for p in (folder / PARTS).iterdir()) == [
        f"t{i}.{name}" for i in range(3) for name in (EPOCHS, TRIALS)]
    assert not (folder / TRIALS).exists()
    assert sorted(read_trials(tmp_path)["trial_id"]) == ["t0", "t1", "t2"]  # a live reader, before compaction
    assert len(read_epochs(folder)) == 6

    compacted = SweepTables(str(tmp_path), "s").compact()
    assert not list((folder / PARTS).iterdir()) and len(compacted.trials) == 3 and len(compacted.epochs) == 6
    assert same_schema(pq.read_schema(folder / TRIALS), trials_schema())
    assert pd.read_parquet(folder / EPOCHS)[["trial_id", "epoch"]].values.tolist() == [
        [f"t{i}", e] for i in range(3) for e in (1, 2)]

    tables.write_trial(*_rows("t1", 70.0, epochs=3))  # t1 resumed and finished again
    merged = merged_table(compacted.fs, str(folder / TRIALS), TRIALS).to_pandas().set_index("trial_id")
    assert len(merged) == 3 and merged.loc["t1", "best_top1"] == 70.0
    again = SweepTables(str(tmp_path), "s").compact()
    assert again.trials["t1"]["best_top1"] == 70.0 and len(again.epochs) == 7
    assert pd.read_parquet(folder / TRIALS)["trial_id"].is_unique


def test_sweeps_started_in_the_same_second_get_their_own_names(tmp_path):
    sweep = Sweep("hetero_pairs", load_preset("quick"))
    opts = SweepOptions(results=str(tmp_path))
    names = {sweep_name(sweep, opts)[0] for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("hetero_pairs-quick-") for n in names)


def test_quick_sweep_end_to_end(tmp_path, ray_local, capsys):
    """hetero_pairs on the embedded cluster, teachers missing: they are trained first; every 1-worker trial runs
    in its own process with its checkpoints in its Tune folder, and the Parquet rows match what Tune recorded."""
    from analysis.common import read_epochs, read_trials
    from sweeps import hetero_pairs

    results, teachers = tmp_path / "results", tmp_path / "teachers"
    argv = ["--results", str(results), "--teacher-dir", str(teachers), "--pairs", PAIR, "--num-samples", "2",
            "--epochs", "2", "--name", "hp", "--seed", "3", *SMALL, "--set", "optim.max_steps_per_epoch=6"]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 0
    out = capsys.readouterr().out
    assert "ray: using this process's Ray instance" in out and "teachers: training the missing convnext_tiny" in out

    assert (teachers / "convnext_tiny.pth").is_file()
    teacher_rows = pd.read_parquet(next(results.glob("teachers-quick-*")) / TRIALS)
    assert teacher_rows[["student", "teacher", "method", "tag", "split", "status"]].values.tolist() == [
        ["convnext_tiny", "", "scratch", "teacher", "final", "ok"]]

    folder = results / "hp"
    assert same_schema(pq.read_schema(folder / TRIALS), trials_schema())
    assert same_schema(pq.read_schema(folder / EPOCHS), epochs_schema())
    trials, epochs = read_trials(folder), read_epochs(folder)
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"ok", "stopped"} and (trials["status"] == "ok").any()
    assert (trials["split"] == "tune").all() and (trials["method"] == "uhkd").all() and (trials["pair"] == PAIR).all()
    assert (trials["workers"] == 1).all() and (trials["sweep"] == "hp").all() and (trials["preset"] == "quick").all()
    layout = trials[["batch_per_worker", "train_workers", "accumulation", "effective_batch"]].values.tolist()
    assert layout == [[row.data_batch_size, 1, 1, row.data_batch_size] for row in
                      trials.rename(columns={"data.batch_size": "data_batch_size"}).itertuples()]
    assert trials["lr_used"].tolist() == trials["optim.lr"].tolist()  # no lr scaling unless optim.scale_lr
    assert trials["method.uhkd.beta"].between(0.05, 20).all()
    assert trials["method.uhkd.temperature"].isin([1, 2, 4]).all()
    assert (trials["method.uhkd.k"] == 3).all()  # resolved method parameters, not only the searched ones
    assert (trials["method.w_ce"] == 1.0).all()  # resolved config columns, not only the searched ones
    assert trials["model.teacher_checkpoint"].eq(str(teachers / "convnext_tiny.pth")).all()

    from ray.tune import ExperimentAnalysis

    tune_results = ExperimentAnalysis(str(folder / "tune")).trial_dataframes  # Tune's own result.json per trial
    assert set(tune_results) == set(trials["trial_id"])
    for row in trials.itertuples():
        tune_history = tune_results[row.trial_id].sort_values("epoch")
        mine = epochs[epochs["trial_id"] == row.trial_id].sort_values("epoch")
        assert mine["epoch"].tolist() == tune_history["epoch"].tolist() == list(range(1, row.epochs_run + 1))
        assert mine["top1"].tolist() == pytest.approx(tune_history["top1"].tolist())
        assert mine["loss_feat"].tolist() == pytest.approx(tune_history["loss_feat"].tolist())
        assert "loss_dkd" not in mine.columns  # a term of another method
        last = tune_history.iloc[-1]
        assert row.best_top1 == pytest.approx(last["best_top1"]) and row.last_top1 == pytest.approx(last["top1"])
        assert row.student_params == last["student_params"] and row.extra_params == last["extra_params"] > 0
        assert row.epochs == 2 and (row.status == "ok") == (row.epochs_run == 2)
        assert 0 <= row.teacher_top1 <= 100 and row.wall_time_s > 0 and row.finished_at > row.started_at
        if row.status == "ok":  # exported into the trial's last checkpoint, in the sweep's folder
            student = Path(row.student_checkpoint)
            assert student.is_file() and student.parent.parent == folder / "tune" / row.trial_id
    assert not (folder / "train").exists()  # no Ray Train run for 1-worker trials


def test_grid_sweep_records_nan_and_crashing_trials_as_failed(tmp_path, ray_local, teacher_dir):
    """One trial diverges (NaN loss), one raises (unreadable teacher file); both are recorded with their reason
    and the third finishes. Plain Tune trainables here (--workers-per-trial 0)."""
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    cells = {"good": {"pair": PAIR, "method.name": "kd"},
             "nan": {"pair": PAIR, "method.name": "kd", "optim.optimizer": "sgd", "optim.lr": 1e12},
             "crash": {"pair": PAIR, "method.name": "kd", "model.teacher_checkpoint": str(broken)}}
    opts = SweepOptions(results=str(tmp_path / "res"), teacher_dir=teacher_dir, workers_per_trial=0, epochs=2,
                        name="grid", sets={**SMALL_SETS, "optim.max_steps_per_epoch": "4"})
    lines: list[str] = []
    outcome = run(Sweep("grid", load_preset("quick"), cells=cells, force={"data.split": "final"}), opts,
                  out=lines.append)
    assert not outcome.interrupted
    trials = pd.read_parquet(Path(outcome.folder) / TRIALS)
    by_lr = trials.set_index("optim.lr")
    assert len(trials) == 3
    good = trials[(trials["optim.lr"] < 1) & (trials["model.teacher_checkpoint"] != str(broken))].iloc[0]
    assert (good["status"], good["epochs_run"], good["failure_reason"]) == ("ok", 2, "")
    nan = by_lr.loc[1e12]
    assert nan["status"] == "failed" and nan["failure_reason"].startswith("non-finite loss at epoch 1")
    assert nan["epochs_run"] == 0 and nan["student_checkpoint"] == ""
    crash = trials[trials["model.teacher_checkpoint"] == str(broken)].iloc[0]
    assert crash["status"] == "failed" and crash["failure_reason"].startswith("teacher checkpoint")
    assert "is truncated or not a torch checkpoint" in crash["failure_reason"]
    assert any(line.startswith("failed: trial") and "non-finite loss" in line for line in lines)
    configs = [r.config for r in outcome.grid]  # each trial's config holds its own cell, not the whole grid
    assert sorted(c["cell"]["label"] for c in configs) == sorted(cells) and not any("_cells" in c for c in configs)
    assert all(c["cell"]["set"] == cells[c["cell"]["label"]] for c in configs)
    assert "3/3 trials recorded (1 ok, 0 stopped, 2 failed)" in "\n".join(lines)
    assert lines[-1] == "exit code 3: some trial(s) failed (listed above)"


def test_interrupt_then_resume_records_every_trial_once(tmp_path, teacher_dir):
    """SIGINT to a sweep once its first trial's rows are written, then --resume: each trial appears exactly once,
    finished trials are not rerun, and unfinished runs continue from their checkpoints (in-process trials here;
    the end-to-end test runs Ray Train trials)."""
    ray_tmp = _short_tmp()
    results = tmp_path / "results"
    argv = [*_script("hetero_pairs"), "--cluster", "local", "--results", str(results), "--teacher-dir", teacher_dir,
            "--pairs", PAIR, "--num-samples", "3", "--epochs", "4", "--max-concurrent", "1", "--workers-per-trial",
            "0", "--name", "sw", *SMALL, "--set", "optim.max_steps_per_epoch=6"]
    try:
        first = subprocess.Popen(argv, env=_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        table = results / "sw" / TRIALS
        deadline = time.monotonic() + 240
        while not list((results / "sw" / PARTS).glob(f"*.{TRIALS}")) and first.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.05)  # soon: the two trials left take only seconds
        first.send_signal(signal.SIGINT)
        log, _ = first.communicate(timeout=120)
        assert first.returncode == 130, log[-3000:]
        assert "--resume --name sw" in log
        before = pd.read_parquet(table)
        assert 1 <= len(before) < 3

        second = subprocess.run([*_script("hetero_pairs"), "--cluster", "local", "--results", str(results),
                                 "--resume", "--name", "sw"], env=_env(ray_tmp), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "sweep sw: resuming" in second.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    after = pd.read_parquet(table)
    epochs = pd.read_parquet(results / "sw" / EPOCHS)
    assert len(after) == 3 and after["trial_id"].is_unique
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for row in before.itertuples():  # recorded before the interruption: not run again
        again = after.set_index("trial_id").loc[row.trial_id]
        assert again["finished_at"] == row.finished_at and again["best_top1"] == row.best_top1
    for trial_id in after["trial_id"]:  # each trial's checkpoints are in its Tune folder, the last one's log in full
        last = sorted((results / "sw" / "tune" / trial_id).glob("checkpoint_*"))[-1]
        logged = [json.loads(line)["epoch"] for line in (last / "metrics.jsonl").read_text().splitlines()]
        assert logged == list(range(1, len(logged) + 1))
        assert epochs[epochs["trial_id"] == trial_id]["epoch"].tolist() == logged


def _cut_off_tunes_state_and_forget(folder: Path, trial_id: str) -> Path:
    """What a SIGKILL while Tune copies its state into the sweep's folder leaves, with trial `trial_id` still running
    then (so without rows): a cut-off `experiment_state-*.json`. Returns that file."""
    for name in (TRIALS, EPOCHS):
        table = pq.read_table(folder / name)
        pq.write_table(table.filter(pc.not_equal(table["trial_id"], trial_id)), folder / name)
    state = next((folder / "tune").glob("experiment_state-*.json"))
    state.write_text(state.read_text()[:100])
    return state


def _resumed_after_a_cut_off_state(folder: Path, resume: Callable[[], list[str]], planned: int) -> list[str]:
    """Cut off Tune's state with one trial running, resume, and check that the sweep ends with its `planned` trials,
    each once: the others' rows as they were, the one running then trained again as a new trial."""
    before = pd.read_parquet(folder / TRIALS).set_index("trial_id")
    running = before.index[-1]
    state = _cut_off_tunes_state_and_forget(folder, running)
    lines = resume()
    after = pd.read_parquet(folder / TRIALS).set_index("trial_id")
    kept = before.drop(running)
    assert len(after) == planned and after.index.is_unique and set(kept.index) < set(after.index)
    assert after.loc[kept.index, "finished_at"].equals(kept["finished_at"])  # not run again
    assert running not in after.index
    assert not pd.read_parquet(folder / EPOCHS).duplicated(["trial_id", "epoch"]).any()
    session = state.name[len("experiment_state-"):-len(".json")]
    assert f"sweep {folder.name}: Tune's state of run(s) {session} was cut off while being saved" in "\n".join(lines)
    assert not state.exists() and state.with_name(state.name + ".torn").is_file()
    assert f"sweep {folder.name}: {planned}/{planned} trials recorded" in "\n".join(lines)
    return lines


def test_a_search_resumed_after_tunes_state_was_cut_off_runs_only_the_trials_left(tmp_path, ray_local,
                                                                                   teacher_dir, capsys):
    """The driver was killed while Tune copied its state (the stopped_kill fault scenario lands there now and then):
    Tune's own restore would restore nothing, not even the search, and sample every planned trial again. The resume
    sets that state aside and starts the search afresh, the trials with rows counting against the budget."""
    from sweeps import hetero_pairs

    argv = ["--results", str(tmp_path), "--teacher-dir", teacher_dir, "--pairs", PAIR, "--num-samples", "3",
            "--epochs", "1", "--workers-per-trial", "0", "--name", "sw", *SMALL, "--set", "optim.max_steps_per_epoch=2"]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 0

    def resume() -> list[str]:
        capsys.readouterr()
        code = hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build,
                                 ["--results", str(tmp_path), "--resume", "--name", "sw"])
        assert code == 0
        return capsys.readouterr().out.splitlines()

    lines = _resumed_after_a_cut_off_state(tmp_path / "sw", resume, planned=3)
    assert "sweep sw: no whole state of Tune; starting its search afresh with its stored settings; 2 of its 3 " \
           "trial(s) have rows and are kept" in lines


def test_a_grid_resumed_after_tunes_state_was_cut_off_runs_only_the_cells_left(tmp_path, ray_local, teacher_dir):
    """As for a search; a grid starts afresh with the cells no row records (the same run and labels), here the
    one cell that was running: every cell once."""
    cells = {f"lr{lr}": {"pair": PAIR, "method.name": "kd", "optim.lr": lr, "tag": f"t{lr}"} for lr in (1e-3, 2e-3)}
    opts = SweepOptions(results=str(tmp_path), teacher_dir=teacher_dir, workers_per_trial=0, epochs=1, name="grid",
                        sets={**SMALL_SETS, "optim.max_steps_per_epoch": "2"})
    sweep = Sweep("grid", load_preset("quick"), cells=cells, force={"data.split": "final"})
    run(sweep, opts)

    def resume() -> list[str]:
        lines: list[str] = []
        assert not run(sweep, dataclasses.replace(opts, resume=True), out=lines.append).interrupted
        return lines

    _resumed_after_a_cut_off_state(tmp_path / "grid", resume, planned=2)
    rows = pd.read_parquet(tmp_path / "grid" / TRIALS)
    assert sorted(zip(rows["optim.lr"], rows["tag"])) == [(1e-3, "t0.001"), (2e-3, "t0.002")]

    # cut off again, every cell with its row: nothing left to run (Tune is not started on an empty grid)
    max((tmp_path / "grid" / "tune").glob("experiment_state-*.json")).write_text("")
    assert "sweep grid: 2/2 trials recorded" in "\n".join(resume())
    assert pd.read_parquet(tmp_path / "grid" / TRIALS).equals(rows)


def test_cluster_auto_attaches_to_a_ray_start_cluster(tmp_path, teacher_dir):
    ray_tmp, port = _short_tmp(), free_port()
    env = _env(ray_tmp)
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 60
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        done = subprocess.run([*_script("hetero_pairs"), "--cluster", "auto", "--results", str(tmp_path / "r"),
                               "--teacher-dir", teacher_dir, "--pairs", PAIR, "--num-samples", "1", "--epochs", "1",
                               "--workers-per-trial", "0", "--name", "attached", *SMALL,
                               "--set", "optim.max_steps_per_epoch=3"],
                              env=env, capture_output=True, text=True, timeout=240)
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ray: attached to the cluster started with `ray start` at " in done.stdout
    assert f":{port} (1 node, 2 CPUs)" in done.stdout
    assert pd.read_parquet(tmp_path / "r" / "attached" / TRIALS)["status"].tolist() == ["ok"]


@pytest.mark.parametrize("args, message", [
    (["--pairs", "convnext_tiny:resnet999"], "unknown or unsupported model 'resnet999'"),
    (["--pairs", "resnet18"], "a pair is 'teacher:student'"),
    (["--cluster", "no address"], "--cluster must be auto, local, HOST:PORT or ray://HOST:PORT"),
    (["--preset", "huge"], "unknown sweep preset 'huge'; valid choices: cifar100, imagenet, quick"),
    (["--set", "data.split=final"], "hetero_pairs runs with data.split=tune; --set data.split=final contradicts"),
    (["--seeds", "0,1"], "hetero_pairs runs every sampled config once (one seed, got 2)"),
    (["--resume"], "nothing to resume: no hetero_pairs-quick-* sweep"),
    (["--preset", "cifar100", "--set", "data.dataset=mnist5k"], "missing teacher checkpoint(s) in"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--num-samples", "2"], "--num-samples 2 is fewer than the 3 pairs; the search splits the samples"),
    (["--set", "data.dataset=folder", "--data-root", "/no/such/dir"], "'/no/such/dir'"),
])
def test_bad_input_fails_before_any_trial_with_one_line(tmp_path, capsys, args, message):
    from sweeps import hetero_pairs

    argv = ["--results", str(tmp_path / "r"), "--teacher-dir", str(tmp_path / "t"), "--cluster", "local", *args]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing started


@pytest.mark.parametrize("command, args, message", [
    ("hetero_pairs", ["--student", "resnet81"], "unknown flag --student (did you mean --pairs TEACHER:STUDENT?)"),
    ("hetero_pairs", ["--num-smaples", "2"], "unknown flag --num-smaples (did you mean --num-samples?)"),
    ("hetero_pairs", ["--worker-per-trial", "2"], "unknown flag --worker-per-trial (did you mean --workers-per-trial?)"),
    ("teachers", ["--pairs", "a:b"], "unknown flag --pairs (did you mean --models?)"),
    ("uhkd.train", ["--pairs", "a:b"], "unknown flag --pairs (did you mean --teacher T --student S?)"),
    ("uhkd.train", ["--ouput", "x"], "unknown flag --ouput (did you mean --output?)"),
    ("analysis.curves", ["results", "--outdir", "x"], "unknown flag --outdir (did you mean --out-dir?)"),
    ("analysis.tables", ["results", "--dataset", "d", "--lst"], "unknown flag --lst (did you mean --last?)"),
])
def test_an_unknown_flag_is_one_line_naming_the_likely_one(capsys, command, args, message):
    import importlib

    module = importlib.import_module({"hetero_pairs": "sweeps.hetero_pairs", "teachers": "sweeps.teachers"}
                                     .get(command, command))
    with pytest.raises(SystemExit) as exited:
        module.parser().parse_args(args) if hasattr(module, "parser") else module.parse_args(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err == f"error: {message} (see --help)\n"


def test_a_dataset_missing_here_fails_before_any_trial_when_cluster_auto_starts_one_here(tmp_path):
    """`--cluster auto` with no cluster running starts an embedded one on this machine: the dataset is checked here
    first, as with `--cluster local`, instead of every trial failing on it."""
    from uhkd.sweep.cluster import started_elsewhere

    if started_elsewhere():
        pytest.skip("a `ray start` cluster runs on this machine: --cluster auto would attach to it")
    ray_tmp = _short_tmp()
    try:
        done = subprocess.run([*_script("hetero_pairs"), "--results", str(tmp_path / "r"), "--teacher-dir",
                               str(tmp_path / "t"), "--set", "data.dataset=folder", "--data-root", "/no/such/dir"],
                              env=_env(ray_tmp), capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "'/no/such/dir'" in done.stderr and "Traceback" not in done.stderr
    assert "ray:" not in done.stdout and not (tmp_path / "r").exists()  # no cluster, nothing written


def test_exit_codes_say_how_the_sweep_ended(tmp_path):
    """docs/sweeps.md#exit-codes: 0 when every trial is recorded and none failed (stopped early by the scheduler
    counts as recorded), 3 when some failed, 1 when all did, 130 when interrupted; each documented there."""
    from uhkd.sweep import runner

    def code(statuses: list[str], interrupted: bool = False) -> int:
        tables = SweepTables(str(tmp_path / "r"), f"s{len(list(tmp_path.glob('r/*')))}")
        for i, status in enumerate(statuses):
            tables.write_trial({"trial_id": str(i), "status": status, "pair": PAIR, "method": "kd"})
        outcome = runner.SweepOutcome("s", tables.folder, tables.compact(), len(statuses), 1, interrupted, None)
        return runner.exit_code(outcome)

    assert code(["ok", "stopped"]) == runner.EXIT_OK == 0
    assert code(["ok", "failed"]) == runner.EXIT_SOME_FAILED == 3
    assert code(["failed", "failed"]) == runner.EXIT_ALL_FAILED == 1
    assert code(["ok"], interrupted=True) == runner.EXIT_INTERRUPTED == 130
    section = (ROOT / "docs" / "sweeps.md").read_text().split("## Exit codes")[1].split("\n## ")[0]
    documented = {int(line.split("|")[1].strip(" `")) for line in section.splitlines() if line.startswith("| `")}
    assert documented == {0, 1, 2, 3, 130}


def test_impossible_resources_and_unreachable_cluster_fail_before_any_trial(tmp_path, capsys, ray_local,
                                                                            teacher_dir):
    from sweeps import hetero_pairs

    base = ["--results", str(tmp_path / "r"), "--teacher-dir", teacher_dir, "--pairs", PAIR]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, [*base, "--gpus-per-trial", "1"]) == 2
    assert "--gpus-per-trial 1 but the Ray cluster has 0 GPUs" in capsys.readouterr().err
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build,
                             [*base, "--workers-per-trial", "2", "--cpus-per-worker", "1.5"]) == 2
    assert "a trial needs 2 worker(s) x 1.5 CPUs" in capsys.readouterr().err
    assert not list((tmp_path / "r").glob("*/trials.parquet"))


def test_unreachable_address_is_one_line(tmp_path, capsys, teacher_dir):
    from sweeps import hetero_pairs

    port = free_port()
    argv = ["--results", str(tmp_path / "r"), "--teacher-dir", teacher_dir, "--pairs", PAIR,
            "--cluster", f"127.0.0.1:{port}"]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in capsys.readouterr().err


def test_reproduce_tables_grid_takes_each_searched_methods_best_settings(tmp_path, capsys):
    """Every method hetero_pairs searched (here UHKD and DKD) runs its pair's best finished settings; a pair it never
    tried borrows the best trial overall, recorded in `weights_from`; --set method.<name>.<param> wins for that
    method's cells only."""
    from sweeps import reproduce_tables

    tables = SweepTables(str(tmp_path / "results"), "hetero_pairs-quick-20260101-000000")
    rows = [("uhkd", "swin_tiny_patch4_window7_224:resnet18", "ok", 50.0, 0.5, 2.0),
            ("uhkd", "swin_tiny_patch4_window7_224:resnet18", "ok", 60.0, 0.7, 3.0),
            ("uhkd", "swin_tiny_patch4_window7_224:resnet18", "stopped", 70.0, 0.9, 9.0),
            ("uhkd", "convnext_tiny:resmlp_12_224", "ok", 80.0, 1.5, 0.1),
            ("dkd", "convnext_tiny:deit_tiny_patch16_224", "ok", 55.0, 2.0, 8.0)]
    for i, (method, pair, status, top1, alpha, beta) in enumerate(rows):
        extra = {"method.uhkd.temperature": 2.0, "method.uhkd.spectrum": "complex"} if method == "uhkd" else {}
        tables.write_trial({"trial_id": str(i), "pair": pair, "status": status, "method": method,
                            "best_top1": top1, f"method.{method}.alpha": alpha, f"method.{method}.beta": beta,
                            **extra})
    tables.compact()
    args = reproduce_tables.parser().parse_args(["--results", str(tmp_path / "results"), "--methods",
                                                 "scratch,kd,dkd,uhkd", "--set", "method.uhkd.k=2"])
    from uhkd.sweep.cli import options

    sweep = reproduce_tables.build(args, options(args))
    assert len(sweep.cells) == 2 * 2 + 2 * 2 * 3  # scratch once per student and seed; kd, dkd, uhkd per pair
    assert sweep.cells["scratch resnet18 s1"] == {"pair": ":resnet18", "method.name": "scratch", "seed": 1}
    assert sweep.cells["uhkd swin_tiny_patch4_window7_224:resnet18 s0"] == {
        "pair": "swin_tiny_patch4_window7_224:resnet18", "method.name": "uhkd", "seed": 0, "method.uhkd.alpha": 0.7,
        "method.uhkd.beta": 3.0, "method.uhkd.temperature": 2.0, "method.uhkd.spectrum": "complex",
        "method.uhkd.k": "2", "weights_from": "1 swin_tiny_patch4_window7_224:resnet18"}
    # a pair hetero_pairs never tried takes the best trial of that method overall, recorded as borrowed
    borrowed = sweep.cells["uhkd convnext_tiny:deit_tiny_patch16_224 s0"]
    assert borrowed["method.uhkd.alpha"] == 1.5 and borrowed["weights_from"] == "3 convnext_tiny:resmlp_12_224"
    dkd = sweep.cells["dkd convnext_tiny:deit_tiny_patch16_224 s0"]
    assert (dkd["method.dkd.alpha"], dkd["method.dkd.beta"]) == (2.0, 8.0) and "method.uhkd.k" not in dkd
    assert sweep.cells["dkd swin_tiny_patch4_window7_224:resnet18 s1"]["weights_from"] == \
        "4 convnext_tiny:deit_tiny_patch16_224"
    assert "weights_from" not in sweep.cells["kd convnext_tiny:deit_tiny_patch16_224 s0"]
    assert sweep.force == {"data.split": "final"}
    out = capsys.readouterr().out
    assert ("uhkd on convnext_tiny:deit_tiny_patch16_224: method.uhkd.alpha=1.5 method.uhkd.beta=0.1 "
            "method.uhkd.temperature=2 method.uhkd.spectrum=complex (trial 3 of convnext_tiny:resmlp_12_224: "
            "BORROWED") in out
    assert "kd: its defaults (no finished hetero_pairs trial" in out


def test_ablation_variants_are_tagged_and_skip_points_equal_to_full():
    from sweeps import ablations

    args = ablations.parser().parse_args([])
    from uhkd.sweep.cli import options

    sweep = ablations.build(args, options(args))
    tags = [cell["tag"] for cell in sweep.cells.values()]
    assert tags == ["full", "w/o FTM", "w/o SRA", "sca=conv_bn", "single level", "w/o KL", "beta=0", "beta=0.2",
                    "beta=5", "k=1", "k=2", "band=high", "band=full"]
    cell = sweep.cells["w/o FTM | swin_tiny_patch4_window7_224:resnet18 s0"]
    assert cell == {"pair": "swin_tiny_patch4_window7_224:resnet18", "seed": 0, "tag": "w/o FTM",
                    "method.uhkd.spectrum": "none"}
    only = ablations.build(ablations.parser().parse_args(["--only", "k"]), options(args))
    assert [c["tag"] for c in only.cells.values()] == ["full", "k=1", "k=2"]  # k=3 is the quick preset's full UHKD


GiB = 2**30


def _at_once(nodes, workers, cpus_per_worker, gpus_per_trial, **kwargs):
    bundles = trial_bundles(workers, cpus_per_worker, gpus_per_trial)
    return concurrency(nodes, bundles, gpus_per_trial, **kwargs)


def test_concurrency_counts_trials_that_fit_per_node():
    node = {"CPU": 16.0, "GPU": 1.0, "memory": 64 * GiB}
    assert _at_once([node], workers=1, cpus_per_worker=2, gpus_per_trial=0.25) == 4  # 4 trials share a GPU
    assert _at_once([node], workers=1, cpus_per_worker=2, gpus_per_trial=0.25, cap=3) == 3
    assert _at_once([node], workers=1, cpus_per_worker=2, gpus_per_trial=0) == 8  # in-process: 8 x 2
    assert _at_once([node], workers=2, cpus_per_worker=2, gpus_per_trial=0) == 3  # 3 x (2 x 2 + 0.01)
    assert _at_once([node], workers=0, cpus_per_worker=4, gpus_per_trial=0.5) == 2
    two = {"CPU": 2.0, "memory": 8 * GiB}
    assert _at_once([two], workers=1, cpus_per_worker=0.95, gpus_per_trial=0) == 2  # the quick preset
    # totals would say 2 GPUs / 0.4 = 5 trials; per node only 2 x 0.4 fit on each GPU
    gpu_node = {"CPU": 8.0, "GPU": 1.0, "memory": 64 * GiB}
    assert _at_once([gpu_node] * 2, workers=1, cpus_per_worker=1, gpus_per_trial=0.4) == 4
    # totals: 4 CPUs / 0.6 = 6; per node each 1-CPU node holds one 0.6-CPU trial
    assert _at_once([{"CPU": 1.0, "memory": 8 * GiB}] * 4, workers=1, cpus_per_worker=0.6, gpus_per_trial=0) == 4
    # the trial's own process reserves memory: 3 GiB holds two Ray Train trials (1.2 GiB each)
    assert _at_once([{"CPU": 16.0, "memory": 3 * GiB}], workers=2, cpus_per_worker=1, gpus_per_trial=0) == 2
    with pytest.raises(UserError, match=r"and 1.2 GiB for its own process; the largest Ray node has 16 CPUs, 0 GPUs "
                                        r"and 1.0 GiB"):
        _at_once([{"CPU": 16.0, "memory": 1 * GiB}], workers=2, cpus_per_worker=1, gpus_per_trial=0)
    with pytest.raises(UserError, match="--gpus-per-trial 2 but the Ray cluster has 1 GPUs"):
        _at_once([node], workers=1, cpus_per_worker=1, gpus_per_trial=2)
    big = {"CPU": 64.0, "GPU": 8.0, "memory": 64 * GiB}
    with pytest.raises(UserError, match="1.5 per worker; above 1 a worker needs whole GPUs"):
        _at_once([big], workers=2, cpus_per_worker=1, gpus_per_trial=3)
    small = {"CPU": 4.0, "GPU": 1.0, "memory": 64 * GiB}  # 8 GPUs in total, but no node holds 2 for one worker
    with pytest.raises(UserError, match=r"a trial needs 1 worker\(s\) x 1 CPUs \+ 2 GPUs"):
        _at_once([small] * 8, workers=1, cpus_per_worker=1, gpus_per_trial=2)


def test_an_autoscaling_cluster_is_sized_by_the_nodes_it_may_start():
    """A head without GPUs, and a node type of 1 GPU that may be started 3 times: trials wait for those nodes."""
    head = {"CPU": 4.0, "memory": 8 * GiB}
    scalable = [head] + [{"CPU": 8.0, "GPU": 1.0, "memory": 32 * GiB}] * 3
    assert _at_once([head], workers=1, cpus_per_worker=2, gpus_per_trial=1, scalable=scalable) == 3
    with pytest.raises(UserError, match="--gpus-per-trial 1 but the Ray cluster has 0 GPUs"):
        _at_once([head], workers=1, cpus_per_worker=2, gpus_per_trial=1)


def test_trial_resources_reserve_memory_for_the_trials_own_process():
    assert trial_resources(trial_bundles(2, 1.0, 1.0)) == {"cpu": 0.01, "memory": 1.2 * GiB}
    assert trial_resources(trial_bundles(1, 2.0, 0.5)) == {"cpu": 2.0, "gpu": 0.5, "memory": 1.0 * GiB}
    assert trial_resources(trial_bundles(1, 2.0, 0.5, memory=False)) == {"cpu": 2.0, "gpu": 0.5}
    assert trial_resources(trial_bundles(2, 1.0, 0, {"gpu_node": 1})) == {"cpu": 0.01, "memory": 1.2 * GiB,
                                                                          "gpu_node": 1}


def test_placement_groups_of_dead_train_controllers_are_released(ray_local):
    """What ASHA leaves behind when it stops a Ray Train trial: a placement group whose creating actor (the Train
    controller) was killed. The driver callback removes it; groups of live actors and of the driver stay."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from uhkd.sweep.callbacks import release_orphaned_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self) -> str:
            self.group = placement_group([{"CPU": 0.01}])
            ray.get(self.group.ready())
            return self.group.id.hex()

        def free(self) -> None:
            remove_placement_group(self.group)

    dead, alive = Controller.remote(), Controller.remote()
    leaked, kept = ray.get(dead.reserve.remote()), ray.get(alive.reserve.remote())
    mine = placement_group([{"CPU": 0.01}])
    ray.kill(dead)
    deadline = time.monotonic() + 30
    removed = 0
    while not removed and time.monotonic() < deadline:  # the GCS records the actor's death shortly after
        removed = release_orphaned_groups()
        time.sleep(0.2)
    table = placement_group_table()
    assert removed == 1 and table[leaked]["state"] == "REMOVED"
    assert table[kept]["state"] != "REMOVED" and table[mine.id.hex()]["state"] != "REMOVED"
    ray.get(alive.free.remote())
    ray.kill(alive)
    remove_placement_group(mine)


def test_detached_cleaners_of_dead_controllers_are_stopped(ray_local):
    """What an ASHA stop leaves without the dashboard: a detached cleaner whose creator (the Train controller) was
    killed. Those go during the sweep; at its end every cleaner of the job goes."""
    import ray
    from ray._private.state import state

    from uhkd.sweep.callbacks import stop_cleaners

    class PlacementGroupCleaner:  # the class name of Ray Train's detached cleaner (what stop_cleaners looks for)
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=0)
    class Controller:
        def start_cleaner(self) -> str:
            self.cleaner = ray.remote(num_cpus=0)(PlacementGroupCleaner).options(lifetime="detached").remote()
            ray.get(self.cleaner.ping.remote())
            return self.cleaner._actor_id.hex()

    dead, alive = Controller.remote(), Controller.remote()
    orphan, guarded = ray.get(dead.start_cleaner.remote()), ray.get(alive.start_cleaner.remote())
    ray.kill(dead)

    def cleaner_state(actor_id: str) -> str:
        return state.actor_table(actor_id)["State"]

    deadline = time.monotonic() + 60
    stopped = 0
    while not stopped and time.monotonic() < deadline:  # the GCS records the controller's death shortly after
        stopped = stop_cleaners(orphaned_only=True)
        time.sleep(0.2)
    assert stopped == 1
    while cleaner_state(orphan) != "DEAD" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cleaner_state(orphan) == "DEAD" and cleaner_state(guarded) == "ALIVE"
    assert stop_cleaners(orphaned_only=False) == 1
    while cleaner_state(guarded) != "DEAD" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cleaner_state(guarded) == "DEAD"
    ray.kill(alive)
