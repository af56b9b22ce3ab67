"""Optuna samplers and pruners by the short names study files use."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}

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
        kwargs["search_space"] = {k: _grid_values(k, d) for k, d in space.items()}
    return _construct(cls, kwargs)


def make_pruner(
    name: str, args: Mapping[str, Any], first_step: int = 1, last_step: int | None = None
) -> optuna.pruners.BasePruner:
    """Build the pruner ``name`` with keyword ``args``.

    Steps are examples seen, so the resource-based pruners default their
    resources to the evaluation grid: ``min_resource`` is the first evaluation
    point and Hyperband's ``max_resource`` the whole run. ``patient`` wraps the
    pruner given as ``wrapped: {name: ..., ...}``.

    Raises:
        ValueError: unknown name or bad arguments.
    """
    kwargs = dict(args)
    if name in ("hyperband", "successive_halving"):
        kwargs.setdefault("min_resource", first_step)
    if name == "hyperband" and last_step is not None:
        kwargs.setdefault("max_resource", last_step)
    if name == "patient":
        wrapped = dict(kwargs.pop("wrapped", None) or {"name": "none"})
        inner = wrapped.pop("name", "none")
        if inner not in PRUNERS:
            raise ValueError(f"unknown wrapped pruner {inner!r}")
        kwargs["wrapped_pruner"] = make_pruner(inner, wrapped, first_step, last_step)
    return _construct(PRUNERS[name], kwargs)


def _construct(cls: type, kwargs: dict[str, Any]) -> Any:
    try:
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


def _grid_values(name: str, d: BaseDistribution) -> list[Any]:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution) and not d.log:
        return list(range(d.low, d.high + 1, d.step))
    if isinstance(d, FloatDistribution) and d.step is not None:
        return [float(v) for v in np.arange(d.low, d.high + d.step / 2, d.step)]
    raise ValueError(f"grid sampler needs categorical or stepped parameters; {name!r} is continuous")
