"""Every command a sweep prints under `next:` runs, for every sweep kind (teachers, hetero_pairs, reproduce_tables,
ablations) on a local results folder and on S3 (`-m slow`): each is run as the user would paste it, from another
folder, and must exit 0. reproduce_tables ends with its comparison table."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAIR = "convnext_tiny:resnet18"
SMALL = ["--set", "data.limit_train=128", "--set", "data.limit_eval=64", "--set", "data.batch_size=32",
         "--set", "optim.max_steps_per_epoch=3", "--epochs", "2"]
# the four sweep kinds, the smallest of each: (script, flags)
CHAIN = [("teachers", ["--models", "convnext_tiny", "--name", "teachers"]),
         ("hetero_pairs", ["--pairs", PAIR, "--num-samples", "2", "--name", "hp"]),
         ("reproduce_tables", ["--pairs", PAIR, "--methods", "scratch,kd,uhkd", "--seeds", "0", "--name", "grid"]),
         ("ablations", ["--pairs", PAIR, "--only", "k", "--name", "abl"])]


def printed_hints(stdout: str) -> list[str]:
    """The commands listed under a `next:` line."""
    lines = stdout.splitlines()
    hints = []
    for i, line in enumerate(lines):
        if line == "next:":
            hints += [hint.strip() for hint in lines[i + 1:] if hint.startswith("  python ")]
            hints = list(dict.fromkeys(hints))
    return hints


def run_hint(hint: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    argv = shlex.split(hint)
    assert argv[0] == "python", hint
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # `analysis` as installed, as a user runs it
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def check_chain(outputs: dict[str, str], cwd: Path, env: dict) -> None:
    for kind, stdout in outputs.items():
        hints = printed_hints(stdout)
        assert len(hints) == 2, (kind, stdout[-2000:])
        for hint in hints:
            done = run_hint(hint, cwd, env)
            assert done.returncode == 0, (kind, hint, done.stdout[-1500:], done.stderr[-1500:])
    table = outputs["reproduce_tables"].rstrip().splitlines()
    start = table.index("comparison table:")
    assert table[start + 1] == ("| Teacher → Student (best-epoch top-1 %) | Teacher | Scratch | KD | UHKD |")
    assert table[start + 4].startswith("| ConvNeXt-T → ResNet18 | ") and "(1 checkpoint)" in table[start + 4]
    assert "best trial per pair:" not in outputs["reproduce_tables"]


def test_every_printed_hint_runs_on_a_local_results_folder(tmp_path, ray_local, capsys):
    from sweeps import ablations, hetero_pairs, reproduce_tables, teachers

    modules = {"teachers": teachers, "hetero_pairs": hetero_pairs, "reproduce_tables": reproduce_tables,
               "ablations": ablations}
    common = ["--results", str(tmp_path / "results"), "--teacher-dir", str(tmp_path / "teachers"), *SMALL]
    outputs = {}
    for kind, flags in CHAIN:
        module = modules[kind]
        argv = [*flags, *common]
        code = (module.run(argv) if kind == "teachers" else
                module.main(module.parser(), module.build, argv,
                            **({"table": module.comparison_table} if kind == "reproduce_tables" else {})))
        outputs[kind] = capsys.readouterr().out
        assert code == 0, outputs[kind][-3000:]
    (tmp_path / "elsewhere").mkdir()
    check_chain(outputs, tmp_path / "elsewhere", dict(os.environ))
    assert "tables: " + str(tmp_path / "results" / "hp" / "trials.parquet") in outputs["hetero_pairs"]


@pytest.mark.slow
def test_every_printed_hint_runs_on_an_s3_results_root(tmp_path, s3_server):
    """Locations are printed as the user gave them (scheme and endpoint in the query string), so the hints reach
    the same bucket."""
    results, teachers = s3_server.uri("hints/results"), s3_server.uri("hints/teachers")
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **s3_server.env, "RAY_TMPDIR": ray_tmp,
           "PYTHONUNBUFFERED": "1"}
    outputs = {}
    for kind, flags in CHAIN:
        done = subprocess.run([sys.executable, str(ROOT / "sweeps" / f"{kind}.py"), *flags, "--cluster", "local",
                               "--results", results, "--teacher-dir", teachers, *SMALL],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (kind, done.stdout[-3000:], done.stderr[-3000:])
        outputs[kind] = done.stdout
    check_chain(outputs, tmp_path, env)
    assert f"tables: {shlex.quote(s3_server.uri('hints/results/hp/trials.parquet'))}" in outputs["hetero_pairs"]
    assert not (tmp_path / "hints").exists() and not any(tmp_path.glob("uhkd*"))  # nothing read or written here
