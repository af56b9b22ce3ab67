"""PruningCallback against an in-memory study: the evaluation grid, its overshoot rule, pruning and divergence.

No model trains: ``fit`` drives the callback the way Trainer does (``on_step_end`` after each optimizer step,
``on_evaluate`` when it asked for an evaluation), with transformers' own TrainerState and TrainerControl and
made-up metrics, as optuna tests its pruners.
"""

import math

import optuna
import pytest
from transformers import TrainerControl, TrainerState

from hpo.trial.pruning import PruningCallback


def fit(callback, n_train, batch, max_steps, metrics=lambda step: {"eval_loss": 1.0}):
    """Run ``max_steps`` optimizer steps of ``batch`` examples; the global steps that evaluated.

    ``metrics(global_step)`` is what the evaluation at that step returns. Stops, as Trainer does, once the
    callback sets ``should_training_stop``.
    """
    steps_per_epoch = math.ceil(n_train / batch)
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    evaluated = []
    for step in range(1, max_steps + 1):
        state.global_step = step
        state.epoch = step / steps_per_epoch  # Trainer's float epoch: epoch + (step + 1) / steps_in_epoch
        callback.on_step_end(None, state, control)
        if control.should_evaluate:
            control.should_evaluate = False
            evaluated.append(step)
            callback.on_evaluate(None, state, control, metrics=metrics(step))
        if control.should_training_stop:
            break
    return evaluated, control


def new_trial(pruner=None):
    study = optuna.create_study(storage=None, pruner=pruner or optuna.pruners.NopPruner())
    return study, study.ask()


def reported(study, trial):
    return study.trials[trial.number].intermediate_values


def test_a_batch_that_divides_the_grid_evaluates_on_every_grid_point():
    study, trial = new_trial()
    callback = PruningCallback(trial, "eval_loss", n_train=48, every=12)
    evaluated, control = fit(callback, n_train=48, batch=4, max_steps=24)  # 2 epochs of 12 steps
    assert evaluated == [3, 6, 9, 12, 15, 18, 21, 24]
    assert list(reported(study, trial)) == [12, 24, 36, 48, 60, 72, 84, 96]  # examples seen, not optimizer steps
    assert [step for step, _ in callback.history] == [12, 24, 36, 48, 60, 72, 84, 96]
    assert not control.should_training_stop and callback.pruned_at is None and callback.diverged is None


def test_an_evaluation_past_a_grid_point_is_reported_at_that_point():
    # Batches of 10 pass the points 12, 24, 36, 48 at 20, 30, 40, 50 examples: each is reported at its point,
    # so trials of every batch size are compared at the same steps.
    study, trial = new_trial()
    callback = PruningCallback(trial, "eval_loss", n_train=50, every=12)
    evaluated, _ = fit(callback, n_train=50, batch=10, max_steps=5)
    assert evaluated == [2, 3, 4, 5]
    assert list(reported(study, trial)) == [12, 24, 36, 48]


def test_a_step_over_several_grid_points_evaluates_once_at_the_last():
    study, trial = new_trial()
    callback = PruningCallback(trial, "eval_loss", n_train=96, every=12)
    evaluated, _ = fit(callback, n_train=96, batch=32, max_steps=3)  # 32, 64, 96 examples
    assert evaluated == [1, 2, 3]
    assert list(reported(study, trial)) == [24, 60, 96]  # 12, 36, 48 and 72 are passed over, not reported late


def test_the_last_step_always_evaluates_and_off_the_grid_reports_the_examples_seen():
    study, trial = new_trial()
    callback = PruningCallback(trial, "eval_loss", n_train=28, every=12)
    evaluated, _ = fit(callback, n_train=28, batch=4, max_steps=7)
    assert evaluated == [3, 6, 7]
    assert list(reported(study, trial)) == [12, 24, 28]


def test_a_float_epoch_a_hair_below_a_grid_point_evaluates_on_time():
    # 15/22 * 44 is 29.999999999999996 in floats: the point 30 is reached at step 15, not one step late.
    study, trial = new_trial()
    callback = PruningCallback(trial, "eval_loss", n_train=44, every=10)
    evaluated, _ = fit(callback, n_train=44, batch=2, max_steps=22)
    assert evaluated == [5, 10, 15, 20, 22]
    assert list(reported(study, trial)) == [10, 20, 30, 40, 44]


def test_each_report_reaches_on_eval_with_the_objective():
    calls = []
    _, trial = new_trial()
    callback = PruningCallback(trial, "eval_accuracy", n_train=48, every=24, on_eval=lambda s, v: calls.append((s, v)))
    fit(
        callback,
        n_train=48,
        batch=8,
        max_steps=6,
        metrics=lambda step: {"eval_loss": 1.0 / step, "eval_accuracy": step / 10},
    )
    assert calls == [(24, 0.3), (48, 0.6)]


