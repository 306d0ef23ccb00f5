"""`--pretrained hub` against a Hugging Face hub cache prepared on disk in the hub's own layout (HF_HOME), offline:
timm's real hub loading code reads the weights from it; with no cached copy the run fails before it starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from uhkd.models import create_stage_model

REPO = "timm/resnet18.a1_in1k"  # timm's default pretrained tag of resnet18
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(hf_home: Path) -> torch.Tensor:
    """A tiny resnet18's ImageNet-shaped weights as the hub cache stores a downloaded model.safetensors."""
    net = create_stage_model("resnet18", num_classes=1000, img_size=32, scale="tiny").net
    repo = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(snapshot / "model.safetensors"))
    return net.conv1.weight.detach().clone()


def _train(tmp_path: Path, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("HF_HUB_CACHE", None)
    args = ["--preset", "quick", "--workers", "0", "--method", "scratch", "--teacher", "", "--pretrained", "hub",
            "--epochs", "1", "--output", str(tmp_path / "run"), "--set", "optim.max_steps_per_epoch=2",
            "--set", "data.limit_eval=64", "--set", "eval_teacher=false"]
    return subprocess.run([sys.executable, "-m", "uhkd.train", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_hub_weights_load_from_the_cache_offline(tmp_path):
    start = hub_cache(tmp_path / "hf")
    done = _train(tmp_path, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    student = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert student["mean"] == pytest.approx([0.485, 0.456, 0.406])  # the normalisation the ImageNet weights were trained with
    trained = student["state_dict"]["conv1.weight"]
    assert torch.nn.functional.cosine_similarity(start.flatten(), trained.flatten(), dim=0) > 0.9


def test_offline_without_a_cached_copy_fails_before_start(tmp_path):
    done = _train(tmp_path, tmp_path / "empty")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --pretrained hub: the ImageNet weights")
    assert "go online" in done.stderr and "--pretrained FILE" in done.stderr
    assert not (tmp_path / "run").exists()
