"""The shared sweep runner: checks a sweep before any trial starts, connects to Ray, assembles the Tuner (Optuna TPE
+ ASHA for search sweeps, a grid otherwise) over the function trainable, restores interrupted sweeps, and prints a
compact summary. Every sweep script is `main(parser, build)` with its own `build(args, opts) -> Sweep`."""
from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import sys
import time
import uuid
import dataclasses
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Callable, Sequence

from ..config import LEAF_TYPES, RunConfig, coerce, config_hash, in_process, is_config_key, method_key
from ..errors import RunFailed, UserError, choice_error, one_line
from ..plugins import loaded as loaded_plugins
from ..storage import check_folder, exists, is_uri, join, open_location, ray_storage
from . import lock
from .cli import SweepOptions, parse
from .results import SweepTables
from .spec import Sweep, SweepPreset
from .state import (STORED, TORN, TUNE, StoredSweep, read_manifest, read_stored, saved_state, set_aside_torn_state,
                    started, write_manifest, write_stored)
from .teachers import CARRIED, install, teachers_sweep
from .trainable import LABELS, flat_run_config, run_config, teacher_path, train_trial, trial_overrides

TRIAL_CPU = 0.01  # the trial's own process: it only waits for its Ray Train workers
# memory reserved for a trial's own process(es), measured on 2 CPUs: a Ray Train trial's driver side is ~1.1 GB
# (trial 490 MB, Train controller 376, synchronisation and queue actors 165); an in-process trial ~0.5 GB + training
TRAIN_DRIVER_MEMORY = 1.2 * 2**30
IN_PROCESS_MEMORY = 1.0 * 2**30
# Tune restarts a trial killed by a lost node or worker (from its run's checkpoint) up to this many times; a
# configuration error never raises (the trainable reports it as status=failed), so it is not retried
TUNE_RETRIES = 2
ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # failed trials are summarised in one line each instead of tracebacks
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # a Train run waits for its workers' resources (an autoscaler adding nodes, other jobs finishing) instead of
    # failing after 4 x 60 s; the concurrency check has made sure a trial fits the cluster at all
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(7 * 24 * 3600),
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's classic output, silent at verbose=0: the console is uhkd.sweep.console's lines
    # Tune's saved state must know a trial before its first epoch ends: a driver killed without warning (no final
    # save) would otherwise resume without it and train a replacement from scratch (Tune's "auto" waits >= 10 s)
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
}


@dataclass
class SweepOutcome:
    name: str
    folder: str  # where trials.parquet and epochs.parquet are, a path on the results filesystem
    tables: SweepTables
    planned: int
    concurrent: int  # trials at once
    interrupted: bool
    grid: Any  # Tune's ResultGrid
    location: str = ""  # the sweep's folder as the user gave the results root (a URI keeps its scheme and query)
    minutes: float = 0.0  # wall time of this session's fit


# The sweeps' exit codes (docs/sweeps.md#exit-codes)
EXIT_OK = 0  # every planned trial recorded, none failed (ok, or stopped early by the scheduler)
EXIT_ALL_FAILED = 1  # every trial failed: nothing to analyse (also: the teachers a sweep needs failed to train)
EXIT_BAD_INPUT = 2  # found before anything ran (or a full results disk, a damaged file that stops --resume)
EXIT_SOME_FAILED = 3  # some trials failed, the others are recorded: the tables have gaps
EXIT_INTERRUPTED = 130  # Ctrl-C, SIGTERM, a lost cluster: continue with --resume


def exit_code(outcome: SweepOutcome) -> int:
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    statuses = [row["status"] for row in outcome.tables.trials.values()]
    if "failed" not in statuses:
        return EXIT_OK
    return EXIT_SOME_FAILED if set(statuses) - {"failed"} else EXIT_ALL_FAILED


def seeds(sweep_kind: str, preset: SweepPreset, opts: SweepOptions) -> tuple[int, ...]:
    return tuple(opts.seeds or preset.budget(sweep_kind).get("seeds") or (0,))


def pairs(sweep_kind: str, preset: SweepPreset, opts: SweepOptions) -> list[str]:
    listed = list(opts.pairs or preset.section(sweep_kind).get("pairs") or [])
    if not listed:
        raise UserError(f"preset {preset.name!r} lists no pairs for {sweep_kind}; give --pairs teacher:student,...")
    return listed


