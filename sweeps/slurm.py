"""Run a sweep as a Slurm batch job: Ray across the allocation, the sweep driver on its first node, a save before the
time limit and a requeue that continues the sweep. Checks the sweep's flags here, writes the batch script
(`<log-dir>/<sweep name>.sbatch`: these #SBATCH lines and settings, then sweeps/slurm_job.sh) and submits it.

    python sweeps/slurm.py --nodes 2 --gpus-per-node 4 --time 24:00:00 -- sweeps/hetero_pairs.py \\
        --preset cifar100 --data-root /data/cifar100 --teacher-dir /shared/teachers --results /shared/results

--ray symmetric (default): `ray symmetric-run` on whole nodes (--exclusive), as Ray's documentation recommends.
--ray manual: `ray start` on each node in the job's own temp folder and port band, for nodes shared with other users
and jobs (symmetric-run refuses a node where any Ray runs, and its `ray stop` ends all of yours there).
Results and teachers must be where every node reads them: shared storage or an object store (s3://...).
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uhkd.sweep.cli import SweepOptions

ROOT = Path(__file__).resolve().parent.parent
BODY = Path(__file__).with_name("slurm_job.sh")
SWEEPS = ("hetero_pairs", "reproduce_tables", "ablations", "teachers")
SET_BY_THE_JOB = ("--cluster", "--resume")  # the job attaches to its own cluster and decides when to resume
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs"}


def parser() -> argparse.ArgumentParser:
    from uhkd.errors import OneLineParser

    p = OneLineParser(prog="sweeps/slurm.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      usage="%(prog)s [options] -- sweeps/SWEEP.py [sweep flags]")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the allocation (default 1); the first is Ray's head")
    p.add_argument("--time", default="", help="the job's time limit, as sbatch --time (default: the partition's)")
    p.add_argument("--signal-lead", type=int, default=300, metavar="SECONDS",
                   help="how long before the time limit the sweep starts saving (default 300; Slurm may send the "
                        "signal up to 60 s early)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (sbatch --gpus-per-node)")
    p.add_argument("--cpus-per-node", type=int, help="CPUs per node (sbatch --cpus-per-task; default: whole nodes "
                                                     "with --ray symmetric, the partition's default with manual)")
    p.add_argument("--mem", default="", help="memory per node, as sbatch --mem (Ray's nodes get exactly this)")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option, e.g. --sbatch=--qos=long or --sbatch=--dependency=afterok:123")
    p.add_argument("--ray", choices=("symmetric", "manual"), default="symmetric",
                   help="symmetric: ray symmetric-run on whole nodes; manual: ray start per node in the job's own "
                        "temp folder and ports (nodes shared with others)")
    p.add_argument("--port-base", type=int, help="first port of the job's band (250 per node from here; default: "
                                                 "derived from the job id, within 20000-32499)")
    p.add_argument("--ray-start-args", default="", metavar="ARGS",
                   help="more `ray start` flags for every node, e.g. '--resources={\"gpu_node\":8}' (no spaces "
                        "inside one flag)")
    p.add_argument("--log-dir", default="slurm", help="where the batch script and the job's output go (default slurm)")
    p.add_argument("--dry-run", action="store_true", help="write the batch script and print it; submit nothing")
    return p


def slurm_seconds(limit: str) -> int | None:
    """The seconds of an sbatch --time value (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None for
    unlimited. Raises `UserError` for anything else."""
    from uhkd.errors import UserError

    if limit.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, dash, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":") if p.isdigit()]
    if len(parts) != len(clock.split(":")) or not 1 <= len(parts) <= 3 or (dash and not days.isdigit()):
        raise UserError(f"--time {limit!r} is no Slurm time limit; give minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60
    hours, minutes, seconds = ([0] + parts)[-3:]
    return (hours * 60 + minutes) * 60 + seconds


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def sweep_kind(script: str) -> str:
    from uhkd.errors import choice_error

    kind = Path(script).stem
    if kind not in SWEEPS or Path(script).suffix != ".py":
        raise choice_error("sweep script", script, [f"sweeps/{k}.py" for k in SWEEPS])
    return kind


def check_sweep(kind: str, flags: list[str]) -> tuple[str, bool, SweepOptions]:
    """The sweep's flags checked as the sweep itself checks them (and, for a new sweep, every trial's config):
    (sweep name, whether it exists already, its options). Raises `UserError`."""
    from uhkd.errors import UserError
    from uhkd.storage import check_folder
    from uhkd.sweep.cli import parse
    from uhkd.sweep.runner import plan, restorable, sweep_name

    for flag in SET_BY_THE_JOB:
        if any(f == flag or f.startswith(flag + "=") for f in flags):
            raise UserError(f"{flag} is set by the Slurm job (it attaches to the Ray cluster it starts and resumes "
                            f"the sweep when it exists); leave it out")
    module = importlib.import_module(f"sweeps.{kind}")
    args, opts = parse(module.parser(), flags)
    check_folder(opts.results, "--results")
    sweep = module.build(args, opts)
    if opts.name and restorable(opts.results, opts.name):
        return opts.name, True, opts
    name = opts.name or sweep_name(sweep, opts)[0]
    plan(sweep, opts, name)
    return name, False, opts


def shared_storage_warning(location: str, nodes: int) -> str:
    """A line when a multi-node job's local `location` is on a filesystem only this machine has, else ""."""
    if nodes < 2 or "://" in location:
        return ""
    path = Path(location).expanduser().resolve()
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines() if len(line.split()) > 2]
    found = max((m for m in mounts if path.is_relative_to(m[0])), key=lambda m: len(m[0]), default=None)
    if found and found[1] in LOCAL_FILESYSTEMS:
        return (f"warning: {path} is on a {found[1]} filesystem ({found[0]}), which the other nodes may not see; "
                f"use shared storage (NFS, Lustre, ...) or an object store (s3://...)")
    return ""


