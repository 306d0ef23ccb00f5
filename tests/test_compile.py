"""The step path: the `compile` switch (torch.compile of the training forward), no host reads of device values in a
step, and the on-device non-finite record."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from uhkd.config import build_config
from uhkd.errors import UserError
from uhkd.trainer import LocalSession, NonFinite, Run, Session, compiled

# a tiny heterogeneous pair at 32 px, one UHKD level: every loss term (ce, kl, feat) and FAM. The
# student is the ViT: a tiny ResNet's gradients at initialisation are ill-conditioned (each block's last BN starts
# at zero and the BN backward blows rounding up), so there even two float32 summation orders disagree at O(1)
TINY = {"data.batch_size": 16, "optim.max_steps_per_epoch": 2, "data.limit_eval": 16, "optim.epochs": 1,
        "model.student": "deit_tiny_patch16_224", "model.teacher": "resnet18", "method.uhkd.stages": "4",
        "eval_teacher": False}


def test_compile_setting_per_device():
    model = torch.nn.Linear(3, 2)
    assert compiled(model, "auto", torch.device("cpu")) is model  # CPU: eager unless asked
    assert compiled(model, "off", torch.device("cuda")) is model
    on = compiled(model, "on", torch.device("cpu"))
    assert on is not model and list(on.parameters()) == list(model.parameters())  # same parameters, no copy
    with pytest.raises(UserError, match="unknown compile 'fast'; valid choices: auto, cudagraphs, off, on"):
        build_config("quick", {"compile": "fast"})


def test_non_finite_record_keeps_the_first_bad_step():
    record = NonFinite(("ce", "kl"), Session())
    record.add(torch.tensor([1.0, 2.0]), 1)
    assert record.reason(1) == ""
    record.add(torch.tensor([math.inf, 2.0]), 2)
    record.add(torch.tensor([math.nan, math.nan]), 3)  # later failures do not overwrite the first
    assert record.reason(4) == "non-finite loss at epoch 4 step 2: loss_ce=inf"


def _run(tmp_path: Path, compile_setting: str, **overrides) -> Run:
    cfg = build_config("quick", {**TINY, "compile": compile_setting, "output_dir": str(tmp_path / compile_setting),
                                 **overrides})
    return Run(cfg, LocalSession(cfg.output_dir, torch.device("cpu")))


def test_a_training_epoch_reads_no_device_value(tmp_path):
    """`.item()`, `bool(t)`, `float(t)` run aten::item / _local_scalar_dense on any device; on CUDA each waits for
    the device. SGD: torch's Adam reads its step counters with `.item()`, but those live on the CPU."""
    run = _run(tmp_path, "off", **{"optim.optimizer": "sgd"})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        metrics = run._train_epoch(1)
    assert metrics["status"] == "ok"
    reads = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}
    assert [e.name for e in prof.events() if e.name in reads] == []


@pytest.mark.slow  # inductor compiles the CPU kernels with the C++ compiler: minutes on 2 cores
def test_compiled_step_gives_the_eager_losses_and_gradients(tmp_path):
    torch.set_num_threads(1)
    eager, fast = _run(tmp_path, "off"), _run(tmp_path, "on")
    assert fast.step_model is not fast.model and eager.step_model is eager.model
    images, target = next(iter(eager.data.train_batches(1)))
    results = []
    for run in (eager, fast):
        for epoch in (0, 1):  # a second epoch index must not change the result (nor recompile)
            run.distiller.zero_grad(set_to_none=True)
            _, losses = run.step_model(images, target, epoch)
            sum(losses.values()).backward()
            results.append(({t: v.item() for t, v in losses.items()},
                            {n: p.grad.clone() for n, p in run.distiller.named_parameters() if p.grad is not None}))
    (loss_e, grad_e), _, (loss_c, grad_c), (loss_c2, _) = results
    assert loss_c == pytest.approx(loss_e, rel=1e-4, abs=1e-6) and loss_c2 == pytest.approx(loss_c, rel=1e-6)
    assert set(grad_c) == set(grad_e) and len(grad_e) > 10
    for name, g in grad_e.items():
        torch.testing.assert_close(grad_c[name], g, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
