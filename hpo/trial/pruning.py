"""Evaluate on a grid of examples seen, report to Optuna, stop when it says prune."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
from transformers import TrainerCallback


class PruningCallback(TrainerCallback):
    """Evaluates every ``every`` examples and reports ``metric`` to ``trial``.

    The step given to Optuna is the number of training examples seen at that
    evaluation point, so trials with different batch sizes or accumulation are
    compared at the same amount of data. A final evaluation always follows the
    last optimizer step. When the pruner says so, training stops and
    ``pruned_at`` holds the step. A NaN or infinite objective or eval loss stops training too
    (``diverged``: the step and what diverged): a diverged model's accuracy is whatever argmax of NaN
    logits gives, and must never be ranked.

    The pruner is asked only once the trial has made ``min_steps`` optimizer steps.

    It also keeps the best evaluation (``best``; with ``keep_best`` its weights, ``best_state``), and with a
    ``patience`` stops a trial whose objective did not improve by more than ``min_delta`` in that many
    evaluations (``stopped_early``: the step).
    """

    def __init__(
        self,
        trial: optuna.Trial,
        metric: str,
        n_train: int,
        every: float,
        on_eval: Callable[[int, float], None] | None = None,
        minimize: bool = True,
        keep_best: bool = False,
        patience: int | None = None,
        min_delta: float = 0.0,
        report: bool = True,
        min_steps: int = 0,
    ):
        self.trial, self.metric, self.n_train, self.every = trial, metric, n_train, every
        self.on_eval = on_eval
        self.minimize, self.keep_best, self.patience, self.min_delta = minimize, keep_best, patience, min_delta
        self.report = report  # False: several objectives, which Optuna neither takes reports for nor prunes
        self.min_steps = min_steps  # optimizer steps before the pruner is asked (it is told every evaluation)
        self.history: list[tuple[int, dict[str, float]]] = []
        self.best: int | None = None  # index in history of the best evaluation
        self.best_state: dict[str, Any] | None = None  # with keep_best: the trained weights at that evaluation
        self.stopped_early: int | None = None  # early stopping ended training at this step
        self.reference: float | None = None  # the value patience compares with, and where it was reached
        self.improved = 0
        self.pruned_at: int | None = None
        self.diverged: tuple[int, str] | None = None
        self.evaluating = False  # between asking for an evaluation and its result: where an out-of-memory came from
        self._next = 1  # index of the next grid point

    def _seen(self, state) -> float:
        return state.epoch * self.n_train

    def on_train_begin(self, args, state, control, **kwargs):  # resumed from a checkpoint: the grid goes on
        self._next = max(self._next, math.floor(self._seen(state) / self.every + 1e-6) + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self._seen(state) + 1e-6 >= self._next * self.every or state.global_step >= state.max_steps:
            control.should_evaluate = self.evaluating = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluating = False
        k = math.floor(self._seen(state) / self.every + 1e-6)
        step = round(k * self.every) if k >= self._next else round(self._seen(state))
        self._next = max(self._next, k + 1)
        value = metrics[self.metric]
        self.history.append((step, dict(metrics)))
        bad = next(
            (
                f"{k} is {metrics[k]}"
                for k in (self.metric, "eval_loss")
                if k in metrics and not math.isfinite(metrics[k])
            ),
            None,
        )
        if bad is not None:
            self.diverged, control.should_training_stop = (step, bad), True
            return
        self._track_best(value, kwargs.get("model"))
        if self.report:
            self.trial.report(value, step)
        if self.on_eval:
            self.on_eval(step, value)
        # Asked at every evaluation (successive halving and Hyperband record their rungs when asked), heeded only
        # from min_steps on.
        if self.report and self.trial.should_prune() and state.global_step >= self.min_steps:
            self.pruned_at, control.should_training_stop = step, True
        elif self.patience is not None and len(self.history) - 1 - self.improved >= self.patience:
            self.stopped_early, control.should_training_stop = step, True

    def _track_best(self, value: float, model) -> None:
        """Note the best evaluation (with ``keep_best``, copy to the CPU the weights training changes: trainable
        parameters and buffers, a LoRA trial's adapters) and the last one that improved by over ``min_delta``."""
        i = len(self.history) - 1
        if self.reference is None or (
            value < self.reference - self.min_delta if self.minimize else value > self.reference + self.min_delta
        ):
            self.reference, self.improved = value, i  # what patience counts from (Keras' rule)
        if self.best is not None:
            best = self.history[self.best][1][self.metric]
            if not (value < best if self.minimize else value > best):
                return
        self.best = i
        if self.keep_best and model is not None:
            changing = {n for n, p in model.named_parameters() if p.requires_grad} | dict(model.named_buffers()).keys()
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in changing
            }
