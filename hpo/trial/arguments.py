"""The last check of ``train:`` and the search space before any trial: every TrainingArguments value (and each
of hpo's knobs) typed as its field, in its range, and accepted by ``TrainingArguments`` itself, alone, so that an
error names the key to fix."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import typing
from collections.abc import Callable
from typing import Any

from optuna.distributions import CategoricalDistribution
from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError
from transformers import Trainer, TrainingArguments

from hpo import knobs
from hpo.config import StudyConfig
from hpo.errors import ConfigError
from hpo.space import training_arguments, training_names
from hpo.trial.plan import repeat_seeds

#: Values TrainingArguments accepts but training refuses, every trial: a batch of 0, a negative rate, a seed
#: over 2**32 (the DataLoader, the optimizer and set_seed raise, an hour into the study).
TRAINING_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "> 0"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "num_train_epochs": (lambda v: v > 0, "> 0"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "data_seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eval_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use num_train_epochs) or >= 1"),
}


def check_training_arguments(cfg: StudyConfig) -> None:
    """Check every ``train:`` value, searched value and derived value of TrainingArguments before any trial.

    Each value is checked against the field's type (pydantic; lax for ``train:``, whose ``1e-3`` YAML
    reads as text and is stored back as the number; strict for searched and derived values, which
    reach the trial as they are), against :data:`TRAINING_RANGES`, and by ``TrainingArguments``
    itself, alone, so an error names the key to fix: an unknown optimizer fails here, not in trial 7.

    Raises:
        ConfigError: with one problem per bad value.
    """
    problems: list = []
    for name, value in list(cfg.train.items()):
        typed = _checked(cfg, problems, ("train", name), name, value)
        if isinstance(value, str) and isinstance(typed, int | float):  # learning_rate: 1e-3 is text in YAML 1.1
            cfg.train[name] = typed
    if cfg.repeats > 1 and "seed" not in cfg.train and "seed" not in cfg.search_space:  # TrainingArguments' seed
        _checked(cfg, problems, ("repeats",), "seed", TrainingArguments.__dataclass_fields__["seed"].default)
    try:  # the knobs together (e.g. head_learning_rate and head_lr_multiplier both set)
        knobs.split(training_arguments(cfg.train))
    except ValidationError as e:
        if not problems:  # a bad value alone is reported above
            problems.append(cfg.problem(("train",), e.errors()[0]["msg"].removeprefix("Value error, ")))
    for name, d in cfg.distributions.items():
        if name not in training_names():
            continue
        values = d.choices if isinstance(d, CategoricalDistribution) else (d.low, d.high)
        before = len(problems)
        for value in dict.fromkeys(values):
            if len(problems) == before:  # the first bad value says it
                _checked(cfg, problems, ("search_space", name), name, value, strict=True)
    for name, values in cfg.derived_values.items():  # what derive: gave at the corners of the space
        if name in training_names():
            before = len(problems)
            for value in values:
                if len(problems) == before:
                    _checked(cfg, problems, ("search_space", name, "derive"), name, value, strict=True)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))


def _checked(cfg: StudyConfig, problems: list, path: tuple, name: str, value: Any, strict: bool = False) -> Any:
    """``value`` of setting ``name``, typed as its field (or hpo's knob) has it; a bad one goes into ``problems`` and
    comes back as it was. ``strict``: no coercion (searched and derived values reach the trial as they are)."""
    ((field, value),) = training_arguments({name: value}).items()
    try:
        if field in knobs.NAMES:  # hpo's own knob
            return getattr(knobs.Knobs.model_validate({field: value}, strict=strict or None), field)
        if field == "lr_scheduler_type" and value in knobs.OWN_SCHEDULES:
            return value
        typed = _type_adapter(_hints()[field]).validate_python(value, strict=strict or None)
        bounds = TRAINING_RANGES.get(field)
        if bounds and isinstance(typed, int | float) and not isinstance(typed, bool) and not bounds[0](typed):
            problems.append(cfg.problem(path, f"{_brief(value)}: {field} must be {bounds[1]}"))
            return value
        if field == "seed" and isinstance(typed, int) and not isinstance(typed, bool):
            # every seed of repeats: the trial trains with each, and would fail on the first out of range
            seeds = repeat_seeds(typed, cfg.repeats)
            if (bad := next((s for s in (seeds[0], seeds[-1]) if not bounds[0](s)), None)) is not None:
                problems.append(
                    cfg.problem(
                        path,
                        f"{_brief(value)}: with repeats: {cfg.repeats} a trial also trains with seed {bad}; "
                        f"each seed must be {bounds[1]}",
                    )
                )
                return value
        args = TrainingArguments(output_dir=os.devnull, **{field: typed})
        if field == "optim":  # bitsandbytes, GaLore, LOMO optimizers import their package only here
            Trainer.get_optimizer_cls_and_kwargs(args)
        if field == "use_liger_kernel" and typed and importlib.util.find_spec("liger_kernel") is None:
            raise ImportError("liger-kernel", name="liger-kernel")
        return typed
    except ValidationError as e:
        hint = " (a derived value: use // for a whole number)" if strict and isinstance(value, float) else ""
        problems.append(cfg.problem(path, f"{_brief(value)}: {e.errors()[0]['msg']}{hint}"))
    except (ValueError, TypeError) as e:
        problems.append(cfg.problem(path, str(e).splitlines()[0][:300]))
    except (ImportError, importlib.metadata.PackageNotFoundError) as e:  # deepspeed: {...} without deepspeed
        wanted = re.search(r"'([^']+)' distribution was not found", str(e))
        package = wanted.group(1) if wanted else getattr(e, "name", None)
        problems.append(
            cfg.problem(
                path,
                f"needs a package that is not installed: {package}"
                if package
                else str(e).strip().splitlines()[0][:200],
            )
        )
    except Exception as e:  # noqa: BLE001 - whatever TrainingArguments raises would fail every trial
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        problems.append(cfg.problem(path, f"{type(e).__name__}: {reason}"))
    return value


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainingArguments)


@functools.cache
def _type_adapter(hint: Any) -> TypeAdapter:
    try:
        return TypeAdapter(hint, config=ConfigDict(allow_inf_nan=False))  # max_grad_norm: "nan" is no number
    except PydanticUserError:  # a type with a config of its own
        return TypeAdapter(hint)


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