def restorable(results: str, name: str) -> bool:
    """Whether sweep `name` under `results` was started, so that --resume continues it: from what Tune saved, or
    with its search started afresh (its stored settings) when Tune saved nothing yet."""
    return started(join(results, name))


def sweep_name(sweep: Sweep, opts: SweepOptions) -> tuple[str, bool]:
    """(name, started): a new name (timestamp + random tail), the given one, or for a bare --resume the latest of
    this kind; whether a sweep of that name was started before. A started sweep whose Tune saved nothing yet (its
    driver stopped in its first seconds) may be started again without --resume."""
    prefix = f"{sweep.kind}-{sweep.preset.name}"
    if opts.name:
        existing = restorable(opts.results, opts.name)
        if opts.resume and not existing:
            raise UserError(f"nothing to resume: no sweep {opts.name!r} under {opts.results!r}")
        if not opts.resume and existing and saved_state(join(opts.results, opts.name)):
            raise UserError(f"sweep {opts.name!r} already exists under {opts.results!r}; add --resume to continue "
                            f"it or choose another --name")
        return opts.name, existing
    if opts.resume:
        import pyarrow.fs as pafs

        fs, root = open_location(opts.results)
        found = [] if fs.get_file_info(root).type != pafs.FileType.Directory else sorted(
            i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith(prefix + "-"))
        found = [n for n in found if restorable(opts.results, n)]
        if not found:
            raise UserError(f"nothing to resume: no {prefix}-* sweep under {opts.results!r}")
        return found[-1], True
    # the random tail: two sweeps started in the same second on one results root get folders of their own
    return f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", False


def resume_flags(name: str, results: str) -> str:
    """The flags that continue sweep `name` of results root `results`, quoted for a shell."""
    return f"--resume --name {shlex.quote(name)} --results {shlex.quote(results)}"


def run_overrides(sweep: Sweep, opts: SweepOptions) -> dict[str, Any]:
    """Fixed overrides of every trial: preset < sweep section < flags and --set < what the sweep forces."""
    budget = sweep.preset.budget(sweep.kind)
    out = dict(sweep.preset.run(sweep.kind))
    epochs = opts.epochs or budget.get("epochs")
    if epochs:
        out["optim.epochs"] = epochs
    if opts.workers_per_trial is not None:
        out["workers"] = opts.workers_per_trial
    if opts.cpus_per_worker is not None:
        out["cpus_per_worker"] = opts.cpus_per_worker
    if opts.data_root:
        out["data.root"] = os.path.abspath(os.path.expanduser(opts.data_root))
    out.update(opts.sets)
    for key, value in sweep.force.items():
        if key in opts.sets and coerce(key, opts.sets[key]) != coerce(key, value):
            raise UserError(f"{sweep.kind} runs with {key}={value}; --set {key}={opts.sets[key]} contradicts it")
        out[key] = value
    return out


def grid_cells(sweep: Sweep) -> list[dict[str, Any]]:
    """The `cell` value of each grid trial: its label and its own overrides only (not the whole grid)."""
    return [{"label": label, "set": overrides} for label, overrides in sweep.cells.items()]


def cells_left(space: dict[str, Any], rows: dict[str, dict]) -> list[dict[str, Any]]:
    """The cells of a grid sweep's `space` that no trial row records (a row of the same run and labels): what the
    grid runs when it starts afresh on a resume."""
    def key(config: dict[str, Any]) -> tuple[str, ...]:
        return (config_hash(run_config(config, "")), *trial_overrides(config)[1].values())

    done = {(row.get("config_hash"), *(str(row.get(label) or "") for label in LABELS)) for row in rows.values()}
    return [cell for cell in space["cell"]["grid_search"] if key({**space, "cell": cell}) not in done]


