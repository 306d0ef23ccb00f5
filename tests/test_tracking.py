"""--track: a real sweep logged to MLflow (its default SQLite store), W&B offline and TensorBoard, read back with each
tracker's own formats and compared with epochs.parquet, and the MLflow command the sweep prints run as printed; a
single uhkd.train run; a local `mlflow server` (slow); the flag without its packages or with a folder as its store."""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
from testkit.realstack import free_port

from analysis.common import read_epochs, read_trials
from uhkd.errors import UserError
from uhkd.storage import checkpoint_folders
from uhkd.sweep.cli import SweepOptions
from uhkd.sweep.runner import run
from uhkd.sweep.spec import Sweep, load_preset
from uhkd.track_options import TrackOptions, mlflow_command, mlflow_store, parse_trackers

PAIR = "convnext_tiny:resnet18"
LOCAL = pafs.LocalFileSystem()
SMALL = {"data.limit_train": "192", "data.limit_eval": "64", "data.batch_size": "32",
         "optim.max_steps_per_epoch": "3"}


def tracked_sweep(tmp_path: Path, teacher_dir: str, track: TrackOptions, cells: dict,
                  out: list | None = None) -> tuple[str, pd.DataFrame]:
    opts = SweepOptions(results=str(tmp_path / "res"), teacher_dir=teacher_dir, workers_per_trial=0, epochs=2,
                        name="tracked", sets=SMALL, track=track)
    outcome = run(Sweep("grid", load_preset("quick"), cells=cells, force={"data.split": "final"}), opts,
                  out=(out if out is not None else []).append)
    epochs = read_epochs(outcome.folder)
    assert set(read_trials(outcome.folder)["status"]) == {"ok"}
    return outcome.folder, epochs


