"""A researcher's own method as a plugin (`--plugin PATH_OR_MODULE`): `examples/my_method.py` runs in a single run
and in a real local Ray sweep, whose trials import it in Ray's worker processes; a broken plugin is one line and
exit 2 before Ray starts."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_method.py"
SMALL = ["--set", "data.limit_train=128", "--set", "data.limit_eval=64", "--set", "data.batch_size=32"]


def _run(*argv: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # unix socket paths stay short
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_example_is_a_short_method_of_one_file():
    assert len(EXAMPLE.read_text().splitlines()) < 100


def test_a_single_run_of_the_plugin_method(tmp_path):
    done = _run("-m", "uhkd.train", "--plugin", str(EXAMPLE), "--method", "zkd", "--preset", "quick", "--workers",
                "0", "--epochs", "1", "--set", "method.zkd.alpha=3", *SMALL, "--output", str(tmp_path / "run"),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1 loss" in done.stdout and "(ce " in done.stdout and " kl " in done.stdout


def test_the_plugin_method_runs_in_a_real_ray_sweep(tmp_path, teacher_dir):
    """The trials train in Ray's worker processes, which import the plugin by name: Ray ships it to them
    (`runtime_env["py_modules"]`). Its parameters land in the results under its own namespace."""
    from analysis.common import read_trials

    done = _run(str(ROOT / "sweeps" / "reproduce_tables.py"), "--plugin", str(EXAMPLE), "--methods", "zkd",
                "--pairs", "convnext_tiny:resnet18", "--seeds", "0", "--epochs", "1", "--cluster", "local",
                "--results", str(tmp_path / "results"), "--teacher-dir", teacher_dir, "--name", "plug",
                "--set", "method.zkd.temperature=3", *SMALL, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = read_trials(tmp_path / "results" / "plug")
    assert trials[["method", "status"]].values.tolist() == [["zkd", "ok"]]
    assert (trials.loc[0, "method.zkd.alpha"], trials.loc[0, "method.zkd.temperature"]) == (9.0, 3.0)


@pytest.mark.parametrize("plugin,message", [
    ("no/such/plugin.py", "error: plugin 'no/such/plugin.py' not found (give a .py file or an importable module "
                          "name)"),
    ("no_such_plugin_module", "error: plugin 'no_such_plugin_module' not found: ModuleNotFoundError: No module "
                              "named 'no_such_plugin_module'"),
    ("{broken}", "error: plugin '{broken}' failed to import: ZeroDivisionError: division by zero"),
    ("{clash}", "error: plugin '{clash}': method 'kd' from clash is already registered by uhkd.methods.kd; give it "
                "another name"),
])
@pytest.mark.parametrize("command", ["uhkd.train", "hetero_pairs"])
def test_a_broken_plugin_is_one_line_before_ray_starts(tmp_path, plugin, message, command):
    (tmp_path / "broken.py").write_text("1 / 0\n")
    (tmp_path / "clash.py").write_text(
        "from uhkd.methods import Distiller, register_method\n\n\n@register_method\n"
        "class Clash(Distiller):\n    name = 'kd'\n    display = 'Clash'\n")
    plugin = plugin.format(broken=tmp_path / "broken.py", clash=tmp_path / "clash.py")
    message = message.format(broken=tmp_path / "broken.py", clash=tmp_path / "clash.py")
    argv = (["-m", "uhkd.train", "--preset", "quick", "--workers", "0"] if command == "uhkd.train" else
            [str(ROOT / "sweeps" / "hetero_pairs.py"), "--results", str(tmp_path / "r")])
    done = _run(*argv, "--plugin", plugin, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == message and done.stdout == ""
    assert not (tmp_path / "r").exists()
