"""The two Parquet tables of a sweep (`trials.parquet`, `epochs.parquet`, schema version 3; docs/results-schema.md).

A trial's end writes only that trial's rows, as two part files `parts/<trial_id>.trials.parquet` and
`parts/<trial_id>.epochs.parquet` (constant cost however many trials the sweep has); the sweep compacts the parts
into the two tables once, when `Tuner.fit` returns (also after an interruption). Readers (`merged_table`) merge the
parts a running or crashed sweep has not compacted yet, a part replacing its trial's rows. Every file is written
through a temporary name and a rename (a single PUT on object stores), so a reader or a crash never sees half a file.
The schema is fixed: a column that is null in every row keeps its type, the config columns follow
`uhkd.config.RunConfig` field by field, and what differs between methods — their parameters, their loss terms — is
held in two map columns (`method_params`, `losses`), so a new method never changes the schema. `wide` turns either
table into the familiar wide frame (`method.<name>.<param>` and `loss_<term>` columns); `upgrade` reads version 2.
"""
from __future__ import annotations

import json
import os
import uuid
from functools import lru_cache
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import pandas as pd

from ..config import LEAF_TYPES, method_key
from ..errors import UserError
from ..storage import open_location

# 2: weights_from and the effective-batch columns (batch_per_worker ... lr_used) added
# 3: method parameters in the map column `method_params`, loss terms in the map column `losses`
SCHEMA_VERSION = 3
TRIALS = "trials.parquet"
EPOCHS = "epochs.parquet"
PARTS = "parts"  # per-trial part files not compacted yet
TIMESTAMP = pa.timestamp("us", tz="UTC")
_ARROW = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
METHOD_PARAMS = pa.map_(pa.string(), pa.string())  # param -> its value as JSON
LOSSES = pa.map_(pa.string(), pa.float64())  # term -> the epoch's mean weighted loss

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


@lru_cache(maxsize=1)
def trials_schema() -> pa.Schema:
    taken = {name for name, _ in _IDENTITY + _TRIAL_HEAD + _TRIAL_TAIL}
    config = [(key, _ARROW[tp]) for key, tp in LEAF_TYPES.items() if key not in taken]
    return _schema(_IDENTITY + _TRIAL_HEAD + config + [("method_params", METHOD_PARAMS)] + _TRIAL_TAIL)


@lru_cache(maxsize=1)
def epochs_schema() -> pa.Schema:
    return _schema(_IDENTITY + [("epoch", pa.int64())] + [(m, pa.float64()) for m in ("top1", "top5", "loss")]
                   + [("losses", LOSSES)] + [(m, pa.float64()) for m in ("lr", "images_per_s", "epoch_time_s")])


def trial_record(row: dict) -> dict:
    """A trials row as stored: the method's `method.<name>.<param>` values gathered into `method_params`."""
    params = {method_key(k)[1]: json.dumps(v) for k, v in row.items() if method_key(k)}
    return {k: v for k, v in row.items() if not method_key(k)} | ({"method_params": params} if params else {})


def epoch_record(row: dict) -> dict:
    """An epochs row as stored: the `loss_<term>` values gathered into `losses`."""
    losses = {k[len("loss_"):]: v for k, v in row.items() if k.startswith("loss_")}
    return {k: v for k, v in row.items() if not k.startswith("loss_")} | ({"losses": losses} if losses else {})