def trial_configs(sweep: Sweep, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One representative trial config per grid cell, or per pair of a search space (its other values sampled
    later), to check before anything runs."""
    if sweep.cells:
        return [{**base, "cell": cell} for cell in grid_cells(sweep)]
    for key in sweep.space:
        if not is_config_key(key) and key != "pair":
            raise choice_error("search-space key", key, [*LEAF_TYPES, "method.<name>.<param>", "pair"])
    pair_domain = sweep.space.get("pair")
    candidates = getattr(pair_domain, "categories", None) or ([pair_domain] if pair_domain else [None])
    return [{**base, **({"pair": p} if p else {})} for p in candidates]


def check_configs(configs: list[dict[str, Any]], dataset: bool = True) -> tuple[list[RunConfig], set[str]]:
    """Build every representative run (names, values, with `dataset` the dataset's presence here) and list the
    teachers they load; the problems of all of them are raised together."""
    from ..methods import teacher_use
    from ..train import preflight
    from ..validate import Problems, collect_problems

    problems, runs, teachers = Problems(), [], set()
    for config in configs:
        mine = Problems()
        overrides = mine.check(lambda c: trial_overrides(c)[0], config)
        if overrides is not None:
            # missing teachers are listed (or trained) by the caller
            cfg = collect_problems(config["_preset"], overrides, mine, teacher_file=False, dataset=dataset)
            mine.check(preflight, cfg, False, dataset)
        for problem in mine.found:
            problems.add(problem)
        if mine.found:
            continue
        if cfg.model.teacher and teacher_use(cfg).needed:
            teachers.add(cfg.model.teacher)
        runs.append(cfg)
    problems.raise_any()
    return runs, teachers


def check_method_sets(sets: dict[str, Any], methods: set[str], kind: str) -> None:
    """A `--set method.<name>.<param>` applies to the trials of that method; naming a method the sweep does not run
    is an error (the value would silently not be used)."""
    unused = sorted(k for k in sets if method_key(k) and method_key(k)[0] not in methods)
    if unused:
        raise UserError(f"--set {', '.join(unused)}: {kind} runs no trial of method "
                        f"{' or '.join(sorted({method_key(k)[0] for k in unused}))} (it runs "
                        f"{', '.join(sorted(methods))}); set method.<name>.<param> of a method it runs")


def trial_bundles(workers: int, cpus_per_worker: float, gpus_per_trial: float,
                  custom: dict[str, float] | None = None, memory: bool = True) -> list[dict[str, float]]:
    """What one trial reserves, as Ray resource bundles: the trial's own process first (with memory for it unless
    `memory` is off: Ray Train's driver side is the trial, its controller and two helper actors), then one bundle
    per Ray Train worker; `custom` resources in each."""
    custom = custom or {}
    if in_process(workers):
        return [{"CPU": cpus_per_worker, "GPU": gpus_per_trial, "memory": IN_PROCESS_MEMORY * memory, **custom}]
    return [{"CPU": TRIAL_CPU, "memory": TRAIN_DRIVER_MEMORY * memory, **custom},
            *[{"CPU": cpus_per_worker, "GPU": gpus_per_trial / workers, **custom}] * workers]


def trial_resources(bundles: list[dict[str, float]]) -> dict[str, float]:
    """The Tune resources of the trial's own process (its first bundle)."""
    return {{"CPU": "cpu", "GPU": "gpu"}.get(key, key): value for key, value in bundles[0].items() if value}


def _room(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(k, 0) + 1e-9 >= v for k, v in need.items() if v)


def trials_fitting(nodes: list[dict[str, float]], bundles: list[dict[str, float]], limit: int = 10_000) -> int:
    """How many trials of these bundles fit on `nodes` at once, each bundle on one node (first with room, as Ray
    packs them): per node, so that resources split over nodes are not counted as if they were one."""
    free = [dict(n) for n in nodes]
    fitted = 0
    while fitted < limit:
        for bundle in bundles:
            node = next((n for n in free if _room(n, bundle)), None)
            if node is None:
                return fitted
            for k, v in bundle.items():
                node[k] = node.get(k, 0) - v
        fitted += 1
    return fitted


def concurrency(nodes: list[dict[str, float]], bundles: list[dict[str, float]], gpus_per_trial: float,
                requested: int | None = None, cap: int | None = None,
                scalable: list[dict[str, float]] | None = None) -> int:
    """How many trials run at once: as many as fit on the nodes (or on the nodes an autoscaler may start,
    `scalable`: trials then wait for them), after checking that one trial fits at all (an infeasible request
    would wait forever)."""
    shapes = scalable or nodes
    gpus = sum(n.get("GPU", 0) for n in shapes)
    if gpus_per_trial > gpus:
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g} but the Ray cluster has {gpus:g} GPUs")
    workers = bundles[1:] or bundles
    per_worker_gpu = workers[0].get("GPU", 0)
    if per_worker_gpu > 1 and not float(per_worker_gpu).is_integer():
        raise UserError(f"{gpus_per_trial:g} GPUs over {len(workers)} workers is {per_worker_gpu:g} per worker; "
                        f"above 1 a worker needs whole GPUs")
    fits = trials_fitting(shapes, bundles)
    if not fits:
        gpu_text = f" + {per_worker_gpu:g} GPUs" if per_worker_gpu else ""
        biggest = max(shapes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        raise UserError(f"a trial needs {len(workers)} worker(s) x {workers[0]['CPU']:g} CPUs{gpu_text} and "
                        f"{bundles[0]['memory'] / 2**30:.1f} GiB for its own process; the largest Ray node has "
                        f"{biggest.get('CPU', 0):g} CPUs, {biggest.get('GPU', 0):g} GPUs and "
                        f"{biggest.get('memory', 0) / 2**30:.1f} GiB (lower --cpus-per-worker / --workers-per-trial)")
    return requested or max(1, min(fits, cap or fits))


def _tuner(sweep: Sweep, opts: SweepOptions, name: str, param_space: dict, trainable: Any, planned: int,
           max_concurrent: int, max_epochs: int, in_process_trials: bool) -> Any:
    from ray import tune

    from .callbacks import ParquetResults, ReleaseStoppedTrainRuns
    from .console import LiveLines
    from .search import scheduler, searcher
    from ..tracking import callbacks as tracking_callbacks

    budget = sweep.preset.budget(sweep.kind)
    storage_path, filesystem = ray_storage(join(opts.results, name))
    tune_run = tune.RunConfig(
        name="tune", storage_path=storage_path, storage_filesystem=filesystem, verbose=0,  # the console: LiveLines
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[ParquetResults(opts.results, name, sweep.preset.name), ReleaseStoppedTrainRuns(),
                   LiveLines(planned, max_epochs, max_concurrent),
                   *tracking_callbacks(replace(opts.track, experiment=name), flat_run_config)],
        failure_config=tune.FailureConfig(max_failures=TUNE_RETRIES))
    # in-process trials (no Ray Train) may reuse a finished trial's process: no second import of torch and timm
    common = dict(trial_dirname_creator=trial_dirname, reuse_actors=in_process_trials)
    if sweep.cells:
        tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=max_concurrent,
                                      scheduler=scheduler(sweep, budget, max_epochs, (opts.results, name)), **common)
    else:
        search = searcher(sweep, opts.seed, planned, max_concurrent, (opts.results, name))
        tune_config = tune.TuneConfig(search_alg=search, num_samples=planned,
                                      scheduler=scheduler(sweep, budget, max_epochs, (opts.results, name)),
                                      **common)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=tune_run)


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


