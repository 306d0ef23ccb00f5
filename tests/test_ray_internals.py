"""Every private Ray API and Ray process internal the toolkit uses (`uhkd/ray_internals.py`) still exists
in the installed Ray and does what the sweep relies on: each test runs one function on a real Ray and fails naming
it. Then each function's fallback, with its internal taken away as a newer Ray might: it returns what keeps the sweep
correct and says once which function fell back."""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

from uhkd import ray_internals as ri

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_fallbacks(monkeypatch):
    monkeypatch.setattr(ri, "_fallbacks", {})


def provided(name: str) -> None:
    assert name not in ri.fallbacks(), (f"uhkd.ray_internals.{name}: Ray {ray.__version__} no longer provides "
                                        f"what it uses ({ri.fallbacks()[name]}); docs/ray-versions.md")


def test_recorded_address(monkeypatch, tmp_path):
    """`ray start --head` records its address in <RAY_TMPDIR or /tmp>/ray/ray_current_cluster."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert ri.recorded_address() == ""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379\n")
    assert ri.recorded_address() == "10.1.2.3:6379", "uhkd.ray_internals.recorded_address reads another file"
    provided("recorded_address")


def test_gcs_temp_dirs(ray_local):
    temp_dir = Path(ray.get_runtime_context().get_temp_dir())
    assert temp_dir in ri.gcs_temp_dirs(), "uhkd.ray_internals.gcs_temp_dirs misses this session's GCS server"
    provided("gcs_temp_dirs")


def test_autoscaler_config_file(ray_local):
    """The cluster's monitor runs on its head with --gcs-address (here without a config: a fixed cluster), and Ray's
    monitor still takes --autoscaling-config."""
    gcs = ray.get_runtime_context().gcs_address
    monitors = [a for a in ri._command_lines() if any(x.endswith("monitor.py") for x in a)
                and f"--gcs-address={gcs}" in a]
    assert monitors, "uhkd.ray_internals.autoscaler_config_file: no monitor.py --gcs-address=<gcs> process"
    assert ri.autoscaler_config_file(gcs) is None
    script = next(x for x in monitors[0] if x.endswith("monitor.py"))
    monitor = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert "--autoscaling-config" in monitor.stdout, "uhkd.ray_internals.autoscaler_config_file: Ray's " \
                                                     "monitor.py takes no --autoscaling-config"
    provided("autoscaler_config_file")


def test_cluster_node_groups(ray_local):
    assert ri.cluster_node_groups() == []  # a fixed cluster publishes no node groups
    provided("cluster_node_groups")


def test_quiet_token_notice():
    notice = logging.getLogger(ri.TOKEN_NOTICE_LOGGER)
    level = notice.level
    try:
        ri.quiet_token_notice()
        assert importlib.import_module(ri.TOKEN_NOTICE_LOGGER).logger is notice, \
            "uhkd.ray_internals.quiet_token_notice: Ray's token notice comes from another logger"
        assert not notice.isEnabledFor(logging.WARNING)
    finally:
        notice.setLevel(level)
    provided("quiet_token_notice")


@ray.remote(num_cpus=0)
class InternalsProbe:
    def pid(self) -> int:
        import os

        return os.getpid()

    def group(self) -> str:
        from ray.util.placement_group import placement_group

        pg = placement_group([{"CPU": 0.01}])
        ray.get(pg.ready(), timeout=60)
        return pg.id.hex()


def test_live_actors(ray_local):
    probe = InternalsProbe.remote()
    pid = ray.get(probe.pid.remote())
    try:
        found = [a for a in ri.live_actors() if a.pid == pid]
        assert found, "uhkd.ray_internals.live_actors misses a live actor"
        context = ray.get_runtime_context()
        assert found[0].class_name == "InternalsProbe"
        assert found[0].job_id == bytes.fromhex(context.get_job_id())
        assert found[0].node_id == context.get_node_id()
        assert found[0].owner_worker_id == bytes.fromhex(context.get_worker_id())
    finally:
        ray.kill(probe)
    provided("live_actors")


def test_placement_groups_of_dead_creators(ray_local):
    from ray.util.placement_group import remove_placement_group

    probe = InternalsProbe.remote()
    group = ray.get(probe.group.remote())
    job = bytes.fromhex(ray.get_runtime_context().get_job_id())
    assert group not in [g.id.hex() for g in ri.placement_groups_of_dead_creators(job)]  # its creator lives
    ray.kill(probe)
    deadline, found = time.monotonic() + 60, []
    while not found and time.monotonic() < deadline:
        found = [g for g in ri.placement_groups_of_dead_creators(job) if g.id.hex() == group]
        time.sleep(0.5)
    provided("placement_groups_of_dead_creators")
    assert found, "uhkd.ray_internals.placement_groups_of_dead_creators misses a group whose creator died"
    remove_placement_group(found[0])


def test_ended_jobs_and_other_jobs_running(ray_local):
    mine = ray.get_runtime_context().get_job_id()
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR');"
            "print(ray.get_runtime_context().get_job_id())")
    other = subprocess.run([sys.executable, "-c", code, ray.get_runtime_context().gcs_address], capture_output=True,
                           text=True, timeout=180)
    assert other.returncode == 0, other.stderr[-2000:]
    ended = other.stdout.split()[-1]
    deadline = time.monotonic() + 30
    while bytes.fromhex(ended) not in ri.ended_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert bytes.fromhex(ended) in ri.ended_jobs(), "uhkd.ray_internals.ended_jobs misses an ended job"
    assert bytes.fromhex(mine) not in ri.ended_jobs()
    assert not ri.other_jobs_running(mine), "uhkd.ray_internals.other_jobs_running counts an ended job"
    assert ri.other_jobs_running("ffffffff")  # this job, seen from another
    provided("ended_jobs")
    provided("other_jobs_running")


def test_wait_for_wandb_files(tmp_path):
    import wandb
    from ray.air.integrations.wandb import WandbLoggerCallback

    callback = WandbLoggerCallback(project="p", mode="offline")
    ri.wait_for_wandb_files(callback)
    provided("wait_for_wandb_files")
    actor = callback._logger_actor_cls(str(tmp_path), queue.Queue(), [], [])
    assert actor._wandb is wandb and callable(wandb.teardown), \
        "uhkd.ray_internals.wait_for_wandb_files: Ray's logging actor no longer holds the wandb module"


def test_start_wandb_run():
    from ray.air.integrations.wandb import WandbLoggerCallback

    start = inspect.signature(WandbLoggerCallback._start_logging_actor)
    assert list(start.parameters)[:3] == ["self", "trial", "exclude_results"], \
        f"uhkd.ray_internals.start_wandb_run: Ray's _start_logging_actor is now {start}"
    assert isinstance(WandbLoggerCallback._exclude_results, list)


def test_mlflow_runs(tmp_path, monkeypatch):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    callback = MLflowLoggerCallback(tracking_uri=(tmp_path / "mlruns").as_uri(), experiment_name="x")
    callback.setup()
    assert ri.mlflow_runs(callback) == {}
    provided("mlflow_runs")


@pytest.mark.slow
def test_client_address():
    from test_ray_cluster import start_head, stop_head

    temp_dir = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # short: Ray's socket paths
    head = start_head(temp_dir, num_cpus=1)
    try:
        # attached as a sweep attaches (`connect`: it retries a session whose server crashed as it started)
        code = ("import json, sys; from uhkd.sweep.cluster import connect; connect(sys.argv[1]);"
                "from uhkd import ray_internals as ri; print(json.dumps([ri.client_address(), ri.fallbacks()]))")
        done = subprocess.run([sys.executable, "-c", code, head.client_address], capture_output=True, text=True,
                              timeout=300, env=head.env)
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    address, fell_back = json.loads(done.stdout.splitlines()[-1])
    assert address == head.client_address and not fell_back, \
        f"uhkd.ray_internals.client_address: {address!r}, {fell_back}"


def test_a_client_session_whose_server_crashed_as_it_started_is_tried_again():
    """What Ray 2.60's client proxy raised in a CI run when the session server it had just forked was already dead
    (ray-project/ray#63202): one of the failures `connect` retries."""
    from uhkd.sweep.cluster import CLIENT_SPAWN_FAILURES, _reason

    exc = ConnectionAbortedError(
        "Initialization failure from server:\nTraceback (most recent call last):\n  File \".../proxier.py\", line "
        "396, in start_specific_server\n    cmd = psutil_proc.cmdline()\npsutil.ZombieProcess: PID still exists but "
        "it's a zombie (pid=3401)\n")
    reason = _reason(exc)
    assert reason == ("Initialization failure from server: psutil.ZombieProcess: PID still exists but it's a zombie "
                      "(pid=3401)")
    assert any(failure in reason for failure in CLIENT_SPAWN_FAILURES)


def test_own_session(tmp_path):
    """An embedded cluster started inside own_session(): none of its processes is in the driver's session (a signal
    to the driver's process group cannot reach them), and they still end with the driver."""
    code = ("import json, os, ray; from uhkd import ray_internals as ri\n"
            "with ri.own_session():\n"
            "    ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
            "node = ray._private.worker._global_node\n"
            "pids = [p.process.pid for ps in node.all_processes.values() for p in ps]\n"
            "print(json.dumps([pids, [os.getsid(p) == os.getsid(0) for p in pids], ri.fallbacks()]))")
    temp_dir = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # short: Ray's socket paths
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_TMPDIR": temp_dir})
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    pids, in_driver_session, fell_back = json.loads(done.stdout.splitlines()[-1])
    assert pids and not any(in_driver_session) and not fell_back, \
        f"uhkd.ray_internals.own_session: {in_driver_session}, {fell_back}"
    time.sleep(2)
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and
             Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
    assert not alive, f"processes of the ended driver's embedded cluster still run: {alive}"


def test_move_trial_storage(tmp_path):
    """A Tune trial pointed at a new experiment storage: its folder and its tracked checkpoints are there."""
    import pyarrow.fs as pafs
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial
    from ray.tune.registry import register_trainable

    register_trainable("moved", lambda config: None)
    storage = StorageContext(storage_path=str(tmp_path / "old"), experiment_dir_name="tune", trial_dir_name="t1")
    trial = Trial("moved", storage=storage, trial_id="t1")
    ri.move_trial_storage(trial, str(tmp_path / "new"), pafs.LocalFileSystem())
    assert trial.path == str(tmp_path / "new" / "tune" / "t1"), "uhkd.ray_internals.move_trial_storage"
    provided("move_trial_storage")


# --- the fallbacks: each internal taken away ------------------------------------------------------------------------

def _no_gcs_log_dir():
    yield ["/opt/ray/core/src/ray/gcs/gcs_server", "--log-directory=/tmp/ray/session_x/logs"]


class NoTrialRuns:
    """A Ray MLflow callback of a Ray that keeps its trial runs elsewhere."""


def _fallback_cases():
    from ray._private import services as ray_services
    from ray._private import state as ray_state
    from ray._private import utils as ray_utils
    from ray.air.integrations import wandb as ray_wandb

    accessor = (ray_state.GlobalState, "_connect_and_get_accessor")
    return [  # function, its arguments, what a newer Ray may lack (object, attribute), the fallback
        ("recorded_address", (), (ray_utils, "read_ray_address"), ""),
        ("gcs_temp_dirs", (), (ri, "_command_lines", _no_gcs_log_dir), []),
        ("cluster_node_groups", (), (ray_state.GlobalState, "get_cluster_config"), []),
        ("quiet_token_notice", (), (ri, "TOKEN_NOTICE_LOGGER", "ray._private.no_such_module"), None),
        ("client_address", (), None, ""),  # no Ray Client connection: what a Ray without the attribute gives
        ("live_actors", (), accessor, []),
        ("placement_groups_of_dead_creators", (b"\0" * 4,), accessor, []),
        ("ended_jobs", (), (ray_state.GlobalState, "job_table"), set()),
        ("other_jobs_running", ("01000000",), (ray_state.GlobalState, "job_table"), True),
        ("wait_for_wandb_files", (NoTrialRuns(),), (ray_wandb, "_WandbLoggingActor"), None),
        ("start_wandb_run", (NoTrialRuns(), None, []), None, False),
        ("mlflow_runs", (NoTrialRuns(),), None, None),
        ("own_session", (), (ray_services, "ConsolePopen"), ri.NO_SESSION),
        ("move_trial_storage", (NoTrialRuns(), "/elsewhere", None), None, None),  # a Trial without its storage
    ]


@pytest.mark.parametrize("case", _fallback_cases(), ids=lambda case: case[0])
def test_fallback_when_the_internal_is_gone(case, monkeypatch, capsys):
    name, args, gone, fallback = case
    if gone is not None and len(gone) == 3:
        monkeypatch.setattr(gone[0], gone[1], gone[2])
    elif gone is not None:
        monkeypatch.delattr(*gone)
    assert getattr(ri, name)(*args) == fallback
    assert name in ri.fallbacks()
    getattr(ri, name)(*args)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: Ray")]
    assert len(warnings) == 1 and f"uhkd.ray_internals.{name} uses" in warnings[0]
