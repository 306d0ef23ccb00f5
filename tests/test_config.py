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
    preset_names,
    unflatten,
)
from uhkd.errors import UserError
from uhkd.methods.base import parse_stage_weights, parse_stages


def test_flatten_round_trip_keeps_every_field_and_type():
    cfg = apply_overrides(RunConfig(), {"method.uhkd.alpha": 0.5, "optim.lr": "0.1", "method.uhkd.sra": "false",
                                        "seed": "3"})
    flat = flatten(cfg)
    assert set(flat) == set(LEAF_TYPES) | {"method.uhkd.alpha", "method.uhkd.sra"}
    assert flat["method.uhkd.alpha"] == 0.5 and flat["optim.lr"] == 0.1
    assert flat["method.uhkd.sra"] is False and flat["seed"] == 3
    assert unflatten(flat) == cfg


def test_apply_overrides_does_not_mutate_the_input():
    base = RunConfig()
    apply_overrides(base, {"optim.lr": 9.0})
    assert base.optim.lr == RunConfig().optim.lr


def test_a_method_parameter_is_set_in_its_own_namespace_only():
    """A parameter of another method than the run's is an error, never a silently unused value; a new method
    starts from its own defaults."""
    kd = apply_overrides(RunConfig(), {"method.name": "kd", "method.kd.alpha": 2})
    assert kd.method.params == {"alpha": 2.0}
    with pytest.raises(UserError, match=r"^method.dkd.beta sets a parameter of method 'dkd', but this run's method "
                                        r"is 'kd'; set method.kd.<param> or choose --method dkd$"):
        apply_overrides(kd, {"method.dkd.beta": 8})
    assert apply_overrides(kd, {"method.name": "dkd", "method.dkd.beta": 8}).method.params == {"beta": 8.0}
    with pytest.raises(UserError, match=r"^unknown config key 'method.beta': method parameters are set per method, "
                                        r"as method.<name>.<param>: .*method.dkd.beta.*method.uhkd.beta"):
        apply_overrides(RunConfig(), {"method.beta": 2})


def test_a_preset_sets_parameters_only_of_the_method_that_runs():
    """quick sets method.uhkd.k=3: a kd run of that preset carries no UHKD parameter."""
    assert build_config("quick").method.params == {"k": 3}
    assert build_config("quick", {"method.name": "kd"}).method.params == {}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"optim.lrr": 1}, "unknown config key 'optim.lrr' (did you mean optim.lr or "),
        ({"optim.lr": "fast"}, "'optim.lr' needs a float, got 'fast'"),
        ({"method.uhkd.sra": "maybe"}, "'method.uhkd.sra' needs a bool"),
        ({"method.uhkd.k": 2.5}, "'method.uhkd.k' needs a int"),
        ({"method.dkdd.beta": 1}, "unknown method 'dkdd' in config key 'method.dkdd.beta'; valid choices: "),
        ({"optim.epochs": 2.5}, "'optim.epochs' needs a int"),
    ],
)
def test_bad_overrides_name_the_value(overrides, needle):
    with pytest.raises(UserError, match=None) as err:
        apply_overrides(RunConfig(), overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_parse_set_rejects_unknown_key_and_missing_equals():
    assert parse_set(["optim.lr=0.1", "method.name=kd", "method.dkd.beta=8"]) == {
        "optim.lr": "0.1", "method.name": "kd", "method.dkd.beta": "8"}
    with pytest.raises(UserError, match=r"unknown config key 'method.dkd.betta' \(did you mean method.dkd.beta"):
        parse_set(["method.dkd.betta=8"])
    with pytest.raises(UserError, match=r"'alpha' \(did you mean method\.\w+\.alpha or .*\?\); valid choices: amp, .*method\.\*"):
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
        ({"method.uhkd.alpha": -1.0}, "method.uhkd.alpha must be >= 0, got -1.0"),
        ({"method.uhkd.beta": math.inf}, "method.uhkd.beta must be a finite number, got inf"),
        ({"method.w_ce": math.nan}, "method.w_ce must be a finite non-negative number"),
        ({"method.uhkd.spectrum": "phase"}, "unknown method.uhkd.spectrum 'phase'; valid choices: amplitude, complex"),
        ({"method.uhkd.stages": "1,5"}, "method.uhkd.stages must be distinct stage indices"),
        ({"method.uhkd.stage_weights": "1,2"}, "method.uhkd.stage_weights has 2 values for 4 stages"),
        ({"method.uhkd.temperature": 0.0}, "method.uhkd.temperature must be > 0, got 0.0"),
        ({"data.protocol": "cifar10"}, "unknown data.protocol 'cifar10' (did you mean cifar100?)"),
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
    assert config_hash(a) != config_hash(apply_overrides(a, {"method.uhkd.beta": 2.0}))