def missing_teachers(teachers: set[str], teacher_dir: str) -> list[str]:
    return sorted(t for t in teachers if not exists(teacher_path(teacher_dir, t)))


@dataclass
class Plan:
    """A new sweep, checked without a cluster: the trial config shared by every trial, how many trials, one
    representative run per cell or pair, and the teacher checkpoints still missing."""

    base: dict[str, Any]
    planned: int
    runs: list[RunConfig]
    missing: list[str]


def plan(sweep: Sweep, opts: SweepOptions, name: str) -> Plan:
    teacher_dir = join(opts.teacher_dir)
    base = {"_preset": sweep.preset.run_preset, "_run": run_overrides(sweep, opts),
            "_sweep_dir": join(opts.results, name), "_teacher_dir": teacher_dir, "_resources": opts.trial_resources,
            "_plugins": loaded_plugins()}
    if sweep.cells:
        planned = len(sweep.cells)
    else:
        run_seeds = seeds(sweep.kind, sweep.preset, opts)
        if len(run_seeds) > 1:
            raise UserError(f"{sweep.kind} runs every sampled config once (one seed, got {len(run_seeds)}); "
                            f"reproduce_tables runs configs over several seeds")
        base["_run"]["seed"] = run_seeds[0]
        planned = opts.num_samples or int(sweep.preset.budget(sweep.kind).get("num_samples", 1))
    from .cluster import trains_here

    # the dataset must be where trials train: checked here when that is this machine, else by each trial
    runs, teachers = check_configs(trial_configs(sweep, base), dataset=trains_here(opts.cluster))
    check_method_sets(opts.sets, {r.method.name for r in runs}, sweep.kind)
    from ..models import check_checkpoint_file

    missing = missing_teachers(teachers, teacher_dir)
    for teacher in sorted(teachers - set(missing)) if not is_uri(teacher_dir) else ():  # a URI's: by the trials
        check_checkpoint_file(teacher_path(teacher_dir, teacher), "teacher checkpoint", load=True)
    if missing and not sweep.preset.section("teachers").get("auto"):
        raise UserError(f"missing teacher checkpoint(s) in {teacher_dir}: {', '.join(f'{t}.pth' for t in missing)}; "
                        f"write them with python sweeps/teachers.py --preset {sweep.preset.name} (or point "
                        f"--teacher-dir at them)")
    return Plan(base, planned, runs, missing)