def _map_items(value: Any) -> list[tuple[str, Any]]:
    """A map cell as pandas or pyarrow gives it (a list of pairs, a dict or None) as a list of pairs."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return list(value.items()) if isinstance(value, dict) else [tuple(item) for item in value]


def flat_trial(record: dict) -> dict:
    """The inverse of `trial_record`: `method_params` spread into `method.<name>.<param>` keys."""
    out = {k: v for k, v in record.items() if k != "method_params"}
    out.update({f"method.{record['method']}.{k}": json.loads(v) for k, v in _map_items(record.get("method_params"))})
    return out


def flat_epoch(record: dict) -> dict:
    """The inverse of `epoch_record`: `losses` spread into `loss_<term>` keys."""
    out = {k: v for k, v in record.items() if k != "losses"}
    out.update({f"loss_{k}": v for k, v in _map_items(record.get("losses"))})
    return out


def wide(table: pa.Table, name: str) -> pd.DataFrame:
    """The table as a pandas frame with the map columns spread out: trials get one `method.<name>.<param>`
    column per parameter of the methods present (null where a row's method has no such parameter), epochs one
    `loss_<term>` column per term."""
    frame = upgrade(table, name).to_pandas()
    column, prefix = ("method_params", None) if name == TRIALS else ("losses", "loss_")
    spread: dict[str, list] = {}
    for i, cell in enumerate(frame[column]):
        for key, value in _map_items(cell):
            out = f"method.{frame['method'].iat[i]}.{key}" if prefix is None else f"{prefix}{key}"
            spread.setdefault(out, [None] * len(frame))[i] = json.loads(value) if prefix is None else value
    extra = pd.DataFrame({k: spread[k] for k in sorted(spread)}, index=frame.index)
    if prefix is not None:
        extra = extra.astype("float64")
    return pd.concat([frame.drop(columns=[column]), extra], axis=1)


def upgrade(table: pa.Table, name: str) -> pa.Table:
    """A version-2 table in version 3's shape (tables of version 3 as they are): the per-field method columns
    (`method.alpha`, ...) become `method_params` entries of the parameters each row's method has, the `loss_<term>`
    columns become `losses` entries."""
    if ("method_params" if name == TRIALS else "losses") in table.column_names:
        return table
    rows = table.to_pylist()
    if name == TRIALS:
        from ..methods import method_class, param_fields

        def params(row: dict) -> dict:
            try:
                names = param_fields(method_class(row.get("method") or ""))
            except UserError:  # a method this installation lacks: its values stay in its old columns' meaning
                names = {}
            return {f"method.{row['method']}.{p}": row[f"method.{p}"] for p in names
                    if row.get(f"method.{p}") is not None}

        records = [trial_record({**row, **params(row)}) for row in rows]
    else:
        records = [epoch_record({k: v for k, v in row.items() if not (k.startswith("loss_") and v is None)})
                   for row in rows]
    schema = trials_schema() if name == TRIALS else epochs_schema()
    return pa.Table.from_pylist([{**r, "schema_version": r.get("schema_version") or 2} for r in records], schema=schema)


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


def read_table(fs: pafs.FileSystem, path: str, name: str) -> pa.Table:
    """A results table file (`name`: TRIALS or EPOCHS, compacted or a part), or one `UserError` line naming it when
    it is truncated, corrupted or no uhkd table of that kind."""
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowException, OSError) as exc:
        problem = f"is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    else:
        problem = _schema_problem(table, name)
        if not problem:
            return table
    raise UserError(f"results table {path!r} {problem}")  # what to do about it depends on who reads it


def _schema_problem(table: pa.Table, name: str) -> str:
    """Why `table`, read from a file, is not a table `name` (TRIALS or EPOCHS) of this toolkit, "" when it is. Its
    schema version is in its metadata, else in its `schema_version` column; a table of an earlier version may lack
    columns added since (`upgrade` reads it)."""
    expected = trials_schema() if name == TRIALS else epochs_schema()
    found = table.schema
    version = (found.metadata or {}).get(b"uhkd.schema_version", b"").decode()
    if not version and "schema_version" in found.names and table.num_rows:
        version = str(table["schema_version"][0].as_py() or "")
    if not version:
        return f"is no uhkd {name.split('.')[0]} table (no schema version in its metadata or columns)"
    missing = [f.name for f in expected if f.name not in found.names] if version == str(SCHEMA_VERSION) else []
    mistyped = [f"{f.name} ({found.field(f.name).type}, not {f.type})" for f in expected
                if f.name in found.names and not found.field(f.name).type.equals(f.type)]
    if missing or mistyped:
        wrong = [*(f"{n} missing" for n in missing), *mistyped]
        return (f"does not hold the {name.split('.')[0]} schema (version {version}): {', '.join(wrong[:4])}"
                f"{f' and {len(wrong) - 4} more' if len(wrong) > 4 else ''}")
    return ""


def _parts(fs: pafs.FileSystem, folder: str, name: str) -> list[str]:
    """The part files of table `name` (TRIALS or EPOCHS) in a sweep folder."""
    selector = pafs.FileSelector(f"{folder}/{PARTS}", allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.base_name.endswith(f".{name}"))


def _ordered(table: pa.Table, name: str) -> pa.Table:
    """Trials by finish time (unfinished last), epochs by (trial, epoch); tables lacking those columns as they are."""
    keys = [("finished_at", "ascending"), ("trial_id", "ascending")] if name == TRIALS else \
        [("trial_id", "ascending"), ("epoch", "ascending")]
    return table.sort_by(keys) if all(k in table.column_names for k, _ in keys) else table


def merged_table(fs: pafs.FileSystem, path: str, name: str) -> pa.Table | None:
    """Table `name` (TRIALS or EPOCHS) stored at `path` as readers see it: the compacted file with the part files
    beside it (trials that ended since the last compaction) replacing their trials' rows; None when neither exists."""
    parts = [upgrade(read_table(fs, part, name), name) for part in _parts(fs, path.rsplit("/", 1)[0], name)]
    tables = [pa.concat_tables(parts, promote_options="default")] if parts else []
    if fs.get_file_info(path).type == pafs.FileType.File:
        table = upgrade(read_table(fs, path, name), name)
        if tables:
            replaced = tables[0]["trial_id"].combine_chunks()
            table = table.filter(pc.invert(pc.is_in(table["trial_id"], value_set=replaced)))
        tables.insert(0, table)
    if not tables:
        return None
    return _ordered(pa.concat_tables(tables, promote_options="default"), name)


class SweepTables:
    """One sweep's tables. `write_trial` records a trial's rows as it ends (part files, constant cost); `load` reads
    every row into memory (`trials` by `trial_id`, `epochs` by (`trial_id`, `epoch`)); `compact` folds the parts into
    `trials.parquet` and `epochs.parquet`. A resumed trial's new part replaces its rows instead of duplicating them."""

    def __init__(self, location: str, sweep: str) -> None:
        self.fs, root = open_location(location)
        self.folder = f"{root.rstrip('/')}/{sweep}"
        self.sweep = sweep
        self.trials: dict[str, dict] = {}
        self.epochs: dict[tuple[str, int], dict] = {}

    def load(self) -> "SweepTables":
        """Read every row written so far (compacted or not), in the form `write_trial` takes. A damaged table is a
        `UserError` saying how the sweep gets past it."""
        for name, rows, flat in ((TRIALS, self.trials, flat_trial), (EPOCHS, self.epochs, flat_epoch)):
            try:
                table = merged_table(self.fs, f"{self.folder}/{name}", name)
            except UserError as err:
                raise UserError(f"{err}; move it aside and run --resume: the rows are rebuilt from the trials' own "
                                f"records") from None
            for row in table.to_pylist() if table is not None else ():
                rows[row["trial_id"] if name == TRIALS else (row["trial_id"], row["epoch"])] = flat(row)
        return self

    def write_trial(self, trial: dict, epochs: Iterable[dict] = ()) -> None:
        """Record one trial's row and epoch rows: its two part files, whatever the number of trials."""
        identity = {"schema_version": SCHEMA_VERSION, "sweep": self.sweep, "trial_id": trial["trial_id"]}
        self.fs.create_dir(f"{self.folder}/{PARTS}", recursive=True)
        for name, rows, schema in ((EPOCHS, [{**epoch_record(r), **identity} for r in epochs], epochs_schema()),
                                   (TRIALS, [{**trial_record(trial), **identity}], trials_schema())):
            write_atomic(pa.Table.from_pylist(rows, schema=schema), self.fs,
                         f"{self.folder}/{PARTS}/{trial['trial_id']}.{name}")

    def compact(self) -> "SweepTables":
        """Fold the part files into the two tables (written whole, then the parts removed; a crash in between
        leaves parts that repeat rows of the tables, which readers merge away); returns the loaded tables."""
        self.load()
        parts = _parts(self.fs, self.folder, TRIALS) + _parts(self.fs, self.folder, EPOCHS)
        if not parts:
            return self
        for name, records, schema in ((EPOCHS, map(epoch_record, self.epochs.values()), epochs_schema()),
                                      (TRIALS, map(trial_record, self.trials.values()), trials_schema())):
            table = _ordered(pa.Table.from_pylist(list(records), schema=schema), name)
            write_atomic(table, self.fs, f"{self.folder}/{name}")
        for path in parts:
            self.fs.delete_file(path)
        return self
