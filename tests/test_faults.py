"""Faults, bad files and hostile input: nothing lost, one clear line. The fast checks run on their own; the
scenarios on real processes (`testkit/faults.py`; `benchmarks/faults.py` prints them as a table) are slow-marked."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from testkit import faults
from uhkd.data.cifar import read_cifar100
from uhkd.errors import UserError
from uhkd.models import create_stage_model, load_teacher, save_model_checkpoint
from uhkd.sweep import lock
from uhkd.sweep.results import SweepTables, epochs_schema, trials_schema
from uhkd.sweep.runner import disk_full, resume_flags
from uhkd.sweep.state import MANIFEST, STORED, read_manifest, read_stored
from uhkd.storage import CHECKPOINT, METRICS_LOG, PREVIOUS_CHECKPOINT

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
    folder = str(tmp_path / "sw")
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / MANIFEST).write_text('{"kind": "hetero_pa')
    with pytest.raises(UserError, match="cannot resume sweep 'sw': .*sweep.json is missing or corrupted") as err:
        read_manifest(folder, "sw")
    _one_line(err)
    (tmp_path / "sw" / MANIFEST).write_text('{"kind": "hetero_pairs"}')
    with pytest.raises(UserError, match="it lacks preset, planned"):
        read_manifest(folder, "sw")
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


HUGE = "9" * 23


@pytest.mark.parametrize("args, message", [
    (["--name", "n" * 300], "--name is at most 100 characters, got 300"),  # the lock file's ENAMETOOLONG
    (["--name", "n" * 5000], "--name is at most 100 characters, got 5000"),
    (["--seed", HUGE], f"--seed must be <= {2**32 - 1}, got {HUGE}"),  # numpy's seed range (the search)
    (["--seeds", HUGE], f"--seeds must be <= {2**32 - 1}, got {HUGE}"),  # a row's int64 column
    (["--epochs", HUGE], f"--epochs must be <= 100000, got {HUGE}"),
    (["--epochs", "2.5"], "error: argument --epochs: invalid int value: '2.5' (see --help)"),
    (["--cpus-per-worker", "1e-300"], "--cpus-per-worker must be >= 0.0001, got 1e-300"),  # Ray: 0 CPUs
    (["--trial-resources", '{"gpu_node": 1e-9}'], "number >= 0.0001"),
    (["--set", "data.limit_train=-1"], "data.limit_train must be >= 0, got -1"),  # would drop one image
])
def test_absurd_values_are_one_line_before_anything_starts(tmp_path, capsys, args, message):
    from sweeps import hetero_pairs

    argv = ["--results", str(tmp_path / "r"), "--teacher-dir", str(tmp_path / "t"), "--cluster", "local", *args]
    try:
        code = hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv)
    except SystemExit as end:  # argparse's own refusals
        code = end.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()  # nothing started


def test_a_teacher_that_weights_only_loading_refuses_fails_before_any_trial(tmp_path, capsys):
    """A whole torch zip file that pickles more than tensors: every trial's weights-only load would fail."""
    from sweeps import hetero_pairs

    (tmp_path / "t").mkdir()
    torch.save({"state_dict": argparse.Namespace(epoch=1)}, tmp_path / "t" / "convnext_tiny.pth")
    argv = ["--results", str(tmp_path / "r"), "--teacher-dir", str(tmp_path / "t"), "--cluster", "local",
            "--pairs", "convnext_tiny:resnet18"]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: teacher checkpoint '{tmp_path / 't' / 'convnext_tiny.pth'}' cannot be loaded "
                          f"with weights_only=True (it pickles argparse.Namespace)") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, problem", [
    ('"a string"', "it holds a JSON str, not an object"),
    ('{"kind": "hetero_pairs", "preset": "quick", "planned": "4", "concurrent": 1, "resources": {}}',
     "planned is '4', not a positive integer"),  # read only once every trial had run
    ('{"kind": "hetero_pairs", "preset": "quick", "planned": 4, "concurrent": 1, "resources": "cpu"}',
     'resources is "cpu", not an object of resource -> amount'),  # Tune's with_resources() error
    ('{"kind": "hetero_pairs", "preset": "quick", "planned": 4, "concurrent": true, "resources": {}}',
     "concurrent is True, not a positive integer"),
])
def test_every_field_of_sweep_json_is_checked_in_one_line(tmp_path, content, problem):
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / MANIFEST).write_text(content)
    with pytest.raises(UserError, match=f"{tmp_path / 'sw' / MANIFEST} is missing or corrupted") as err:
        read_manifest(str(tmp_path / "sw"), "sw")
    assert problem in _one_line(err)