def run(sweep: Sweep, opts: SweepOptions, out: Callable[[str], None] = print,
        table: Callable[[list[dict]], list[str]] | None = None) -> SweepOutcome:
    """Check, then run (or resume) `sweep` and print its summary (`table`: the lines that end it instead of the best
    trial per pair, e.g. reproduce_tables' comparison table); returns where its tables are and whether it was
    interrupted. The sweep is locked while it runs here: a second driver on the same sweep refuses
    (`uhkd.sweep.lock`). A lost cluster ends this process (`_fit`)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # absolute here: under Ray Client the callbacks that write the tables resolve paths on the cluster
    opts = replace(opts, results=join(opts.results))
    if not opts.cluster.startswith("ray://"):  # under Ray Client the head writes there, not this machine
        check_folder(opts.results, "--results")
    name, existing = sweep_name(sweep, opts)
    try:
        outcome = _resume(sweep, opts, name, out) if opts.resume else _run(sweep, opts, name, existing, out)
    finally:
        lock.release(join(opts.results, name))
    summarize(outcome, not sweep.cells, out, table)
    return outcome


def _resume(sweep: Sweep, opts: SweepOptions, name: str, out: Callable[[str], None]) -> SweepOutcome:
    """Continue sweep `name` with its stored settings, at its current location: what Tune saved is restored; when
    Tune saved nothing whole, its search starts afresh, keeping the trials that have rows."""
    from ray import tune

    from .cluster import connect

    folder = join(opts.results, name)
    lock.hold(folder, name)
    manifest = read_manifest(folder, name)
    if manifest["kind"] != sweep.kind:
        raise UserError(f"sweep {name!r} is a {manifest['kind']} sweep; resume it with sweeps/{manifest['kind']}.py")
    rows = SweepTables(opts.results, name).load().trials  # an unreadable table fails here, in one line
    stored = read_stored(folder, name)
    torn = set_aside_torn_state(folder) if stored is not None else []  # without a stored sweep, nothing else to use
    saved = saved_state(folder)
    if stored is None and not saved:
        raise UserError(f"cannot resume sweep {name!r}: neither Tune's state nor {folder}/{STORED} was saved; "
                        f"start it again without --resume")
    out(connect(opts.cluster))
    if torn:
        out(f"sweep {name}: Tune's state of run(s) {', '.join(torn)} was cut off while being saved (the driver was "
            f"killed then); set aside as {folder}/{TUNE}/*{TORN}")
    trainable = tune.with_resources(train_trial, manifest["resources"])
    planned, concurrent = manifest["planned"], manifest["concurrent"]
    if stored is not None:
        stored = stored.at(opts.results, name)
    if not saved:
        kept = f"; {len(rows)} of its {planned} trial(s) have rows and are kept" if rows else ""
        out(f"sweep {name}: {'no whole state of Tune' if torn else 'stopped before Tune saved any state'}; starting "
            f"its search afresh with its stored settings{kept}")
        if stored.sweep.cells:  # a search counts the rows itself (PairSearch); a grid runs the cells left
            cells = cells_left(stored.space, rows)
            if not cells:
                return _outcome(opts, name, planned, concurrent, None, time.monotonic())
            stored = replace(stored, space={**stored.space, "cell": tune.grid_search(cells)})
        return _fit(_tuner(stored.sweep, stored.opts, name, stored.space, trainable, planned, concurrent,
                           stored.max_epochs, stored.in_process), opts, name, planned, concurrent, out)
    out(f"sweep {name}: resuming with its stored trials and settings")
    space = None  # a sweep that stored no search (an older toolkit's): Tune's state alone, at the place it had
    if stored is not None:
        # built again here, rewriting the tuner.pkl that Tune's restore reads: its callbacks, search and scheduler
        # then write under this --results
        _tuner(stored.sweep, stored.opts, name, stored.space, trainable, planned, concurrent, stored.max_epochs,
               stored.in_process)
        space = stored.space
    # errored trials crashed on infrastructure (a configuration error ends as status=failed, not errored): they
    # continue from their checkpoints too
    path, filesystem = ray_storage(join(folder, TUNE))
    tuner = tune.Tuner.restore(path, trainable=trainable, storage_filesystem=filesystem, param_space=space,
                               resume_unfinished=True, resume_errored=True, restart_errored=False)
    return _fit(tuner, opts, name, planned, concurrent, out)


def _run(sweep: Sweep, opts: SweepOptions, name: str, existing: bool, out: Callable[[str], None]) -> SweepOutcome:
    import ray
    from ray import tune

    from .cluster import connect, scalable_nodes

    p = plan(sweep, opts, name)
    folder = join(opts.results, name)
    lock.hold(folder, name)
    out(connect(opts.cluster))
    if existing:
        out(f"sweep {name}: its earlier start stopped before Tune saved any state; starting it afresh")
    budget = sweep.preset.budget(sweep.kind)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    scalable = scalable_nodes()
    gpus = opts.gpus_per_trial
    if gpus is None:
        auto = budget.get("gpus_per_trial", "auto")
        gpus = float(any(n.get("GPU", 0) >= 1 for n in scalable or nodes)) if auto == "auto" else float(auto)
    cfg = p.runs[0]
    p.base["_run"]["gpus_per_worker"] = gpus / max(cfg.workers, 1)
    # an autoscaler counts a node type that states no memory as having none, and would never start one for a
    # trial that reserves memory
    memory = not scalable or all(n.get("memory") for n in scalable)
    bundles = trial_bundles(cfg.workers, cfg.cpus_per_worker, gpus, opts.trial_resources, memory)
    max_concurrent = concurrency(nodes, bundles, gpus, opts.max_concurrent, budget.get("max_concurrent"), scalable)
    if p.missing:
        train_teachers(sweep.preset, p.missing, opts, out)
    resources = trial_resources(bundles)
    space = {**p.base, **sweep.space} if not sweep.cells else {**p.base, "cell": tune.grid_search(grid_cells(sweep))}
    stored = StoredSweep(sweep, opts, space, max(r.optim.epochs for r in p.runs), in_process(cfg.workers))
    write_stored(folder, stored)
    write_manifest(folder, {"kind": sweep.kind, "preset": sweep.preset.name, "planned": p.planned,
                            "concurrent": max_concurrent, "resources": resources})
    from .console import plan_lines
    from .search import split_budget

    shares = split_budget(p.planned, list(sweep.space["pair"].categories)) if not sweep.cells else None
    for line in plan_lines(name, p.planned, [r.optim.epochs for r in p.runs], max_concurrent, cfg.workers, folder,
                           shares, opts.seed):
        out(line)
    tuner = _tuner(sweep, opts, name, space, tune.with_resources(train_trial, resources), p.planned, max_concurrent,
                   stored.max_epochs, stored.in_process)
    return _fit(tuner, opts, name, p.planned, max_concurrent, out)


def train_teachers(preset: SweepPreset, models: Sequence[str], opts: SweepOptions,
                   out: Callable[[str], None] = print) -> None:
    """Train the missing teachers of `preset` on the cluster this process is connected to (before a sweep)."""
    teacher_dir = join(opts.teacher_dir)
    out(f"teachers: training the missing {', '.join(models)} into {teacher_dir} first")
    # the students' data, model scale and step limits carry over (the checkpoint must match them); not their recipe
    sets = {k: v for k, v in opts.sets.items() if k in CARRIED or (k.startswith("data.") and k != "data.split")}
    topts = dataclasses.replace(opts, name="", resume=False, num_samples=None, epochs=None, seeds=None, sets=sets,
                                pairs=None)
    outcome = run(teachers_sweep(preset, models, seeds("teachers", preset, topts)[0]), topts, out)
    if outcome.interrupted:
        raise KeyboardInterrupt
    failed = install([r for r in outcome.tables.trials.values() if r["student"] in models], teacher_dir, out)
    if failed:
        raise RunFailed(f"teacher training failed ({'; '.join(failed)}); the sweep needs these teachers")


def compacted(results: str, name: str) -> SweepTables:
    return SweepTables(results, name).compact()


def tables_where_written(results: str, name: str) -> SweepTables:
    """The sweep's tables, compacted and read on the side that wrote them: under Ray Client (`ray://`) Tune's driver
    and its callbacks run on the cluster's head node, so there; here otherwise."""
    import ray

    if not ray.util.client.ray.is_connected():
        return compacted(results, name)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # the server's node
    return ray.get(ray.remote(num_cpus=0, scheduling_strategy=here)(compacted).remote(results, name))