def script_text(opts: argparse.Namespace, argv: list[str], kind: str, flags: list[str], name: str, results: str,
                script: Path) -> str:
    log_dir = script.parent
    sbatch = [f"--job-name=uhkd-{name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1",
              f"--signal=B:USR1@{opts.signal_lead}", "--requeue", "--open-mode=append", f"--chdir={Path.cwd()}",
              f"--output={log_dir}/{name}-%j.out"]
    if opts.ray == "symmetric":
        sbatch.append("--exclusive")
    for flag, value in (("--time", opts.time), ("--cpus-per-task", opts.cpus_per_node),
                        ("--gpus-per-node", opts.gpus_per_node), ("--mem", opts.mem),
                        ("--partition", opts.partition), ("--account", opts.account)):
        if value:
            sbatch.append(f"{flag}={value}")
    given_name = {i for i, f in enumerate(flags) if f == "--name" or f.startswith("--name=")}
    given_name |= {i + 1 for i in given_name if flags[i] == "--name"}  # the sweep's name is set once, below
    sweep = [sys.executable, str(ROOT / "sweeps" / f"{kind}.py"), "--cluster", "auto",
             *(f for i, f in enumerate(flags) if i not in given_name), "--name", name]
    settings = {"NAME": name, "RESULTS": results, "SCRIPT": str(script), "LOG_DIR": str(log_dir),
                "PYTHON": sys.executable, "REPO": str(ROOT), "NODES": str(opts.nodes), "RAY_MODE": opts.ray,
                "PORT_BASE": "" if opts.port_base is None else str(opts.port_base),
                "RAY_START_ARGS": opts.ray_start_args}
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sbatch),
             f"# Written by: {shlex.join(['python', 'sweeps/slurm.py', *argv])}",
             *(f"{k}={shlex.quote(v)}" for k, v in settings.items()),
             f"SWEEP=({shlex.join(sweep)})", ""]
    return "\n".join(lines) + BODY.read_text()


