"""Sweeps as Slurm batch jobs (`sweeps/slurm.py`) on a real Slurm started here (`tests/slurmstack.py`: munged,
slurmctld and two slurmd nodes from the distribution's packages): a quick sweep through `ray symmetric-run`, and a
two-node sweep (manual Ray start, token authentication on) that Slurm's time limit ends mid-sweep, whose job
requeues itself and continues the sweep to the end, every trial exactly once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from testkit.realstack import processes_with_env
from slurmstack import missing, slurm

from testkit import faults
from uhkd.sweep.results import EPOCHS, TRIALS

ROOT = Path(__file__).resolve().parent.parent
PAIR = "convnext_tiny:resnet18"
TINY = ["--workers-per-trial", "0", "--set", "data.limit_eval=64", "--set", "data.batch_size=32"]

needs_slurm = pytest.mark.skipif(bool(missing()), reason=f"no {', '.join(missing())} here: apt-get install slurm-wlm "
                                                         f"munge (.ci/run does)")


def launch(tmp_path: Path, *argv: str) -> int:
    from sweeps import slurm as launcher

    return launcher.main(["--log-dir", str(tmp_path / "slurm"), *argv])


@pytest.mark.parametrize("argv, message", [
    ([], "give the sweep after --"),
    (["--", "sweeps/nope.py"], "unknown sweep script 'sweeps/nope.py'"),
    (["--", "sweeps/hetero_pairs.py", "--cluster", "local"], "--cluster is set by the Slurm job"),
    (["--", "sweeps/hetero_pairs.py", "--resume"], "--resume is set by the Slurm job"),
    (["--time", "4", "--", "sweeps/hetero_pairs.py"], "--signal-lead 300 s leaves the sweep no time within --time 4"),
    (["--time", "1:2:3:4", "--", "sweeps/hetero_pairs.py"], "--time '1:2:3:4' is no Slurm time limit"),
    (["--", "sweeps/hetero_pairs.py", "--pairs", "convnext_tiny:resnet99"], "resnet99"),
], ids=["no-sweep", "unknown-sweep", "cluster", "resume", "lead-longer-than-time", "bad-time", "bad-pair"])
def test_bad_input_is_one_line_and_submits_nothing(tmp_path, capsys, argv, message):
    results = ["--results", str(tmp_path / "results")] if len(argv) > 1 and argv[-1] != "sweeps/nope.py" else []
    assert launch(tmp_path, *argv, *results) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "results").exists()


def test_dry_run_writes_the_batch_script(tmp_path, capsys):
    assert launch(tmp_path, "--nodes", "2", "--ray", "manual", "--time", "2-00:00:00", "--gpus-per-node", "4",
                  "--dry-run", "--", "sweeps/hetero_pairs.py", "--pairs", PAIR, "--results", str(tmp_path / "r"),
                  "--name", "demo") == 0
    script = tmp_path / "slurm" / "demo.sbatch"
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --gpus-per-node=4", "RAY_MODE=manual"):
        assert line in text.splitlines(), line
    assert "--exclusive" not in text  # manual: nodes may be shared
    sweep = next(line for line in text.splitlines() if line.startswith("SWEEP=("))
    assert "--cluster auto" in sweep and sweep.endswith("--name demo)") and sweep.count("--name") == 1
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "not submitted: --dry-run" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=1) as running:
        yield running


@pytest.fixture
def work(tmp_path, cluster):
    """Results, teachers and the job's environment: Ray's token authentication on (the test session turns it
    off), its token created in a home folder of the test's own, Ray's per-job files in a short private folder."""
    job_tmp = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(cluster.env, HOME=str(tmp_path / "home"), UHKD_JOB_TMP=str(job_tmp), PYTHONPATH=str(ROOT))
    yield {"dir": tmp_path, "teachers": faults.make_teachers(tmp_path / "teachers"), "env": env}
    cluster.cancel_all()
    deadline = time.monotonic() + 60  # every process a job started (Ray's included) inherits UHKD_JOB_TMP
    while (left := processes_with_env(f"UHKD_JOB_TMP={job_tmp}")) and time.monotonic() < deadline:
        time.sleep(1)
    subprocess.run(["rm", "-rf", str(job_tmp)], check=False)
    assert not left, f"the job left processes running: {sorted(left.values())}"


def submit(work: dict, launcher: list[str], sweep: list[str]) -> str:
    """Run sweeps/slurm.py; returns the job id."""
    argv = [sys.executable, str(ROOT / "sweeps" / "slurm.py"), "--log-dir", str(work["dir"] / "slurm"), *launcher,
            "--", *sweep, "--results", str(work["dir"] / "results"), "--teacher-dir", work["teachers"]]
    done = subprocess.run(argv, env=work["env"], cwd=work["dir"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    job = re.search(r"^slurm: job (\d+) ", done.stdout, re.M)
    assert job, done.stdout
    return job.group(1)


def output(work: dict, job: str) -> str:
    found = list((work["dir"] / "slurm").glob(f"*-{job}.out"))
    return found[0].read_text(errors="replace") if found else ""


def once_each(results: Path, name: str, planned: int) -> dict:
    """The scenario's numbers: trials planned, rows in trials.parquet, trials lost (no row, or a row without all
    its epochs) and duplicated (rows or epoch rows beyond one per trial and epoch); epochs retrained (logged twice
    by a run: trained again after an interruption); and per trial the epochs its last checkpoint logged."""
    trials = pd.read_parquet(results / name / TRIALS)
    epochs = pd.read_parquet(results / name / EPOCHS)
    expected = dict(zip(trials["trial_id"], trials["epochs_run"]))
    per_trial = epochs.groupby("trial_id")["epoch"].apply(sorted).to_dict()
    lost = planned - trials["trial_id"].nunique() + sum(
        per_trial.get(t, []) != list(range(1, int(n) + 1)) for t, n in expected.items())
    duplicated = len(trials) - trials["trial_id"].nunique() + int(epochs.duplicated(["trial_id", "epoch"]).sum())
    checkpointed = {}
    for trial in trials["trial_id"]:
        last = sorted((results / name / "tune" / trial).glob("checkpoint_*"))[-1]
        checkpointed[trial] = [json.loads(line)["epoch"] for line in (last / "metrics.jsonl").read_text().splitlines()]
    retrained = sum(len(log) - len({m["epoch"] for m in log}) for log in faults.run_logs(results, name).values())
    return {"planned": planned, "rows": len(trials), "lost": lost, "duplicated": duplicated, "retrained": retrained,
            "status": trials["status"].tolist(), "checkpointed": checkpointed, "trials": trials}


def report(scenario: str, numbers: dict) -> None:
    print(f"\nslurm scenario | planned | rows | lost | duplicated | epochs retrained\n"
          f"{scenario} | {numbers['planned']} | {numbers['rows']} | {numbers['lost']} | {numbers['duplicated']} | "
          f"{numbers['retrained']}", file=sys.__stderr__)


@pytest.mark.slow
@needs_slurm
def test_quick_sweep_through_ray_symmetric_run(cluster, work):
    if not cluster.isolated:
        pytest.skip("ray symmetric-run refuses a machine where other Ray instances run, and its `ray stop` would end "
                    "them: this needs the PID namespace `unshare` is not allowed to make here")
    job = submit(work, ["--nodes", "1", "--time", "15"],
                    ["sweeps/hetero_pairs.py", "--pairs", PAIR, "--num-samples", "4", "--epochs", "3", *TINY,
                     "--set", "data.limit_train=192", "--set", "optim.max_steps_per_epoch=6", "--name", "quick"])
    info = cluster.wait(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"), 900)
    log = output(work, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "Running command on head node" in log and "slurm: sweep quick finished" in log
    numbers = once_each(work["dir"] / "results", "quick", planned=4)
    report("symmetric-run, 1 node: quick hetero_pairs", numbers)
    assert (numbers["rows"], numbers["lost"], numbers["duplicated"]) == (4, 0, 0)
    assert set(numbers["status"]) <= {"ok", "stopped"}


@pytest.mark.slow
@needs_slurm
def test_time_limit_ends_a_two_node_sweep_and_the_requeued_job_finishes_it(cluster, work):
    """`--time 3 --signal-lead 45`: Slurm sends USR1 to the batch shell about 2 minutes in, the driver saves, Ray
    stops, the job requeues itself. Once requeued, the test lengthens the pending job's time limit (as a user may
    with `scontrol update`) so that its second run finishes the sweep instead of another requeue cycle."""
    seeds, epochs = "0,1,2,3", 12  # ~2.5 min of training on 2 idle cores: more than the ~1.5 min before the signal
    job = submit(work, ["--nodes", "2", "--ray", "manual", "--time", "3", "--signal-lead", "45"],
                    ["sweeps/reproduce_tables.py", "--pairs", PAIR, "--methods", "kd,uhkd", "--seeds", seeds,
                     "--epochs", str(epochs), "--weights-from", "none", *TINY, "--set", "data.limit_train=3840",
                     "--set", "optim.max_steps_per_epoch=120", "--name", "grid"])
    requeued = cluster.wait(job, lambda i: int(i.get("Restarts", 0)) >= 1
                            or i.get("JobState") not in ("RUNNING", "PENDING"), 600)
    first = output(work, job)
    assert int(requeued.get("Restarts", 0)) == 1, f"{requeued.get('JobState')}: {first[-3000:]}"
    assert "the time limit is near: the sweep saves, then the job requeues" in first
    assert "slurm: requeueing job" in first
    # Ray had two nodes, and with one CPU per node two trials at once means both nodes ran trials
    assert "(2 nodes, 2 CPUs)" in first
    assert re.search(r"sweep grid: \d+ trial\(s\) of \d+ epoch\(s\), 2 at once,", first)
    assert "token authentication on" in first
    before = len(faults.rows(work["dir"] / "results", "grid"))
    epochs_before = sum(len(e) for e in faults.logged_epochs(work["dir"] / "results", "grid").values())
    assert epochs_before >= 1, "the first run ended before any epoch: nothing was interrupted mid-sweep"
    assert cluster.command("scontrol", "update", f"JobId={job}", "TimeLimit=20").returncode == 0
    info = cluster.wait(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"), 1200)
    log = output(work, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "slurm: continuing sweep grid" in log and "slurm: sweep grid finished" in log
    planned = 2 * len(seeds.split(","))
    numbers = once_each(work["dir"] / "results", "grid", planned)
    report(f"manual start, 2 nodes, token auth; time limit after {before} row(s) and {epochs_before} epoch(s), "
           f"requeued, finished", numbers)
    assert (numbers["rows"], numbers["lost"], numbers["duplicated"]) == (planned, 0, 0)
    assert numbers["status"] == ["ok"] * planned
    assert all(logged == list(range(1, epochs + 1)) for logged in numbers["checkpointed"].values()), \
        numbers["checkpointed"]
    assert not cluster.command("squeue", "-h").stdout.strip()
