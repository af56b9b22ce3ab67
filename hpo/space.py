"""The search space as a study file declares it: its schema (``Param``, ``when:`` conditions, constraints) and the
names a space may search.

A study file's ``search_space:`` is validated into :class:`Param` entries here. :mod:`hpo.distributions` compiles
them once into Optuna distributions and samples them in one place; each entry's own distribution
(:func:`to_distribution`) is here, where the entry checks itself with it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from functools import cached_property, lru_cache
from typing import Annotated, Any, Literal

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
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

#: TrainingArguments that wrap or change the model for good, or leave a hook on it when training fails (NEFTune's),
#: or cast it in place (full-precision evaluation): a trial with one of them loads its own
#: (hpo.trial.resident), and trains in no pack.
NOT_RESIDENT = (
    "deepspeed",
    "fsdp",
    "torch_compile",
    "torch_compile_backend",  # either one sets torch_compile
    "torch_compile_mode",
    "neftune_noise_alpha",
    "bf16_full_eval",
    "fp16_full_eval",
)
#: TrainingArguments that change the model in place, only ever one way (the Trainer turns checkpointing on and never
#: off; accelerate wraps a full fine-tune's forward in the first trial's autocast): part of a resident base's key,
#: which a pack's trials share.
MODEL_SETTINGS = (
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "gradient_checkpointing",  # transformers 5's deprecated alias of activation_checkpointing
    "gradient_checkpointing_kwargs",
    "use_liger_kernel",
    "liger_kernel_config",
    "bf16",
    "fp16",
)


# The schema of one search-space entry. Its checks end with Optuna's own (to_distribution), and the
# compiler in hpo.distributions reads nothing else.

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


@lru_cache(maxsize=1)
def training_argument_names() -> frozenset[str]:
    """The field names of ``transformers.TrainingArguments``.

    Read from the installed source with ``ast``: importing transformers (and
    torch) takes seconds, and validating a study file should take less.
    """
    if written := knobs.training_fields_source():
        return frozenset(s.target.id for s in written if not s.target.id.startswith("_"))
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


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split trial params into (TrainingArguments kwargs, model kwargs, LoRA kwargs)."""
    model = {k: v for k, v in params.items() if k in MODEL_PARAMS}
    lora = {k: v for k, v in params.items() if k in LORA_PARAMS}
    training = {k: v for k, v in params.items() if k not in model and k not in lora}
    return training, model, lora
