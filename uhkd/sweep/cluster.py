"""`--cluster auto|local|ADDRESS`: attach to a Ray cluster or start an embedded one, and say which in one line.

`auto` looks at RAY_ADDRESS (`RAY_ADDRESS=auto` means this same search), then at the address `ray start --head`
records on this machine (Ray's `ray_current_cluster` file, in the default temp folder or, for clusters started with
`ray start --temp-dir`, in the temp folder of each running GCS server), and starts an embedded cluster when none
answers. Unlike `ray.init("auto")` it does not attach to whatever Ray processes `ps` shows (other users' or tests'
embedded clusters write no `ray_current_cluster`), and a stale file left by a stopped cluster is reported and
skipped instead of tried.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import ray

from ..errors import UserError
from ..ray_internals import autoscaler_config_file, client_address, cluster_node_groups, gcs_temp_dirs, recorded_address
from ..ray_session import job_env, ray_messages_to_file, start_local


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


def started_elsewhere() -> list[str]:
    """Addresses recorded by `ray start` in the temp folders of the GCS servers running here (`--temp-dir`)."""
    found = set()
    for temp_dir in gcs_temp_dirs():
        try:
            found.add((temp_dir / "ray_current_cluster").read_text().strip())
        except OSError:
            pass
    return sorted(a for a in found if a and answers(a))


def _describe() -> str:
    res = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    gpus = f", {res['GPU']:g} GPUs" if res.get("GPU") else ""
    return f"{nodes} node{'s' * (nodes != 1)}, {res.get('CPU', 0):g} CPUs{gpus}"


CLIENT_SPAWN_TRIES = 5
# how a session's server that crashed as it started shows (the last: found dead, as a zombie, by the proxy)
CLIENT_SPAWN_FAILURES = ("Starting Ray client server failed", "Proxy failed to Connect to backend", "ZombieProcess")


def _init(address: str) -> None:
    for attempt in range(1, CLIENT_SPAWN_TRIES + 1):
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env=job_env())
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            reason = _reason(exc)
            # The Ray Client proxy forks each session's server from a multi-threaded gRPC process, and a few
            # percent of those children crash as they start (ray-project/ray#63202), most often on a head that has
            # just started; a new session a moment later usually starts
            if not any(f in reason for f in CLIENT_SPAWN_FAILURES) or attempt == CLIENT_SPAWN_TRIES:
                raise UserError(f"cannot attach to the Ray cluster at {address}: {reason}") from None
            ray.shutdown()
            print(f"ray: the cluster's Ray Client server could not start a session (ray-project/ray#63202); "
                  f"trying again ({attempt + 1}/{CLIENT_SPAWN_TRIES})", flush=True)
            time.sleep(2 ** (attempt - 1))


def _reason(exc: Exception) -> str:
    """One line of Ray's message: a Ray Client server's refusal ends its first line with ':' and carries the
    server's traceback below it, whose last line says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


LOST_AFTER_S = 10.0  # a cluster that does not answer this long is lost (a GCS restart takes longer only with HA)


def watch(lost: Callable[[str, float], None], after: float = LOST_AFTER_S, address: str = "") -> Callable[[], None]:
    """Check once a second, in a daemon thread, that the cluster this process uses (or `address`) still answers
    (its GCS, or under Ray Client its client server); after `after` seconds without an answer (its head node lost,
    an embedded cluster's processes killed) call `lost(address, after)` in that thread. Returns the function that
    stops watching. Ray's own core worker waits 60 s for a lost GCS, then ends the process with a line of its own."""
    address = address or _current_address()
    stopped = threading.Event()

    def poll() -> None:
        last = time.monotonic()
        while not stopped.wait(1.0):
            if answers(address, timeout=1.0):
                last = time.monotonic()
            elif time.monotonic() - last >= after and not stopped.is_set():
                lost(address, after)
                return

    threading.Thread(target=poll, name="uhkd-cluster-watch", daemon=True).start()
    return stopped.set


def _current_address() -> str:
    return client_address() if ray.util.client.ray.is_connected() else ray.get_runtime_context().gcs_address


def connect(cluster: str) -> str:
    """Connect this process to Ray as `cluster` says; returns the one line that says what happened (and where
    Ray's own messages went)."""
    line = _connect(cluster)
    return f"{line}; Ray's own messages: {ray_messages_to_file()}"


