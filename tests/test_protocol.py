"""The presets carry the published protocol: the methods' defaults (docs/baselines.md, docs/method.md) for every
preset × method, the recipe (docs/protocol.md#recipes) for every pair of the cifar100 and imagenet sweeps, the
effective batch on any worker count, and the teacher rules (scratch builds none; a distilling run needs a checkpoint
unless it asks for a random teacher)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from uhkd.config import batch_plan, build_config, preset_names
from uhkd.data.augment import RAND_AUGMENT, RECIPES
from uhkd.errors import UserError
from uhkd.methods import resolve_method
from uhkd.models import model_family, model_kind
from uhkd.registry import METHODS
from uhkd.sweep.cli import SweepOptions
from uhkd.sweep.runner import run_overrides
from uhkd.sweep.spec import Sweep, load_preset
from uhkd.sweep.trainable import run_config
from uhkd.train import main, run_in_process
from uhkd.trainer import LocalSession, Run

PROTOCOL = {"quick": "other", "cifar100": "cifar100", "imagenet": "imagenet"}


BASELINES = ("scratch", "kd", "dkd", "dist", "fitnet", "ofa")  # the OFA-KD protocol's; newer methods test their own


def published_params(method: str, protocol: str, student: str) -> dict:
    """Each baseline's defaults as its paper and the OFA-KD protocol give them (docs/baselines.md), written out."""
    cnn = model_kind(student) == "cnn"
    return {
        "scratch": {},
        "kd": dict(alpha=1.0, temperature=1.0),
        "dkd": dict(alpha=1.0, beta=2.0, temperature=1.0, warmup_epochs=20),
        "dist": dict(beta=1.0, gamma=1.0, temperature=1.0),
        "fitnet": dict(alpha=1.0, beta=1.0, temperature=1.0, stages="1,2,3,4", stage_weights=""),
        "ofa": dict(gamma=1.5 if protocol == "imagenet" else 1.0, temperature=1.0, stages="1,2,3,4",
                    branch_weight=0.1 if protocol == "cifar100" and cnn else 1.0),
    }[method]


@pytest.mark.parametrize("student", ["resnet18", "deit_tiny_patch16_224"])
@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_resolves_every_baseline_to_its_published_defaults(preset, method, student):
    """No preset value meant for one method reaches another (imagenet's OFA gamma 1.5 was DIST's γ before the
    methods had their own namespaces)."""
    resolved = resolve_method(build_config(preset, {"method.name": method, "model.student": student}))
    assert (resolved.w_ce, resolved.label_smoothing) == (1.0, 0.1)
    assert resolved.params == published_params(method, PROTOCOL[preset], student)


# docs/protocol.md#recipes per dataset × student family; where the paper is silent, the released OFA-KD configs
# (configs/{cifar,imagenet}/{cnn,vit_mlp}.yaml, 8 GPUs): ImageNet CNN warm-up 3 and effective batch 8 × 64,
# ImageNet ViT/MLP min lr 1e-6.
RECIPE = {
    ("cifar100", "cnn"): dict(epochs=300, optimizer="sgd", lr=0.05, momentum=0.9, schedule="cosine", min_lr=1e-3,
                              warmup_epochs=3, weight_decay=2e-3, effective_batch=1024, batch_size=128,
                              augment="cnn", label_smoothing=0.1, clip_grad=0.0, ema_decay=0.0),
    ("cifar100", "token"): dict(epochs=300, optimizer="adamw", lr=5e-4, schedule="cosine", min_lr=1e-5,
                                warmup_epochs=20, weight_decay=0.05, effective_batch=1024, batch_size=128,
                                augment="vit", label_smoothing=0.1, clip_grad=5.0, ema_decay=0.0),
    ("imagenet1k", "cnn"): dict(epochs=100, optimizer="sgd", lr=0.1, momentum=0.9, schedule="step", step_epochs=30,
                                step_gamma=0.1, warmup_epochs=3, weight_decay=1e-4, effective_batch=512,
                                batch_size=64, augment="cnn", label_smoothing=0.1, clip_grad=0.0, ema_decay=0.0),
    ("imagenet1k", "token"): dict(epochs=300, optimizer="adamw", lr=5e-4, schedule="cosine", min_lr=1e-6,
                                  warmup_epochs=20, weight_decay=0.05, effective_batch=1024, batch_size=128,
                                  augment="vit", label_smoothing=0.1, clip_grad=5.0, ema_decay=0.99996),
}
# docs/protocol.md#recipes: RandAugment m9, mixup 0.8, cutmix 1.0, random erasing 0.25 for ViT/MLP students
AUGMENT = {"cnn": dict(rand_augment=False, mixup=0.0, cutmix=0.0, erase=0.0),
           "vit": dict(rand_augment=True, mixup=0.8, cutmix=1.0, erase=0.25)}


