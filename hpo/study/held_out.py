"""What the trials that may end among the best are measured on beyond their value, once each, when they finish:
``data.test`` (shown, never chosen on) and the finalists' generations (:mod:`hpo.trial.generation`).

Only a trial that can still be among the best when it finishes is measured: one outside them then can never enter
them later, so every trial of the final top N has been measured (on the first objective).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from hpo.attrs import FINALIST, GENERATE_SECONDS, TEST_METRICS, TEST_TOP_K
from hpo.study.faults import storage_error
from hpo.study.storage import orientation
from hpo.trial.finetune import evaluate_test
from hpo.trial.workbench import Workbench


def score_if_top(bench: Workbench, trial: optuna.Trial, result: Any, seed: int) -> None:
    """Evaluate ``data.test`` and generate as a finalist, each where ``result`` may end among its top; a failure of
    either is recorded as its error: the trial trained and was evaluated, it stays COMPLETE."""
    cfg = bench.cfg
    if bench.test_rows is not None and may_be_top(trial, result.value, TEST_TOP_K):
        try:
            trial.set_user_attr(TEST_METRICS, evaluate_test(bench, result.model))
        except Exception as e:  # noqa: BLE001 - recorded on the trial
            trial.set_user_attr(TEST_METRICS, {"error": cfg.masked(storage_error(e))[:500]})
    if cfg.finalists is not None and may_be_top(trial, result.value, cfg.finalists.top):
        from hpo.trial.generation import finalist_metrics

        try:
            found = finalist_metrics(bench, result.model, seed)
        except Exception as e:  # noqa: BLE001 - recorded on the trial
            trial.set_user_attr(FINALIST, {"error": cfg.masked(f"{type(e).__name__}: {e}")[:500]})
            return
        trial.set_user_attr(GENERATE_SECONDS, found.pop(GENERATE_SECONDS))
        trial.set_user_attr(FINALIST, found)


def may_be_top(trial: optuna.Trial, value: float, k: int) -> bool:
    """Whether a trial finishing with ``value`` may end among the study's best ``k`` (on the first objective)."""
    study = trial.study
    sign = orientation(study)
    done = sorted(sign * t.values[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return len(done) < k or sign * value < done[k - 1]
