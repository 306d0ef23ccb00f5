"""A real Slurm on this machine for the slow tests: `munged`, `slurmctld` and one `slurmd -N nK` per node, from the
distribution's `slurm-wlm` and `munge` packages (`.ci/run` installs them), with a generated `slurm.conf` on free
ports and their own key, state, spool and log folders under `folder`.

    with slurm(tmp, nodes=2) as cluster:   # nodes n1, n2 (same machine, each slurmd on its own port)
        job = cluster.sbatch(script, env=...)
        cluster.wait(job, lambda info: info["JobState"] == "COMPLETED")

The daemons run inside a PID namespace of their own (`unshare`), so every process a job starts is gone when the
namespace's first process is killed, and `ray stop` or `ray symmetric-run` inside a job see only the job's Ray, not
other Ray instances on the machine (`isolated` is False where namespaces are not allowed: then nothing a test runs
may call `ray stop`).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from testkit.realstack import free_ports

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")


def missing() -> list[str]:
    """The Slurm and munge programs this machine lacks."""
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).is_file()]


def _conf(folder: Path, nodes: int, cpus: int, memory_mb: int, ports: list[int]) -> str:
    host = socket.gethostname()
    lines = [
        "ClusterName=uhkdtest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
        # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
        f"AuthInfo=socket={folder}/munge/munge.socket,cred_expire=10", f"StateSaveLocation={folder}/state",
        f"SlurmdSpoolDir={folder}/spool/%n", f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd-%n.pid", f"SlurmctldLogFile={folder}/log/slurmctld.log",
        f"SlurmdLogFile={folder}/log/slurmd-%n.log",
        # no cgroups in a container: processes are tracked by their parent chain
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin", "MpiDefault=none", "SwitchType=switch/none",
        "SchedulerParameters=sched_interval=5",  # a requeued job starts within seconds of becoming eligible
        "ReturnToService=2", "SlurmdParameters=config_overrides", "KillWait=15", "MinJobAge=3600", "JobRequeue=1",
        *(f"NodeName=n{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[i]} CPUs={cpus} "
          f"RealMemory={memory_mb} State=UNKNOWN" for i in range(1, nodes + 1)),
        f"PartitionName=debug Nodes=n[1-{nodes}] Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    folder: Path
    env: dict[str, str]  # SLURM_CONF for the client commands
    isolated: bool  # the daemons (and every job's processes) in a PID namespace of their own

    def command(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 60,
                ) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env={**(env or os.environ), **self.env}, capture_output=True, text=True,
                              timeout=timeout)

    def sbatch(self, script: Path, env: dict[str, str]) -> str:
        done = self.command("sbatch", "--parsable", str(script), env=env)
        assert done.returncode == 0, done.stderr + self.logs()
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...)."""
        text = self.command("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, done: Callable[[dict[str, str]], bool], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if done(info):
                return info
            time.sleep(2)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s\n"
                           f"{self.logs()}")

    def cancel_all(self, timeout: float = 90) -> None:
        """Cancel every job and wait until Slurm has ended their processes."""
        self.command("scancel", "--full", "--user", str(os.getuid()))
        deadline = time.monotonic() + timeout
        while self.command("squeue", "-h", "-t", "R,CG").stdout.strip() and time.monotonic() < deadline:
            time.sleep(1)

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted((self.folder / "log").glob("*")) if p.is_file())


def _init_script(folder: Path, nodes: int) -> str:
    conf = folder / "slurm.conf"
    munge = (f"munged -F -f --socket={folder}/munge/munge.socket --key-file={folder}/munge/munge.key "
             f"--pid-file={folder}/munge/munged.pid --seed-file={folder}/munge/seed --log-file={folder}/log/munged.log")
    daemons = [f"slurmctld -D -i -f {conf}", *(f"slurmd -D -N n{i} -f {conf}" for i in range(1, nodes + 1))]
    lines = [f"export PATH=/usr/sbin:$PATH SLURM_CONF={conf}", f"{munge} &",
             f"until [ -S {folder}/munge/munge.socket ]; do sleep 0.2; done",
             *(f"{d} > {folder}/log/{d.split()[0]}-{i}.out 2>&1 &" for i, d in enumerate(daemons)), "wait"]
    return "\n".join(lines)


def _namespaces_allowed() -> bool:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=30).returncode == 0
    return False


@contextlib.contextmanager
def slurm(folder: Path, nodes: int = 2, cpus: int = 1, memory_mb: int = 8000,
          timeout: float = 60) -> Iterator[SlurmCluster]:
    """Start the daemons (nodes n1..n<nodes>, `cpus` CPUs each) and wait until every node is idle; on exit kill
    them and everything the jobs started."""
    folder = Path(folder)
    for sub in ("state", "spool", "log", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    (folder / "munge").chmod(0o700)
    (folder / "slurm.conf").write_text(_conf(folder, nodes, cpus, memory_mb, free_ports(nodes + 1)))
    (folder / "init.sh").write_text(_init_script(folder, nodes))
    isolated = _namespaces_allowed()
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] if isolated else []
    with open(folder / "log" / "init.out", "w") as out:
        init = subprocess.Popen([*prefix, "bash", str(folder / "init.sh")], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    cluster = SlurmCluster(folder, {"SLURM_CONF": str(folder / "slurm.conf")}, isolated)
    try:
        deadline = time.monotonic() + timeout
        while True:
            state = cluster.command("sinfo", "-h", "-o", "%T %D").stdout.split()
            if state[:2] == ["idle", str(nodes)]:
                break
            if time.monotonic() > deadline or init.poll() is not None:
                raise RuntimeError(f"Slurm did not come up (sinfo: {' '.join(state)!r})\n{cluster.logs()}")
            time.sleep(1)
        yield cluster
    finally:
        cluster.cancel_all()
        # SIGKILL: unshare waits for its child with signals blocked; its death kills the namespace, whose processes
        # all die with its first one. Without a namespace, the session's process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(init.pid, signal.SIGKILL)
        init.wait(timeout=60)
