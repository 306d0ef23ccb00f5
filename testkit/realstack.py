"""Real infrastructure for the slow tests: a SeaweedFS S3 server and a two-node Ray cluster whose nodes share no
disk. `tests/conftest.py` wraps them as the `s3_server` and `two_nodes` fixtures; tests that need other settings
use the context managers directly.

    with s3(tmp) as server:            # server.uri("res") -> "s3://uhkd/res?endpoint_override=...&scheme=http"
        ...
    with two_nodes(tmp, hidden=[tmp / "work"]) as cluster:   # cluster.address -> "127.0.0.1:PORT"
        ...   # trials that ask for {"worker_node": 1} run on the second node, which sees `hidden` as empty tmpfs
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

BIN = Path(sys.executable).parent
WORKER_RESOURCE = "worker_node"  # only the second node has it: trials asking for it run there


_handed_out: set[int] = set()


def free_ports(n: int) -> list[int]:
    """`n` local ports nothing listens on, none handed out before by this process: the kernel may give a port
    just closed again, and a Ray node given one port for two of its components aborts."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            ports.append(port)
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def listening_hosts(port: int) -> list[str]:
    """The addresses TCP sockets on this machine listen on at `port` (Linux's /proc/net tables)."""
    hosts = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path("/proc/net", table).read_text().splitlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                state = fields[3]
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    # the kernel prints the address as 32-bit words in host (little-endian) byte order
                    words = [bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8)]
                    hosts.append(str(ipaddress.ip_address(b"".join(words))))
    return hosts


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process group we started (the server or `ray start --block` and its children), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def processes_with_env(entry: str) -> dict[int, str]:
    """pid -> command line of this machine's processes whose environment holds `entry` ("NAME=value")."""
    found = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return found


def kill_left_behind(raylet_pid: int, wait_s: float = 10) -> list[str]:
    """SIGKILL what a stopped Ray session's workers left running after `wait_s` (seen once in CI: a Ray Train
    controller whose core worker had shut down but whose process never exited, 1.1 GB, orphaned). Every Ray worker
    inherits RAY_RAYLET_PID from its raylet. Returns the command lines of the processes killed."""
    deadline = time.monotonic() + wait_s
    while (left := processes_with_env(f"RAY_RAYLET_PID={raylet_pid}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(left.values())


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint with one identity and one bucket name (created on first write)."""

    endpoint: str  # "127.0.0.1:PORT"
    access_key: str
    secret_key: str
    bucket: str
    log: Path

    def uri(self, path: str = "") -> str:
        """A pyarrow URI of `path` in the bucket, endpoint and scheme in its query string."""
        key = f"/{path.strip('/')}" if path.strip("/") else ""
        return f"s3://{self.bucket}{key}?endpoint_override={self.endpoint}&scheme=http"

    @property
    def env(self) -> dict[str, str]:
        """The credentials as the AWS environment variables (what every process that opens the URIs needs)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", access_key=self.access_key,
                                 secret_key=self.secret_key, allow_bucket_creation=True)

    def listing(self, path: str = "") -> list[str]:
        """Every file under `bucket/path`, relative to it."""
        import pyarrow.fs as pafs

        root = f"{self.bucket}/{path.strip('/')}".rstrip("/")
        infos = self.filesystem().get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


@contextlib.contextmanager
def s3(folder: Path, bucket: str = "uhkd", start_timeout: float = 90) -> Iterator[S3Server]:
    """Start `weed server` with S3 on free local ports (every port given, so nothing binds a default one)."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    access, secret = "uhkdtest", "uhkdtestsecret"
    identities = {"identities": [{"name": "tests", "credentials": [{"accessKey": access, "secretKey": secret}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (folder / "s3.json").write_text(json.dumps(identities))
    names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc"]
    ports = {**dict(zip(names, free_ports(len(names)))), "s3.port.iceberg": 0, "s3.port.lance": 0}
    s3_port = ports["s3.port"]
    cmd = [str(shutil.which("weed", path=str(BIN)) or "weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-dir={folder / 'data'}", "-s3", f"-s3.config={folder / 's3.json'}", "-master.telemetry=false",
           "-master.volumeSizeLimitMB=64", "-volume.max=8", *(f"-{k}={v}" for k, v in ports.items())]
    log = folder / "weed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"127.0.0.1:{s3_port}", access, secret, bucket, log)
    try:
        _wait_s3(server, proc, start_timeout)
        yield server
    finally:
        _stop(proc)


def _wait_s3(server: S3Server, proc: subprocess.Popen, timeout: float) -> None:
    """Until a small object round-trips. Each probe runs in a subprocess with its own timeout: a pyarrow S3 call to
    a server that is not up yet retries for minutes."""
    probe = (f"fs = __import__('pyarrow.fs', fromlist=['fs']).S3FileSystem(endpoint_override={server.endpoint!r}, "
             f"scheme='http', access_key={server.access_key!r}, secret_key={server.secret_key!r}, "
             f"allow_bucket_creation=True, connect_timeout=2, request_timeout=5)\n"
             f"fs.create_dir({server.bucket!r})\n"
             f"with fs.open_output_stream('{server.bucket}/.probe') as f: f.write(b'ok')\n"
             f"assert fs.open_input_stream('{server.bucket}/.probe').read() == b'ok'\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited ({proc.returncode}): {server.log.read_text()[-2000:]}")
        if answers(int(server.endpoint.rsplit(":", 1)[1])):
            try:
                if subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=20).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
        time.sleep(1)
    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f}s: {server.log.read_text()[-2000:]}")


@dataclass
class TwoNodes:
    """A `ray start --head` node (no worker resource) and a second node in its own mount namespace."""

    address: str  # "127.0.0.1:PORT" of the head
    temp_dir: Path  # RAY_TMPDIR of the processes that attach (holds the head's ray_current_cluster)
    hidden: list[Path]  # folders the second node sees as empty private tmpfs mounts
    env: dict[str, str]  # environment for processes that attach (RAY_ADDRESS unset, RAY_TMPDIR set)
    logs: list[Path] = field(default_factory=list)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(p.read_text(errors="replace")[-chars:] for p in self.logs if p.exists())


def _ray_start(args: Sequence[str]) -> list[str]:
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port"]
    ports = dict(zip(names, free_ports(len(names))))
    return [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
            *(f"--{k}={v}" for k, v in ports.items()), *args]


@contextlib.contextmanager
def two_nodes(hidden: Sequence[Path], head_cpus: int = 1, worker_cpus: int = 2, timeout: float = 120,
              env: dict[str, str] | None = None) -> Iterator[TwoNodes]:
    """Head node + a worker node that sees each folder of `hidden` as an empty tmpfs (so it shares no results,
    teachers or runs folder with the driver) and holds the custom resource `worker_node` (10 units). `env` is
    added to both nodes' environment (e.g. S3 credentials, which trials inherit)."""
    hidden = [Path(h).resolve() for h in hidden]
    for h in hidden:
        h.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base.update({"RAY_TMPDIR": str(temp), "PYTHONUNBUFFERED": "1", **(env or {})})
    port = free_port()
    procs: list[subprocess.Popen] = []
    cluster = TwoNodes(f"127.0.0.1:{port}", temp, hidden, base)
    try:
        head = _ray_start(["--head", f"--port={port}", f"--num-cpus={head_cpus}", "--include-dashboard=false",
                           f"--ray-client-server-port={free_port()}", f"--temp-dir={temp / 'h'}"])
        _start_node(head, "head", cluster, procs, timeout, lambda nodes: bool(nodes))
        worker = _ray_start([f"--address={cluster.address}", f"--num-cpus={worker_cpus}",
                             f"--resources={json.dumps({WORKER_RESOURCE: 10})}", f"--temp-dir={temp / 'w'}"])
        mounts = " && ".join(f"mount -t tmpfs -o size=2g tmpfs {shlex.quote(str(h))}" for h in hidden)
        script = f"{mounts + ' && ' if mounts else ''}exec {shlex.join(worker)}"
        _start_node(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], "worker", cluster, procs,
                    timeout, lambda nodes: any(WORKER_RESOURCE in n for n in nodes))
        yield cluster
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if os.environ.get("UHKD_KEEP_RAY_LOGS"):
            print(f"two_nodes: logs kept in {temp}")
        else:
            shutil.rmtree(temp, ignore_errors=True)


