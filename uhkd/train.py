"""One distillation run: in-process (`run_in_process`), in a Tune trial's own process (`run_in_trial`), on a Ray Train
`TorchTrainer` (`fit_ray_train`), or from the command line (`python -m uhkd.train`). The loop itself is
`uhkd.trainer`; the Ray paths store every checkpoint (state, metrics log, exported student) through Tune or Ray Train
on the run's storage location, so nothing a run produces stays on the disk of the node it ran on."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import RunConfig, config_hash, flatten, in_process, parse_set, unflatten
from .errors import OneLineParser, UserError
from .hub import HUB
from .plugins import add_plugin_flag, import_modules, load as load_plugins, loaded as loaded_plugins
from .registry import DATASETS, METHODS
from .storage import (METRICS_LOG, check_folder, checkpoint_folders, exists, is_uri, join, location_of, open_location,
                      ray_storage)
from .track_options import add_track_flags, track_options
from .trainer import (CHECKPOINT, STUDENT, LocalSession, Session, epoch_line, read_checkpoint, resume_line,
                      teacher_label, train_loop)

DEFAULT_PRESET = {"cifar100": "cifar100", "imagenet1k": "imagenet", "mnist5k": "quick"}
RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # the controller polls workers every 2 s by default: slow starts
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # the patch prints every worker line twice on the driver
}


def run_name(cfg: RunConfig) -> str:
    """`cfg.name`, else one derived from the method, models, dataset and the config hash (so rerunning the same
    command resumes the same run)."""
    if cfg.name:
        return cfg.name
    teacher = cfg.model.teacher or "none"
    return f"{cfg.method.name}-{cfg.model.student}-{teacher}-{cfg.data.dataset}-{config_hash(cfg)}"


def preflight(cfg: RunConfig, teacher_file: bool = True, dataset: bool = True, node: str = "") -> None:
    """Checks that need no model or data loading, run before any worker starts, so a wrong name or path fails
    once with one line instead of in every worker and every retry. A method that distils needs a teacher
    checkpoint unless `model.random_teacher`; `teacher_file=False` leaves the file's existence to the caller (a
    sweep that trains missing teachers first). The dataset is checked only where the run trains (`dataset`);
    `node` names that machine in the message of a missing one."""
    from .methods import teacher_use

    METHODS.get(cfg.method.name)
    try:
        if dataset:
            DATASETS.get(cfg.data.dataset).check(cfg.data.root, cfg.data.download)
    except UserError as err:
        raise UserError(f"node {node}: {err}" if node else str(err)) from None
    from .models import check_checkpoint_file

    m = cfg.model
    if teacher_use(cfg).needed and not m.teacher_checkpoint and not m.random_teacher:
        raise UserError(f"method {cfg.method.name!r} distils from teacher {m.teacher!r} but no teacher checkpoint "
                        f"is given: pass --teacher-checkpoint FILE (sweeps: --teacher-dir), or --set "
                        f"model.random_teacher=true to distil from a randomly initialised teacher")
    if m.teacher_checkpoint and teacher_file:
        if is_uri(m.teacher_checkpoint):
            if not exists(m.teacher_checkpoint):
                raise UserError(f"teacher checkpoint {m.teacher_checkpoint!r} not found")
        else:
            check_checkpoint_file(m.teacher_checkpoint, "teacher checkpoint")
    if m.pretrained_file and m.pretrained_file != HUB and not exists(m.pretrained_file):
        raise UserError(f"pretrained weight file {m.pretrained_file!r} not found")


def dataset_summary(cfg: RunConfig) -> str:
    """What a dataset read from its files (a class-folder tree, timm's factory names) holds here: classes, images
    per split, the mean/std used; "" for the others."""
    from .data import get_dataset

    d = cfg.data
    return get_dataset(d.dataset, d.root, d.mean, d.std).summary()


def node_name() -> str:
    """This machine as Ray knows it (its node IP address), else its host name."""
    try:
        import ray.util

        return ray.util.get_node_ip_address()
    except Exception:  # Ray not installed or not started here
        return socket.gethostname()


def _absolute(cfg: RunConfig, output_dir: str) -> RunConfig:
    """Ray workers change their working directory: every path must be absolute."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path and not is_uri(path) else path

    return dataclasses.replace(
        cfg, output_dir=absolute(cfg.output_dir or output_dir),
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root)),
        model=dataclasses.replace(cfg.model, teacher_checkpoint=absolute(cfg.model.teacher_checkpoint),
                                  pretrained_file=cfg.model.pretrained_file if cfg.model.pretrained_file == HUB
                                  else absolute(cfg.model.pretrained_file)))