def test_a_damaged_stored_sweep_is_one_line(tmp_path):
    (tmp_path / "sw").mkdir()
    assert read_stored(str(tmp_path / "sw"), "sw") is None  # a sweep started before sweep.pkl existed
    (tmp_path / "sw" / STORED).write_bytes(b"\x80\x05garbage")
    with pytest.raises(UserError, match=f"cannot resume sweep 'sw': {tmp_path / 'sw' / STORED} is corrupted") as err:
        read_stored(str(tmp_path / "sw"), "sw")
    _one_line(err)


def test_a_garbage_part_or_a_foreign_table_is_named_in_one_line_and_never_merged(tmp_path):
    tables = SweepTables(str(tmp_path), "sw")
    tables.write_trial({"trial_id": "t1", "status": "ok"}, [{"epoch": 1, "top1": 1.0}])
    parts = tmp_path / "sw" / "parts"
    (parts / "t2.trials.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=f"results table '{parts / 't2.trials.parquet'}' is unreadable") as err:
        SweepTables(str(tmp_path), "sw").load()
    assert "move it aside and run --resume" in _one_line(err)
    (parts / "t2.trials.parquet").unlink()
    SweepTables(str(tmp_path), "sw").compact()
    table = tmp_path / "sw" / "trials.parquet"
    pq.write_table(pa.table({"trial_id": ["x", None], "n": [1, 2]}), table)  # valid Parquet, not ours
    with pytest.raises(UserError, match=f"results table '{table}' is no uhkd trials table") as err:
        SweepTables(str(tmp_path), "sw").load()
    _one_line(err)
    table.unlink()
    # ours, but a column of another type: said which
    epochs = pa.Table.from_pylist([{"trial_id": "t1", "epoch": 1}], schema=epochs_schema()).set_column(
        epochs_schema().get_field_index("epoch"), "epoch", pa.array(["1"]))
    pq.write_table(epochs, tmp_path / "sw" / "epochs.parquet")
    with pytest.raises(UserError, match="does not hold the epochs schema .*epoch \\(string, not int64\\)"):
        SweepTables(str(tmp_path), "sw").load()


def test_a_table_of_an_earlier_schema_version_is_still_read(tmp_path):
    """Columns added since are missing from it (readers see nulls); its other columns are as they were."""
    schema = trials_schema()
    older = pa.schema([f for f in schema if f.name != "lr_used"], metadata={"uhkd.schema_version": "1"})
    (tmp_path / "sw").mkdir()
    pq.write_table(pa.Table.from_pylist([{"trial_id": "old", "status": "ok"}], schema=older),
                   tmp_path / "sw" / "trials.parquet")
    SweepTables(str(tmp_path), "sw").write_trial({"trial_id": "new", "status": "stopped", "lr_used": 0.1})
    rows = SweepTables(str(tmp_path), "sw").load().trials
    assert rows["old"]["lr_used"] is None and rows["new"]["lr_used"] == 0.1


def test_the_resume_hint_quotes_what_a_shell_would_split():
    flags = resume_flags("s", "/data/my results")
    assert flags == "--resume --name s --results '/data/my results'"
    assert shlex.split(flags)[-1] == "/data/my results"


def test_tunes_state_cut_off_mid_write_is_set_aside_and_the_newest_whole_one_restored(tmp_path):
    """Two runs of a sweep saved Tune's state; the second was killed while its state was copied (cut-off JSON). Its
    four files are set aside, so that Tune's own lookups (newest by name) pick the first run's state and search
    state; a whole newest state is left alone; a cut-off pickle or an empty file is set aside as well."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.utils.util import _load_newest_checkpoint

    from uhkd.sweep.state import set_aside_torn_state

    tune_dir = tmp_path / "sw" / "tune"
    tune_dir.mkdir(parents=True)
    runs = {"2026-01-01_10-00-00": '{"trial_data": []}', "2026-01-01_11-00-00": '{"trial_data": [[{"tri'}
    for session, state in runs.items():
        (tune_dir / f"experiment_state-{session}.json").write_text(state)
        (tune_dir / f"search_gen_state-{session}.json").write_text("{}")
        (tune_dir / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"run": session}))
        (tune_dir / f"callback-states-{session}.pkl").write_bytes(pickle.dumps([]))
    assert set_aside_torn_state(str(tmp_path / "sw")) == ["2026-01-01_11-00-00"]
    assert sorted(p.name for p in tune_dir.glob("*.torn")) == [
        "callback-states-2026-01-01_11-00-00.pkl.torn", "experiment_state-2026-01-01_11-00-00.json.torn",
        "search_gen_state-2026-01-01_11-00-00.json.torn", "searcher-state-2026-01-01_11-00-00.pkl.torn"]
    assert Path(_find_newest_experiment_checkpoint(str(tune_dir))).name == "experiment_state-2026-01-01_10-00-00.json"
    assert _load_newest_checkpoint(str(tune_dir), "searcher-state-*.pkl") == {"run": "2026-01-01_10-00-00"}
    assert set_aside_torn_state(str(tmp_path / "sw")) == []  # the newest is whole now
    # a third run whose experiment state is whole but whose search state (a pickle) was cut off
    (tune_dir / "experiment_state-2026-01-01_12-00-00.json").write_text('{"trial_data": []}')
    (tune_dir / "searcher-state-2026-01-01_12-00-00.pkl").write_bytes(pickle.dumps({"run": "12"})[:-3])
    assert set_aside_torn_state(str(tmp_path / "sw")) == ["2026-01-01_12-00-00"]
    assert _load_newest_checkpoint(str(tune_dir), "searcher-state-*.pkl") == {"run": "2026-01-01_10-00-00"}
    (tune_dir / "experiment_state-2026-01-01_10-00-00.json").write_text("")  # killed before it wrote a byte
    assert set_aside_torn_state(str(tmp_path / "sw")) == ["2026-01-01_10-00-00"]
    assert _find_newest_experiment_checkpoint(str(tune_dir)) is None


def test_a_resumed_trial_takes_the_checkpoint_of_its_latest_epoch(tmp_path):
    """Tune names a restored trial's checkpoints from the count its saved state had: after an interruption, an
    older name may hold a later epoch, and a damaged log sorts last."""
    import pyarrow.fs as pafs

    from uhkd.train import latest_first

    for name, epochs in (("checkpoint_000000", [1, 2, 3]), ("checkpoint_000001", [1, 2]),
                         ("checkpoint_000002", None)):
        (tmp_path / name).mkdir()
        log = "".join(json.dumps({"epoch": e, "loss": 1.0}) + "\n" for e in epochs) if epochs else "{"
        (tmp_path / name / METRICS_LOG).write_text(log)
    folders = [str(tmp_path / f"checkpoint_00000{i}") for i in (2, 1, 0)]
    assert [Path(f).name for f in latest_first(pafs.LocalFileSystem(), folders)] == \
        ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]


def test_a_cluster_that_stops_answering_is_said_lost_and_one_that_answers_is_not():
    """The driver's watch (`uhkd.sweep.cluster.watch`) on a listening socket: nothing while it answers; once it is
    closed, `lost` is called with its address (the slow head_lost scenario kills a real head)."""
    import socket
    import threading

    from uhkd.sweep.cluster import watch

    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    said, done = [], threading.Event()
    stop = watch(lambda where, seconds: (said.append((where, seconds)), done.set()), after=1.0, address=address)
    try:
        assert not done.wait(3.5)  # answering: never lost
        server.close()
        assert done.wait(60) and said == [(address, 1.0)]
    finally:
        stop()
        server.close()


EMBEDDED_CLUSTER = """
import json, ray
from ray._private import ray_constants, worker
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from testkit.realstack import listening_hosts
from uhkd.sweep.cluster import connect
print(connect('local'))
print('token auth', is_token_auth_enabled())
where = ray.experimental.internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                                      namespace=ray_constants.KV_NAMESPACE_DASHBOARD).decode()
print(json.dumps({'address': where, 'url': worker.get_dashboard_url(),
                  'listening': listening_hosts(int(where.rsplit(':', 1)[1]))}))
