"""Optuna samplers and pruners by the short names study files use."""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import typing
import warnings
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import TypeAdapter, ValidationError

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}

DEFAULT_STARTUP_TRIALS = 3  # median and percentile pruners: finished trials before the first is pruned
MAX_GRID_POINTS = 100_000  # GridSampler lists every point: a 10-line file must not ask for billions

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "patient": optuna.pruners.PatientPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}


def make_sampler(
    name: str, args: Mapping[str, Any], space: Mapping[str, BaseDistribution]
) -> optuna.samplers.BaseSampler:
    """Build the sampler ``name`` with keyword ``args``.

    ``grid`` takes its grid from the search space (categorical choices, stepped
    ranges) unless ``args`` gives ``search_space``.

    Raises:
        ValueError: unknown name, bad arguments, or a space the grid cannot enumerate.
    """
    cls = SAMPLERS[name]
    kwargs = dict(args)
    if name == "grid" and "search_space" not in kwargs:
        points = math.prod(_grid_size(k, d) for k, d in space.items())  # before listing a single value
        if points > MAX_GRID_POINTS:
            raise ValueError(
                f"the grid has {points:,} points (at most {MAX_GRID_POINTS:,}): fewer choices, "
                "a larger step, or another sampler"
            )
        kwargs["search_space"] = {k: _grid_values(k, d) for k, d in space.items()}
    return _construct(cls, kwargs)


def make_pruner(
    name: str, args: Mapping[str, Any], first_step: int = 1, last_step: int | None = None
) -> optuna.pruners.BasePruner:
    """Build the pruner ``name`` with keyword ``args``.

    ``median`` and ``percentile`` start pruning after :data:`DEFAULT_STARTUP_TRIALS` finished trials unless
    ``n_startup_trials`` says otherwise.

    Steps are examples seen, so the resource-based pruners default their
    resources to the evaluation grid: ``min_resource`` is the first evaluation
    point and Hyperband's ``max_resource`` the whole run. ``patient`` wraps the
    pruner given as ``wrapped: {name: ..., ...}``.

    Raises:
        ValueError: unknown name or bad arguments.
    """
    kwargs = dict(args)
    if name in ("median", "percentile"):
        # Optuna's default is 5: replayed on recorded curves (benchmarks/pruning.py), 3 cut a 12-trial study's
        # training time by a further ~10 points on two data sizes, and no more winners (docs/performance.md).
        kwargs.setdefault("n_startup_trials", DEFAULT_STARTUP_TRIALS)
    if name in ("hyperband", "successive_halving"):
        kwargs.setdefault("min_resource", first_step)
    if name == "hyperband" and last_step is not None:
        kwargs.setdefault("max_resource", last_step)
    if name == "patient":
        # Without ``wrapped``, Optuna's PatientPruner(None, patience) prunes on patience alone.
        wrapped = kwargs.pop("wrapped", None)
        if wrapped is None:
            kwargs["wrapped_pruner"] = None
        else:
            if not isinstance(wrapped, Mapping) or wrapped.get("name") not in PRUNERS:
                raise ValueError(f"wrapped: a pruner like {{name: median}}, one of {', '.join(PRUNERS)}")
            wrapped = dict(wrapped)
            kwargs["wrapped_pruner"] = make_pruner(wrapped.pop("name"), wrapped, first_step, last_step)
    return _construct(PRUNERS[name], kwargs)


def dry_run(
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    space: Mapping[str, BaseDistribution],
    direction: str | list[str],
    n_trials: int = 3,
) -> None:
    """Ask, report, prune and tell a few trials of an in-memory study with made-up values.

    Constructors store most arguments unchecked; an argument of the wrong kind then fails in every trial.
    This finds it before the study starts.

    Raises:
        Exception: whatever the sampler or pruner raises.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        directions = [direction] if isinstance(direction, str) else direction
        study = optuna.create_study(sampler=sampler, pruner=pruner, directions=directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    rng = np.random.default_rng(0)
    for _ in range(n_trials):
        trial = study.ask(dict(space))
        for step in (1, 2, 3) if len(directions) == 1 else ():  # Optuna prunes one objective only
            trial.report(float(rng.random()), step)
            trial.should_prune()
        study.tell(trial, [float(v) for v in rng.random(len(directions))])


def _construct(cls: type, kwargs: dict[str, Any]) -> Any:
    kwargs = _typed(cls, kwargs)
    try:
        with warnings.catch_warnings():  # the study file asked for it by name: no "experimental" warning
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except TypeError as e:  # unexpected or missing keyword: say it in the user's words, with a hint
        message = str(e).replace(".__init__()", ":")
        accepted = list(inspect.signature(cls).parameters)
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            match = difflib.get_close_matches(unknown[0], accepted, n=1)
            message += f"; did you mean {match[0]!r}?" if match else ""
        raise ValueError(message) from None
    except ImportError as e:
        raise ValueError(f"{cls.__name__} needs a package that is not installed: {e}") from None


def _typed(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against the constructor's annotations (pydantic, lax: ``"10"`` → 10).

    Optuna's constructors store arguments unchecked, so ``n_startup_trials: ten`` would fail in every trial.
    An annotation that does not resolve (a name imported only for type checkers) is left unchecked.
    """
    namespace = {
        **vars(collections.abc),
        **vars(typing),
        "np": np,
        "optuna": optuna,
        "FrozenTrial": optuna.trial.FrozenTrial,
        "BaseSampler": optuna.samplers.BaseSampler,
        "BaseDistribution": BaseDistribution,
        "Study": optuna.Study,
        "TrialState": optuna.trial.TrialState,
        "BasePruner": optuna.pruners.BasePruner,
    }
    try:
        hints = typing.get_type_hints(cls.__init__, localns=namespace)
    except Exception:  # noqa: BLE001 - an annotation we cannot resolve: the dry run still checks
        return kwargs
    out = {}
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is None or key == "wrapped_pruner":
            out[key] = value
            continue
        try:
            adapter = TypeAdapter(hint, config={"arbitrary_types_allowed": True})
        except Exception:  # noqa: BLE001 - pydantic cannot check this annotation: the dry run still does
            out[key] = value
            continue
        try:
            out[key] = adapter.validate_python(value)
        except ValidationError:
            expected = (
                hint.__name__
                if isinstance(hint, type)
                else str(hint).replace("typing.", "").replace("collections.abc.", "")
            )
            raise ValueError(f"{key}: {value!r} is not {expected}") from None
    return out


def _grid_size(name: str, d: BaseDistribution) -> int:
    if isinstance(d, CategoricalDistribution):
        return len(d.choices)
    if isinstance(d, IntDistribution) and not d.log:
        return (d.high - d.low) // d.step + 1
    if isinstance(d, FloatDistribution) and d.step is not None:
        return round((d.high - d.low) / d.step) + 1
    raise ValueError(f"grid sampler needs categorical or stepped parameters; {name!r} is continuous")


def _grid_values(name: str, d: BaseDistribution) -> list[Any]:
    """The grid points of one parameter (:func:`_grid_size` has checked that it has any)."""
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution):
        return list(range(d.low, d.high + 1, d.step))
    # In decimal, as written: np.arange(0, 0.3 + 0.05, 0.1) ends at 0.30000000000000004, past high, which Optuna
    # warns is out of range and trains anyway. Clamped to high: Optuna cuts high to the last whole step.
    low, step = Decimal(repr(d.low)), Decimal(repr(d.step))
    return [min(float(low + i * step), d.high) for i in range(_grid_size(name, d))]