def set_threads(cfg: RunConfig) -> None:
    """torch threads = `threads`, else cpus_per_worker rounded up. More threads than the cores a run really gets
    is ruinous for torch on CPU (measured here: 12 img/s with 2 threads on 2 busy cores, 440 with 1)."""
    torch.set_num_threads(cfg.threads or max(1, math.ceil(cfg.cpus_per_worker)))


def run_in_process(cfg: RunConfig, report: Callable[[dict], None] | None = None, resume: bool = True) -> dict:
    """Train in this process (no Ray). `report` gets each epoch's metrics; the checkpoint is
    `<output_dir>/checkpoint.pt` (output_dir default `runs/<run name>`), resumed from when `resume`. Sets this
    process's torch threads (`set_threads`)."""
    cfg = _absolute(cfg, os.path.join("runs", run_name(cfg)))
    preflight(cfg)
    return train_loop(cfg, LocalSession(cfg.output_dir, _this_process(cfg), report, resume))


def _this_process(cfg: RunConfig) -> torch.device:
    """Set this process up to train `cfg` (torch threads) and return its device."""
    if cfg.gpus_per_worker > 0 and not torch.cuda.is_available():
        raise UserError(f"gpus_per_worker={cfg.gpus_per_worker} but no CUDA device is available here")
    set_threads(cfg)
    return torch.device("cuda" if cfg.gpus_per_worker > 0 else "cpu")


def run_in_trial(cfg: RunConfig) -> dict:
    """Train in this Tune trial's own process (a sweep trial of at most one worker): no Ray Train actors; each
    epoch is one Tune result whose checkpoint Tune stores in the trial's folder on the sweep's storage."""
    cfg = _absolute(cfg, cfg.output_dir)
    preflight(cfg, node=node_name())
    return train_loop(cfg, TuneSession(_this_process(cfg), cfg.output_dir))


class TuneSession(Session):
    """In a Tune trial's own process: checkpoints through `tune.report(metrics, checkpoint=...)`, which uploads the
    folder to the trial's storage location `folder` before it returns; `tune.get_checkpoint()` names the last one
    Tune registered."""

    folder = ""  # the trial's own folder on its storage, where Tune uploads its checkpoints

    def __init__(self, device: torch.device, folder: str) -> None:
        from ray import tune

        self.api, self.device, self.folder = tune, device, folder

    def load(self) -> dict | None:
        """The readable checkpoint of the latest epoch in the trial's storage: also one Tune never registered (the
        trial saved it while the driver was stopping, or killed), even when Tune's saved state names none, so
        that no epoch trains twice; else an older one when those are unreadable."""
        import pyarrow.fs as pafs

        checkpoint = self.api.get_checkpoint()
        if checkpoint is not None:
            fs, run = checkpoint.filesystem, os.path.dirname(checkpoint.path.rstrip("/"))
        elif self.folder:
            fs, run = open_location(self.folder)
        else:
            return None
        with tempfile.TemporaryDirectory(prefix="uhkd-restore-") as folder:
            def fetched() -> Iterator[tuple[str, Path]]:  # one at a time: usually the first one read is used
                for path in latest_first(fs, checkpoint_folders(fs, run)):
                    local = Path(folder) / os.path.basename(path)
                    local.mkdir()
                    if fs.get_file_info(f"{path}/{CHECKPOINT}").type == pafs.FileType.File:
                        pafs.copy_files(f"{path}/{CHECKPOINT}", str(local / CHECKPOINT), source_filesystem=fs,
                                        destination_filesystem=pafs.LocalFileSystem())
                    yield f"{path}/{CHECKPOINT}", local / CHECKPOINT

            return read_checkpoint(fetched())

    def report(self, metrics: dict, save: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="uhkd-ckpt-") as folder:
            checkpoint = None
            if self.rank == 0:
                save(Path(folder))
                checkpoint = self.api.Checkpoint.from_directory(folder)
            self.api.report(metrics, checkpoint=checkpoint)


