"""Optuna's private names, read here and nowhere else in hpo.

hpo needs a few things Optuna keeps private: a trial's storage id, the storage under the study's cache, the system
attrs a running trial cannot show, the hook its samplers read a study's trials through, Hyperband's brackets.
Each is one small function here, and each has a test in ``tests/test_optuna_private.py`` that checks, against a
real study, that the name is there and means what hpo takes it to mean: an Optuna release that renames or changes
one fails there, in one place, instead of somewhere in a run.

At the bottom of hpo's layers (it imports only optuna): the config's checks use it as well as the study's loop.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

FIXED_PARAMS = "fixed_params"  # system attr: a queued trial's parameters (``enqueue_trial``)
RETRY_HISTORY = "retry_history"  # system attr: the trials a retry retries (a stale heartbeat's retry callback)


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage (the ``study_id`` column of an RDB storage's ``studies`` table)."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage, unique across the storage's studies (not its ``number``)."""
    return trial._trial_id


def trial_by_id(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """The running trial ``trial_id`` of ``study``, to write to (a user attr, a report) from another process or
    after the loop that asked for it has gone."""
    return optuna.Trial(study, trial_id)


def backend(study: optuna.Study) -> BaseStorage:
    """The storage ``study`` writes through, without Optuna's cache around it: an ``RDBStorage`` for a database."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def stored_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials as the storage holds them now, whatever ``study`` is (a view, Hyperband's bracket study
    filters its own ``get_trials``); not to be changed (no copies)."""
    return study._storage.get_all_trials(study._study_id, deepcopy=False)


def system_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """A running trial's system attrs (``fixed_params`` of a queued trial, ``retry_history`` of a retry), read from
    the storage: Optuna's ``Trial`` no longer shows them (optuna-integration reads them the same way)."""
    return trial.storage.get_trial_system_attrs(trial._trial_id)


def set_system_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    """Write a system attr of a running trial (Optuna's ``Trial`` no longer does)."""
    trial.storage.set_trial_system_attr(trial._trial_id, key, value)


def stored_user_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """A running trial's user attrs as the storage holds them now (another process, a rank, may have set some)."""
    return trial.storage.get_trial_user_attrs(trial._trial_id)


def intermediate_values(trial: optuna.Trial) -> dict[int, float]:
    """What a running trial reported so far, step → value, as the storage holds it now (a rank may report)."""
    return trial.storage.get_trial(trial._trial_id).intermediate_values


def startup_trials(sampler: optuna.samplers.BaseSampler) -> int:
    """How many trials ``sampler`` draws at random before it models (TPE's, GP's, CMA-ES's ``n_startup_trials``);
    0 for a sampler without a start-up."""
    return getattr(sampler, "_n_startup_trials", 0)


def contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is one of ``distribution``'s, by Optuna's own membership test (the one behind its "out of
    range" warning for an enqueued value); False for a value of another kind."""
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def bracket_of(hyperband: optuna.pruners.HyperbandPruner, study: optuna.Study, trial: FrozenTrial) -> int:
    """The Hyperband bracket ``trial`` belongs to (0 before Hyperband knows its brackets)."""
    return hyperband._get_bracket_id(study, trial)


def bracket_pruner(
    hyperband: optuna.pruners.HyperbandPruner, study: optuna.Study, trial: FrozenTrial
) -> tuple[int, optuna.pruners.BasePruner]:
    """``trial``'s Hyperband bracket and the pruner (successive halving) that decides within it, the brackets set
    up first if need be: Hyperband's own ``prune`` asks it with a study of the bracket that reads the storage."""
    if not hyperband._pruners:
        hyperband._try_initialization(study)
    bracket = hyperband._get_bracket_id(study, trial)
    return bracket, hyperband._pruners[bracket]


class StudyView:
    """``study`` with only the trials :meth:`visible` keeps (subclasses choose); anything else is the study's.

    Optuna's samplers and pruners read a study's trials through its private ``_get_trials`` (with ``use_cache``),
    so a view answers that too: from the storage each time, never the study's cache, which holds what another
    view saw.
    """

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def visible(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        return trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, use_cache=False)
        return [t for t in self.visible(trials) if states is None or t.state in states]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()