def _start_node(cmd: list[str], name: str, cluster: TwoNodes, procs: list[subprocess.Popen], timeout: float,
                ready: Callable[[list[dict]], bool], attempts: int = 3) -> None:
    """Start a node and wait until the cluster's alive nodes satisfy `ready`. On loaded cores a raylet aborts at
    start-up when its dashboard agent misses Ray's fixed 15 s deadline, so the node starts at a raised priority
    (back to normal once it is up), and a node that still aborts is started again."""
    for attempt in range(attempts):
        log = cluster.temp_dir / f"{name}-{attempt}.log"
        cluster.logs.append(log)
        raised = os.geteuid() == 0
        with open(log, "w") as out:
            proc = subprocess.Popen(["nice", "-n", "-10", *cmd] if raised else cmd, env=cluster.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            nodes = _alive_nodes(cluster)
            if nodes is not None and ready(nodes):
                if raised:  # the node's processes (and the trials they start later) at normal priority
                    with contextlib.suppress(OSError):
                        os.setpriority(os.PRIO_PGRP, proc.pid, 0)
                return
            time.sleep(1)
        _stop(proc)
    raise RuntimeError(f"the {name} Ray node did not come up ({attempts} attempts): {cluster.log_tail()}")


def _alive_nodes(cluster: TwoNodes) -> list[dict] | None:
    """The resources of the cluster's alive nodes (asked from a short-lived process), None if it cannot tell."""
    if not answers(int(cluster.address.rsplit(":", 1)[1])):
        return None
    code = ("import ray, json; ray.init(address=%r, log_to_driver=False); "
            "print('NODES', json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))" % cluster.address)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        return None
    nodes = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("NODES ")]
    return nodes[-1] if done.returncode == 0 and nodes else None