def test_the_pruner_stops_training_at_the_step_it_pruned():
    study, trial = new_trial(optuna.pruners.ThresholdPruner(upper=1.0))
    callback = PruningCallback(trial, "eval_loss", n_train=48, every=12)
    losses = {3: 0.9, 6: 0.8, 9: 1.5, 12: 0.1}
    evaluated, control = fit(
        callback, n_train=48, batch=4, max_steps=12, metrics=lambda step: {"eval_loss": losses[step]}
    )
    assert evaluated == [3, 6, 9]  # no evaluation after the one that pruned
    assert control.should_training_stop and callback.pruned_at == 36
    assert reported(study, trial) == {12: 0.9, 24: 0.8, 36: 1.5}  # the value that pruned is reported first


def test_a_larger_batch_is_pruned_against_a_smaller_one_at_the_same_grid_points():
    # The median pruner compares trials at equal steps: without the grid, batch 10 would report at 20, 30, ...
    # where the batch-4 trial has no value, and it would never be pruned.
    study = optuna.create_study(storage=None, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    fit(
        PruningCallback(good, "eval_loss", n_train=48, every=12),
        n_train=48,
        batch=4,
        max_steps=12,
        metrics=lambda step: {"eval_loss": 1.0 / step},
    )
    study.tell(good, 0.1)
    bad = study.ask()
    callback = PruningCallback(bad, "eval_loss", n_train=48, every=12)
    evaluated, control = fit(callback, n_train=48, batch=10, max_steps=5, metrics=lambda step: {"eval_loss": 5.0})
    assert evaluated == [2] and callback.pruned_at == 12 and control.should_training_stop


@pytest.mark.parametrize("min_steps", [0, 3])
def test_no_trial_is_pruned_before_min_optimizer_steps_but_a_clearly_worse_one_is_after(min_steps):
    # At equal examples seen, a trial with 6x the effective batch (gradient accumulation) has made a sixth of
    # the optimizer steps: behind early, ahead at the end. Asked at its first evaluation, after one optimizer
    # step, the median pruner stops it; with min_optimizer_steps 3 it is first asked after 3, and finishes best.
    study = optuna.create_study(storage=None, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))

    def run(batch, curve):
        trial = study.ask()
        callback = PruningCallback(trial, "eval_loss", n_train=96, every=24, min_steps=min_steps)
        steps = 96 // batch
        fit(callback, 96, batch, steps, lambda step: {"eval_loss": curve[step * batch // 24 - 1]})
        if callback.pruned_at is None:
            study.tell(trial, curve[-1])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return callback.pruned_at

    assert run(4, [1.0, 0.6, 0.4, 0.3]) is None  # the first trial: nothing to compare with
    accumulating = run(24, [1.5, 1.2, 0.35, 0.2])  # 1 optimizer step per evaluation
    clearly_worse = run(24, [5.0, 5.0, 5.0, 5.0])
    if min_steps:
        assert accumulating is None and clearly_worse == 72  # asked first after 3 optimizer steps
    else:
        assert accumulating == 24 and clearly_worse == 24  # the short-horizon bias: cut after one step


@pytest.mark.parametrize(
    "metric, values, why",
    [
        ("eval_loss", {"eval_loss": float("nan")}, "eval_loss is nan"),
        ("eval_accuracy", {"eval_loss": 0.5, "eval_accuracy": float("inf")}, "eval_accuracy is inf"),
        # a finite accuracy with a NaN loss is the argmax of NaN logits: diverged all the same
        ("eval_accuracy", {"eval_loss": float("nan"), "eval_accuracy": 0.3}, "eval_loss is nan"),
        ("eval_loss", {"eval_loss": float("-inf")}, "eval_loss is -inf"),
    ],
)
def test_a_non_finite_objective_or_loss_stops_training_unreported(metric, values, why):
    calls = []
    study, trial = new_trial(optuna.pruners.ThresholdPruner(upper=100.0))
    callback = PruningCallback(trial, metric, n_train=48, every=12, on_eval=lambda s, v: calls.append(s))
    first = {"eval_loss": 0.7, "eval_accuracy": 0.4}
    evaluated, control = fit(
        callback, n_train=48, batch=4, max_steps=12, metrics=lambda step: first if step == 3 else values
    )
    assert evaluated == [3, 6] and control.should_training_stop
    assert callback.diverged == (24, why) and callback.pruned_at is None
    assert list(reported(study, trial)) == [12] and calls == [12]  # the sampler never sees the diverged value
    assert [step for step, _ in callback.history] == [12, 24]  # the history keeps it, for the fail reason
