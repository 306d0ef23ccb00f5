"""The training loop of one run, the same function in-process, in a Tune trial's own process and inside Ray Train
workers.

A `Session` says where the loop runs: its rank, world size and device, how a model is wrapped for data parallelism,
where the last checkpoint comes from and where each epoch's checkpoint goes. A checkpoint is a folder: `checkpoint.pt`
(the run's state, every report so far included), `metrics.jsonl` (those reports, one JSON line each, for readers that
should not load the state) and, in the checkpoint of the run's last epoch, `student.pt` (the exported student).
`LocalSession` keeps one in the run's output folder; the Ray sessions (`uhkd.train`) hand each to Tune or Ray Train,
which store it on the run's storage (a local, shared or object-store location).

Randomness is re-seeded at the start of every epoch from (seed, epoch, rank), so a run resumed from the checkpoint of
epoch e draws the same crops, mixes and drop-path masks as an uninterrupted run, on every rank, without the checkpoint
having to carry each rank's generator states.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import RunConfig, batch_plan, flatten
from .console import progress
from .data.loader import WorkerData
from .errors import UserError, one_line
from .methods import Distiller, build_method, teacher_use
from .models import create_stage_model, load_teacher, save_model_checkpoint
from .storage import CHECKPOINT, METRICS_LOG, PREVIOUS_CHECKPOINT, STUDENT, local_file

NAN = float("nan")
# settings that may change between a run and its resumption (where things are, not what is trained)
RESUMABLE_CHANGES = frozenset({"name", "output_dir", "data.root", "data.download", "data.loader_workers",
                               "max_failures", "threads", "cpus_per_worker", "eval_teacher", "compile"})
# steps between reads of the on-device non-finite record (each read is one host sync, plus an all-reduce on >1 rank)
NON_FINITE_CHECK_EVERY = 50


class Session:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def load(self) -> dict | None:
        """The state of the run's last checkpoint, None when there is none."""
        raise NotImplementedError

    def report(self, metrics: dict, save: Callable[[Path], None]) -> None:
        """Called by every rank once per epoch, once for a failure and once when a resumed run had already ended;
        on rank 0, `save(folder)` writes the checkpoint's files into `folder` for the session to store."""
        raise NotImplementedError


class LocalSession(Session):
    """In-process: the checkpoint's files in `<output_dir>` (the state before the latest kept as
    `checkpoint.prev.pt`, to fall back to when the latest is unreadable), each epoch's metrics to the `report`
    callback."""

    def __init__(self, output_dir: str, device: torch.device, report: Callable[[dict], None] | None = None,
                 resume: bool = True) -> None:
        self.folder = Path(output_dir)
        self.device, self.callback, self.resume = device, report, resume

    def load(self) -> dict | None:
        if not self.resume:
            return None
        return read_checkpoint([(str(self.folder / n), self.folder / n) for n in (CHECKPOINT, PREVIOUS_CHECKPOINT)])

    def report(self, metrics: dict, save: Callable[[Path], None]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # written beside, then renamed into place: a crash mid-write leaves the previous checkpoint intact
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".checkpoint-") as tmp:
            save(Path(tmp))
            if (self.folder / CHECKPOINT).is_file():
                os.replace(self.folder / CHECKPOINT, self.folder / PREVIOUS_CHECKPOINT)
            for path in sorted(Path(tmp).iterdir(), key=lambda p: p.name == CHECKPOINT):  # the state last
                os.replace(path, self.folder / path.name)
        if self.callback is not None:
            self.callback(dict(metrics))


