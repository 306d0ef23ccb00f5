"""What a sweep keeps so that it can always be continued, wherever its folder now is.

Before Tune starts, a sweep writes `sweep.json` (the manifest: kind, preset, planned trials, trials at once, each
trial's resources) and `sweep.pkl` (what its Tuner is built from: the sweep, its options, its param space). A
resumed sweep builds its Tuner again from them at the sweep's current location (`--results`), so that every
callback, the search and the scheduler write there, then restores what Tune saved (`tune/experiment_state-*.json`,
`saved_state`); when the driver stopped before Tune saved anything, or while it saved (`set_aside_torn_state`), the
search starts afresh under the same name, its trials with rows counted against the budget.
Tune moves the trials it restores to the experiment's new place, but neither their configs nor the trials its
restored search creates later: `relocate` points a trial there.
"""
from __future__ import annotations

import io
import json
import math
import pickletools
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.fs as pafs

from ..errors import UserError, one_line
from ..storage import join, open_location, ray_storage
from .cli import SweepOptions
from ..ray_internals import move_trial_storage
from .spec import Sweep

MANIFEST = "sweep.json"
STORED = "sweep.pkl"
TUNE = "tune"  # Tune's experiment folder in a sweep's folder


def _write(folder: str, name: str, data: bytes) -> None:
    fs, root = open_location(folder)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{name}") as f:
        f.write(data)


def _read(folder: str, name: str) -> bytes:
    fs, root = open_location(folder)
    return _read_path(fs, f"{root}/{name}")


