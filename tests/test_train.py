"""One run: schedule, in-process training with checkpoints and resume, NaN handling, Ray Train (including a worker
killed mid-run) and the command line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from uhkd.config import RunConfig, build_config
from uhkd.errors import UserError
from uhkd.models import create_stage_model
from uhkd.train import fit_ray_train, main, run_in_process
from uhkd.trainer import CHECKPOINT, METRICS_LOG, STUDENT, lr_factor

METRIC_KEYS = {"epoch", "top1", "top5", "best_top1", "best_top5", "best_epoch", "loss", "lr", "images_per_s",
               "epoch_time_s", "teacher_top1", "student_params", "extra_params", "effective_batch", "status",
               "failure_reason"}
# tiny models on 32x32 MNIST digits, a few steps per epoch
SMALL = {"data.batch_size": 32, "optim.max_steps_per_epoch": 3, "data.limit_eval": 64, "optim.epochs": 2}


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """run_in_process sets this process's torch threads; later tests get the count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def quick(tmp_path: Path, **overrides) -> RunConfig:
    return build_config("quick", {**SMALL, "output_dir": str(tmp_path / "run"), **overrides})


def test_lr_schedule_golden_values():
    cfg = build_config(None, {"optim.epochs": 10, "optim.lr": 0.1, "optim.min_lr": 0.001, "optim.warmup_epochs": 2})
    f = lr_factor(cfg, updates_per_epoch=5)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warm-up over 10 updates
    assert f(10) == pytest.approx(1.0) and f(30) == pytest.approx(0.01 + 0.99 * 0.5)  # cosine half-way
    assert f(50) == pytest.approx(0.01)
    step = build_config(None, {"optim.schedule": "step", "optim.step_epochs": 3, "optim.step_gamma": 0.1,
                               "optim.warmup_epochs": 0, "optim.epochs": 10})
    g = lr_factor(step, updates_per_epoch=4)
    assert [g(0), g(11), g(12), g(24)] == pytest.approx([1.0, 1.0, 0.1, 0.01])


class Crash(Exception):
    pass


def test_in_process_run_checkpoint_and_resume(tmp_path):
    cfg = quick(tmp_path)
    seen: list[dict] = []

    def crash_after_first_epoch(metrics: dict) -> None:
        seen.append(metrics)
        raise Crash  # the process "dies" right after epoch 1 was checkpointed

    with pytest.raises(Crash):
        run_in_process(cfg, report=crash_after_first_epoch)
    out = Path(cfg.output_dir)
    assert (out / CHECKPOINT).is_file() and not (out / STUDENT).exists()
    first = seen[0]
    assert METRIC_KEYS | {"loss_ce", "loss_kl", "loss_feat"} <= set(first)
    assert first["epoch"] == 1 and first["status"] == "running" and first["effective_batch"] == 32
    assert 0 <= first["top1"] <= first["top5"] <= 100 and first["extra_params"] > 0
    assert first["loss"] == pytest.approx(first["loss_ce"] + first["loss_kl"] + first["loss_feat"])

    final = run_in_process(cfg, report=seen.append)  # the same run again: resumes after epoch 1
    assert [m["epoch"] for m in seen] == [1, 2]
    assert final["epoch"] == 2 and final["status"] == "ok"
    assert final["teacher_top1"] == first["teacher_top1"]  # measured once, kept in the checkpoint
    assert [json.loads(line)["epoch"] for line in (out / METRICS_LOG).read_text().splitlines()] == [1, 2]
    student = create_stage_model("resnet18", num_classes=10, img_size=32, scale="tiny",
                                 checkpoint=str(out / STUDENT))
    assert sum(p.numel() for p in student.parameters()) == final["student_params"]

    with pytest.raises(UserError, match=r"belongs to a run with other settings \(optim.lr\)"):
        run_in_process(quick(tmp_path, **{"optim.lr": 0.5}))


