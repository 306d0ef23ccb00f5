"""`--study DB` (what `optuna-dashboard sqlite:///DB` opens): after a real hetero_pairs sweep, each pair's study holds
every finished trial with the values it sampled and its value, as trials.parquet records them, and a real
optuna-dashboard serves them."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from analysis.common import read_trials
from uhkd.sweep.results import TRIALS
from uhkd.sweep.search import study_name
from uhkd.sweep.spec import Sweep, load_preset

PAIRS = ["convnext_tiny:resnet18", "convnext_tiny:deit_tiny_patch16_224"]
SEARCHED = ["method.uhkd.alpha", "method.uhkd.beta", "method.uhkd.temperature", "method.uhkd.spectrum"]  # UHKD's


@pytest.mark.slow
def test_the_study_holds_every_finished_trial_per_pair(tmp_path, ray_local):
    from sweeps import hetero_pairs
    from uhkd.models import create_stage_model, save_model_checkpoint

    teachers = tmp_path / "teachers"
    save_model_checkpoint(teachers / "convnext_tiny.pth",
                          create_stage_model("convnext_tiny", num_classes=10, img_size=32, scale="tiny"))
    db = tmp_path / "study.db"
    argv = ["--results", str(tmp_path / "r"), "--teacher-dir", str(teachers), "--pairs", ",".join(PAIRS),
            "--num-samples", "4", "--epochs", "2", "--workers-per-trial", "0", "--name", "st", "--study", str(db),
            "--set", "data.limit_train=128", "--set", "data.limit_eval=64", "--set", "data.batch_size=32",
            "--set", "optim.max_steps_per_epoch=2"]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 0
    trials = read_trials(tmp_path / "r" / "st" / TRIALS)
    finished = trials[trials["status"] != "failed"]
    assert len(finished) == 4

    storage = f"sqlite:///{db}"
    sweep = Sweep("hetero_pairs", load_preset("quick"), method="uhkd")
    for pair in PAIRS:
        study = optuna.load_study(study_name=study_name(sweep, pair), storage=storage)
        done = sorted(([t.params[k] for k in SEARCHED], t.value) for t in study.trials
                      if t.state == optuna.trial.TrialState.COMPLETE)
        rows = finished[finished["pair"] == pair]
        expected = sorted((r[SEARCHED].tolist(), r["best_top1"]) for _, r in rows.iterrows())
        assert len(done) == len(expected) == 2
        for (params, value), (want, best) in zip(done, expected):
            assert params[:3] == pytest.approx(want[:3]) and params[3] == want[3]
            assert math.isclose(value, best)
    assert dashboard_trials(db) == {study_name(sweep, p): len(finished[finished["pair"] == p]) for p in PAIRS}


def dashboard_trials(db: Path) -> dict[str, int]:
    """{study name: complete trials} as `optuna-dashboard sqlite:///DB` serves them (its JSON API)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = str(Path(sys.executable).with_name("optuna-dashboard"))
    server = subprocess.Popen([exe, f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{path}", timeout=5) as answer:
            return json.load(answer)

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = get("studies")["study_summaries"]
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        trials = {s["study_name"]: get(f"studies/{s['study_id']}?after=0")["trials"] for s in studies}
        return {name: sum(t["state"] == "Complete" for t in listed) for name, listed in trials.items()}
    finally:
        server.terminate()
        server.wait(timeout=30)