def read_checkpoint(candidates: Iterable[tuple[str, Path]]) -> dict | None:
    """The first readable checkpoint of `candidates` (what to call it, the local file; newest first), or None to
    start from epoch 1. Skipping an unreadable (truncated, corrupted) one is said on stderr, with the checkpoint
    used instead or the restart."""
    problems = []
    for name, path in candidates:
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "epoch" not in state:
                raise ValueError("not a uhkd run checkpoint")
        except Exception as err:  # torch raises many types for a truncated or damaged file
            problems.append(f"checkpoint {name} is unreadable ({type(err).__name__}: {one_line(err, 120)})")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}; falling back to {name} (epoch {state['epoch']})",
                  file=sys.stderr, flush=True)
        return state
    if problems:
        print(f"warning: {'; '.join(problems)}; no readable checkpoint left: restarting the run from epoch 1",
              file=sys.stderr, flush=True)
    return None


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def compiled(model: nn.Module, setting: str, device: torch.device) -> nn.Module:
    """`model` under `torch.compile` as the `compile` setting says (auto: on CUDA only; on CPU compiling takes
    minutes for little gain). The compiled module shares the parameters: optimizer and checkpoints are unchanged."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return model
    return torch.compile(model, mode="reduce-overhead" if setting == "cudagraphs" else None)


class NonFinite:
    """On-device record of the first step of an epoch whose loss terms are not all finite: `add` launches a few
    tiny kernels and never waits for the device; `reason` reads the record (one host sync) and says what failed.
    All ranks call `reason` at the same steps, so they agree and stop together."""

    def __init__(self, terms: tuple[str, ...], session: "Session") -> None:
        self.terms, self.session = terms, session
        self.step = torch.zeros((), dtype=torch.float64, device=session.device)  # 0: none yet
        self.values = torch.zeros(len(terms), device=session.device)

    def add(self, values: torch.Tensor, step: int) -> None:
        first = ~torch.isfinite(values).all() & (self.step == 0)
        self.step = torch.where(first, float(step), self.step)
        self.values = torch.where(first, values, self.values)

    def reason(self, epoch: int) -> str:
        earliest = torch.where(self.step > 0, self.step, math.inf)
        if self.session.world > 1:
            dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
        seen, own = torch.stack([earliest, self.step]).tolist()
        if math.isinf(seen):
            return ""
        names = [f"loss_{t}={v}" for t, v in zip(self.terms, self.values.tolist()) if not math.isfinite(v)]
        return (f"non-finite loss at epoch {epoch} step {int(seen)}: "
                f"{', '.join(names) if own == seen else 'on another rank'}")


def build_optimizer(cfg: RunConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW at peak `lr` over the trainable parameters; biases and norm weights (1-d) get no weight
    decay."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(cfg: RunConfig, updates_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after `u` optimizer updates: linear warm-up, then cosine to `min_lr` or steps
    (an lr scaled for the batch scales `min_lr` alike, so the ratio is `optim`'s)."""
    o = cfg.optim
    warm = o.warmup_epochs * updates_per_epoch
    total = o.epochs * updates_per_epoch

    def factor(u: int) -> float:
        if u < warm:
            return (u + 1) / warm
        if o.schedule == "step":
            return o.step_gamma ** ((u // updates_per_epoch) // o.step_epochs)
        progress = min(1.0, (u - warm) / max(1, total - warm))
        floor = o.min_lr / o.lr if o.lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def evaluate(forward_logits: Callable[[torch.Tensor], torch.Tensor], data: WorkerData, session: Session,
             dtype: torch.dtype | None) -> tuple[float, float]:
    """Top-1 and top-5 (%) over the whole evaluation set: each rank scores its shard, counts are summed."""
    counts = torch.zeros(3, device=session.device, dtype=torch.float64)
    for images, labels in data.eval_batches():
        with torch.autocast(session.device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward_logits(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(dim=1).sum()
        counts[2] += len(labels)
    if session.world > 1:
        dist.all_reduce(counts)
    correct1, correct5, n = counts.tolist()
    return 100 * correct1 / max(n, 1), 100 * correct5 / max(n, 1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def resume_line(last: dict) -> str:
    """What a run says when it starts again from a checkpoint whose last report is `last`."""
    if last["status"] == "failed":
        return f"run already failed: {last['failure_reason']}"
    return f"run already finished at epoch {last['epoch']}" if last["status"] == "ok" else \
        f"resuming after epoch {last['epoch']}"


def teacher_label(cfg: RunConfig) -> str:
    """"teacher <name>", saying so when it is randomly initialised (no checkpoint, `model.random_teacher`)."""
    m = cfg.model
    random = m.random_teacher and not m.teacher_checkpoint
    return f"teacher {m.teacher}" + (" (random: no checkpoint, model.random_teacher=true)" if random else "")


def epoch_line(m: dict, epochs: int, terms: tuple[str, ...]) -> str:
    parts = " ".join(f"{t} {m[f'loss_{t}']:.4f}" for t in terms)
    return (f"epoch {m['epoch']}/{epochs} loss {m['loss']:.4f} ({parts}) top1 {m['top1']:.2f} top5 {m['top5']:.2f} "
            f"best {m['best_top1']:.2f}@{m['best_epoch']} lr {m['lr']:.3g} {m['images_per_s']:.0f} img/s "
            f"{m['epoch_time_s']:.1f}s")


class Run:
    """Everything one worker builds for a run; `fit()` trains it to the end (or to a failure)."""

    def __init__(self, cfg: RunConfig, session: Session) -> None:
        self.cfg, self.session = cfg, session
        dev = session.device
        seed_everything(cfg.seed, 0, session.rank)
        self.data = WorkerData(cfg.data, cfg.seed, dev, session.rank, session.world, cfg.optim.max_steps_per_epoch)
        info = self.data.info
        m = cfg.model
        # from scratch: the dataset's statistics; from pretrained weights: the normalisation they were trained with
        stats = {} if m.pretrained_file else {"mean": info.mean, "std": info.std}
        student = create_stage_model(m.student, num_classes=info.num_classes, img_size=cfg.data.img_size,
                                     scale=m.scale, isotropic_blocks=m.isotropic_blocks,
                                     pretrained_file=local_file(m.pretrained_file), **stats)
        use = teacher_use(cfg)
        teacher = None
        if use.needed:  # a method without a teacher (scratch) builds and evaluates none
            if not m.teacher:
                raise UserError(f"method {cfg.method.name!r} needs a teacher: set --teacher (model.teacher)")
            teacher = load_teacher(m.teacher, local_file(m.teacher_checkpoint), num_classes=info.num_classes,
                                   img_size=cfg.data.img_size, scale=m.scale, isotropic_blocks=m.isotropic_blocks,
                                   stages=use.stages, needs_logits=use.logits or cfg.eval_teacher)
        self.teacher = teacher
        self.distiller: Distiller = build_method(cfg, student, teacher).to(dev)
        if teacher is not None:
            teacher.to(dev)
        self.channels_last = dev.type == "cuda" and m.channels_last
        if self.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.model = session.wrap(self.distiller)
        self.step_model = compiled(self.model, cfg.compile, dev)  # the training forward (backward follows it)
        self.dtype = amp_dtype(cfg.amp, dev)
        o = cfg.optim
        self.plan = batch_plan(cfg, session.world)
        self.accumulate = self.plan.accumulation
        if self.data.steps_per_epoch < self.accumulate:
            raise UserError(f"{self.accumulate} accumulation steps (optim.effective_batch={o.effective_batch}, "
                            f"optim.accumulate={o.accumulate}) exceed the {self.data.steps_per_epoch} steps of an "
                            f"epoch")
        self.updates_per_epoch = self.data.steps_per_epoch // self.accumulate
        self.optimizer = build_optimizer(cfg, self.distiller, o.lr * self.plan.lr_scale)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.updates_per_epoch))
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.dtype == torch.float16)
        self.ema = None
        if o.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.distiller.student, decay=o.ema_decay)
        self.terms = tuple(self.distiller.terms)
        self.best = {"best_top1": NAN, "best_top5": NAN, "best_epoch": 0}
        self.teacher_top1 = NAN
        self.epoch = 0
        self.history: list[dict] = []  # every report so far, carried by each checkpoint

    @property
    def eval_student(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.distiller.student

    def state(self, metrics: dict, trainable: bool = True) -> dict:
        """The checkpoint; without `trainable` only the record of how the run ended (a failure)."""
        state = {"epoch": self.epoch, "metrics": metrics, "history": list(self.history), "config": flatten(self.cfg),
                 "best": dict(self.best), "teacher_top1": self.teacher_top1, "model": None}
        if trainable:
            state.update(model=self.distiller.trainable_state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                         ema=self.ema.state_dict() if self.ema else None)
        return state

    def restore(self, state: dict) -> None:
        changed = sorted(k for k, v in flatten(self.cfg).items()
                         if k not in RESUMABLE_CHANGES and state["config"].get(k) != v)
        if changed:
            raise UserError(f"the checkpoint in {self.cfg.output_dir or 'this run'} belongs to a run with other "
                            f"settings ({', '.join(changed)}); use another output folder/run name, or remove it")
        self.epoch = state["epoch"]
        self.best, self.teacher_top1 = dict(state["best"]), state["teacher_top1"]
        self.history = list(state["history"])
        if state["model"] is None:  # a failure record: nothing to train from
            return
        self.distiller.load_trainable_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def base_metrics(self) -> dict:
        return {"teacher_top1": self.teacher_top1, "student_params": self.distiller.student_param_count(),
                "extra_params": self.distiller.extra_param_count(),
                "effective_batch": self.plan.effective_batch}

    def fit(self) -> dict:
        metrics: dict = {}
        state = self.session.load()
        if state is not None:
            self.restore(state)
            metrics = state["metrics"]
            self._log(resume_line(metrics))
            if metrics["status"] in ("ok", "failed"):
                # reported again, so that whoever drives the run (Tune, Ray Train) learns how it ended and where
                # its files are even when the first report of its end was lost to an interruption
                self.session.report(metrics, self.saver(state, export=metrics["status"] == "ok"))
                return metrics
        elif self.teacher is not None and self.cfg.eval_teacher:
            self.teacher_top1 = evaluate(self.teacher.forward_logits, self.data, self.session, self.dtype)[0]
            self._log(f"{teacher_label(self.cfg)} top1 {self.teacher_top1:.2f} on the evaluation set")
        while self.epoch < self.cfg.optim.epochs:
            metrics = self._train_epoch(self.epoch + 1)
            self.history.append(metrics)
            if metrics["status"] == "failed":
                self.session.report(metrics, self.saver(self.state(metrics, trainable=False)))
                self._log(f"run failed: {metrics['failure_reason']}", sys.stderr)
                return metrics
            self.epoch += 1
            self._log(epoch_line(metrics, self.cfg.optim.epochs, self.terms))
            self.session.report(metrics, self.saver(self.state(metrics), export=self.epoch == self.cfg.optim.epochs))
        return metrics

    def saver(self, state: dict, export: bool = False) -> Callable[[Path], None]:
        """Writes a checkpoint folder holding `state` (with `export`: and the exported student)."""
        def save(folder: Path) -> None:
            torch.save(state, folder / CHECKPOINT)
            (folder / METRICS_LOG).write_text("".join(json.dumps(m) + "\n" for m in state["history"]))
            if export:
                save_model_checkpoint(folder / STUDENT, self.eval_student, epoch=self.epoch,
                                      top1=state["metrics"]["top1"], method=self.cfg.method.name,
                                      teacher=self.cfg.model.teacher, dataset=self.cfg.data.dataset)

        return save

    def _log(self, line: str, file: TextIO | None = None) -> None:
        if self.session.rank == 0:
            print(line, file=file or sys.stdout, flush=True)

    def _train_epoch(self, epoch: int) -> dict:
        cfg, dev, accumulate = self.cfg, self.session.device, self.accumulate
        seed_everything(cfg.seed, epoch, self.session.rank)
        self.distiller.train()
        sums = torch.zeros(len(self.terms) + 1, device=dev, dtype=torch.float64)
        non_finite = NonFinite(self.terms, self.session)
        steps = images_seen = 0
        start = time.perf_counter()
        # whole accumulation rounds only: a partial last round's gradients would leak into the next epoch's first
        # update (and be lost on resumption)
        steps_planned = self.updates_per_epoch * accumulate
        batches = progress(itertools.islice(self.data.train_batches(epoch), steps_planned), steps_planned,
                           f"epoch {epoch}/{cfg.optim.epochs}", enabled=self.session.rank == 0)
        for step, (images, target) in enumerate(batches):
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            update = (step + 1) % accumulate == 0
            sync = contextlib.nullcontext() if update or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype is not None):
                    _, losses = self.step_model(images, target, epoch - 1)
                values = torch.stack([losses[t].float() for t in self.terms])
                self.scaler.scale(values.sum() / accumulate).backward()
            if update:
                self._update()
            values = values.detach()
            non_finite.add(values, step + 1)
            sums += torch.cat([values.sum().view(1), values]).double()
            steps += 1
            images_seen += len(images)
            # no host sync per step: the record is read every NON_FINITE_CHECK_EVERY steps and at the epoch's end
            if steps % NON_FINITE_CHECK_EVERY == 0 and (reason := non_finite.reason(epoch)):
                return self._failure(epoch, reason, time.perf_counter() - start)
        if reason := non_finite.reason(epoch):
            return self._failure(epoch, reason, time.perf_counter() - start)
        train_time = time.perf_counter() - start
        with eval_mode(self.eval_student) as student:
            top1, top5 = evaluate(student.forward_logits, self.data, self.session, self.dtype)
        if not top1 <= self.best["best_top1"]:  # also true while best is NaN
            self.best = {"best_top1": top1, "best_top5": top5, "best_epoch": epoch}
        mean = (sums / max(steps, 1)).tolist()
        return {"epoch": epoch, "top1": top1, "top5": top5, **self.best, "loss": mean[0],
                **{f"loss_{t}": v for t, v in zip(self.terms, mean[1:])},
                "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": images_seen * self.session.world / max(train_time, 1e-9),
                "epoch_time_s": time.perf_counter() - start, **self.base_metrics(),
                "status": "ok" if epoch == cfg.optim.epochs else "running", "failure_reason": ""}

    def _update(self) -> None:
        o = self.cfg.optim
        if o.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], o.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.distiller.student, step=self.scheduler.last_epoch)

    def _failure(self, epoch: int, reason: str, elapsed: float) -> dict:
        return {"epoch": epoch, "top1": NAN, "top5": NAN, **self.best, "loss": NAN,
                **{f"loss_{t}": NAN for t in self.terms}, "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": NAN, "epoch_time_s": elapsed, **self.base_metrics(), "status": "failed",
                "failure_reason": reason}


def train_loop(cfg: RunConfig, session: Session) -> dict:
    """Build the run on this worker and train it; returns the last metrics (status ok or failed)."""
    return Run(cfg, session).fit()