def recipe_of(cfg) -> dict:
    o, plan = cfg.optim, batch_plan(cfg)
    values = {**{k: getattr(o, k) for k in ("epochs", "optimizer", "lr", "momentum", "schedule", "min_lr",
                                             "step_epochs", "step_gamma", "warmup_epochs", "weight_decay",
                                             "clip_grad", "ema_decay")},
              "effective_batch": plan.effective_batch, "batch_size": plan.batch_per_worker,
              "augment": cfg.data.augment, "label_smoothing": cfg.method.label_smoothing}
    return values


def protocol_cells(sweep_preset: str):
    """(pair, method, resolved config) of every pair × method of the preset's reproduce_tables grid (the final
    protocol), as its trials resolve them."""
    preset = load_preset(sweep_preset)
    sweep = Sweep("reproduce_tables", preset, force={"data.split": "final"})
    base = {"_preset": preset.run_preset, "_run": run_overrides(sweep, SweepOptions(preset=sweep_preset)),
            "_sweep_dir": "/tmp/unused", "_teacher_dir": "/tmp/unused"}
    section = preset.section("reproduce_tables")
    pairs = sorted(set(section["pairs"]) | set(preset.section("hetero_pairs")["pairs"]))
    for pair in pairs:
        for method in section["methods"]:
            teacher, student = pair.split(":")
            cell = {"pair": pair if METHODS.get(method).needs_teacher else f":{student}", "method.name": method}
            yield pair, method, run_config({**base, **cell}, "t")


@pytest.mark.parametrize("sweep_preset", ["cifar100", "imagenet"])
def test_every_pair_of_the_paper_sweeps_runs_the_published_recipe(sweep_preset):
    cells = list(protocol_cells(sweep_preset))
    assert len({pair for pair, _, _ in cells}) == {"cifar100": 12, "imagenet": 15}[sweep_preset]
    for pair, method, cfg in cells:
        family = model_family(cfg.model.student)
        expected = RECIPE[(cfg.data.dataset, family)]
        got = recipe_of(cfg)
        where = f"{sweep_preset} {pair} {method}"
        assert {k: got[k] for k in expected} == expected, where
        assert (cfg.data.img_size, cfg.model.scale, cfg.data.split) == (224, "full", "final"), where
        augment = AUGMENT[cfg.data.augment]
        assert {k: getattr(RECIPES[cfg.data.augment], k) for k in augment} == augment, where
        assert cfg.data.protocol == sweep_preset, where
        if method in BASELINES:
            assert cfg.method.params == published_params(method, sweep_preset, cfg.model.student), where
    assert RAND_AUGMENT.startswith("rand-m9-")


@pytest.mark.parametrize("preset,student,expected", [
    ("cifar100", "resnet18", 1024), ("cifar100", "deit_tiny_patch16_224", 1024),
    ("imagenet", "resnet18", 512), ("imagenet", "deit_tiny_patch16_224", 1024), ("quick", "resnet18", None)])
