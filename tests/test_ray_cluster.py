"""Sweeps on a `ray start --head` cluster (no dashboard) that they attach to: nothing of a sweep stays on the
cluster after it exits (Ray Train's detached cleaners of ASHA-stopped trials included), two sweeps started at once
on one results root both complete in folders of their own, `--cluster auto` finds a cluster started with
`ray start --temp-dir`, and Ray Client (`ray://`) sweeps report their rows."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from testkit.realstack import free_ports

from uhkd.sweep.results import TRIALS

ROOT = Path(__file__).resolve().parent.parent
PAIR = "convnext_tiny:resnet18"
SMALL = ["--set", "data.limit_train=192", "--set", "data.limit_eval=64", "--set", "data.batch_size=32",
         "--set", "optim.max_steps_per_epoch=4"]


@dataclass
class Head:
    address: str
    client_address: str  # ray://
    temp_dir: str
    process: subprocess.Popen
    env: dict


def start_head(temp_dir: str, num_cpus: int = 4, autoscaling: dict | None = None, **env_vars: str) -> Head:
    """`ray start --head --block` on free local ports, without the dashboard, its files under `temp_dir`; with an
    `autoscaling` config for Ray's fake multi-node provider, an autoscaler that starts nodes as local processes."""
    gcs, client, node_manager, object_manager, agent, agent_grpc, metrics, runtime_env = free_ports(8)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_TMPDIR": temp_dir, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **env_vars})
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    scaling = []
    if autoscaling:
        config = Path(temp_dir) / "autoscaling.json"
        provider = {**autoscaling["provider"], "gcs_address": f"127.0.0.1:{gcs}"}
        config.write_text(json.dumps({**autoscaling, "provider": provider}))
        scaling = [f"--autoscaling-config={config}"]
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115  (the head writes it while it runs)
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
         f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", *scaling],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    head = Head(f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}", temp_dir, process, env)
    deadline = time.monotonic() + 240
    while not (Path(temp_dir) / "ray_current_cluster").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            raise AssertionError(f"ray start --head did not come up: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.5)
    return head


def stop_head(head: Head) -> None:
    head.process.terminate()
    try:
        head.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.process.kill()
        head.process.wait(timeout=30)
    subprocess.run(["pkill", "-9", "-f", head.temp_dir], check=False)  # nodes an autoscaler started outlive it


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    started = start_head(temp_dir)
    try:
        yield started
    finally:
        stop_head(started)
        shutil.rmtree(temp_dir, ignore_errors=True)


def sweep(head: Head, cluster: str, results: Path, teacher_dir: str, *args: str, env: dict | None = None,
          cwd: str | None = None, timeout: int = 900, script: list[str] | None = None) -> subprocess.CompletedProcess:
    """hetero_pairs (or `script`, python's arguments) on one pair with tiny data, as its own process."""
    argv = [sys.executable, *(script or [str(ROOT / "sweeps" / "hetero_pairs.py")]), "--cluster", cluster, "--results",
            str(results), "--teacher-dir", teacher_dir, "--pairs", PAIR, *SMALL, *args]
    return subprocess.run(argv, env=env or head.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


LIST_ACTORS = """
import json, sys, ray
from ray._private.state import state
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
me = ray.get_runtime_context().get_job_id()
print(json.dumps([{"cls": a["ActorClassName"], "job": a["JobID"], "pid": a["Pid"]}
                  for a in state.actor_table(None, actor_state_name="ALIVE").values() if a["JobID"] != me]))
"""


def private_mb(pid: int) -> float:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0.0
    return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean", "Private_Dirty"))) / 1024


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
        except OSError:
            continue
        if parent is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            found[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return found


NODE_PROCESSES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")  # the node's own, not a job's


def left_over(head: Head) -> tuple[list[dict], dict[int, str]]:
    """(live actors of jobs other than the caller's, `ray::` processes of actors or tasks) on the cluster: with no
    sweep running, none should be left."""
    listing = subprocess.run([sys.executable, "-c", LIST_ACTORS, head.address], env=head.env, capture_output=True,
                             text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]
    actors = json.loads(listing.stdout.strip().splitlines()[-1])
    workers = {p: c for p, c in descendants(head.process.pid).items()
               if c.startswith("ray::") and not c.startswith(NODE_PROCESSES)}
    return actors, workers


# hetero_pairs whose every trial plans 12 epochs in a sweep of 2: ASHA stops each at its max_t (epoch 3) while its
# Ray Train run is still going (the controller killed, as for any early stop). 2 workers: 1-worker trials train in
# the trial's own process.
ASHA_STOPS_ALL = """
import sys
from sweeps import hetero_pairs
from uhkd.sweep.runner import main
from uhkd.sweep.spec import domain

def build(args, opts):
    sweep = hetero_pairs.build(args, opts)
    sweep.space["optim.epochs"] = domain("optim.epochs", {"choice": [12]})
    return sweep

sys.exit(main(hetero_pairs.parser(), build))
"""
LEAK_SWEEP = ("--num-samples", "3", "--epochs", "2", "--workers-per-trial", "2", "--cpus-per-worker", "0.45",
              "--max-concurrent", "2")


@pytest.mark.slow
def test_a_sweep_with_asha_stops_leaves_nothing_on_the_cluster(head, tmp_path, teacher_dir):
    """Ray Train trials that ASHA stops: their detached PlacementGroupCleaner actors used to stay alive until the
    cluster stopped (~110 MB each). After the sweep exits, no actor and no actor process of it remains."""
    before_actors, before_workers = left_over(head)
    done = sweep(head, head.address, tmp_path / "r", teacher_dir, *LEAK_SWEEP, "--name", "leak", timeout=1800,
                 script=["-c", ASHA_STOPS_ALL])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "r" / "leak" / TRIALS)
    assert trials["status"].tolist() == ["stopped"] * 3  # by ASHA: at max_t, or trailing at a rung
    deadline = time.monotonic() + 60  # killed actors' processes exit shortly after
    while True:
        actors, workers = left_over(head)
        if (not actors and not workers) or time.monotonic() > deadline:
            break
        time.sleep(1)
    leaked_mb = sum(private_mb(p) for p in workers)
    assert (before_actors, before_workers) == ([], {})
    assert actors == [] and workers == {}, f"left on the cluster: {actors} {workers} ({leaked_mb:.0f} MB)"


@pytest.mark.slow
def test_the_cleaners_of_a_killed_sweep_go_with_the_next_sweep(head, tmp_path, teacher_dir):
    """A driver SIGKILLed mid-sweep cannot end its Ray Train runs' detached cleaners; the next sweep on the
    cluster does (their job has ended, so nothing of it is left to guard)."""
    argv = [sys.executable, str(ROOT / "sweeps" / "hetero_pairs.py"), "--cluster", head.address, "--results",
            str(tmp_path / "r"), "--teacher-dir", teacher_dir, "--pairs", PAIR, *SMALL, "--num-samples", "1",
            "--epochs", "20", "--workers-per-trial", "2", "--cpus-per-worker", "0.45", "--name", "killed"]
    driver = subprocess.Popen(argv, env=head.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(a["cls"] == "PlacementGroupCleaner" for a in left_over(head)[0]):
            assert driver.poll() is None and time.monotonic() < deadline, "no Ray Train run started"
            time.sleep(1)
    finally:
        os.killpg(driver.pid, 9)
        driver.wait(timeout=60)
    time.sleep(5)  # the GCS marks the job ended; its non-detached actors (controller, workers) die with it
    assert "PlacementGroupCleaner" in [a["cls"] for a in left_over(head)[0]]  # detached: it stays
    done = sweep(head, head.address, tmp_path / "r", teacher_dir, *in_process("--name", "next"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deadline = time.monotonic() + 60
    while left_over(head)[0] and time.monotonic() < deadline:
        time.sleep(1)
    assert left_over(head)[0] == []


def in_process(*args: str) -> list[str]:
    return ["--num-samples", "1", "--epochs", "1", "--workers-per-trial", "0", *args]


@pytest.mark.slow
def test_two_sweeps_started_together_on_one_results_root_both_complete(head, tmp_path, teacher_dir):
    results = tmp_path / "r"
    argv = [sys.executable, str(ROOT / "sweeps" / "hetero_pairs.py"), "--cluster", head.address, "--results",
            str(results), "--teacher-dir", teacher_dir, "--pairs", PAIR, *SMALL, *in_process()]
    runs = [subprocess.Popen(argv, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    logs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    folders = sorted(p for p in results.iterdir() if p.name.startswith("hetero_pairs-quick-"))
    assert len(folders) == 2  # same second, folders of their own
    for folder in folders:
        assert pd.read_parquet(folder / TRIALS)["status"].tolist() == ["ok"]


@pytest.mark.slow
def test_cluster_auto_finds_a_cluster_started_with_temp_dir(head, tmp_path, teacher_dir):
    """The head's address file is in its --temp-dir, not in this process's RAY_TMPDIR; RAY_ADDRESS=auto means the
    same search."""
    env = {**head.env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ra", dir="/tmp"), "RAY_ADDRESS": "auto"}
    try:
        done = sweep(head, "auto", tmp_path / "r", teacher_dir, *in_process("--name", "found"), env=env)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    port = head.address.rsplit(":", 1)[1]
    assert "ray: attached to the cluster started with `ray start --temp-dir` at " in done.stdout
    assert f":{port} (1 node, 4 CPUs)" in done.stdout
    assert pd.read_parquet(tmp_path / "r" / "found" / TRIALS)["status"].tolist() == ["ok"]


EXPLICIT = """
import sys, ray
from uhkd.sweep.cluster import connect
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
print(connect(sys.argv[1]))
print(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
"""


@pytest.mark.slow
def test_an_explicit_address_wins_over_an_initialised_ray(head):
    done = subprocess.run([sys.executable, "-c", EXPLICIT, head.address], env=head.env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    line, port = done.stdout.strip().splitlines()[-2:]
    assert line.startswith("ray: left this process's Ray instance at ") and f"attached to {head.address}" in line
    assert port == head.address.rsplit(":", 1)[1]


@pytest.mark.slow
def test_ray_client_sweep_reports_its_rows(head, tmp_path, teacher_dir):
    """With ray:// the Tune driver runs on the cluster: the tables are written and read there, and the sweep's
    summary on the client lists them. A relative --results is the client's folder."""
    done = sweep(head, head.client_address, Path("res"), teacher_dir, *in_process("--name", "client"),
                 cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sweep client: 1/1 trials recorded (1 ok, 0 stopped, 0 failed)" in done.stdout
    assert pd.read_parquet(tmp_path / "res" / "client" / TRIALS)["status"].tolist() == ["ok"]


CRASH_FIRST_SESSION_SERVER = """
import os, signal, sys
if "--mode=specific-server" in sys.argv:
    try:
        os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass
    else:
        os.kill(os.getpid(), signal.SIGSEGV)
"""
CONNECT = """
import sys, ray
from uhkd.sweep.cluster import connect
print(connect(sys.argv[1]))
print("remote", ray.get(ray.remote(lambda: 7).remote()))
"""


@pytest.mark.slow
def test_a_ray_client_session_whose_server_crashes_as_it_starts_is_started_again(tmp_path):
    """Ray's client proxy loses a few percent of its session servers as they fork (ray-project/ray#63202); here
    the head's first session server crashes at start, and the driver attaches with its second."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASH_FIRST_SESSION_SERVER.format(marker=str(tmp_path / "crashed")))
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    # the proxy notices the crash only when the server's channel is not up in its 30 s: a shorter wait fails
    # healthy sessions too on a loaded machine
    crashing = start_head(temp_dir, PYTHONPATH=f"{site}:{ROOT}")
    try:
        done = subprocess.run([sys.executable, "-c", CONNECT, crashing.client_address], env=crashing.env,
                              capture_output=True, text=True, timeout=300)
    finally:
        stop_head(crashing)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "crashed").exists()
    retry = "ray: the cluster's Ray Client server could not start a session (ray-project/ray#63202); trying again"
    lines = done.stdout.splitlines()
    retries = len(lines) - 2  # the head's own spawn race may cost a session more than the one crashed here
    assert retries >= 1 and lines[:retries] == [f"{retry} ({n}/5)" for n in range(2, retries + 2)], lines
    assert lines[-2].startswith(f"ray: attached to the cluster at {crashing.client_address} ") and lines[-1] == "remote 7"
    assert "Traceback" not in done.stdout + done.stderr


# Ray's fake multi-node provider: a head without CPUs, and a node type of 1 CPU the autoscaler may start twice
FAKE_AUTOSCALER = {
    "cluster_name": "fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_node": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}},
    "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    **dict.fromkeys(("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                     "head_start_ray_commands", "worker_start_ray_commands"), [])}


TRIAL_NODES = """
import json, sys, ray
from ray._private.state import state
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = {n["NodeID"]: n for n in ray.nodes()}  # dead ones too: an idle node the autoscaler ended
trials = [a for a in state.actor_table(None).values() if a["Pid"] in json.loads(sys.argv[2])]
print(json.dumps([nodes[a["Address"]["NodeID"]].get("Resources", {}) for a in trials]))
"""


@pytest.mark.slow
def test_a_sweep_runs_its_trials_on_the_nodes_an_autoscaler_starts(tmp_path, teacher_dir):
    """Autoscaler v1 (what `ray up` runs) keeps its node types in its config file and publishes none to the GCS;
    its node types state no memory, which it counts as none. The sweep finds the types, sizes its concurrency by
    them, reserves no memory, and its trials wait for the nodes."""
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")
    scaling = start_head(temp_dir, num_cpus=0, autoscaling=FAKE_AUTOSCALER)
    try:
        done = sweep(scaling, scaling.address, tmp_path / "res", teacher_dir,
                     *in_process("--num-samples", "2", "--name", "scaled"), timeout=600)
        # each trial's process (Tune's result log says which) and the node the GCS has its actor on
        pids = [json.loads(line)["pid"] for log in (tmp_path / "res" / "scaled" / "tune").glob("*/result.json")
                for line in log.read_text().splitlines()[:1]]
        nodes = subprocess.run([sys.executable, "-c", TRIAL_NODES, scaling.address, json.dumps(pids)],
                               env=scaling.env, capture_output=True, text=True, timeout=120)
        monitor = (Path(temp_dir) / "session_latest" / "logs" / "monitor.log").read_text()
    finally:
        stop_head(scaling)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(1 node, 0 CPUs)" in done.stdout
    assert "sweep scaled: 2 trial(s) of 1 epoch(s), 2 at once, " in done.stdout
    assert "sweep scaled: 2/2 trials recorded (2 ok, 0 stopped, 0 failed)" in done.stdout
    assert pd.read_parquet(tmp_path / "res" / "scaled" / TRIALS)["status"].tolist() == ["ok", "ok"]
    # the autoscaler's summary of each update names the nodes it asked for in it: both at once, or one and then
    # one, as the trials' demand arrives (and Ray's fake provider starts one node per request, so it asks again)
    added = re.findall(r"Adding (\d+) node\(s\) of type cpu_node\.", monitor)
    assert sum(map(int, added)) >= 1, [line for line in monitor.splitlines() if "cpu_node" in line]
    # both trials ran on such a node (1 CPU), not on the head (0 CPUs; Ray gives it the head's marker resource)
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    resources = json.loads(nodes.stdout.splitlines()[-1])
    assert len(pids) == 2 and len(resources) == 2, (pids, resources)
    assert all(r.get("CPU") == 1 and "node:__internal_head__" not in r for r in resources), resources


@pytest.mark.slow
def test_an_embedded_sweep_with_asha_stops_keeps_no_cleaners(ray_local, tmp_path, teacher_dir):
    """The embedded cluster has no dashboard, so Ray Train's cleaners never learn that a stopped trial's controller
    died: before the fix each stopped trial left one alive (3 here, ~110 MB each, plus the AutoscalingCoordinator)."""
    from ray._private.state import state

    from sweeps import hetero_pairs
    from uhkd.sweep.cli import options
    from uhkd.sweep.runner import run
    from uhkd.sweep.spec import domain

    args = hetero_pairs.parser().parse_args(["--results", str(tmp_path / "r"), "--teacher-dir", teacher_dir,
                                             "--pairs", PAIR, *SMALL, *LEAK_SWEEP, "--name", "leak"])
    opts = options(args)
    sweep = hetero_pairs.build(args, opts)
    sweep.space["optim.epochs"] = domain("optim.epochs", {"choice": [12]})
    outcome = run(sweep, opts, out=lambda line: None)
    assert [r["status"] for r in outcome.tables.trials.values()] == ["stopped"] * 3
    left = ["?"]
    deadline = time.monotonic() + 60
    while left and time.monotonic() < deadline:
        left = sorted(a["ActorClassName"] for a in state.actor_table(None, actor_state_name="ALIVE").values())
        time.sleep(1)
    assert left == []