def _read_path(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.readall()


def started(folder: str) -> bool:
    """Whether a sweep was started in `folder` (its manifest was written)."""
    fs, root = open_location(folder)
    return fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File


TORN = ".torn"  # suffix of Tune state files set aside, which Tune's restore then ignores
SESSION_FILES = ("experiment_state-{}.json", "searcher-state-{}.pkl", "search_gen_state-{}.json",
                 "callback-states-{}.pkl")  # what Tune saves together, per run of the sweep (its session)


def _saved_sessions(fs: pafs.FileSystem, tune_dir: str) -> list[str]:
    """The runs (sessions) whose experiment state Tune saved in `tune_dir`, newest first (they are timestamps)."""
    prefix, suffix = SESSION_FILES[0].split("{}")
    infos = fs.get_file_info(pafs.FileSelector(tune_dir, allow_not_found=True))
    return sorted((i.base_name[len(prefix):-len(suffix)] for i in infos
                   if i.base_name.startswith(prefix) and i.base_name.endswith(suffix)), reverse=True)


def saved_state(folder: str) -> bool:
    """Whether Tune saved the experiment state of the sweep in `folder` (it does so every few seconds once it has
    started: a driver stopped before that saved nothing to restore)."""
    fs, root = open_location(folder)
    return bool(_saved_sessions(fs, f"{root}/{TUNE}"))


def _whole(data: bytes) -> bool:
    """Whether a Tune state file's bytes are whole: a pickle (Tune's `search_gen_state-*.json` is one too) whose
    opcodes run to its STOP, read without unpickling, or else JSON that parses."""
    try:
        if data.startswith(b"\x80"):  # the PROTO opcode that starts every pickle of protocol 2 or later
            for _ in pickletools.genops(io.BytesIO(data)):
                pass
        else:
            json.loads(data)
        return True
    except ValueError:
        return False


def set_aside_torn_state(folder: str) -> list[str]:
    """Tune rewrites its state every few seconds, one set of files per run of the sweep (`SESSION_FILES`). A driver
    killed while they are copied to the sweep's folder leaves one cut off, and Tune's restore then restores nothing
    of the sweep, not even its search, and runs it again from the start. Each newest session with a file cut off is
    set aside (its files renamed `*.torn`), so that the resume takes the newest state saved whole, or starts the
    search afresh; returns the sessions set aside."""
    fs, root = open_location(folder)
    tune_dir = f"{root}/{TUNE}"
    torn = []
    for session in _saved_sessions(fs, tune_dir):  # newest first, as Tune picks it
        present = [name for name in (pattern.format(session) for pattern in SESSION_FILES)
                   if fs.get_file_info(f"{tune_dir}/{name}").type == pafs.FileType.File]
        if all(_whole(_read_path(fs, f"{tune_dir}/{name}")) for name in present):
            break
        for name in present:
            fs.move(f"{tune_dir}/{name}", f"{tune_dir}/{name}{TORN}")
        torn.append(session)
    return torn


def write_manifest(folder: str, manifest: dict) -> None:
    _write(folder, MANIFEST, json.dumps(manifest, indent=1).encode())


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _amount(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def manifest_problem(manifest: Any) -> str:
    """What is wrong with a parsed `sweep.json`, "" when nothing is."""
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in ("kind", "preset", "planned", "concurrent", "resources") if k not in manifest]
    if missing:
        return f"it lacks {', '.join(missing)}"
    for key in ("kind", "preset"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            return f"{key} is {manifest[key]!r}, not a name"
    for key in ("planned", "concurrent"):
        if not _count(manifest[key]):
            return f"{key} is {manifest[key]!r}, not a positive integer"
    resources = manifest["resources"]
    if not isinstance(resources, dict) or not all(isinstance(k, str) and _amount(v) for k, v in resources.items()):
        return f"resources is {one_line(json.dumps(resources), 80)}, not an object of resource -> amount"
    return ""


def read_manifest(folder: str, name: str) -> dict:
    """The manifest of sweep `name` in `folder`, checked field by field; one `UserError` line naming the file and
    what is wrong with it."""
    path = f"{open_location(folder)[1]}/{MANIFEST}"
    try:
        manifest = json.loads(_read(folder, MANIFEST))
        problem = manifest_problem(manifest)
    except (OSError, ValueError) as exc:
        problem = one_line(exc, 200)
    if problem:
        raise UserError(f"cannot resume sweep {name!r}: {path} is missing or corrupted ({problem}); it is written "
                        f"when the sweep starts")
    return manifest


@dataclass
class StoredSweep:
    """What a sweep's Tuner is built from, besides its manifest and its location."""

    sweep: Sweep
    opts: SweepOptions
    space: dict[str, Any]  # Tune's param space; `_sweep_dir` is the location the sweep had when it started
    max_epochs: int
    in_process: bool

    def at(self, results: str, name: str) -> "StoredSweep":
        """This sweep at its current location: results root `results`."""
        return replace(self, opts=replace(self.opts, results=results),
                       space={**self.space, "_sweep_dir": join(results, name)})


def write_stored(folder: str, stored: StoredSweep) -> None:
    from ray import cloudpickle

    _write(folder, STORED, cloudpickle.dumps(stored))


def read_stored(folder: str, name: str) -> StoredSweep | None:
    """The stored sweep; None for a sweep started by a toolkit that did not store one (Tune's saved state alone
    then restores it, at the location it had)."""
    import pickle

    fs, root = open_location(folder)
    if fs.get_file_info(f"{root}/{STORED}").type != pafs.FileType.File:
        return None
    try:
        stored = pickle.loads(_read(folder, STORED))
        if not isinstance(stored, StoredSweep):
            raise TypeError(f"it holds a {type(stored).__name__}")
    except Exception as exc:  # unpickling raises many types for a damaged file
        raise UserError(f"cannot resume sweep {name!r}: {root}/{STORED} is corrupted ({type(exc).__name__}: "
                        f"{one_line(exc, 200)}); it is written when the sweep starts") from None
    return stored


def relocate(trial: Any, sweep_dir: str) -> None:
    """Point a Tune trial at the sweep location `sweep_dir`: its config (where its run writes) and its Tune storage
    (where Tune keeps its checkpoints and logs), when they name another one (a moved sweep)."""
    if trial.config.get("_sweep_dir", sweep_dir) == sweep_dir:
        return
    trial.config["_sweep_dir"] = sweep_dir
    path, filesystem = ray_storage(sweep_dir)
    move_trial_storage(trial, path, filesystem or pafs.LocalFileSystem())