def submit(script: Path) -> str:
    """sbatch's job id, or `UserError` with sbatch's own line."""
    from uhkd.errors import UserError, one_line

    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise UserError(f"cannot run sbatch ({exc.strerror}); run this on a Slurm login node") from None
    if done.returncode:
        raise UserError(f"sbatch refused {script}: {one_line(done.stderr or done.stdout)}")
    return done.stdout.strip().split(";")[0]


def launch(argv: list[str]) -> int:
    from uhkd.errors import UserError

    own, sweep_argv = split_argv(argv)
    p = parser()
    opts = p.parse_args(own)
    try:
        if not sweep_argv:
            raise UserError("give the sweep after --, e.g. -- sweeps/hetero_pairs.py --preset cifar100 ...")
        if opts.nodes < 1 or opts.signal_lead < 1:
            raise UserError(f"--nodes and --signal-lead must be >= 1, got {opts.nodes} and {opts.signal_lead}")
        limit = slurm_seconds(opts.time) if opts.time else None
        if limit is not None and limit < opts.signal_lead + 120:
            raise UserError(f"--signal-lead {opts.signal_lead} s leaves the sweep no time within --time {opts.time}: "
                            f"the save starts that long before the limit (Slurm may signal up to 60 s earlier) and "
                            f"Ray takes a minute to start; give a longer --time or a shorter --signal-lead")
        if opts.ray == "manual" and opts.nodes > 50 and opts.port_base is None:
            raise UserError(f"--ray manual gives each node a band of 250 ports within 20000-32499: at most 50 nodes "
                            f"(or give --port-base), got {opts.nodes}")
        kind = sweep_kind(sweep_argv[0])
        name, exists, sweep_opts = check_sweep(kind, sweep_argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for location in (sweep_opts.results, sweep_opts.teacher_dir):
        warning = shared_storage_warning(location, opts.nodes)
        if warning:
            print(warning, file=sys.stderr)
    script = Path(opts.log_dir).resolve() / f"{name}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(script_text(opts, argv, kind, sweep_argv[1:], name, sweep_opts.results, script))
    if opts.dry_run:
        print(script.read_text())
        print(f"slurm: wrote {script} (not submitted: --dry-run)")
        return 0
    try:
        job = submit(script)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"slurm: job {job} {'continues' if exists else 'runs'} sweep {name} on {opts.nodes} node(s) "
          f"({opts.ray}); output: {script.parent}/{name}-{job}.out")
    print(f"slurm: save and requeue now: scancel --batch --signal=USR1 {job}; save and stop: "
          f"scancel --batch --signal=USR2 {job}")
    print(f"slurm: continue a stopped sweep: sbatch {script}")
    return 0


def started(results: str, name: str) -> bool:
    """Whether sweep `name` has saved state under `results` (the job then continues it with --resume)."""
    from uhkd.sweep.runner import restorable

    return restorable(results, name)


def wait_nodes(count: int, timeout: float) -> int:
    """Wait until the Ray cluster at RAY_ADDRESS has `count` alive nodes: 0, or 1 after `timeout` seconds."""
    import logging

    import ray

    ray.init(log_to_driver=False, logging_level=logging.ERROR)
    deadline = time.monotonic() + timeout
    alive = 0
    while time.monotonic() < deadline:
        alive = sum(n["Alive"] for n in ray.nodes())
        if alive >= count:
            print(f"slurm: {alive} Ray node(s) up")
            return 0
        time.sleep(2)
    print(f"slurm: only {alive} of {count} Ray nodes started within {timeout:.0f} s; see the ray-*.log files")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["started"]:  # used by the batch script
        return 0 if started(argv[1], argv[2]) else 1
    if argv[:1] == ["nodes"]:  # used by the batch script
        return wait_nodes(int(argv[1]), float(argv[2]))
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