def latest_first(fs: Any, folders: list[str]) -> list[str]:
    """Checkpoint folders by the last epoch their metrics log holds, latest first (then by name). Tune names a
    restored trial's checkpoints from the count its saved state had, so after an interruption an older name may
    hold a later epoch."""
    def last_epoch(path: str) -> int:
        try:
            with fs.open_input_stream(f"{path}/{METRICS_LOG}") as f:
                lines = f.readall().decode().splitlines()
            return int(json.loads(lines[-1])["epoch"]) if lines else 0
        except (OSError, ValueError, KeyError, TypeError):  # no log or a damaged one: tried last
            return -1

    return sorted(folders, key=lambda path: (last_epoch(path), path), reverse=True)


class RayTrainSession(TuneSession):
    """Inside a TorchTrainer worker: DDP via `prepare_model`, checkpoints through `ray.train.report` (every rank
    reports, rank 0 gives the folder) into the Ray Train run's storage."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self.api = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)


def _worker(config: dict) -> dict:
    """The TorchTrainer's per-worker function. Bad input returns a `user_error` record instead of raising, so
    Ray Train does not retry what cannot succeed; `fit_ray_train` raises it on the driver."""
    import_modules(config["plugins"])
    cfg = unflatten(config["cfg"])
    set_threads(cfg)
    try:
        preflight(cfg, node=node_name())  # the dataset must be on every worker's node
        return train_loop(cfg, RayTrainSession())
    except UserError as err:
        return {"status": "failed", "failure_reason": str(err), "user_error": True}


def fit_ray_train(cfg: RunConfig, *, storage_path: str, run_name: str, callbacks: Sequence[Any] = (),
                  resources: dict[str, float] | None = None) -> dict:
    """Run `cfg` on a TorchTrainer with `cfg.workers` workers (one too: `in_process` is the command line's and the
    sweeps' rule, a direct call is explicit) and return the final metrics, with `checkpoint`: the
    location of the last checkpoint (its `student.pt` is the exported student of a finished run).

    The Ray Train run is `<storage_path>/<run_name>`, where `storage_path` is a local or shared folder or a URI
    (`s3://bucket/path?endpoint_override=HOST:PORT&scheme=http`): a fit with the same name resumes from its
    latest checkpoint, and a worker failure restarts the group from it up to `cfg.max_failures` times. Each
    worker also reserves the custom `resources` (e.g. `{"gpu_node": 1}`). Connects to Ray (`ray.init()`) if this
    process has not.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if cfg.workers < 1:
        raise UserError(f"fit_ray_train needs workers >= 1, got {cfg.workers} (use run_in_process for 0)")
    storage_path = join(storage_path)
    cfg = _absolute(cfg, join(storage_path, run_name))
    preflight(cfg, dataset=False)  # the workers check the dataset on their own nodes
    if not ray.is_initialized():
        ray.init()
    use_gpu = cfg.gpus_per_worker > 0
    if use_gpu and ray.cluster_resources().get("GPU", 0) < cfg.gpus_per_worker * cfg.workers:
        raise UserError(f"{cfg.workers} worker(s) x gpus_per_worker={cfg.gpus_per_worker} needs more GPUs than "
                        f"the Ray cluster has ({ray.cluster_resources().get('GPU', 0):g})")
    for key, value in RAY_TRAIN_ENV.items():  # Ray Train passes these on to its controller and workers
        os.environ.setdefault(key, value)
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {}), **(resources or {})}
    path, filesystem = ray_storage(storage_path)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": flatten(cfg), "plugins": loaded_plugins()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=path, storage_filesystem=filesystem, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    metrics = dict(result.return_value or result.metrics or {})
    if metrics.pop("user_error", False):
        raise UserError(metrics["failure_reason"])
    metrics["checkpoint"] = location_of(result.checkpoint.path, storage_path) if result.checkpoint else ""
    return metrics