"""


@pytest.mark.slow
def test_embedded_cluster_keeps_token_auth_and_a_local_dashboard(tmp_path):
    """The toolkit never turns Ray's token authentication off itself (tests and CI do, by RAY_AUTH_MODE), and the
    embedded cluster's dashboard serves nothing beyond this machine."""
    ray_tmp = faults.tempfile.mkdtemp(prefix="ra", dir="/tmp")
    env = {k: v for k, v in faults.env(ray_tmp).items() if k != "RAY_AUTH_MODE"}
    try:
        done = subprocess.run([sys.executable, "-c", EMBEDDED_CLUSTER], capture_output=True, text=True,
                              timeout=180, env={**env, "HOME": str(tmp_path)})
    finally:
        faults.shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "token auth True" in done.stdout
    # said in the toolkit's line, not by Ray's own warning on the console
    assert "started an embedded local cluster (1 node, " in done.stdout and ", token authentication on)" in done.stdout
    assert "Token authentication" not in done.stderr
    # where the dashboard's head process binds its web server (the node's IP for any host but a loopback one), the
    # URL Ray reports for it ("" while the web server is off), and what listens on that port
    dashboard = json.loads(done.stdout.splitlines()[-1])
    assert dashboard["address"].startswith("127.0.0.1:"), dashboard
    assert dashboard["url"] in ("", dashboard["address"]), dashboard
    assert all(ipaddress.ip_address(host).is_loopback for host in dashboard["listening"]), dashboard


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
    "early_kill": "sweep sw: stopped before Tune saved any state; starting its search afresh with its stored settings",
    "group_sigterm": "interrupted: continue with python sweeps/hetero_pairs.py --resume --name sw --results ",
    "head_lost": "error: the Ray cluster at ",
    "bad_input": "error: --name is at most 100 characters, got 300",
    "torn_state": "sweep sw: Tune's state of run(s) ",
}
RESUMED = "then --resume exit 0"
EXPECT_OUTCOME = {  # scenario -> exit codes as `Outcome.outcome` words them
    "driver_sigkill": ["exit -9 (", RESUMED], "driver_sigterm": ["exit 130 (", RESUMED],
    "worker_sigkill": ["1 killed; exit 0"], "node_lost": ["exit 0"],
    "disk_full": ["exit 2, ", "--resume exit 0"], "two_sweeps": ["exit 0 and 0; same name: exit 2"],
    "two_resumes": ["second exit 2; exit 130 (", RESUMED], "teacher_checkpoint": ["exit 2 before any trial"],
    "trial_checkpoint": ["exit 130 (", RESUMED], "trials_parquet": ["exit 2, moved aside", RESUMED],
    "sweep_json": ["exit 2, restored", RESUMED], "cifar_archive": ["exit 2 and 2; nothing ran"],
    "nan_storm": ["exit 0; 2 failed, 2 listed with reasons"], "ray_job": ["stopped: hint printed; resubmitted: exit 0"],
    "early_kill": ["exit -9 (", RESUMED], "epoch_kill": ["exit -9 (", RESUMED], "stopped_kill": ["exit -9 (", RESUMED],
    "torn_state": ["exit -9 (", RESUMED],
    "moved": ["exit 130 (", RESUMED, "old place untouched"],
    "group_sigterm": ["exit 130 (", RESUMED, "0 part file(s) left uncompacted"],
    "head_lost": ["exit 130 (", RESUMED], "bad_input": ["14/14 refused in one line, 0 started", "exit 130 (", RESUMED],
}
# bad_input: the file each damaged-file refusal names, or the value a flag refusal names
BAD_INPUT_LINES = ["--name is at most 100 characters, got 5000", "--seed must be <= 4294967295",
                   "--seeds must be <= 4294967295", "--epochs must be <= 100000", "invalid int value: '2.5'",
                   "--cpus-per-worker must be >= 0.0001, got 1e-300", "data.limit_train must be >= 0, got -1",
                   "cannot be loaded with weights_only=True", "garbage.trials.parquet' is unreadable",
                   "trials.parquet' is no uhkd trials table", "it holds a JSON str, not an object",
                   "planned is '3', not a positive integer", "resources is \"cpu\", not an object"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", faults.SCENARIOS)
def test_fault_scenario(scenario, tmp_path):
    if scenario == "disk_full" and subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                                                  capture_output=True).returncode:
        pytest.skip("needs unshare (user and mount namespaces) for a private tmpfs")
    result = faults.run_scenario(scenario, tmp_path)
    assert not result.outcome.startswith("could not run"), result.outcome
    assert (result.lost, result.duplicated) == (0, 0), result
    assert result.retrained <= (scenario == "trial_checkpoint"), result  # the fallback: one epoch
    # runs replaced by new trials: after a cut-off Tune state, those running at the kill; after another kill, one
    # begun within Tune's state-saving period (2 s) before it, at most 2 of these ~1 s epochs
    assert result.abandoned >= 1 if scenario == "torn_state" else result.abandoned <= 2, result
    assert not any("Traceback" in line for line in result.lines), result.lines
    assert all(line.count("\n") == 0 for line in result.lines)
    for expected in [*([EXPECT_LINES[scenario]] if scenario in EXPECT_LINES else []),
                     *(BAD_INPUT_LINES if scenario == "bad_input" else [])]:
        assert any(expected in line for line in result.lines), (expected, result.lines)
    if scenario not in ("teacher_checkpoint", "cifar_archive"):
        assert result.written == result.planned, result
    for part in EXPECT_OUTCOME[scenario]:
        assert part in result.outcome, result