def mlflow_runs(uri: str, experiment: str) -> dict[str, tuple[dict, dict]]:
    """trial id -> (params, {metric: [(step, value), ...]}) read with MLflow's client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for r in client.search_runs([exp.experiment_id]):
        history = {key: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
                   for key in r.data.metrics}
        out[r.data.tags["trial_id"]] = (r.data.params, history)
    return out


def run_printed(command: str) -> str:
    """A printed command run as a user would (bash, this environment's python first on PATH), with no MLflow setting
    inherited (no MLFLOW_ALLOW_FILE_STORE, no MLFLOW_TRACKING_URI)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def printed_mlflow(lines: list[str], says: str) -> str:
    """The command printed on the line after the `mlflow: ...` line that contains `says`."""
    (i,) = [i for i, line in enumerate(lines) if line.startswith("mlflow: ") and says in line]
    assert lines[i + 1].startswith("  MLFLOW_TRACKING_URI=")
    return lines[i + 1].strip()


def assert_same_as_parquet(runs: dict, epochs: pd.DataFrame, keys=("top1", "loss", "loss_kl", "lr")) -> None:
    assert set(runs) == set(epochs["trial_id"])
    for trial_id, (params, history) in runs.items():
        mine = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        for key in keys:
            assert [s for s, _ in history[key]] == mine["epoch"].tolist() == [1, 2]
            assert [v for _, v in history[key]] == pytest.approx(mine[key].tolist())
        assert params["method.name"] == "kd" and params["optim.epochs"] == "2" and params["pair"] == PAIR
        assert params["data.split"] == "final" and params["name"] == trial_id  # the flat dotted keys


def wandb_records(path: str) -> list:
    """The protobuf records of a W&B offline transaction log (`run-<id>.wandb`, LevelDB log framing)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TFRecord event files in `folder`."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in glob.glob(f"{folder}/events.out.tfevents.*"):
        data, pos = Path(path).read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_sweep_console_and_tracking_in_mlflow_wandb_and_tensorboard(tmp_path, teacher_dir, ray_local, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cells = {"a": {"pair": PAIR, "method.name": "kd"}, "b": {"pair": PAIR, "method.name": "kd", "optim.lr": 1e-3}}
    track = TrackOptions(("mlflow", "wandb", "tensorboard"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db")
    summary: list[str] = []
    folder, epochs = tracked_sweep(tmp_path, teacher_dir, track, cells, summary)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    runs = mlflow_runs(store, "tracked")
    listed = run_printed(printed_mlflow(summary, f"experiment 'tracked' (id 1) in {store}, one run per trial"))
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("tracked").experiment_id])
    rows = [line.split()[-2:] for line in listed.splitlines() if len(line.split()) == 5]  # date time UTC name id
    assert sorted(rows) == sorted([r.info.run_name, r.info.run_id] for r in logged) and len(rows) == 2
    assert sorted(runs) == sorted(set(epochs["trial_id"]))

    live = capsys.readouterr().out.splitlines()  # uhkd.sweep.console.LiveLines
    trials = read_trials(folder).set_index("trial_id")
    for row in epochs.itertuples():
        line = next(l for l in live if l.startswith(f"trial {row.trial_id} {PAIR} epoch {row.epoch}/2 "))
        assert f"top1 {row.top1:.2f} " in line and f"(ce {row.loss_ce:.4f} kl {row.loss_kl:.4f})" in line
    for trial_id in trials.index:
        (started,) = [l for l in live if l.startswith(f"trial {trial_id} {PAIR}: started")]
        cell = {"method.name=kd"} | ({"optim.lr=0.001"} if trials.loc[trial_id, "optim.lr"] == 1e-3 else set())
        assert set(started.split(": started")[1].split()) == cell  # the cell's values, not the cell's dict
        finished = f"trial {trial_id} {PAIR}: finished, best top1 {trials.loc[trial_id, 'best_top1']:.4g}"
        assert any(line == finished or line.startswith(finished + "; about ") for line in live)
    best = trials["best_top1"].idxmax()
    summary = summary[next(i for i, line in enumerate(summary) if "trials recorded" in line):]
    assert summary[0].startswith("sweep tracked: 2/2 trials recorded (2 ok, 0 stopped, 0 failed)")
    assert summary[1] == "best trial per pair:" and summary[2].split() == [
        "pair", "trial", "top1", "epoch", "epochs", "status", "optim.lr"]  # the one value that differs
    assert summary[3].split() == [PAIR, best, f"{trials.loc[best, 'best_top1']:.2f}",
                                  str(trials.loc[best, "best_epoch"]), "2/2", "ok", f"{trials.loc[best, 'optim.lr']:.4g}"]
    assert summary[-3:] == ["next:", f"  python -m analysis.tables {folder} --dataset mnist5k --split final",
                            f"  python -m analysis.curves {folder} --out-dir figures"]  # a grid: no search to report

    assert_same_as_parquet(runs, epochs)

    for trial_id in set(epochs["trial_id"]):
        mine = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        (log,) = glob.glob(f"{tmp_path}/wandb/offline-run-*-{trial_id}/run-{trial_id}.wandb")
        records = wandb_records(log)
        config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
                  for i in r.run.config.update}
        assert config["method.name"] == "kd" and config["pair"] == PAIR and config["name"] == trial_id
        history = [{i.nested_key[0]: json.loads(i.value_json) for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        assert [h["epoch"] for h in history] == [h["_step"] for h in history] == [1, 2]
        assert [h["top1"] for h in history] == pytest.approx(mine["top1"].tolist())
        assert [h["loss_ce"] for h in history] == pytest.approx(mine["loss_ce"].tolist())

        (trial_dir,) = glob.glob(f"{folder}/tune/{trial_id}")
        scalars = tensorboard_scalars(trial_dir)
        assert [s for s, _ in scalars["ray/tune/top1"]] == [1, 2]
        assert [v for _, v in scalars["ray/tune/top1"]] == pytest.approx(mine["top1"].tolist(), rel=1e-6)
        assert [v for _, v in scalars["ray/tune/loss_kl"]] == pytest.approx(mine["loss_kl"].tolist(), rel=1e-6)


@pytest.mark.parametrize("ray_train", [False, True])
def test_a_single_run_shows_and_tracks_every_epoch(tmp_path, capsys, request, monkeypatch, ray_train):
    """One worker in-process (the loop prints) and, with --ray-train, on Ray Train (the driver prints what the run's
    checkpoints on its storage hold, and tracks it): each epoch's line once on the console, and the same numbers in
    MLflow (its default store, mlflow.db in the working folder, read back by the printed command) and
    TensorBoard."""
    import ray

    from uhkd.train import main

    if ray_train:
        request.getfixturevalue("ray_local")
    started = ray.is_initialized()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    args = ["--preset", "quick", "--workers", "1", *(["--ray-train"] if ray_train else []), "--epochs", "2",
            "--output", str(out), "--track", "mlflow,tensorboard", "--set", "optim.max_steps_per_epoch=2", "--set",
            "data.limit_eval=64"]
    assert main(args) == 0
    assert ray.is_initialized() == (started or ray_train)  # one worker alone never starts Ray
    log = (Path(checkpoint_folders(LOCAL, str(out))[0]) if ray_train else out) / "metrics.jsonl"
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    console = capsys.readouterr().out.splitlines()
    lines = [line for line in console if line.startswith("epoch ")]
    assert [line.split(" loss ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(f"top1 {r['top1']:.2f} " in line for r, line in zip(reports, lines, strict=True))
    store = f"sqlite:///{tmp_path}/mlflow.db"
    runs = mlflow_runs(store, "uhkd.train")
    params, history = runs[out.name]
    from mlflow.tracking import MlflowClient

    (run,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("uhkd.train").experiment_id])
    described = json.loads(run_printed(printed_mlflow(
        console, f"mlflow: run {run.info.run_id} of experiment 'uhkd.train' (id 1) in {store}; read it back with:")))
    assert described["info"]["run_id"] == run.info.run_id and described["info"]["status"] == "FINISHED"
    assert described["data"]["params"]["method.name"] == "uhkd"
    assert described["data"]["metrics"]["top1"] == pytest.approx(reports[-1]["top1"])
    assert params["method.name"] == "uhkd" and params["method.uhkd.alpha"] == "1.0"  # resolved method defaults
    for key in ("top1", "loss_feat", "loss_kl", "images_per_s"):
        assert [s for s, _ in history[key]] == [r["epoch"] for r in reports] == [1, 2]
        assert [v for _, v in history[key]] == pytest.approx([r[key] for r in reports])
    assert [v for _, v in tensorboard_scalars(str(out))["ray/tune/loss_feat"]] == pytest.approx(
        [r["loss_feat"] for r in reports], rel=1e-6)

    assert main(args) == 0  # the same run again: it says so and shows no epoch again
    again = capsys.readouterr().out.splitlines()
    assert again[0] == "run already finished at epoch 2" and not [line for line in again if "epoch 1/2" in line]


def test_the_mlflow_store_is_mlflows_default_sqlite_file_and_never_a_bare_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_store("") == f"sqlite:///{tmp_path}/mlflow.db"  # MLflow 3's DEFAULT_TRACKING_URI, made absolute
    assert mlflow_store("sqlite:///sub/m.db") == mlflow_store("sub/m.db") == f"sqlite:///{tmp_path}/sub/m.db"
    assert mlflow_store("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/t.db")
    assert mlflow_store("") == "sqlite:////srv/t.db"
    (tmp_path / "mlruns").mkdir()
    with pytest.raises(UserError) as err:
        mlflow_store("mlruns")
    assert str(err.value) == (
        "--mlflow-uri 'mlruns' is a folder (an MLflow file store, which MLflow 3 keeps in maintenance mode); give a "
        "SQLite file such as mlruns/mlflow.db, a tracking server http://HOST:PORT, or file:mlruns to keep logging to "
        "that file store")
    assert mlflow_command("file:mlruns", "experiments search") == (
        "MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file:mlruns python -m mlflow experiments search")


def test_track_needs_known_installed_trackers():
    with pytest.raises(UserError, match=r"unknown tracker 'mlfow' \(did you mean mlflow\?\); valid choices: "
                                         r"mlflow, tensorboard, wandb"):
        parse_trackers(["tensorboard,mlfow"])
    with pytest.raises(UserError) as err:
        parse_trackers(["mlflow"], modules={"mlflow": "mlflow_not_installed_here"})
    assert str(err.value) == ('--track mlflow needs the mlflow_not_installed_here package, which is not installed: '
                              'pip install -e ".[track]"')
    assert parse_trackers(["mlflow,wandb", "mlflow"]) == ("mlflow", "wandb")


@pytest.mark.slow
def test_sweep_is_tracked_on_a_local_mlflow_server(tmp_path, teacher_dir, ray_local):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--default-artifact-root", str(tmp_path / "art"),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(1)
        cells = {"a": {"pair": PAIR, "method.name": "kd"}}
        _, epochs = tracked_sweep(tmp_path, teacher_dir, TrackOptions(("mlflow",), mlflow_uri=uri), cells)
        assert_same_as_parquet(mlflow_runs(uri, "tracked"), epochs)
    finally:
        server.terminate()
        server.wait(timeout=30)