def _connect_ray(cfg: RunConfig) -> None:
    """This process's Ray instance if it has one (a notebook's, a test's), else RAY_ADDRESS if set (an existing
    cluster), else a fresh local one sized for the workers. Worker and Ray output stays in the Ray session logs:
    the driver prints each epoch itself (`uhkd.console.FollowCheckpoints`)."""
    import logging

    import ray

    from .ray_session import job_env, ray_messages_to_file, start_local

    if not ray.is_initialized():
        if address := os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env=job_env())
        else:
            start_local(num_cpus=max(os.cpu_count() or 1, math.ceil(cfg.workers * cfg.cpus_per_worker)))
    ray_messages_to_file()


def _driver_lines(cfg: RunConfig) -> Callable[[dict], None]:
    """Prints what the loop prints in its rank-0 worker, from the reports its checkpoints hold."""
    def show(m: dict) -> None:
        if m.get("status") == "failed":
            print(f"run failed: {m.get('failure_reason')}", file=sys.stderr, flush=True)
            return
        terms = tuple(k[len("loss_"):] for k in m if k.startswith("loss_"))
        print(epoch_line(m, cfg.optim.epochs, terms), flush=True)

    return show


def _train(cfg: RunConfig, output: Path, tracker: Any, ray_train: bool = False) -> dict:
    """In-process (0 or 1 worker, unless `ray_train`), or on Ray Train with the driver following the run's metrics;
    each epoch also to `tracker`."""
    from .console import FollowCheckpoints

    here = in_process(cfg.workers) and not ray_train
    if not here:
        _connect_ray(cfg)
    if tracker is not None:
        tracker.start()
    report = tracker.result if tracker is not None else None
    if here:
        return run_in_process(cfg, report=report)
    show = _driver_lines(cfg)

    def on_report(m: dict) -> None:
        show(m)
        if report is not None:
            report(m)

    follow = FollowCheckpoints(str(output), on_report)
    if follow.earlier:  # the workers say so in the Ray session logs
        print(resume_line(follow.earlier[-1]), flush=True)
    with follow:
        return fit_ray_train(cfg, storage_path=str(output.parent), run_name=output.name)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m uhkd.train", description="One distillation run (the protocol: docs/protocol.md).",
                      hints=SWEEP_FLAGS)
    p.add_argument("--teacher", help="timm model name of the teacher")
    p.add_argument("--teacher-checkpoint", help="teacher weights (uhkd checkpoint); required by every method but "
                   "scratch unless --set model.random_teacher=true")
    p.add_argument("--student", help="timm model name of the student")
    p.add_argument("--method", help=f"one of {', '.join(METHODS.names())} (or a --plugin's)")
    p.add_argument("--dataset", help=" | ".join(DATASETS.names()))
    p.add_argument("--data-root", help="dataset folder")
    p.add_argument("--workers", type=int, help="training processes: 0 or 1 = in this process without Ray (default "
                                               "1), 2 or more = a Ray Train TorchTrainer of that many workers")
    p.add_argument("--ray-train", action="store_true", help="run on a Ray Train TorchTrainer even with one worker "
                                                           "(to check that path, e.g. nccl on one GPU)")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--preset", help="quick | cifar100 | imagenet (default: the dataset's own)")
    p.add_argument("--split", help="tune (seeded 90/10 split of the training set) | final (train/test)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field by its dotted key, e.g. --set optim.lr=0.1, or a parameter of the run's "
                        "method, --set method.uhkd.beta=2 (repeatable)")
    p.add_argument("--output", help="local or shared output folder (checkpoint, student.pt); default runs/<run name>")
    p.add_argument("--download", action="store_true", help="download the dataset if missing (CIFAR-100)")
    p.add_argument("--pretrained", metavar="hub|FILE",
                   help="student starts from ImageNet weights: hub = timm's from the Hugging Face hub (or its "
                        "cache), FILE = a local weight file (model.pretrained_file)")
    add_plugin_flag(p)
    add_track_flags(p.add_argument_group("experiment tracking"))
    return p.parse_args(argv)


# what a sweep's flags are called here
SWEEP_FLAGS = {"--pairs": "--teacher T --student S", "--results": "--output", "--teacher-dir": "--teacher-checkpoint",
               "--workers-per-trial": "--workers", "--gpus-per-trial": "--gpus-per-worker",
               "--seeds": "--set seed=N", "--seed": "--set seed=N"}
FLAG_KEYS = {"teacher": "model.teacher", "teacher_checkpoint": "model.teacher_checkpoint",
             "student": "model.student", "method": "method.name", "dataset": "data.dataset",
             "data_root": "data.root", "workers": "workers", "gpus_per_worker": "gpus_per_worker",
             "epochs": "optim.epochs", "split": "data.split", "output": "output_dir",
             "pretrained": "model.pretrained_file"}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's config, with every flag, --set, name and path checked together (`uhkd.validate`)."""
    from .validate import Problems, checked_config

    overrides: dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()
                                 if getattr(args, flag) is not None}
    if args.download:
        overrides["data.download"] = True
    problems = Problems()
    for item in args.sets:
        overrides.update(problems.check(parse_set, [item]) or {})
    problems.check(track_options, args)
    if args.output and is_uri(args.output):
        problems.add(f"--output {args.output!r} is a URI; a single run writes to a local or shared folder (a "
                     f"sweep's --results takes a URI)")
    elif args.output:
        problems.check(check_folder, args.output, "--output")
    dataset = overrides.get("data.dataset", RunConfig().data.dataset)
    return checked_config(args.preset or DEFAULT_PRESET.get(str(dataset)), overrides, problems)


