"""The step and plateau schedules hpo builds (hpo.trial.trainer.KnobsTrainer), on a real Trainer that never trains.

A two-layer torch module stands in for a model: ``body`` and a new head ``classifier``. The optimizer and the
scheduler are created as Trainer creates them, then stepped by hand; tests/test_knobs.py runs them in trials.
"""

import pytest
import torch
from transformers import TrainingArguments

from hpo.knobs import Knobs
from hpo.trial.trainer import KnobsTrainer

N_STEPS = 12  # optimizer steps in the whole run


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.body(x))


@pytest.fixture
def build(tmp_path):
    """``build(knobs, **training_arguments)`` → (trainer, optimizer, scheduler) for a run of N_STEPS steps."""

    def build(knobs: Knobs, **args):
        arguments = TrainingArguments(
            output_dir=str(tmp_path),
            report_to=[],
            use_cpu=True,
            **{"learning_rate": 0.1, "lr_scheduler_type": "constant", **args},
        )
        trainer = KnobsTrainer(model=Net(), args=arguments, knobs=knobs, heads=["classifier"])
        optimizer = trainer.create_optimizer()
        return trainer, optimizer, trainer.create_scheduler(N_STEPS, optimizer)

    return build


def rates(optimizer, scheduler, n=N_STEPS):
    """The learning rate of each param group at optimizer steps 0 … n-1."""
    seen = []
    for _ in range(n):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_step_schedule_warms_up_then_decays_every_third_of_the_run(build):
    knobs = Knobs(optimizer="sgd", schedule="step", lr_gamma=0.5, head_lr_multiplier=10)
    _, optimizer, scheduler = build(knobs, warmup_steps=2)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    heads = [group["head"] for group in optimizer.param_groups]
    assert heads == [False, False, True, True]  # (body, head) × (no decay, decay)
    body = [0.0, 0.05] + [0.1] * 4 + [0.05] * 4 + [0.025] * 2  # linear warmup over 2 steps, then halved every 4
    expected = [[lr * (10 if head else 1) for head in heads] for lr in body]
    flat = [lr for lrs in rates(optimizer, scheduler) for lr in lrs]
    assert flat == pytest.approx([lr for lrs in expected for lr in lrs])


@pytest.mark.parametrize(
    "lr_step_size, size",
    [
        (None, 4),  # a third of the run
        (0.25, 3),  # below 1: a fraction of the run
        (0.1, 2),  # 1.2 steps, rounded up
        (0.01, 1),  # never less than one step
        (5, 5),  # 1 or more: optimizer steps
        (2.5, 2),  # whole steps: the fraction is dropped
        (20, 20),  # longer than the run: no decay at all
    ],
)
def test_step_size_is_steps_or_a_fraction_of_the_run(build, lr_step_size, size):
    _, optimizer, scheduler = build(Knobs(optimizer="sgd", schedule="step", lr_gamma=0.1, lr_step_size=lr_step_size))
    body = [lrs[0] for lrs in rates(optimizer, scheduler)]
    assert body == pytest.approx([0.1 * 0.1 ** (step // size) for step in range(N_STEPS)])


def test_a_warmup_ratio_counts_steps_of_the_run(build):
    _, optimizer, scheduler = build(Knobs(optimizer="adamw", schedule="step", lr_gamma=0.5), warmup_steps=0.25)
    body = [lrs[0] for lrs in rates(optimizer, scheduler)]  # 3 warmup steps, then a third of 12 between decays
    assert body == pytest.approx([0.0, 0.1 / 3, 0.2 / 3] + [0.1] * 4 + [0.05] * 4 + [0.025])


def test_plateau_schedule_cuts_the_rate_when_the_eval_loss_stops_falling(build):
    # Trainer steps a ReduceLROnPlateau with the metric_for_best_model of each evaluation: here, made-up losses.
    knobs = Knobs(
        optimizer="sgd",
        schedule="reduce_lr_on_plateau",
        lr_plateau_factor=0.5,
        lr_plateau_patience=1,
        head_learning_rate=1.0,
    )
    _, optimizer, scheduler = build(knobs)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and scheduler.mode == "min"
    assert [group["initial_lr"] for group in optimizer.param_groups] == [0.1, 0.1, 1.0, 1.0]
    seen = []
    for loss in [1.0, 0.9, 0.95, 0.9, 0.92, 0.8, 0.85, 0.85, 0.85, 0.85]:
        scheduler.step(loss)
        seen.append([group["lr"] for group in optimizer.param_groups])
    # patience 1: the second evaluation in a row without a new best halves every group's rate
    body = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.0125]
    assert [lrs[0] for lrs in seen] == pytest.approx(body)
    assert [lrs[2] for lrs in seen] == pytest.approx([lr * 10 for lr in body])  # the head keeps its ratio


def test_patience_zero_cuts_at_the_first_evaluation_without_progress(build):
    _, optimizer, scheduler = build(
        Knobs(schedule="reduce_lr_on_plateau", lr_plateau_factor=0.1, lr_plateau_patience=0, head_lr_multiplier=1)
    )
    seen = []
    for loss in [1.0, 1.0, 0.5, 0.6]:
        scheduler.step(loss)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_without_an_own_schedule_transformers_builds_the_one_named(build):
    # No hpo schedule: TrainingArguments' lr_scheduler_type, here linear decay to zero over the run.
    _, optimizer, scheduler = build(Knobs(optimizer="sgd"), lr_scheduler_type="linear")
    body = [lrs[0] for lrs in rates(optimizer, scheduler)]
    assert body == pytest.approx([0.1 * (N_STEPS - step) / N_STEPS for step in range(N_STEPS)])


def test_a_scheduler_that_exists_is_kept(build):
    trainer, optimizer, scheduler = build(Knobs(optimizer="sgd", schedule="step"))
    assert trainer.create_scheduler(N_STEPS, optimizer) is scheduler