def test_effective_batch_is_reached_on_any_worker_count_by_accumulation(preset, student, expected):
    """`None`: the preset fixes no effective batch (quick keeps its small one, whatever the workers)."""
    batch = build_config(preset, {"model.student": student}).data.batch_size
    for workers in (0, 1, 2, 8):
        world = max(workers, 1)
        plan = batch_plan(build_config(preset, {"model.student": student, "workers": workers}))
        effective = expected or batch * world
        assert (plan.batch_per_worker, plan.train_workers, plan.accumulation, plan.effective_batch,
                plan.lr_scale) == (batch, world, effective // (batch * world), effective, 1.0)


def test_an_effective_batch_that_does_not_divide_fails_in_one_line():
    with pytest.raises(UserError) as err:
        build_config("cifar100", {"model.student": "resnet18", "workers": 3})
    assert str(err.value).startswith("optim.effective_batch=1024 cannot be reached with data.batch_size=128 x 3 "
                                     "worker(s) = 384 images per step") and "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"x 1 worker\(s\) x optim.accumulate=4 = 512 images per update"):
        build_config("cifar100", {"model.student": "resnet18", "optim.accumulate": 4})


def test_opt_in_lr_scaling_keeps_the_batch_and_scales_the_lr():
    cfg = build_config("cifar100", {"model.student": "resnet18", "workers": 3, "optim.scale_lr": True})
    plan = batch_plan(cfg)
    assert (plan.accumulation, plan.effective_batch) == (1, 384)
    assert plan.columns(cfg) == {"batch_per_worker": 128, "train_workers": 3, "accumulation": 1,
                                 "effective_batch": 384, "lr_used": pytest.approx(0.05 * 384 / 1024)}


SMALL = {"data.batch_size": 16, "optim.max_steps_per_epoch": 4, "data.limit_train": 128, "data.limit_eval": 32,
         "optim.epochs": 1}


def test_the_training_loop_accumulates_to_the_effective_batch_and_uses_the_scaled_lr(tmp_path):
    accumulated = Run(build_config("quick", {**SMALL, "optim.effective_batch": 32}), LocalSession(str(tmp_path),
                                                                                                 torch.device("cpu")))
    assert (accumulated.accumulate, accumulated.updates_per_epoch) == (2, 2)
    assert accumulated.base_metrics()["effective_batch"] == 32
    scaled = Run(build_config("quick", {**SMALL, "optim.effective_batch": 64, "optim.scale_lr": True}),
                 LocalSession(str(tmp_path), torch.device("cpu")))
    assert (scaled.accumulate, scaled.base_metrics()["effective_batch"]) == (1, 16)
    assert scaled.optimizer.param_groups[0]["initial_lr"] == pytest.approx(2e-3 * 16 / 64)


def test_scratch_builds_and_evaluates_no_teacher(tmp_path, capsys):
    cfg = build_config("quick", {**SMALL, "method.name": "scratch", "output_dir": str(tmp_path / "run")})
    assert cfg.model.teacher and cfg.eval_teacher  # the preset names a teacher; scratch must ignore it
    run = Run(cfg, LocalSession(cfg.output_dir, torch.device("cpu")))
    assert run.teacher is None and run.distiller.teacher is None
    metrics = run_in_process(cfg)
    assert metrics["status"] == "ok" and math.isnan(metrics["teacher_top1"])
    assert "teacher" not in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["cifar100", "imagenet"])
def test_distilling_without_a_teacher_checkpoint_fails_before_start(tmp_path, capsys, preset):
    code = main(["--preset", preset, "--method", "kd", "--student", "resnet18", "--dataset", "mnist5k",  # offline
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: method 'kd' distils from teacher 'vit_small_patch16_224' but no teacher "
                          "checkpoint is given") and "model.random_teacher=true" in err
    assert not Path(tmp_path / "o").exists()


def test_a_random_teacher_is_allowed_when_asked_for_and_in_quick(tmp_path):
    asked = build_config(None, {"model.scale": "tiny", "data.dataset": "mnist5k", "data.img_size": 32,
                                "model.random_teacher": True, "method.name": "kd", **SMALL,
                                "output_dir": str(tmp_path / "asked")})
    quick = build_config("quick", {**SMALL, "method.name": "kd", "output_dir": str(tmp_path / "quick")})
    assert quick.model.random_teacher and not quick.model.teacher_checkpoint
    for cfg in (asked, quick):
        assert run_in_process(cfg)["status"] == "ok"
