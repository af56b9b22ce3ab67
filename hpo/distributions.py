"""The compiled search space: Optuna distributions, and the points a space holds.

:mod:`hpo.space` declares a study's ``search_space:`` (``Param``, the names it may search); here it is compiled
once into Optuna distributions (:func:`compile_space`) and sampled in one place (:func:`sample`). Derived
parameters, conditions and constraints are evaluated by the same walk at trial time and at validation
(:func:`walk`, :func:`corners`); :func:`finite_size` counts a discrete space and :func:`at_edges` reads a best
point against its bounds. No torch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hpo.expr import Expression
from hpo.space import Param, to_distribution


def compile_space(space: Mapping[str, Param]) -> dict[str, BaseDistribution]:
    """The sampled parameters as ``{name: distribution}``, built once per study (derived ones are computed)."""
    return {name: to_distribution(p) for name, p in space.items() if p.derive is None}


def active(when: Mapping[str, Any] | None, values: Mapping[str, Any]) -> bool:
    """Whether a ``when:`` condition holds: each name has the value, or one of a list of values."""
    return all(
        name in values and (values[name] in want if isinstance(want, list) else values[name] == want)
        for name, want in (when or {}).items()
    )


def sample(
    trial: optuna.Trial,
    space: Mapping[str, Param],
    distributions: Mapping[str, BaseDistribution],
    fixed: Mapping[str, Any] = {},  # read only
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample ``trial``'s parameters in file order: (sampled, derived).

    A conditional parameter whose ``when`` does not hold is left out; a derived
    one is computed from ``fixed`` settings and the parameters before it (and
    left out when one of them is). This is the one place that calls
    ``trial.suggest_*``.

    Raises:
        ValueError: a ``derive:`` expression failed (division by zero, overflow).
    """

    def suggest(name: str, d: BaseDistribution) -> Any:
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(name, d.choices)
        if isinstance(d, IntDistribution):
            return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)

    return walk(space, distributions, suggest, fixed)


class DeriveError(ValueError):
    """A ``derive:`` expression failed at a point of the space."""


