"""The prepared GPU check's dry mode runs on CPU (so the script a GPU session runs does not rot)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from uhkd.sweep.spec import load_preset

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode_projects_the_grid(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                          "--only", "epoch", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    runs, totals = rows[:-2], rows[-2:]
    assert [(r["family"], r["method"], r["compile"], r["status"]) for r in runs] == [
        ("resnet18", "kd", "off", "ok"), ("resnet18", "uhkd", "off", "ok")]
    for r in runs:
        assert r["step_s"] > 0 and r["eval_s"] > 0 and r["checkpoint_s"] >= 0
        assert math.isclose(r["run_gpu_hours"], 300 * r["epoch_s"] / 3600)
    section = load_preset("cifar100").section("reproduce_tables")
    pairs = [p for p in section["pairs"] if p.endswith(":resnet18")]
    seeds = len(load_preset("cifar100").budget("reproduce_tables")["seeds"])
    # every method but scratch per pair, scratch once per student, each per seed
    eager, best = totals
    assert eager["grid"] == "off" and best["grid"] == "best" and best["grid_gpu_hours"] == eager["grid_gpu_hours"]
    assert eager["grid_trials"] == seeds * (len(pairs) * (len(section["methods"]) - 1) + 1)
    kd, uhkd = (r["run_gpu_hours"] for r in runs)
    feature = sum(m in ("fitnet", "ofa", "uhkd") for m in section["methods"])
    expected = seeds * (len(pairs) * (feature * uhkd + (len(section["methods"]) - 1 - feature) * kd) + kd)
    assert math.isclose(eager["grid_gpu_hours"], expected, rel_tol=1e-9)
