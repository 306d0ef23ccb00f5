"""The run console: the epoch progress bar only on a terminal, and the driver following a run's metrics.jsonl."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

from uhkd.console import FollowMetrics, progress

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


def test_follow_metrics_reports_appended_lines_once(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"epoch": 1}) + "\n")  # an earlier session's line: not reported again
    seen: list[dict] = []
    with FollowMetrics(log, seen.append, every_s=0.05):
        with open(log, "a") as f:
            f.write(json.dumps({"epoch": 2}) + "\n" + '{"epoch": 3')  # the last line is still being written
            f.flush()
            assert list(progress([1], 1, "x")) == [1]
            f.write("}\n")
    assert seen == [{"epoch": 2}, {"epoch": 3}]