def walk(
    space: Mapping[str, Param],
    distributions: Mapping[str, BaseDistribution],
    choose: Callable[[str, BaseDistribution], Any],
    fixed: Mapping[str, Any] = {},  # read only
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parameters of one point, in file order, with ``choose(name, distribution)`` picking each sampled value.

    Conditions and derived values as :func:`sample` describes; validation walks the corners of the space
    with the same function that trials sample with.
    """
    sampled: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    for name, p in space.items():
        values = {**fixed, **sampled, **derived}
        if not active(p.when, values):
            continue
        if p.expression is not None:
            try:
                derived[name] = p.expression.evaluate(values)
            except KeyError:  # reads a parameter that is inactive here: so is this one
                pass
            except ValueError as e:
                raise DeriveError(f"search_space.{name}.derive: {e}") from None
            continue
        sampled[name] = choose(name, distributions[name])
    return sampled, derived


def broken_constraint(constraints: Iterable[Expression], values: Mapping[str, Any]) -> str | None:
    """The first constraint that ``values`` break, or None.

    A constraint that reads a parameter inactive at this point (its ``when`` does not hold) does not apply.

    Raises:
        ValueError: a constraint failed to evaluate (division by zero, overflow).
    """
    for c in constraints:
        with contextlib.suppress(KeyError):
            if not c.evaluate(values):
                return c.source
    return None


def finite_size(
    space: Mapping[str, Param],
    distributions: Mapping[str, BaseDistribution],
    fixed: Mapping[str, Any] = {},
    max_points: int = 100_000,
) -> int | None:  # read only
    """How many distinct configurations the space holds, counting ``when:`` conditions; None when it is
    continuous or over ``max_points`` combinations (too many to count)."""
    values = {}
    for name, d in distributions.items():
        if isinstance(d, CategoricalDistribution):
            values[name] = list(d.choices)
        elif isinstance(d, IntDistribution) or d.step is not None:
            n = (
                (d.high - d.low) // d.step + 1
                if isinstance(d, IntDistribution)
                else round((d.high - d.low) / d.step) + 1
            )
            if n > max_points:
                return None
            values[name] = [d.low + k * d.step for k in range(n)]
        else:
            return None
    if math.prod(len(v) for v in values.values()) > max_points:
        return None
    seen = set()
    for combo in itertools.product(*values.values()):
        point = dict(zip(values, combo, strict=True))
        with contextlib.suppress(ValueError):  # a derive that fails here: the trial would fail, not count
            seen.add(
                repr(sorted(walk(space, distributions, lambda name, d, point=point: point[name], fixed)[0].items()))
            )
    return len(seen)


def corners(
    distributions: Mapping[str, BaseDistribution], n_random: int = 32, max_corners: int = 256
) -> list[dict[str, Any]]:
    """Points that validation evaluates ``derive:`` and ``constraints:`` at.

    Every combination of each parameter's extremes (low and high, or every choice), up to
    ``max_corners`` of them (then a random subset, seed 0), plus ``n_random`` random points.
    """
    rng = np.random.default_rng(0)
    ends = {name: _ends(d) for name, d in distributions.items()}
    n_combinations = math.prod(len(v) for v in ends.values())
    if n_combinations <= max_corners:
        points = [dict(zip(ends, combo, strict=True)) for combo in itertools.product(*ends.values())]
    else:
        points = [{name: v[int(rng.integers(len(v)))] for name, v in ends.items()} for _ in range(max_corners)]
    for _ in range(n_random):
        points.append({name: _random(d, rng) for name, d in distributions.items()})
    return points


def _ends(d: BaseDistribution) -> list[Any]:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    return [d.low, d.high] if d.low != d.high else [d.low]


def _random(d: BaseDistribution, rng: np.random.Generator) -> Any:
    if isinstance(d, CategoricalDistribution):
        return d.choices[int(rng.integers(len(d.choices)))]
    low, high = (math.log(d.low), math.log(d.high)) if d.log else (d.low, d.high)
    value = float(rng.uniform(low, high))
    value = math.exp(value) if d.log else value
    if d.step is not None:
        value = d.low + round((value - d.low) / d.step) * d.step
    value = min(max(value, d.low), d.high)
    return round(value) if isinstance(d, IntDistribution) else value


EDGE = 0.05  # a best value within this share of its range from a bound: the optimum may lie past it


def at_edges(params: Mapping[str, Any], distributions: Mapping[str, BaseDistribution]) -> list[str]:
    """Warnings for best ``params`` that sit at the edge of their range, each naming the bound to move.

    A float or int within :data:`EDGE` of a bound (measured on the log scale where the parameter is
    log-scaled), or the smallest or largest of three or more numeric choices.

    >>> from optuna.distributions import FloatDistribution
    >>> at_edges({"learning_rate": 4.8e-4}, {"learning_rate": FloatDistribution(1e-5, 5e-4, log=True)})
    ['search_space.learning_rate: the best value 0.00048 is at the high end of [1e-05, 0.0005] (within 5%): raise high']
    """
    out = []
    for name, value in params.items():
        d = distributions.get(name)
        few = isinstance(d, IntDistribution) and (d.high - d.low) // d.step < 2  # two values: both are edges
        if isinstance(d, FloatDistribution | IntDistribution) and d.high > d.low and not few:
            scale = math.log if d.log else float
            share = (scale(value) - scale(d.low)) / (scale(d.high) - scale(d.low))
            if share <= EDGE and _floor(d.low, isinstance(d, IntDistribution)):
                continue
            if share <= EDGE or share >= 1 - EDGE:
                end, move = ("low", "lower low") if share <= EDGE else ("high", "raise high")
                out.append(
                    f"search_space.{name}: the best value {value:g} is at the {end} end of [{d.low:g}, {d.high:g}] "
                    f"(within {EDGE:.0%}): {move}"
                )
        elif isinstance(d, CategoricalDistribution) and len(d.choices) >= 3:
            numbers = [c for c in d.choices if isinstance(c, int | float) and not isinstance(c, bool)]
            ends = (min(numbers), max(numbers)) if len(numbers) == len(d.choices) else ()
            floor = bool(ends) and value == ends[0] and _floor(value, all(isinstance(c, int) for c in numbers))
            if value in ends and not floor:
                end = "smallest" if value == min(numbers) else "largest"
                out.append(
                    f"search_space.{name}: the best value {value:g} is the {end} choice: "
                    f"add a {'smaller' if end == 'smallest' else 'larger'} one"
                )
    return out


def _floor(low: float, integer: bool) -> bool:
    """Whether nothing lies below ``low``: 0 for a float (dropout, weight decay, warmup), 1 for an integer
    (batch size, accumulation, LoRA rank; 0 for warmup steps). A best value there is no reason to widen the range."""
    return low <= 1 if integer else low <= 0
