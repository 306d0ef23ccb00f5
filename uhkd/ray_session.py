"""This process's own Ray session, for a single run (`uhkd.train`) and for the sweeps alike: an embedded local
cluster, the runtime environment of the jobs this process submits (the settings Ray's workers read and the user's
plugins), and Ray's log records sent to a file instead of the console."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import ray

from . import plugins
from .ray_internals import own_session, quiet_token_notice

WORKER_ENV = ("RAY_TRAIN_", "TUNE_", "HF_HUB_OFFLINE")  # settings the trials and their Train runs read


def job_env() -> dict:
    """This process's settings for Ray's workers, as the job's runtime environment: workers of a cluster started
    elsewhere inherit that cluster's environment, not this process's; the user's plugins go with it (`py_modules`),
    so trials on any node import them."""
    env: dict = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV)}}
    if plugins.modules():
        env["py_modules"] = plugins.modules()
    return env


def start_local(num_cpus: int | None = None) -> str:
    """Start an embedded cluster (this machine's CPUs unless `num_cpus`); returns whether it asks its clients
    for a token."""
    # Ray's token authentication stays as Ray sets it (on by default for local clusters since 2.59; tests and CI
    # turn it off with RAY_AUTH_MODE=disabled), and a dashboard never listens beyond this machine. Ray's console
    # warning that the token is on is said in the toolkit's own line instead.
    quiet_token_notice()
    # its processes in a session of their own: a signal to this driver's process group (Slurm's scancel and time
    # limits, `timeout`, Kubernetes) reaches the driver alone, which stops the sweep cleanly
    with own_session():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=False, logging_level=logging.WARNING, runtime_env=job_env())
    token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"  # what ray.init settled on
    return "token authentication on" if token else "token authentication off (RAY_AUTH_MODE)"


def ray_messages_to_file() -> str:
    """Send this process's Ray log records (Tune's controller, Train's, the core worker's) to a file in the Ray
    session's logs folder instead of the console, where only the toolkit's lines belong. Returns the file."""
    folder = Path(tempfile.gettempdir())  # a Ray Client driver's session is on the cluster
    if not ray.util.client.ray.is_connected():
        context = ray.get_runtime_context()
        folder = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    path = folder / f"uhkd-driver-{os.getpid()}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    ray_logger = logging.getLogger("ray")
    for old in [h for h in ray_logger.handlers if isinstance(h, logging.StreamHandler)]:
        ray_logger.removeHandler(old)
        if isinstance(old, logging.FileHandler):
            old.close()
    ray_logger.addHandler(handler)
    return str(path)
