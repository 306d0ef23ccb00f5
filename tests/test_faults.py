"""Faults, bad files and hostile input: nothing lost, one clear line. The fast checks run on their own; the
scenarios on real processes (`benchmarks/faults.py`, which prints them as a table) are slow-marked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import faults
from uhkd.data.cifar import read_cifar100
from uhkd.errors import UserError
from uhkd.models import create_stage_model, load_teacher, save_model_checkpoint
from uhkd.sweep import lock
from uhkd.sweep.cli import SweepOptions
from uhkd.sweep.results import SweepTables
from uhkd.sweep.runner import MANIFEST, disk_full, read_manifest
from uhkd.trainer import CHECKPOINT, PREVIOUS_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(faults._cifar_archive(faults._Evil(f"touch {marker}")))
    with pytest.raises(UserError, match=r"refusing CIFAR-100 'train' .*calls posix\.system") as err:
        read_cifar100(str(tmp_path))
    _one_line(err)
    assert not marker.exists()


def test_real_cifar_format_still_reads_and_truncated_archive_is_one_line(tmp_path):
    raw = faults._cifar_archive()
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(raw)
    data, labels = read_cifar100(str(tmp_path))
    assert data.shape == (8, 32, 32, 3) and labels.tolist() == list(range(8))
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="cannot read CIFAR-100 'train'") as err:
        read_cifar100(str(tmp_path))
    _one_line(err)


def test_every_torch_load_is_weights_only():
    calls = []
    for path in [*ROOT.glob("uhkd/**/*.py"), *ROOT.glob("sweeps/*.py"), *ROOT.glob("analysis/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                calls.append((path.name, n, "weights_only=True" in line))
    assert calls and all(ok for *_, ok in calls), calls


def test_truncated_teacher_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "t.pth"
    save_model_checkpoint(path, create_stage_model("resnet18", num_classes=10, img_size=32, scale="tiny"))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="is not readable \\(truncated or corrupted\\?\\)") as err:
        load_teacher("resnet18", str(path), num_classes=10, img_size=32, scale="tiny")
    _one_line(err)


def test_trial_checkpoint_falls_back_to_the_previous_one_then_restarts(tmp_path, capfd):
    from uhkd.config import build_config
    from uhkd.train import run_in_process

    cfg = build_config("quick", {"model.teacher": "", "model.student": "resnet18", "method.name": "scratch",
                                 "optim.epochs": 3, "data.limit_train": 64, "data.limit_eval": 32,
                                 "data.batch_size": 32, "optim.max_steps_per_epoch": 2, "workers": 0,
                                 "output_dir": str(tmp_path / "run")})
    run_in_process(cfg)
    run = tmp_path / "run"
    assert torch.load(run / PREVIOUS_CHECKPOINT, weights_only=True)["epoch"] == 2
    (run / CHECKPOINT).write_bytes((run / CHECKPOINT).read_bytes()[:1000])
    assert run_in_process(cfg)["epoch"] == 3  # epoch 3 trained again from epoch 2's checkpoint
    err = capfd.readouterr().err
    assert f"checkpoint {run / CHECKPOINT} is unreadable" in err
    assert f"falling back to {run / PREVIOUS_CHECKPOINT} (epoch 2)" in err
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        (run / name).write_bytes(b"garbage")
    run_in_process(cfg)
    assert "no readable checkpoint left: restarting the run from epoch 1" in capfd.readouterr().err


def test_corrupted_sweep_json_and_trials_parquet_are_one_line(tmp_path):
    opts = SweepOptions(results=str(tmp_path))
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / MANIFEST).write_text('{"kind": "hetero_pa')
    with pytest.raises(UserError, match="cannot resume sweep 'sw': .*sweep.json is missing or corrupted") as err:
        read_manifest(opts, "sw")
    _one_line(err)
    (tmp_path / "sw" / MANIFEST).write_text('{"kind": "hetero_pairs"}')
    with pytest.raises(UserError, match="it lacks preset, planned"):
        read_manifest(opts, "sw")
    pq.write_table(pa.table({"trial_id": ["a"]}), tmp_path / "sw" / "trials.parquet")
    raw = (tmp_path / "sw" / "trials.parquet").read_bytes()
    (tmp_path / "sw" / "trials.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="trials.parquet' is unreadable .*move it aside and run --resume") as err:
        SweepTables(str(tmp_path), "sw").load()
    _one_line(err)


def test_a_second_driver_of_one_sweep_refuses_while_the_first_holds_it(tmp_path):
    folder = str(tmp_path / "sw")
    lock.hold(folder, "sw")
    try:
        code = f"from uhkd.sweep import lock; lock.hold({folder!r}, 'sw')"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert other.returncode != 0
        assert f"UserError: sweep 'sw' is already running (pid {os.getpid()} on" in other.stderr
    finally:
        lock.release(folder)
    lock.hold(folder, "sw")  # free again once released (or once its holder died)
    lock.release(folder)


def test_disk_full_is_found_inside_wrapped_errors():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("Tune failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert not disk_full(RuntimeError("other"))


@pytest.mark.slow
def test_embedded_cluster_keeps_token_auth_and_a_local_dashboard(tmp_path):
    """The toolkit never turns Ray's token authentication off itself (tests and CI do, by RAY_AUTH_MODE)."""
    code = ("from uhkd.sweep.cluster import connect; print(connect('local'));"
            "from ray._private.authentication.authentication_utils import is_token_auth_enabled;"
            "print('token auth', is_token_auth_enabled())")
    ray_tmp = faults.tempfile.mkdtemp(prefix="ra", dir="/tmp")
    env = {k: v for k, v in faults.env(ray_tmp).items() if k != "RAY_AUTH_MODE"}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                              env={**env, "HOME": str(tmp_path)})
    finally:
        faults.shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "token auth True" in done.stdout
    # said in the toolkit's line, not by Ray's own warning on the console
    assert "started an embedded local cluster (1 node, " in done.stdout and ", token authentication on)" in done.stdout
    assert "Token authentication" not in done.stderr
    cluster = (ROOT / "uhkd" / "sweep" / "cluster.py").read_text()
    assert 'dashboard_host="127.0.0.1"' in cluster


