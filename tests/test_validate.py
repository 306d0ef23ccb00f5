"""Bad input is found before Ray starts or any data loads, every problem listed in one block."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from uhkd.errors import UserError
from uhkd.train import main
from uhkd.validate import checked_config


def test_a_model_typo_on_the_ray_path_fails_before_ray_starts(tmp_path):
    ray_tmp = tmp_path / "ray"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "uhkd.train", "--preset", "quick", "--teacher", "typo"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: unknown or unsupported model 'typo'")
    assert not ray_tmp.exists() and not (tmp_path / "runs").exists()  # no Ray session, no run folder


def test_every_problem_is_listed_together(tmp_path, capsys):
    """Default preset (CIFAR-100, not on disk): the missing dataset no longer hides the other problems."""
    code = main(["--teacher", "typo", "--student", "resnt18", "--method", "magic", "--set", "optim.lr=fast",
                 "--set", "optim.lrr=1", "--teacher-checkpoint", str(tmp_path / "t.pth"),
                 "--data-root", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2 and lines[0] == "error: 7 problems:"
    assert sorted(line.split()[0:4] for line in lines[1:]) == sorted([
        ["unknown", "config", "key", "'optim.lrr'"], ["config", "key", "'optim.lr'", "needs"],
        ["unknown", "or", "unsupported", "model"], ["unknown", "or", "unsupported", "model"],
        ["unknown", "method", "'magic';", "valid"], ["CIFAR-100", "not", "found", "at"],
        ["teacher", "checkpoint", f"'{tmp_path / 't.pth'}'", "not"]])
    assert sum("'typo'" in line or "'resnt18'" in line for line in lines) == 2 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_config_level_problems_join_the_name_problems():
    with pytest.raises(UserError) as err:
        checked_config("quick", {"model.student": "nope", "data.split": "sideways", "data.dataset": "mnist"})
    lines = str(err.value).splitlines()
    assert lines[0] == "3 problems:" and len(lines) == 4
    assert any(line.startswith("  unknown or unsupported model 'nope'") for line in lines)
    assert "  unknown data.split 'sideways'; valid choices: final, tune" in lines
    assert any(line.startswith("  unknown dataset 'mnist' (did you mean mnist5k?); valid choices: cifar100, folder, "
                               "hfds/<name>, "
                               "imagenet1k, mnist5k, torch/<name>") for line in lines)


def test_sweep_flags_are_listed_together(tmp_path, capsys):
    from sweeps import hetero_pairs

    argv = ["--results", str(tmp_path / "r"), "--epochs", "0", "--cluster", "no address", "--set", "optim.lrr=1",
            "--track", "mlfow"]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: 4 problems:" and len(lines) == 5
    assert "--cluster must be" in lines[1] and "--epochs must be >= 1" in lines[2]
    assert "unknown config key 'optim.lrr'" in lines[3] and "unknown tracker 'mlfow'" in lines[4]
    assert not Path(tmp_path / "r").exists()


def test_a_sweep_lists_the_problems_of_all_its_pairs_before_ray(tmp_path, capsys):
    from sweeps import hetero_pairs

    argv = ["--results", str(tmp_path / "r"), "--cluster", "local", "--set", "optim.lr=fast", "--set",
            "optim.optimizer=adamx", "--pairs", "swin_tiny:resnet18,convnext_tiny:rsnet18,x"]
    assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert lines[0] == "error: 5 problems:" and len(lines) == 6, lines
    for needle in ("config key 'optim.lr' needs a float, got 'fast'", "optim.optimizer 'adamx'",
                   "model 'swin_tiny' (did you mean swin_tiny_patch4_window7_224", "model 'rsnet18' (did you mean "
                   "resnet18", "a pair is 'teacher:student' (timm names), got 'x'"):
        assert sum(needle in line for line in lines[1:]) == 1, (needle, lines)
    assert "ray:" not in out.out and not Path(tmp_path / "r").exists()


def test_an_unreachable_or_unwritable_location_is_one_line_before_ray(tmp_path, capsys):
    from testkit.realstack import free_port
    from sweeps import hetero_pairs

    store = f"?endpoint_override=127.0.0.1:{free_port()}&scheme=http"  # nothing listens there
    (tmp_path / "file").write_text("")
    cases = {("--results", f"s3://lab/res{store}"): "cannot be reached: ",
             ("--teacher-dir", f"s3://lab/teachers{store}"): "error: cannot reach 's3://lab/teachers/",
             ("--results", str(tmp_path / "file" / "res")): f"cannot be created: {tmp_path / 'file'} is a file",
             ("--results", str(tmp_path / "file")): "is a file, not a folder"}
    for flag, message in cases.items():
        argv = ["--results", str(tmp_path / "r"), "--cluster", "local", *flag]
        assert hetero_pairs.main(hetero_pairs.parser(), hetero_pairs.build, argv) == 2, flag
        out = capsys.readouterr()
        assert out.err.count("\n") == 1 and message in out.err and out.err.startswith("error: "), (flag, out.err)
        assert "ray:" not in out.out  # found before any cluster starts


def test_a_teacher_checkpoint_uri_is_looked_up_on_its_store(tmp_path, capsys):
    from uhkd.models import create_stage_model, save_model_checkpoint

    teacher = tmp_path / "t.pth"
    save_model_checkpoint(teacher, create_stage_model("convnext_tiny", num_classes=10, img_size=32, scale="tiny"))
    checked_config("quick", {"model.teacher": "convnext_tiny", "model.teacher_checkpoint": teacher.as_uri()})
    with pytest.raises(UserError, match=r"^teacher checkpoint 'file://.*/none\.pth' not found$"):
        checked_config("quick", {"model.teacher_checkpoint": (tmp_path / "none.pth").as_uri()})
    assert main(["--preset", "quick", "--output", "s3://lab/run"]) == 2
    assert capsys.readouterr().err == ("error: --output 's3://lab/run' is a URI; a single run writes to a local or "
                                       "shared folder (a sweep's --results takes a URI)\n")
