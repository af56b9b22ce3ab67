"""Parallel and reproducible: under ``hpo run --workers N`` trial k is sampled and pruned on what the trials
before it told, never on which worker happened to finish first.

Optuna's samplers see whatever has finished when a worker asks, so a seeded study's trials depend on timing.
Here, with N workers, trial k sees

* the results of trials 0 … k-N, waiting for any of them still running;
* trials k-N+1 … k-1 as running, with their parameters and without their results (waiting until they are
  sampled): TPE's constant liar, on by default here, keeps the trials of one batch apart;

and its sampler is seeded with (seed, k). The pruner sees trials 0 … k-N. So a seeded study gives the same
trials with N workers every time; with one worker this is Optuna's sequential search. With N workers, trials
0 … k-N are still running only when one of them is slower than the N-1 after it: then trial k waits for it.

Optuna has no such mode: its batch samplers decide a batch at once, and its constant liar alone still sees
finish order; so hpo builds it from a study view (:class:`hpo.optuna_private.StudyView`: a proxy whose ``get_trials``
shows the past as above).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from hpo import optuna_private
from hpo.trial import interrupts

POLL_S = 0.2  # how often a trial waiting for the ones before it looks again
SAMPLED = "hpo:sampled"  # system attr: the trial's parameters are all drawn (a later trial may lie with them)


class _View(optuna_private.StudyView):
    """``study`` as trial ``number`` may see it (see the module's docstring); anything else is the study's."""

    def __init__(self, study: optuna.Study, number: int, lag: int):
        super().__init__(study)
        self._number, self._lag = number, lag

    def visible(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        out = []
        for t in trials:
            if self._number - self._lag < t.number < self._number:  # the batch in flight: parameters only
                t = _running(t)
            elif t.number > self._number:
                continue
            out.append(t)
        return out

    @property
    def best_trial(self) -> FrozenTrial:  # the Wilcoxon pruner compares with it
        done = self.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            raise ValueError("no trial is complete yet")
        minimize = self._study.direction == optuna.study.StudyDirection.MINIMIZE
        return (min if minimize else max)(done, key=lambda t: t.value)

    @property
    def best_value(self) -> float:
        return self.best_trial.value


def _running(t: FrozenTrial) -> FrozenTrial:
    return FrozenTrial(
        number=t.number,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=t.datetime_start,
        datetime_complete=None,
        params=t.params,
        distributions=t.distributions,
        user_attrs=t.user_attrs,
        system_attrs=t.system_attrs,
        intermediate_values={},
        trial_id=optuna_private.trial_id(t),
    )


class OrderedSampler(optuna.samplers.BaseSampler):
    """``make(seed)`` builds the sampler; trial k gets a fresh one seeded from (``seed``, k) and the view with
    ``lag`` = the number of workers.

    The sampler's start-up trials (its ``n_startup_trials``, drawn at random) are the ones one worker draws:
    ``walk(trial)`` suggests a trial's parameters, and :meth:`_startup` replays the seeded sampler's start-up
    in a study of its own. So ``--workers N`` starts from the configurations ``--workers 1`` (and Optuna's own
    sequential search with that seed) starts from, and the worker count changes only what is learned after.
    """

    def __init__(
        self,
        make: Callable[[int], optuna.samplers.BaseSampler],
        seed: int,
        lag: int,
        walk: Callable[[optuna.Trial], Any] | None = None,
    ):
        self._make, self._seed, self.lag, self._walk = make, seed, lag, walk
        self._inner: dict[int, optuna.samplers.BaseSampler] = {}
        self._draws: list[optuna.Trial] | None = None  # the start-up trials, in the order drawn
        self._fixed: dict[int, int] = {}  # trial number -> queued trials before it (they draw nothing)

    def _startup(self, study: optuna.Study, trial: FrozenTrial) -> optuna.Trial | None:
        """What one worker's seeded sampler draws for ``trial``, if it is a start-up trial; else None.

        One worker's trial k is its sampler's (k - q)-th draw, q being the queued trials before it, as long as
        fewer than ``n_startup_trials`` have finished: trial k < ``n_startup_trials``.
        """
        if self._walk is None or optuna_private.FIXED_PARAMS in trial.system_attrs:
            return None
        if self._draws is None:
            sampler = self._make(self._seed)
            verbosity = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
            try:
                replay = optuna.create_study(sampler=sampler, directions=study.directions)
            finally:
                optuna.logging.set_verbosity(verbosity)
            self._draws = []
            for _ in range(optuna_private.startup_trials(sampler)):
                t = replay.ask()
                with contextlib.suppress(ValueError):  # a derived value fails here: so does that trial, as drawn
                    self._walk(t)
                self._draws.append(t)
        if trial.number >= len(self._draws):  # past the start-up: no storage read on every later trial
            return None
        if trial.number not in self._fixed:
            before = optuna_private.stored_trials(study)[: trial.number]
            self._fixed[trial.number] = sum(optuna_private.FIXED_PARAMS in t.system_attrs for t in before)
        return self._draws[trial.number - self._fixed[trial.number]]

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._inner:
            seed = int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0])
            self._inner[trial.number] = self._make(seed)
        return self._inner[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(_View(study, trial.number, self.lag), trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(_View(study, trial.number, self.lag), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if self._startup(study, trial) is not None:
            return {}
        return self._for(trial).sample_relative(_View(study, trial.number, self.lag), trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        drawn = self._startup(study, trial)
        if drawn is not None and drawn.distributions.get(param_name) == param_distribution:
            return drawn.params[param_name]
        view = _View(study, trial.number, self.lag)
        return self._for(trial).sample_independent(view, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: list[float] | None
    ) -> None:
        inner = self._for(trial)
        del self._inner[trial.number]
        inner.after_trial(_View(study, trial.number, self.lag), trial, state, values)


class OrderedPruner(optuna.pruners.BasePruner):
    """``inner`` deciding on trials 0 … k-``lag`` only (finished before trial k began: see the sampler)."""

    def __init__(self, inner: optuna.pruners.BasePruner, lag: int):
        self.inner, self.lag = inner, lag

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        inner = self.inner
        if isinstance(inner, optuna.pruners.HyperbandPruner):
            # Hyperband's own bracket study reads the storage past any view: ask the trial's bracket pruner
            # (successive halving) with the view cut to that bracket.
            bracket, pruner = optuna_private.bracket_pruner(inner, study, trial)
            return pruner.prune(_Bracket(study, trial.number, self.lag, inner, bracket), trial)
        return inner.prune(_Past(study, trial.number, self.lag), trial)


class _Past(_View):
    """Trials 0 … number-lag, and trial ``number`` itself."""

    def visible(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        return [t for t in trials if t.number <= self._number - self._lag or t.number == self._number]


class _Bracket(_Past):
    """The past of one Hyperband bracket."""

    def __init__(self, study, number, lag, hyperband, bracket):
        super().__init__(study, number, lag)
        self._hyperband, self._bracket = hyperband, bracket

    def visible(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        bracket = self._bracket
        return [
            t for t in super().visible(trials) if optuna_private.bracket_of(self._hyperband, self._study, t) == bracket
        ]


def horizon(study: optuna.Study, number: int) -> int:
    """The last trial whose result trial ``number`` may use: ``number - lag`` when ordered, else ``number - 1``."""
    return number - getattr(study.sampler, "lag", 1)


def mark_sampled(trial: optuna.Trial) -> None:
    """Say that ``trial``'s parameters are all drawn: a later trial of its batch may now lie with them."""
    if isinstance(trial.study.sampler, OrderedSampler):
        optuna_private.set_system_attr(trial, SAMPLED, True)


def wait_for_predecessors(study: optuna.Study, number: int, lag: int, cap_s: float) -> list[int]:
    """Block until trials 0 … number-``lag`` have finished and the rest before ``number`` have drawn their
    parameters. A trial whose worker died goes stale and ends FAIL here (heartbeats), so the wait ends. A trial
    that neither ends nor goes stale (a worker killed before its heartbeat began, a hung rank) is waited for
    ``cap_s`` at most: then this trial goes on, and the trials still pending are returned (its view is then
    timing's, as without ordering; the study stays correct)."""
    deadline = time.monotonic() + cap_s
    while True:
        trials = optuna_private.stored_trials(study)
        pending = [
            t.number
            for t in trials[:number]
            if t.state == TrialState.RUNNING and (t.number <= number - lag or not t.system_attrs.get(SAMPLED))
        ]
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(POLL_S)
        interrupts.stop_if_asked()  # a safe point: the trial has not begun training
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