EXPECT_LINES = {  # scenario -> what the user must have been told (one line each)
    "driver_sigterm": "--resume --name sw",
    "trial_checkpoint": "/checkpoint.pt is unreadable (",
    "trials_parquet": "error: results table",
    "sweep_json": "error: cannot resume sweep 'sw'",
    "two_resumes": "error: sweep 'sw' is already running",
    "two_sweeps": "error: sweep 'a' ",
    "teacher_checkpoint": "error: teacher checkpoint",
    "cifar_archive": "error: refusing CIFAR-100",
    "nan_storm": "non-finite loss",
    "disk_full": "error: the results disk is full",
}


EXPECT_OUTCOME = {  # scenario -> exit codes as `Outcome.outcome` words them
    "driver_sigkill": ["exit -9 then --resume exit 0"], "driver_sigterm": ["exit 130 then --resume exit 0"],
    "worker_sigkill": ["1 killed; exit 0"], "node_lost": ["exit 0"],
    "disk_full": ["exit 2, ", "--resume exit 0"], "two_sweeps": ["exit 0 and 0; same name: exit 2"],
    "two_resumes": ["second exit 2; exit 130 then --resume exit 0"], "teacher_checkpoint": ["exit 2 before any trial"],
    "trial_checkpoint": ["exit 130 then --resume exit 0"], "trials_parquet": ["exit 2, moved aside", "--resume exit 0"],
    "sweep_json": ["exit 2, restored", "--resume exit 0"], "cifar_archive": ["exit 2 and 2; nothing ran"],
    "nan_storm": ["exit 0; 2 failed, 2 listed with reasons"], "ray_job": ["stopped: hint printed; resubmitted: exit 0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(faults.SCENARIOS))
def test_fault_scenario(scenario, tmp_path):
    if scenario == "disk_full" and subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                                                  capture_output=True).returncode:
        pytest.skip("needs unshare (user and mount namespaces) for a private tmpfs")
    result = faults.run_scenario(scenario, tmp_path)
    assert not result.outcome.startswith("could not run"), result.outcome
    assert (result.lost, result.duplicated) == (0, 0), result
    assert result.retrained <= (1 if scenario == "trial_checkpoint" else 0), result  # the fallback: one epoch
    assert not any("Traceback" in line for line in result.lines), result.lines
    assert all(line.count("\n") == 0 for line in result.lines)
    if scenario in EXPECT_LINES:
        assert any(EXPECT_LINES[scenario] in line for line in result.lines), result.lines
    if scenario not in ("teacher_checkpoint", "cifar_archive"):
        assert result.written == result.planned, result
    for part in EXPECT_OUTCOME[scenario]:
        assert part in result.outcome, result
