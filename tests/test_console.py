"""The run console: the epoch progress bar only on a terminal, and the driver following a run's checkpoints."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import time

from uhkd.console import FollowCheckpoints

BAR = "from uhkd.console import progress; assert list(progress(range(40), 40, 'epoch 1/3')) == list(range(40))"


def _stderr_of(terminal: bool) -> str:
    if not terminal:
        done = subprocess.run([sys.executable, "-c", BAR], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0
        return done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    done = subprocess.run([sys.executable, "-c", BAR], stderr=follower, stdout=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0
    os.set_blocking(leader, False)
    out = b""
    try:
        while chunk := os.read(leader, 4096):
            out += chunk
    except BlockingIOError:  # all read
        pass
    os.close(follower)
    os.close(leader)
    return out.decode(errors="replace")


def test_progress_bar_only_on_a_terminal():
    on_terminal = _stderr_of(True)
    assert "epoch 1/3" in on_terminal and "/40" in on_terminal
    assert _stderr_of(False) == ""


def test_follow_checkpoints_reports_each_new_epoch_once(tmp_path):
    def checkpoint(name: str, text: str) -> None:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "metrics.jsonl").write_text(text)

    lines = [json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)]
    checkpoint("checkpoint_000001", lines[0])  # an earlier session's epoch: not reported again
    seen: list[dict] = []
    with FollowCheckpoints(str(tmp_path), seen.append, every_s=0.05):
        checkpoint("checkpoint_000002", lines[0] + '{"epoch": ')  # still being written: read on a later poll
        time.sleep(0.2)
        checkpoint("checkpoint_000002", "".join(lines[:2]))
        time.sleep(0.2)
        checkpoint("checkpoint_000003", "".join(lines))
        shutil.rmtree(tmp_path / "checkpoint_000001")  # Ray keeps the newest two
    assert seen == [{"epoch": 2}, {"epoch": 3}]
