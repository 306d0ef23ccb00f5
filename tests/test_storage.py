"""Storage on any filesystem: locations (URI joins inside the path, AWS_ENDPOINT_URL, node caches), and sweeps on two
Ray nodes that share no disk, with every table, checkpoint, exported student and teacher on a real S3 server
(SeaweedFS). The S3 and two-node tests are slow (`-m slow`)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from uhkd.errors import UserError
from uhkd.models import create_stage_model, save_model_checkpoint
from uhkd.storage import cache_dir, copy, exists, join, local_file, location_of, open_location

ROOT = Path(__file__).resolve().parent.parent
PAIR = "convnext_tiny:resnet18"
SMALL = ["--set", "data.limit_train=192", "--set", "data.limit_eval=64", "--set", "data.batch_size=32",
         "--set", "optim.max_steps_per_epoch=4"]
ON_WORKER = ["--trial-resources", '{"worker_node": 1}']


def test_join_puts_parts_inside_the_uri_path_never_after_its_query():
    uri = "s3://bucket/res?endpoint_override=127.0.0.1:9000&allow_bucket_creation=true"
    assert join(uri, "sweep", "tune") == \
        "s3://bucket/res/sweep/tune?endpoint_override=127.0.0.1:9000&allow_bucket_creation=true"
    assert join("s3://bucket?scheme=http", "a/b") == "s3://bucket/a/b?scheme=http"
    assert join("gs://bucket/x/", "y") == "gs://bucket/x/y"
    assert join("~/res", "a") == str(Path("~/res").expanduser().resolve() / "a")
    assert location_of("/abs/sweep/student.pt", "/abs") == "/abs/sweep/student.pt"
    assert location_of("bucket/res/sw/t/student.pt", uri) == \
        "s3://bucket/res/sw/t/student.pt?endpoint_override=127.0.0.1:9000&allow_bucket_creation=true"


def test_local_locations(tmp_path):
    source = tmp_path / "a.pth"
    source.write_bytes(b"weights")
    copy(str(source), str(tmp_path / "teachers" / "b.pth"))
    assert (tmp_path / "teachers" / "b.pth").read_bytes() == b"weights" and exists(str(tmp_path / "teachers/b.pth"))
    assert local_file(str(source)) == str(source) and local_file("") == ""
    with pytest.raises(UserError, match="cannot open location 'nosuch://x'"):
        open_location("nosuch://x")


@pytest.mark.slow
def test_s3_locations_endpoint_from_the_environment_and_node_cache(s3_server, tmp_path, monkeypatch):
    uri = s3_server.uri("loc") + "&allow_bucket_creation=true"
    source = tmp_path / "t.pth"
    source.write_bytes(b"teacher bytes")
    copy(str(source), join(uri, "teachers", "t.pth"))
    assert s3_server.listing("loc") == ["teachers/t.pth"] and exists(join(uri, "teachers", "t.pth"))

    monkeypatch.setenv("UHKD_CACHE", str(tmp_path / "cache"))
    cached = local_file(join(uri, "teachers", "t.pth"))
    assert Path(cached).read_bytes() == b"teacher bytes" and Path(cached).is_relative_to(cache_dir())
    s3_server.filesystem().delete_file(f"{s3_server.bucket}/loc/teachers/t.pth")
    assert local_file(join(uri, "teachers", "t.pth")) == cached  # fetched once per node

    # a bare s3:// URI reaches the endpoint AWS_ENDPOINT_URL names (pyarrow itself ignores that variable)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_server.endpoint}")
    copy(str(source), f"s3://{s3_server.bucket}/env/t.pth")
    assert s3_server.listing("env") == ["t.pth"]


def _run(args: list[str], cluster, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=cluster.env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _read(server, key: str) -> pd.DataFrame:
    return pq.read_table(f"{server.bucket}/{key}", filesystem=server.filesystem()).to_pandas()


@pytest.mark.slow
def test_a_plugin_reaches_trials_on_a_node_that_cannot_see_its_file(two_nodes, s3_server, tmp_path):
    """`--plugin FILE` where FILE lies in a folder the second node sees as an empty tmpfs: its trials can only
    import the method because Ray ships the plugin to them (the job's runtime_env py_modules)."""
    work = two_nodes.hidden[0] / "plugin"
    work.mkdir()
    plugin = work / "my_method.py"
    shutil.copy(ROOT / "examples" / "my_method.py", plugin)
    model = create_stage_model("convnext_tiny", num_classes=10, img_size=32, scale="tiny")
    save_model_checkpoint(tmp_path / "convnext_tiny.pth", model)
    teachers, results = s3_server.uri("pl/teachers"), s3_server.uri("pl/results")
    copy(str(tmp_path / "convnext_tiny.pth"), join(teachers, "convnext_tiny.pth"))
    done = _run([str(ROOT / "sweeps" / "reproduce_tables.py"), "--cluster", two_nodes.address, "--plugin",
                 str(plugin), "--methods", "zkd", "--pairs", PAIR, "--seeds", "0", "--epochs", "1", "--results",
                 results, "--teacher-dir", teachers, "--name", "pl", *ON_WORKER, *SMALL], two_nodes, work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = _read(s3_server, "pl/results/pl/trials.parquet")
    assert trials[["method", "status"]].values.tolist() == [["zkd", "ok"]]


@pytest.mark.slow
def test_teachers_then_sweep_on_a_node_without_shared_disk_keep_everything_on_s3(two_nodes, s3_server):
    """sweeps/teachers.py trains a teacher on the second node (a 2-worker Ray Train trial) and installs it to S3;
    hetero_pairs then loads it from there (1-worker trials in their own processes). That node sees the driver's
    folder as an empty tmpfs, so every table, checkpoint, exported student and teacher must be on S3."""
    work = two_nodes.hidden[0] / "teachers_then_sweep"
    work.mkdir()
    results, teachers = s3_server.uri("ts/results"), s3_server.uri("ts/teachers")
    common = ["--cluster", two_nodes.address, "--results", results, "--teacher-dir", teachers, *ON_WORKER, *SMALL]
    trained = _run([str(ROOT / "sweeps" / "teachers.py"), "--models", "convnext_tiny", "--epochs", "1",
                    "--workers-per-trial", "2", "--cpus-per-worker", "0.45", "--name", "teachers", *common],
                   two_nodes, work)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert s3_server.listing("ts/teachers") == ["convnext_tiny.pth"]
    teacher_row = _read(s3_server, "ts/results/teachers/trials.parquet").iloc[0]
    assert (teacher_row["status"], teacher_row["workers"]) == ("ok", 2)
    assert teacher_row["student_checkpoint"].startswith(s3_server.uri("ts/results/teachers/train/").split("?")[0])

    swept = _run([str(ROOT / "sweeps" / "hetero_pairs.py"), "--pairs", PAIR, "--num-samples", "2", "--epochs", "2",
                  "--name", "hp", *common], two_nodes, work)
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    assert "teachers: training the missing" not in swept.stdout  # found on S3
    trials = _read(s3_server, "ts/results/hp/trials.parquet")
    epochs = _read(s3_server, "ts/results/hp/epochs.parquet")
    assert len(trials) == 2 and set(trials["status"]) <= {"ok", "stopped"} and (trials["status"] == "ok").any()
    assert (trials["model.teacher_checkpoint"] == join(teachers, "convnext_tiny.pth")).all()
    files = s3_server.listing("ts/results/hp")
    for row in trials.itertuples():
        assert epochs[epochs["trial_id"] == row.trial_id]["epoch"].tolist() == list(range(1, row.epochs_run + 1))
        assert any(f.startswith(f"tune/{row.trial_id}/checkpoint_") and f.endswith("/checkpoint.pt") for f in files)
        if row.status == "ok":  # the exported student, on S3, readable through its URI
            fs, path = open_location(row.student_checkpoint)
            with fs.open_input_stream(path) as f:
                assert len(f.readall()) > 1000
            student = create_stage_model("resnet18", num_classes=10, img_size=32, scale="tiny",
                                         checkpoint=local_file(row.student_checkpoint))
            assert sum(p.numel() for p in student.parameters()) == row.student_params
    assert not list(work.iterdir())  # nothing on the driver's disk either


@pytest.mark.slow
def test_interrupt_then_resume_on_s3_across_nodes(two_nodes, s3_server, tmp_path):
    """SIGINT once the first trial's row is on S3, then --resume: the sweep continues from the S3 state and
    checkpoints; each trial is recorded once with all its epochs."""
    work = two_nodes.hidden[0] / "resume"
    work.mkdir()
    model = create_stage_model("convnext_tiny", num_classes=10, img_size=32, scale="tiny")
    save_model_checkpoint(tmp_path / "convnext_tiny.pth", model)
    teachers, results = s3_server.uri("rs/teachers"), s3_server.uri("rs/results")
    copy(str(tmp_path / "convnext_tiny.pth"), join(teachers, "convnext_tiny.pth"))
    argv = [sys.executable, str(ROOT / "sweeps" / "hetero_pairs.py"), "--cluster", two_nodes.address,
            "--results", results, "--teacher-dir", teachers, "--pairs", PAIR, "--num-samples", "3", "--epochs", "3",
            "--max-concurrent", "1", "--name", "sw", *ON_WORKER, *SMALL]
    first = subprocess.Popen(argv, env=two_nodes.env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 400
    # a trial's row lands in its part file at once (trials.parquet itself is compacted when the sweep stops)
    while not any(f.endswith(".trials.parquet") for f in s3_server.listing("rs/results/sw/parts")) \
            and first.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    first.send_signal(signal.SIGINT)
    log, _ = first.communicate(timeout=180)
    assert first.returncode == 130, log[-3000:]
    before = _read(s3_server, "rs/results/sw/trials.parquet")
    assert 1 <= len(before) < 3

    second = _run([str(ROOT / "sweeps" / "hetero_pairs.py"), "--cluster", two_nodes.address, "--results", results,
                   "--resume", "--name", "sw"], two_nodes, work)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _read(s3_server, "rs/results/sw/trials.parquet")
    epochs = _read(s3_server, "rs/results/sw/epochs.parquet")
    assert len(after) == 3 and after["trial_id"].is_unique and not epochs.duplicated(["trial_id", "epoch"]).any()
    for row in before.itertuples():  # recorded before the interruption: not run again
        assert after.set_index("trial_id").loc[row.trial_id, "finished_at"] == row.finished_at
    fs = s3_server.filesystem()
    for row in after.itertuples():
        assert epochs[epochs["trial_id"] == row.trial_id]["epoch"].tolist() == list(range(1, row.epochs_run + 1))
        last = sorted(f for f in s3_server.listing(f"rs/results/sw/tune/{row.trial_id}") if f.endswith("metrics.jsonl"))
        with fs.open_input_stream(f"{s3_server.bucket}/rs/results/sw/tune/{row.trial_id}/{last[-1]}") as f:
            logged = [json.loads(line)["epoch"] for line in f.readall().decode().splitlines()]
        assert logged == list(range(1, row.epochs_run + 1))
