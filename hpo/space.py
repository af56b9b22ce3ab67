"""The search space: its schema (``Param``, ``when:`` conditions, constraints) and its compiler.

A study file's ``search_space:`` is validated into :class:`Param` entries here, compiled once into
Optuna distributions (:func:`compile_space`), and sampled in one place (:func:`sample`); derived
parameters, conditions and constraints are evaluated by the same walk at trial time and at
validation (:func:`walk`, :func:`corners`). Also the names a space may search.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import itertools
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hpo import knobs
from hpo.errors import did_you_mean
from hpo.expr import Expression

#: Model-side knobs: ``dropout`` sets every dropout probability in the model config; ``bits`` the
#: quantization of the frozen weights (``model.quantization``).
MODEL_PARAMS = frozenset({"dropout", "bits"})
#: PEFT ``LoraConfig`` names; any of them in a space makes trials LoRA fine-tunes.
LORA_PARAMS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules"})
#: Names people know from transformers 4 that hpo still takes, mapped to today's field
#: (transformers 5 reads a float ``warmup_steps`` below 1 as a ratio of the total steps).
RENAMED_TRAINING_ARGS = {"warmup_ratio": "warmup_steps"}
#: TrainingArguments that hpo owns: each trial sets them itself.
RESERVED_TRAINING_ARGS = frozenset(
    {"output_dir", "eval_strategy", "eval_steps", "save_strategy", "label_names", "auto_find_batch_size"}
)


# The schema of one search-space entry. It sits beside the compiler below: the entry's checks end
# with Optuna's own (to_distribution), and the compiler reads nothing else.

Choice = bool | int | float | str | None


def _searchable(name: str) -> str:
    if name not in searchable_names():
        if name in RESERVED_TRAINING_ARGS:
            raise ValueError(f"{name!r} is set by hpo and cannot be searched")
        raise ValueError(f"unknown parameter {name!r}{did_you_mean(name, searchable_names())}")
    return name


def _condition(source: str) -> str:
    Expression(source, condition=True)  # raises ValueError naming what is not allowed
    return source


#: A search-space key: a TrainingArguments field, one of hpo's knobs, ``dropout`` or a LoRA setting.
SearchName = Annotated[str, AfterValidator(_searchable)]
#: A ``constraints:`` entry: a comparison over parameter names, e.g. ``"a * b <= 128"``.
Condition = Annotated[str, AfterValidator(_condition)]


def no_boolean_numbers(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A field validator for every field of a model: a boolean is refused where a number goes. YAML reads true/false,
    yes/no and on/off as booleans, which pydantic would take as the numbers 1 and 0 (``n_trials: yes`` ran 1 trial).
    A validator rather than annotated types: those would turn the JSON schema's exclusiveMinimum into "gt"."""
    if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
        raise ValueError(f"a number, not {str(value).lower()}")
    return value


def _numeric(annotation: Any) -> bool:
    """Whether ``annotation`` takes an int or a float and not a bool (through unions and ``Annotated``)."""
    kinds: set[Any] = set()
    stack = [annotation]
    while stack:
        a = stack.pop()
        args = typing.get_args(a)
        (stack.extend(args) if args else kinds.add(a))
    return bool(kinds & {int, float}) and bool not in kinds


