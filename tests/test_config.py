import math

import pytest

from uhkd.config import (
    LEAF_TYPES,
    RunConfig,
    apply_overrides,
    build_config,
    config_hash,
    flatten,
    parse_set,
    parse_stage_weights,
    parse_stages,
    preset_names,
    unflatten,
)
from uhkd.errors import UserError


def test_flatten_round_trip_keeps_every_field_and_type():
    cfg = apply_overrides(RunConfig(), {"method.alpha": 0.5, "optim.lr": "0.1", "method.sra": "false", "seed": "3"})
    flat = flatten(cfg)
    assert set(flat) == set(LEAF_TYPES)
    assert flat["method.alpha"] == 0.5 and flat["optim.lr"] == 0.1
    assert flat["method.sra"] is False and flat["seed"] == 3
    assert unflatten(flat) == cfg


def test_apply_overrides_does_not_mutate_the_input():
    base = RunConfig()
    apply_overrides(base, {"optim.lr": 9.0})
    assert base.optim.lr == RunConfig().optim.lr


def test_optional_fields_accept_none():
    cfg = apply_overrides(RunConfig(), {"method.beta": "none"})
    assert cfg.method.beta is None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"optim.lrr": 1}, "unknown config key 'optim.lrr' (did you mean optim.lr or "),
        ({"optim.lr": "fast"}, "'optim.lr' needs a float, got 'fast'"),
        ({"method.sra": "maybe"}, "'method.sra' needs a bool"),
        ({"optim.epochs": 2.5}, "'optim.epochs' needs a int"),
    ],
)
def test_bad_overrides_name_the_value(overrides, needle):
    with pytest.raises(UserError, match=None) as err:
        apply_overrides(RunConfig(), overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_parse_set_rejects_unknown_key_and_missing_equals():
    assert parse_set(["optim.lr=0.1", "method.name=kd"]) == {"optim.lr": "0.1", "method.name": "kd"}
    with pytest.raises(UserError, match=r"'alpha' \(did you mean method.alpha\?\); valid choices: amp, .*method\.\*"):
        parse_set(["alpha=1"])
    with pytest.raises(UserError, match=r"valid choices: optim.accumulate, .*optim.weight_decay$"):  # its section
        parse_set(["optim.lrr=1"])
    with pytest.raises(UserError, match="key=value"):
        parse_set(["optim.lr"])


def test_presets_apply_the_student_family_recipe():
    assert {"quick", "cifar100", "imagenet"} <= set(preset_names())
    cnn = build_config("cifar100", {"model.student": "resnet18"})
    token = build_config("cifar100", {"model.student": "deit_tiny_patch16_224"})
    assert (cnn.optim.optimizer, cnn.optim.lr, cnn.data.augment) == ("sgd", 0.05, "cnn")
    assert (token.optim.optimizer, token.optim.lr, token.optim.clip_grad) == ("adamw", 5e-4, 5.0)
    # explicit overrides win over the family recipe
    assert build_config("cifar100", {"model.student": "resnet18", "optim.lr": 0.1}).optim.lr == 0.1
    imnet = build_config("imagenet", {"model.student": "resnet18"})
    assert (imnet.optim.epochs, imnet.optim.schedule, imnet.data.batch_size) == (100, "step", 64)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError, match=r"unknown preset 'cifar10' \(did you mean cifar100\?\); valid choices: "
                                         r"cifar100, imagenet, quick"):
        build_config("cifar10")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"method.alpha": -1.0}, "method.alpha must be a finite non-negative number"),
        ({"method.beta": math.inf}, "method.beta must be a finite non-negative number"),
        ({"method.w_ce": math.nan}, "method.w_ce must be a finite non-negative number"),
        ({"method.spectrum": "phase"}, "unknown method.spectrum 'phase'; valid choices: amplitude, complex"),
        ({"method.stages": "1,5"}, "method.stages must be distinct stage indices"),
        ({"method.stage_weights": "1,2"}, "method.stage_weights has 2 values for 4 stages"),
        ({"method.temperature": 0.0}, "method.temperature must be > 0"),
    ],
)
def test_validation_errors_are_one_line(overrides, needle):
    with pytest.raises(UserError) as err:
        build_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_stage_parsing_and_default_weights():
    assert parse_stages("4, 2") == (2, 4)
    assert parse_stage_weights("", 4) == (0.25, 0.25, 0.25, 0.25)
    assert parse_stage_weights("1,0.5", 2) == (1.0, 0.5)


def test_config_hash_ignores_name_but_not_hyperparameters():
    a = RunConfig()
    assert config_hash(a) == config_hash(apply_overrides(a, {"name": "x", "output_dir": "/tmp/x"}))
    assert config_hash(a) != config_hash(apply_overrides(a, {"method.beta": 2.0}))
