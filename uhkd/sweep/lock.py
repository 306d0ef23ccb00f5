"""One driver per sweep at a time: a second `--resume` of a running sweep (or a new sweep given its name) would
run the same trials twice and race on the tables, so it refuses in one line.

The lock is an `flock` on `<results>/<sweep>/.lock`, which the kernel releases when the holding process dies, even
by SIGKILL: a crashed driver never leaves a stale lock behind. An object-store results root (a URI) has no such
lock; there, run one driver per sweep.
"""
from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime, timezone
from typing import IO

from ..errors import UserError

LOCK = ".lock"
_held: dict[str, IO] = {}  # folder -> open lock file, for the life of this process


def hold(folder: str, name: str) -> None:
    """Take the lock of the sweep folder `folder` (a local path; a URI is not locked) for this process, or raise
    `UserError` naming the process that holds it."""
    if "://" in folder or folder in _held:
        return
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"sweep {name!r} is already running ({holder}); wait for it to end or stop it first, "
                        f"then --resume") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    f.flush()
    _held[folder] = f


def release(folder: str) -> None:
    f = _held.pop(folder, None)
    if f is not None:
        f.close()
