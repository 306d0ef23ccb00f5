"""Shared test setup: offline, quiet Ray defaults, and one local Ray cluster per test session (`ray_local`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}.items():
    os.environ.setdefault(_key, _value)

# The example plugin is a registered method here as well: the registry's contracts (tests/test_methods.py,
# tests/test_learning.py) check a user's method exactly as they check the built-in ones.
from uhkd.plugins import load  # noqa: E402

load([str(Path(__file__).resolve().parents[1] / "examples" / "my_method.py")])


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with 2 CPUs for the whole session (started on first use); after it stops, no process of
    it is left on the machine (`testkit.realstack.kill_left_behind`, which says what it had to kill)."""
    import ray
    from testkit.realstack import kill_left_behind

    from uhkd.ray_session import job_env

    # job_env: the example plugin loaded above goes to the workers (py_modules), as a sweep's own cluster ships it
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=job_env())
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    yield ray
    ray.shutdown()
    for command in kill_left_behind(raylet):
        print(f"ray_local: killed a process the stopped session left behind: {command}", file=sys.__stderr__)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on free local ports for the session (`testkit/realstack.py`: `S3Server` with `endpoint`,
    `access_key`, `secret_key`, `bucket`, `uri(path)`, `env`, `filesystem()`, `listing(path)`). Its credentials are
    put into this process's environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), which Ray nodes started
    afterwards inherit."""
    from testkit.realstack import s3

    with s3(tmp_path_factory.mktemp("s3")) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_server):
    """A `ray start --head` node plus a second node that shares no disk with it (`testkit/realstack.py`:
    `TwoNodes` with `address`, `env`, `hidden`). The second node sees `hidden[0]` (a fresh folder: put results,
    teachers and runs there) as an empty tmpfs and alone holds the custom resource `worker_node`, so trials that
    request `{"worker_node": 1}` run there. Both nodes have the S3 credentials."""
    from testkit.realstack import two_nodes as start

    with start([tmp_path_factory.mktemp("work")], env=s3_server.env) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """Random-init tiny teacher checkpoints for the test pairs (teacher quality does not matter here)."""
    from uhkd.models import create_stage_model, save_model_checkpoint

    folder = tmp_path_factory.mktemp("teachers")
    save_model_checkpoint(folder / "convnext_tiny.pth",
                          create_stage_model("convnext_tiny", num_classes=10, img_size=32, scale="tiny"))
    return str(folder)