def _tracker(args: argparse.Namespace, cfg: RunConfig, output: Path) -> Any:
    """The run's trackers: config = the resolved flat dotted keys, TensorBoard events in `output`."""
    from .methods import resolve_method
    from .tracking import RunTracker

    resolved = dataclasses.replace(cfg, method=resolve_method(cfg))
    return RunTracker(track_options(args, "uhkd.train"), output.name, flatten(resolved), str(output))


def main(argv: Sequence[str] | None = None) -> int:
    import uhkd.methods  # noqa: F401  (registers the methods, for --help and name checks)

    args = parse_args(argv)
    try:
        load_plugins(args.plugin)
        cfg = config_from_args(args)
        output = Path(cfg.output_dir or os.path.join("runs", run_name(cfg))).expanduser().resolve()
        check_folder(str(output), "the output folder")  # the default one (--output was checked with the flags)
        cfg = dataclasses.replace(cfg, output_dir=str(output))
        preflight(cfg)  # before Ray starts
        found = dataset_summary(cfg)
        if found:
            print(found, flush=True)
        tracker = _tracker(args, cfg, output) if args.track else None
        metrics = _train(cfg, output, tracker, args.ray_train)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the same command resumes the run from its last checkpoint", file=sys.stderr)
        return 130
    if tracker is not None:
        tracker.end(failed=metrics.get("status") == "failed")
        for line in tracker.read_back():
            print(line)
    if metrics.get("status") == "failed":  # the reason was printed already
        return 1
    folder = metrics.get("checkpoint") or cfg.output_dir  # Ray Train: the student is in the last checkpoint
    teacher = "" if math.isnan(metrics["teacher_top1"]) else f", {teacher_label(cfg)} top1 {metrics['teacher_top1']:.2f}"
    print(f"done: top1 {metrics['top1']:.2f} (best {metrics['best_top1']:.2f} at epoch {metrics['best_epoch']})"
          f"{teacher}; student saved as {join(folder, STUDENT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
