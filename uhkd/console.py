"""What a person watches while one run trains: a progress bar over an epoch's steps (tqdm, only on a terminal) and,
for a run whose loop prints in Ray Train workers, the driver following the run's `metrics.jsonl` to print each
epoch's line itself (so Ray's worker output can stay in the Ray session logs)."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, enabled: bool = True) -> Iterator[T]:
    """`items` with a tqdm bar on stderr when it is a terminal (and `enabled`); the bar disappears at the end."""
    if not (enabled and sys.stderr.isatty()):
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, unit="step") as bar:
        yield from bar


class FollowMetrics:
    """Calls `on_report(metrics)` for every line appended to a `metrics.jsonl` after `start()` (lines already there
    belong to an earlier session of the run), polling every `every_s` seconds, until `stop()` (which reads the
    rest)."""

    def __init__(self, path: str | Path, on_report: Callable[[dict], None], every_s: float = 0.5) -> None:
        self.path, self.on_report, self.every_s = Path(path), on_report, every_s
        self._offset = self.path.stat().st_size if self.path.is_file() else 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-metrics", daemon=True)

    def __enter__(self) -> "FollowMetrics":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.every_s):
            self._read()
        self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self._offset)
            text = f.read()
        complete = text[:text.rfind("\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            if line.strip():
                self.on_report(json.loads(line))
