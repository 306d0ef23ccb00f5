"""`--cluster auto|local|ADDRESS`: attach to a Ray cluster or start an embedded one, and say which in one line.

`auto` looks at RAY_ADDRESS, then at the address `ray start --head` records on this machine (Ray's
`ray_current_cluster` file), and starts an embedded cluster when neither answers. Unlike `ray.init("auto")` it does
not attach to whatever Ray processes `ps` shows (other users' or tests' embedded clusters), and a stale
`ray_current_cluster` left by a stopped cluster is reported and skipped instead of tried.
"""
from __future__ import annotations

import logging
import os
import socket

import ray

from ..errors import UserError


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return host.strip("[]"), int(port)


def answers(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at `address` (cheap check before Ray's long connect retries)."""
    try:
        with socket.create_connection(_host_port(address), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def recorded_address() -> str:
    """The address `ray start --head` wrote on this machine ("" if none)."""
    from ray._private.utils import read_ray_address

    return read_ray_address() or ""


def _describe() -> str:
    res = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    gpus = f", {res['GPU']:g} GPUs" if res.get("GPU") else ""
    return f"{nodes} node{'s' * (nodes != 1)}, {res.get('CPU', 0):g} CPUs{gpus}"


def _init(address: str) -> None:
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot attach to the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None


def _start_local() -> None:
    # Ray's token authentication stays as Ray sets it (on by default for local clusters since 2.59; tests and CI
    # turn it off with RAY_AUTH_MODE=disabled), and a dashboard never listens beyond this machine
    ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False,
             logging_level=logging.WARNING)


def connect(cluster: str) -> str:
    """Connect this process to Ray as `cluster` says; returns the one line that says what happened."""
    explicit = cluster not in ("auto", "local")
    if explicit and not answers(cluster):
        raise UserError(f"no Ray cluster answers at {cluster}; start one there with `ray start --head` or use "
                        f"--cluster local")
    if ray.is_initialized():
        return f"ray: using this process's Ray instance ({_describe()})"
    if cluster == "local":
        _start_local()
        return f"ray: started an embedded local cluster ({_describe()})"
    if explicit:
        _init(cluster)
        return f"ray: attached to the cluster at {cluster} ({_describe()})"
    env = os.environ.get("RAY_ADDRESS", "")
    if env:
        if not answers(env):
            raise UserError(f"RAY_ADDRESS={env} does not answer; unset it or start that cluster")
        _init(env)
        return f"ray: attached to the cluster at RAY_ADDRESS={env} ({_describe()})"
    recorded = recorded_address()
    if recorded and answers(recorded):
        _init(recorded)
        return f"ray: attached to the cluster started with `ray start` at {recorded} ({_describe()})"
    _start_local()
    stale = f"; {recorded} (recorded by an earlier `ray start`) does not answer" if recorded else ""
    return f"ray: no running cluster found{stale}; started an embedded local one ({_describe()})"