class Param(BaseModel):
    """One search-space entry: an Optuna distribution, or a value derived from other parameters.

    ``when`` makes it conditional: it is sampled only when every named parameter
    has the given value (or one of a list of values).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _no_boolean_numbers = field_validator("*", mode="before")(no_boolean_numbers)

    type: Literal["float", "int", "categorical"] | None = Field(
        None,
        description="float or int: a number between low and high; categorical: one of choices. "
        "Leave it out when the value is derived.",
    )
    low: float | None = Field(
        None, description="The smallest value, inclusive (int: a whole number; log: true: above 0)."
    )
    high: float | None = Field(None, description="The largest value, inclusive; at least low.")
    log: bool = Field(
        False,
        description="Sample on a log scale, for ranges spanning orders of magnitude "
        "(learning_rate 1e-5..1e-3). Needs low > 0; not with step.",
    )
    step: PositiveFloat | None = Field(
        None,
        description="Spacing of the values counted from low (0.05; int: "
        "a whole number). Default: continuous for float, 1 for int.",
    )
    choices: list[Choice] | None = Field(
        None,
        description="The values of a categorical parameter: all numbers, all strings or all booleans, none repeated.",
    )
    derive: str | None = Field(
        None,
        description="Computed, not sampled: arithmetic over the parameters above it "
        'and train: settings, e.g. "2 * r" (+ - * / // % **, min, max).',
    )
    when: dict[str, Choice | list[Choice]] | None = Field(
        None,
        description="Sample it only when each named parameter (defined above it) has this value or one of "
        "a list of values, e.g. {optim: sgd}; otherwise the trial leaves it out.",
    )

    @cached_property
    def expression(self) -> Expression | None:
        return Expression(self.derive) if self.derive is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> Param:
        if self.when is not None and not self.when:
            raise ValueError("'when' needs at least one {parameter: value}")
        if self.derive is not None:
            if self.type is not None or self.low is not None or self.high is not None or self.choices is not None:
                raise ValueError("a derived parameter takes 'derive' (and 'when') only")
            self.expression  # noqa: B018 - parse now, so a bad expression fails validation
            return self
        if self.type is None:
            raise ValueError("give 'type' (float, int, categorical) or 'derive'")
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("categorical takes 'choices' only (no low/high/step/log)")
            kinds = {
                "number" if isinstance(c, int | float) and not isinstance(c, bool) else type(c).__name__
                for c in self.choices
            }
            if len(kinds) > 1:
                raise ValueError(f"choices mix types ({', '.join(sorted(kinds))}): {self.choices}")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"choices repeat a value: {self.choices}")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high (choices are for categorical)")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low={self.low:g} > high={self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0 (low={self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("step and log=true cannot be combined")
        if self.type == "int":
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and value != int(value):
                    raise ValueError(f"int parameter needs whole numbers: {key}={value:g}")
        to_distribution(self)  # Optuna's own checks, e.g. step not dividing the range
        return self


@lru_cache(maxsize=1)
def training_argument_names() -> frozenset[str]:
    """The field names of ``transformers.TrainingArguments``.

    Read from the installed source with ``ast``: importing transformers (and
    torch) takes seconds, and validating a study file should take less.
    """
    spec = importlib.util.find_spec("transformers")
    source = Path(next(iter(spec.submodule_search_locations))) / "training_args.py"
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            return frozenset(
                s.target.id
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and not s.target.id.startswith("_")
            )
    from dataclasses import fields  # the source moved: fall back to the slow import

    from transformers import TrainingArguments

    return frozenset(f.name for f in fields(TrainingArguments) if f.init)


def training_names() -> frozenset[str]:
    """What ``train:`` and a search space may set: TrainingArguments fields, renamed ones, hpo's knobs."""
    renamed = {k for k in RENAMED_TRAINING_ARGS if k not in training_argument_names()}
    return training_argument_names() | renamed | knobs.NAMES


def training_arguments(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with renamed fields (``warmup_ratio``) under their TrainingArguments name."""
    fields = training_argument_names()
    return {(k if k in fields else RENAMED_TRAINING_ARGS.get(k, k)): v for k, v in kwargs.items()}


def searchable_names() -> frozenset[str]:
    """Every name a search space may use."""
    return (training_names() - RESERVED_TRAINING_ARGS) | MODEL_PARAMS | LORA_PARAMS


def to_distribution(p: Param) -> BaseDistribution:
    """One search-space entry as an Optuna distribution.

    >>> to_distribution(Param(type="float", low=1e-5, high=1e-3, log=True))
    FloatDistribution(high=0.001, log=True, low=1e-05, step=None)

    Raises:
        ValueError: the entry is inconsistent (Optuna's own checks, e.g. ``low > high``).
    """
    if p.type == "categorical":
        return CategoricalDistribution(p.choices)
    if p.type == "int":
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return FloatDistribution(p.low, p.high, log=p.log, step=p.step)


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


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split trial params into (TrainingArguments kwargs, model kwargs, LoRA kwargs)."""
    model = {k: v for k, v in params.items() if k in MODEL_PARAMS}
    lora = {k: v for k, v in params.items() if k in LORA_PARAMS}
    training = {k: v for k, v in params.items() if k not in model and k not in lora}
    return training, model, lora


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