def _connect(cluster: str) -> str:
    explicit = cluster not in ("auto", "local")
    if explicit and not answers(cluster):
        raise UserError(f"no Ray cluster answers at {cluster}; start one there with `ray start --head` or use "
                        f"--cluster local")
    if ray.is_initialized():
        current = _current_address()
        if not explicit or (current and _host_port(current) == _host_port(cluster)):
            return f"ray: using this process's Ray instance ({_describe()})"
        ray.shutdown()  # an explicit address wins over the instance this process had
        _init(cluster)
        return f"ray: left this process's Ray instance at {current}; attached to {cluster} ({_describe()})"
    if cluster == "local":
        auth = start_local()
        return f"ray: started an embedded local cluster ({_describe()}, {auth})"
    if explicit:
        _init(cluster)
        return f"ray: attached to the cluster at {cluster} ({_describe()})"
    address, found = _auto()
    if address:
        _init(address)
        return f"ray: attached to {found} ({_describe()})"
    auth = start_local()
    return f"ray: no running cluster found{found}; started an embedded local one ({_describe()}, {auth})"


def _auto() -> tuple[str, str]:
    """(address, how it was found) of the cluster `--cluster auto` attaches to, or ("", why none answered) when
    it starts an embedded one."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        if not answers(env):
            raise UserError(f"RAY_ADDRESS={env} does not answer; unset it or start that cluster")
        return env, f"the cluster at RAY_ADDRESS={env}"
    recorded = recorded_address()
    if recorded and answers(recorded):
        return recorded, f"the cluster started with `ray start` at {recorded}"
    elsewhere = started_elsewhere()
    if len(elsewhere) > 1:
        raise UserError(f"several clusters started with `ray start` run here ({', '.join(elsewhere)}); choose one "
                        f"with --cluster ADDRESS")
    if elsewhere:
        return elsewhere[0], f"the cluster started with `ray start --temp-dir` at {elsewhere[0]}"
    return "", f"; {recorded} (recorded by an earlier `ray start`) does not answer" if recorded else ""


def trains_here(cluster: str) -> bool:
    """Whether the trials of `--cluster` run on this machine alone, so that what they read there (the dataset) can
    be checked here before any trial: `local`, `auto` where it starts an embedded cluster, or the Ray instance
    this process already holds (which both use) when each of its nodes is this machine."""
    if cluster not in ("auto", "local"):
        return False
    if ray.is_initialized():
        if ray.util.client.ray.is_connected():
            return False
        here = ray.util.get_node_ip_address()
        return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n.get("Alive"))
    return cluster == "local" or not _auto()[0]


def scalable_nodes(limit: int = 256) -> list[dict[str, float]] | None:
    """The nodes an autoscaling cluster may have (its node types x their maximum counts, the head's type once
    more), None on a fixed cluster. Autoscaler v2 and KubeRay publish their node types in the GCS; v1, what
    `ray up` runs, keeps them in the config file its monitor reads on the head node."""
    if ray.util.client.ray.is_connected():  # the cluster's state is read on the cluster
        return ray.get(ray.remote(num_cpus=0)(scalable_nodes).remote(limit))
    types = [(shape, count) for shape, count in cluster_node_groups() if count and shape] or \
        _on_head_node(monitor_node_types)
    if not types:
        return None
    return [shape for shape, count in types for _ in range(limit if count < 0 else min(count, limit))]


def monitor_node_types() -> list[tuple[dict[str, float], int]]:
    """Autoscaler v1's node types: (resources, how many such nodes there may be) from the config file of this
    cluster's monitor process, run on this node; [] without one. Types whose resources the file leaves to the
    cloud provider to fill in are left out."""
    import yaml

    path = autoscaler_config_file(ray.get_runtime_context().gcs_address)
    if path is None:
        return []
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    cap = int(config.get("max_workers", 2**31))
    head = config.get("head_node_type")
    types = (config.get("available_node_types") or {}).items()
    return [({k: float(v) for k, v in t["resources"].items()},
             min(int(t.get("max_workers", cap)), cap) + (n == head)) for n, t in types if t.get("resources")]


def _on_head_node(fn: Callable[[], list]) -> list:
    """`fn()` run on the cluster's head node ([] when no head is known)."""
    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n["Resources"]),
                None)
    if head is None:
        return []
    if ray.get_runtime_context().get_node_id() == head:
        return fn()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.get(ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))(fn)
                   .remote())
