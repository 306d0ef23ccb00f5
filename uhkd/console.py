"""What a person watches while one run trains: a progress bar over an epoch's steps (tqdm, only on a terminal) and,
for a run whose loop prints in Ray Train workers, the driver following the run's checkpoints on its storage to print
each epoch's line itself (so Ray's worker output can stay in the Ray session logs)."""
from __future__ import annotations

import json
import sys
import threading
from typing import Callable, Iterable, Iterator, TypeVar

from .storage import METRICS_LOG, checkpoint_folders, open_location

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, enabled: bool = True) -> Iterator[T]:
    """`items` with a tqdm bar on stderr when it is a terminal (and `enabled`); the bar disappears at the end."""
    if not (enabled and sys.stderr.isatty()):
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, unit="step") as bar:
        yield from bar


class FollowCheckpoints:
    """Calls `on_report(metrics)` for every epoch a Ray Train run reports after `__enter__`, polling every `every_s`
    seconds until `__exit__` (which reads the rest). The reports come from the `metrics.jsonl` of the run's newest
    checkpoint (each holds every report so far) on the run's storage, a local path or a URI: the driver reads what
    Ray Train stored, never a worker's disk. The reports of an earlier session of the run (`earlier`) are not
    shown again."""

    def __init__(self, run: str, on_report: Callable[[dict], None], every_s: float = 0.5) -> None:
        self.fs, self.run = open_location(run)
        self.on_report, self.every_s = on_report, every_s
        self.earlier = self._reports()
        self._shown = len(self.earlier)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="follow-checkpoints", daemon=True)

    def __enter__(self) -> "FollowCheckpoints":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _follow(self) -> None:
        while not self._done.wait(self.every_s):
            self._show_new()
        self._show_new()

    def _show_new(self) -> None:
        reports = self._reports()
        for metrics in reports[self._shown:]:
            self.on_report(metrics)
        self._shown = max(self._shown, len(reports))

    def _reports(self) -> list[dict]:
        for folder in checkpoint_folders(self.fs, self.run):
            try:
                with self.fs.open_input_stream(f"{folder}/{METRICS_LOG}") as f:
                    return [json.loads(line) for line in f.readall().decode().splitlines() if line.strip()]
            except (OSError, ValueError):  # still being uploaded, or just removed (Ray keeps the newest two)
                continue
        return []