def _fit(tuner: Any, opts: SweepOptions, name: str, planned: int, concurrent: int,
         out: Callable[[str], None]) -> SweepOutcome:
    from ..tracking import read_back
    from .cluster import watch

    started_at = time.monotonic()
    # SIGTERM (ray job stop, Slurm, Kubernetes, timeout) stops the sweep like Ctrl-C: Tune saves its state and the
    # resume hint is printed. Set here, after ray.init, which installs its own SIGTERM handler (exit at once).
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    stop_watching = watch(lambda address, seconds: _cluster_lost(opts, name, address, seconds))
    try:
        grid = tuner.fit()
    except Exception as exc:
        if not disk_full(exc):
            raise
        written = len(SweepTables(opts.results, name).load().trials)
        raise UserError(f"the results disk is full (no space left on device): the sweep stopped; the {written} "
                        f"trial row(s) written before are intact in {join(opts.results, name)}; free some space, "
                        f"then continue with {resume_flags(name, opts.results)}") from None
    finally:
        stop_watching()
        signal.signal(signal.SIGTERM, previous)
    for line in read_back(replace(opts.track, experiment=name)):
        out(line)
    return _outcome(opts, name, planned, concurrent, grid, started_at)


def _outcome(opts: SweepOptions, name: str, planned: int, concurrent: int, grid: Any,
             started_at: float) -> SweepOutcome:
    tables = tables_where_written(opts.results, name)
    # every trial that ends gets its row; fewer rows than planned trials means Tune was interrupted (SIGINT)
    return SweepOutcome(name, tables.folder, tables, planned, concurrent, interrupted=len(tables.trials) < planned,
                        grid=grid, location=join(opts.results, name), minutes=(time.monotonic() - started_at) / 60)


