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


def test_the_sweep_console_estimates_the_time_left_at_this_sessions_pace(monkeypatch, capsys):
    """4 trials of 3 epochs, 2 at once: once both running trials reported an epoch (10 s in), 10 trial-epochs are
    left at 5 s each (10 s / 2 epochs reported); a finished trial counts none; a pickled (resumed) console
    measures its own pace again."""
    import pickle
    from types import SimpleNamespace

    from uhkd.sweep import console

    clock = iter([100.0, 110.0, 130.0])  # the first start, the first round's end, a's end
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    live = console.LiveLines(planned=4, epochs=3, concurrent=2)
    a, b = (SimpleNamespace(trial_id=t, status="RUNNING", config={"pair": "t:s", "_run": {"optim.epochs": 3}},
                            last_result={}, evaluated_params={}) for t in ("a", "b"))
    def metrics(epoch: int, top1: float) -> dict:
        return {"epoch": epoch, "loss": 1.0, "top1": top1, "top5": 90.0, "best_top1": top1, "best_epoch": epoch,
                "lr": 0.1, "images_per_s": 100.0, "epoch_time_s": 5.0}

    live.on_trial_start(0, [a], a)
    live.on_trial_start(0, [a, b], b)
    live.on_trial_result(0, [a, b], a, metrics(1, 50.0))
    live.on_trial_result(0, [a, b], b, metrics(1, 40.0))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "estimate: about 50 s left (10 trial-epoch(s) at most, 2 at once)"
    live.on_trial_result(0, [a, b], a, metrics(2, 60.0))
    a.last_result = {"status": "ok", "best_top1": 60.0, "epoch": 2}
    live.on_trial_complete(0, [a, b], a)  # done at 2 of 3: 2 (b) + 2 x 3 (not started) left, 30 s / 3 epochs
    assert capsys.readouterr().out.splitlines()[-1] == (
        "trial a t:s: finished, best top1 60; about 80 s left (8 trial-epoch(s) at most, 2 at once)")
    again = pickle.loads(pickle.dumps(live))
    assert (again.planned, again.epochs, again.concurrent) == (4, 3, 2)
    assert (again.started, again.reported, again.done) == (0.0, 0, {}) and again.time_left([a, b]) == ""