def test_non_finite_loss_fails_the_run_with_its_reason(tmp_path):
    # SGD at lr 1e12 blows the weights up in one update: the next loss is NaN
    cfg = quick(tmp_path, **{"optim.optimizer": "sgd", "optim.lr": 1e12, "eval_teacher": False})
    seen: list[dict] = []
    metrics = run_in_process(cfg, report=seen.append)
    assert metrics["status"] == "failed" and metrics["epoch"] == 1
    assert metrics["failure_reason"].startswith("non-finite loss at epoch 1 step ")
    assert "loss_ce=nan" in metrics["failure_reason"]
    assert seen == [metrics]
    again = run_in_process(cfg)  # a failed run is not retried on resume
    assert (again["status"], again["failure_reason"]) == ("failed", metrics["failure_reason"])


def test_ray_train_run(tmp_path, ray_local):
    """Everything the run produces is in its Ray Train storage: checkpoints carrying the metrics log, and the
    exported student in the last one; nothing in the output folder of the worker's node."""
    cfg = quick(tmp_path, workers=1)
    metrics = fit_ray_train(cfg, storage_path=str(tmp_path / "ray"), run_name="one")
    assert metrics["status"] == "ok" and metrics["epoch"] == 2 and METRIC_KEYS <= set(metrics)
    checkpoints = sorted(p for p in (tmp_path / "ray" / "one").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2 and metrics["checkpoint"] == str(checkpoints[-1])
    assert (checkpoints[-1] / STUDENT).is_file() and not (checkpoints[0] / STUDENT).exists()
    logged = [json.loads(line) for line in (checkpoints[-1] / METRICS_LOG).read_text().splitlines()]
    assert [m["epoch"] for m in logged] == [1, 2] and logged[-1]["top1"] == metrics["top1"]
    assert not (tmp_path / "run").exists()


def _train_worker_pids() -> set[int]:
    """Pids of the live Ray Train worker actors of this cluster (from the GCS actor table)."""
    from ray._private.state import state

    return {a["Pid"] for a in state.actor_table(None).values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"]}


def test_ray_train_restarts_a_killed_worker_from_its_checkpoint(tmp_path, ray_local):
    cfg = quick(tmp_path, workers=1, max_failures=1, eval_teacher=False,
                **{"optim.epochs": 4, "optim.max_steps_per_epoch": 30})
    snapshot = tmp_path / "ray" / "killed" / "checkpoint_manager_snapshot.json"
    killed: list[int] = []
    first: list[dict] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 400  # Ray Train start-up on loaded cores
        while time.time() < deadline:
            if snapshot.is_file():  # the controller has registered the checkpoint of epoch 1
                (pid,) = _train_worker_pids()
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                checkpoint = min(snapshot.parent.glob("checkpoint_*"))  # epoch 1's
                first.extend(json.loads(line) for line in (checkpoint / METRICS_LOG).read_text().splitlines())
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    metrics = fit_ray_train(cfg, storage_path=str(tmp_path / "ray"), run_name="killed")
    killer.join()
    assert killed and metrics["status"] == "ok" and metrics["epoch"] == 4
    last = Path(metrics["checkpoint"])
    logged = [json.loads(line) for line in (last / METRICS_LOG).read_text().splitlines()]
    assert [m["epoch"] for m in logged] == [1, 2, 3, 4]
    # continued from the checkpoint of epoch 1, not from scratch: its record of epoch 1 is the one from before
    assert first and (logged[0]["loss"], logged[0]["epoch_time_s"]) == (first[0]["loss"], first[0]["epoch_time_s"])
    state = torch.load(last / CHECKPOINT, weights_only=True)
    assert [m["epoch"] for m in state["history"]] == [1, 2, 3, 4]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "uhkd.train", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    unknown_key = _cli("--preset", "quick", "--workers", "0", "--set", "optim.lrr=0.1")
    assert unknown_key.returncode == 2
    assert unknown_key.stderr.strip().splitlines() == [
        unknown_key.stderr.strip()] and unknown_key.stderr.startswith("error: unknown config key 'optim.lrr'")
    missing = _cli("--dataset", "cifar100", "--data-root", str(tmp_path / "none"), "--workers", "0")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith(f"error: CIFAR-100 not found at '{tmp_path / 'none'}'")


@pytest.mark.parametrize("args, message", [
    (["--teacher-checkpoint", "/nonexistent/t.pt"], "error: teacher checkpoint '/nonexistent/t.pt' not found"),
    (["--method", "magic"], "error: unknown method 'magic'; valid choices: "),
    (["--student", "resnet18", "--set", "method.uhkd.stages=1,5"], "error: method.uhkd.stages must be distinct"),
    (["--split", "sideways"], "error: unknown data.split 'sideways'; valid choices: final, tune"),
])
def test_cli_bad_input_messages(tmp_path, capsys, args, message):
    code = main(["--preset", "quick", "--workers", "0", "--output", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1


def test_an_output_that_cannot_be_a_folder_fails_before_training(tmp_path, capsys):
    """`--output` naming a file (or a folder under one) is one line, exit 2, before any data or epoch."""
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    for output, message in ((existing, f"error: --output '{existing}' is a file, not a folder"),
                            (existing / "run", f"error: --output '{existing / 'run'}' cannot be created: {existing} "
                                               f"is a file")):
        assert main(["--preset", "quick", "--workers", "0", "--output", str(output)]) == 2
        captured = capsys.readouterr()
        assert captured.err == message + "\n" and "epoch" not in captured.out
    assert existing.read_text() == "keep me"


def test_teacher_checkpoint_with_other_class_count_is_refused(tmp_path, capsys):
    from uhkd.models import save_model_checkpoint

    teacher = create_stage_model("deit_tiny_patch16_224", num_classes=100, img_size=32, scale="tiny")
    save_model_checkpoint(tmp_path / "t.pt", teacher)
    code = main(["--preset", "quick", "--workers", "0", "--teacher-checkpoint", str(tmp_path / "t.pt"),
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "class count 100, but this run needs 10" in capsys.readouterr().err


def test_student_from_pretrained_weights_keeps_their_normalisation(tmp_path):
    imagenet = create_stage_model("resnet18", num_classes=1000, img_size=32, scale="tiny")
    torch.save(imagenet.net.state_dict(), tmp_path / "resnet18_in1k.pth")
    cfg = quick(tmp_path, **{"method.name": "scratch", "model.pretrained_file": str(tmp_path / "resnet18_in1k.pth"),
                             "optim.epochs": 1, "optim.max_steps_per_epoch": 1, "eval_teacher": False})
    assert run_in_process(cfg)["status"] == "ok"
    student = torch.load(Path(cfg.output_dir) / STUDENT, weights_only=True)
    assert student["mean"] == pytest.approx([0.485, 0.456, 0.406])  # timm's ImageNet statistics, not MNIST's
    start, trained = imagenet.net.conv1.weight, student["state_dict"]["conv1.weight"]
    assert torch.nn.functional.cosine_similarity(start.flatten(), trained.flatten(), dim=0) > 0.9


def test_the_console_says_when_the_teacher_is_random(tmp_path, capsys, teacher_dir):
    """quick distils from a randomly initialised teacher (model.random_teacher): its top-1 line says so; a teacher
    loaded from a checkpoint is not called random."""
    small = ["--workers", "0", "--epochs", "1", "--set", "optim.max_steps_per_epoch=2", "--set", "data.limit_eval=64"]
    assert main(["--preset", "quick", "--output", str(tmp_path / "random"), *small]) == 0
    lines = capsys.readouterr().out.splitlines()
    (measured,) = [line for line in lines if line.startswith("teacher ")]
    assert measured.startswith("teacher deit_tiny_patch16_224 (random: no checkpoint, model.random_teacher=true) "
                               "top1 ") and measured.endswith(" on the evaluation set")
    (done,) = [line for line in lines if line.startswith("done: ")]
    assert "teacher deit_tiny_patch16_224 (random: no checkpoint, model.random_teacher=true) top1 " in done

    assert main(["--preset", "quick", "--output", str(tmp_path / "loaded"), "--teacher", "convnext_tiny",
                 "--teacher-checkpoint", f"{teacher_dir}/convnext_tiny.pth", *small]) == 0
    lines = capsys.readouterr().out.splitlines()
    (measured,) = [line for line in lines if line.startswith("teacher ")]
    assert measured.startswith("teacher convnext_tiny top1 ") and "random" not in " ".join(lines)