def _cluster_lost(opts: SweepOptions, name: str, address: str, seconds: float) -> None:
    """The cluster stopped answering: what Tune saved (every few seconds) is what --resume continues from; the
    tables are compacted here (not under Ray Client: the lost head wrote them), the user told in one line, and
    this process ends (130: interrupted) before Ray's core worker would, after 60 s and without a word."""
    try:
        written = f"the {len(compacted(opts.results, name).trials)} trial row(s) written are in " \
                  f"{join(opts.results, name)}; " if not opts.cluster.startswith("ray://") else ""
    except Exception as exc:  # a full disk, an unreachable store: the rows stay in their part files
        written = f"the tables were left uncompacted ({one_line(exc, 120)}); "
    print(f"error: the Ray cluster at {address} has not answered for {seconds:g} s: the sweep stopped; {written}"
          f"continue with {resume_flags(name, opts.results)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` or one of its causes is "no space left on device" (Tune, Ray and pyarrow wrap it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def summarize(outcome: SweepOutcome, search: bool, out: Callable[[str], None],
              table: Callable[[list[dict]], list[str]] | None = None) -> None:
    from .console import summary_lines

    for line in summary_lines(list(outcome.tables.trials.values()), outcome.location, outcome.planned,
                              outcome.minutes, outcome.name, search, table):
        out(line)
    code = exit_code(outcome)
    if code in (EXIT_ALL_FAILED, EXIT_SOME_FAILED):
        out(f"exit code {code}: {'every' if code == EXIT_ALL_FAILED else 'some'} trial(s) failed (listed above)")


def main(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace, SweepOptions], Sweep],
         argv: Sequence[str] | None = None,
         after: Callable[[SweepOutcome, SweepOptions], None] | None = None,
         table: Callable[[list[dict]], list[str]] | None = None) -> int:
    """Parse, build and run a sweep (then `after` on a finished one; `table`: see `run`); returns its exit code
    (`exit_code`, or `EXIT_BAD_INPUT` with one line)."""
    import ray

    started_ray = not ray.is_initialized()
    try:
        args, opts = parse(parser, argv)
        outcome = run(build(args, opts), opts, table=table)
        if after is not None and not outcome.interrupted:
            after(outcome, opts)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ALL_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    if outcome.interrupted:
        print(f"interrupted: continue with python {parser.prog} {resume_flags(outcome.name, opts.results)}",
              file=sys.stderr)
    return exit_code(outcome)
