"""The two Parquet tables of a sweep (`trials.parquet`, `epochs.parquet`, schema version 1; README "Results
schema").

Both files are rewritten whole each time a trial ends, through a temporary name and a rename (a single PUT on
object stores), so a reader or a crash never sees half a file. The schema is fixed: a column that is null in every
row keeps its type, and the config columns follow `uhkd.config.RunConfig` field by field.
"""
from __future__ import annotations

import os
import uuid
from functools import lru_cache
from typing import Any, Iterable, Union, get_args, get_origin

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import LEAF_TYPES
from ..errors import UserError
from ..registry import METHODS
from ..storage import open_location

SCHEMA_VERSION = 1
TRIALS = "trials.parquet"
EPOCHS = "epochs.parquet"
TIMESTAMP = pa.timestamp("us", tz="UTC")
_ARROW = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}

_IDENTITY = [("schema_version", pa.int32()), ("sweep", pa.string()), ("trial_id", pa.string())]
_TRIAL_HEAD = [("preset", pa.string()), ("tag", pa.string()), ("weights_from", pa.string()), ("dataset", pa.string()),
               ("teacher", pa.string()), ("student", pa.string()), ("method", pa.string()), ("pair", pa.string()),
               ("seed", pa.int64()), ("split", pa.string())]
_TRIAL_TAIL = [("epochs", pa.int64()), ("epochs_run", pa.int64()), ("best_top1", pa.float64()),
               ("best_top5", pa.float64()), ("best_epoch", pa.int64()), ("last_top1", pa.float64()),
               ("last_top5", pa.float64()), ("teacher_top1", pa.float64()), ("student_params", pa.int64()),
               ("extra_params", pa.int64()), ("images_per_s", pa.float64()), ("wall_time_s", pa.float64()),
               ("batch_per_worker", pa.int64()), ("train_workers", pa.int64()), ("accumulation", pa.int64()),
               ("effective_batch", pa.int64()), ("lr_used", pa.float64()), ("status", pa.string()),
               ("failure_reason", pa.string()), ("student_checkpoint", pa.string()), ("config_hash", pa.string()),
               ("toolkit_version", pa.string()), ("git_commit", pa.string()), ("started_at", TIMESTAMP),
               ("finished_at", TIMESTAMP)]


def _arrow_type(tp: Any) -> pa.DataType:
    if get_origin(tp) is Union:  # Optional[float] -> float
        tp = next(a for a in get_args(tp) if a is not type(None))
    return _ARROW[tp]


def loss_terms() -> list[str]:
    """Every loss term name of every registered method (the fixed `loss_<term>` columns)."""
    import uhkd.methods  # noqa: F401  (registers the methods)

    return sorted({t for name in METHODS.names() for t in METHODS.get(name).terms})


@lru_cache(maxsize=1)
def trials_schema() -> pa.Schema:
    taken = {name for name, _ in _IDENTITY + _TRIAL_HEAD + _TRIAL_TAIL}
    config = [(key, _arrow_type(tp)) for key, tp in LEAF_TYPES.items() if key not in taken]
    return _schema(_IDENTITY + _TRIAL_HEAD + config + _TRIAL_TAIL)


@lru_cache(maxsize=1)
def epochs_schema() -> pa.Schema:
    metrics = ["top1", "top5", "loss", *(f"loss_{t}" for t in loss_terms()), "lr", "images_per_s", "epoch_time_s"]
    return _schema(_IDENTITY + [("epoch", pa.int64())] + [(m, pa.float64()) for m in metrics])


def _schema(columns: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema(columns, metadata={"uhkd.schema_version": str(SCHEMA_VERSION)})


def write_atomic(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            pq.write_table(table, tmp, filesystem=fs)
        except BaseException:  # e.g. a full disk: leave the previous file as it was, and no partial file
            if fs.get_file_info(tmp).type == pafs.FileType.File:
                fs.delete_file(tmp)
            raise
        fs.move(tmp, path)  # rename(2): readers see the old file or the new one
    else:  # object stores publish an object only once its upload completes
        pq.write_table(table, path, filesystem=fs)


def read_table(fs: pafs.FileSystem, path: str) -> pa.Table:
    """A results table, or one `UserError` line when the file is truncated or corrupted."""
    try:
        return pq.read_table(path, filesystem=fs)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"results table {path!r} is unreadable ({type(exc).__name__}: {reason}); move it aside "
                        f"and run --resume: the rows are rebuilt from the trials' own records") from None


class SweepTables:
    """In-memory rows of one sweep's tables, keyed so a resumed sweep replaces rows instead of duplicating them:
    trials by `trial_id`, epochs by (`trial_id`, `epoch`)."""

    def __init__(self, location: str, sweep: str) -> None:
        self.fs, root = open_location(location)
        self.folder = f"{root.rstrip('/')}/{sweep}"
        self.sweep = sweep
        self.trials: dict[str, dict] = {}
        self.epochs: dict[tuple[str, int], dict] = {}

    def load(self) -> "SweepTables":
        """Read the rows already written (a resumed sweep)."""
        for name, rows, key in ((TRIALS, self.trials, ("trial_id",)), (EPOCHS, self.epochs, ("trial_id", "epoch"))):
            path = f"{self.folder}/{name}"
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                for row in read_table(self.fs, path).to_pylist():
                    rows[row[key[0]] if len(key) == 1 else tuple(row[k] for k in key)] = row
        return self

    def put(self, trial: dict, epochs: Iterable[dict] = ()) -> None:
        identity = {"schema_version": SCHEMA_VERSION, "sweep": self.sweep, "trial_id": trial["trial_id"]}
        self.trials[trial["trial_id"]] = {**trial, **identity}
        for row in epochs:
            self.epochs[(trial["trial_id"], int(row["epoch"]))] = {**row, **identity}

    def write(self) -> None:
        self.fs.create_dir(self.folder, recursive=True)
        trials = sorted(self.trials.values(), key=lambda r: (r.get("finished_at") is None, r.get("finished_at"),
                                                            r["trial_id"]))
        epochs = [self.epochs[k] for k in sorted(self.epochs)]
        write_atomic(pa.Table.from_pylist(trials, schema=trials_schema()), self.fs, f"{self.folder}/{TRIALS}")
        write_atomic(pa.Table.from_pylist(epochs, schema=epochs_schema()), self.fs, f"{self.folder}/{EPOCHS}")
