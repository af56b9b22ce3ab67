"""Tuning knobs that TrainingArguments lacks, set in ``train:`` or searched like its fields.

- ``optimizer``: adamw (default), adam, sgd, rmsprop, adafactor; ``momentum`` for sgd and rmsprop.
- ``lr_scheduler_type: step`` (``lr_step_size``, ``lr_gamma``), and ``reduce_lr_on_plateau``
  (``lr_plateau_factor``, ``lr_plateau_patience``) stepped by the eval loss at every evaluation.
  transformers has no step schedule, and its plateau schedule demands an eval strategy, which hpo
  replaces with its own evaluation grid; so hpo builds both. Warmup works with ``step``.
- Layer-wise rates: ``head_learning_rate`` or ``head_lr_multiplier`` for the newly initialised
  head (the weights the checkpoint did not have) against the pretrained body.
- ``lr_scaling: linear``: learning_rate × effective batch / ``lr_base_batch_size``.
- ``head_init``: how new heads start (``normal`` with ``head_init_std``, or ``xavier``).
- ``packing`` (causal LM): each training batch's rows concatenated into one, without padding, each row attending
  to itself only (:func:`hpo.trial.model.train_collator`); evaluations stay padded, so values compare.

Declared here for the config layer (importing this module imports neither torch nor transformers);
:class:`hpo.trial.trainer.KnobsTrainer` applies them in a trial.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

#: Schedules hpo builds itself; TrainingArguments gets ``constant`` in their place.
OWN_SCHEDULES = ("step", "reduce_lr_on_plateau")


class Knobs(BaseModel):
    """hpo's own knobs of one trial (those TrainingArguments lacks), validated."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["adamw", "adam", "sgd", "rmsprop", "adafactor"] | None = None  # None: TrainingArguments' optim
    momentum: float = Field(0.0, ge=0, lt=1)
    schedule: Literal[OWN_SCHEDULES] | None = None  # type: ignore[valid-type]  # from lr_scheduler_type
    lr_step_size: PositiveFloat | None = (
        None  # optimizer steps between decays; below 1, a fraction of the run (default 1/3)
    )
    lr_gamma: float = Field(0.1, gt=0, le=1)
    lr_plateau_factor: float = Field(0.5, gt=0, lt=1)
    lr_plateau_patience: int = Field(0, ge=0)  # evaluations without improvement before the rate drops
    head_learning_rate: PositiveFloat | None = None
    head_lr_multiplier: PositiveFloat | None = None
    lr_scaling: Literal["linear"] | None = None
    lr_base_batch_size: PositiveInt = 32
    head_init: Literal["normal", "xavier"] = "normal"
    head_init_std: PositiveFloat | None = None  # default: the model config's initializer_range
    packing: bool = False  # causal LM: training batches flattened into one row (position ids restart at each)

    @model_validator(mode="after")
    def _one_head_rate(self) -> Knobs:
        if self.head_learning_rate is not None and self.head_lr_multiplier is not None:
            raise ValueError("set head_learning_rate or head_lr_multiplier, not both")
        return self

    @property
    def own_optimizer(self) -> bool:
        return self.optimizer is not None or self.head_learning_rate is not None or self.head_lr_multiplier is not None


NAMES = frozenset(Knobs.model_fields) - {"schedule"}


def training_default(name: str) -> Any:
    """``TrainingArguments``' own default for its field ``name``, read from transformers, never copied.

    >>> training_default("learning_rate"), training_default("seed")
    (5e-05, 42)

    From the installed source where the default is a literal (importing transformers, and torch, takes seconds: see
    :func:`hpo.space.training_argument_names`), else from the dataclass.

    Raises:
        KeyError: no such field, or one without a default.
    """
    if name in (literal := _literal_training_defaults()):
        return literal[name]
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    if fields.get(name, dataclasses.MISSING) is dataclasses.MISSING:
        raise KeyError(name)
    return fields[name]


def training_value(args: Mapping[str, Any], name: str) -> Any:
    """``args[name]``, else what TrainingArguments makes of its absence (:func:`training_default`)."""
    return args[name] if name in args else training_default(name)


@functools.cache
def training_fields_source() -> list[ast.AnnAssign]:
    """The annotated fields of ``TrainingArguments`` as the installed transformers writes them (empty where its
    source moved): parsed once, for its field names (:func:`hpo.space.training_argument_names`) and the
    defaults written as literals, because importing transformers (and torch) takes seconds."""
    spec = importlib.util.find_spec("transformers")
    source = Path(next(iter(spec.submodule_search_locations))) / "training_args.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            return [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    return []


@functools.cache
def _literal_training_defaults() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for s in training_fields_source():
        value = s.value  # ``x: int = 8`` or ``x: int = field(default=8, metadata=...)``
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
            value = next((k.value for k in value.keywords if k.arg == "default"), None)
        if value is not None:
            with contextlib.suppress(ValueError, TypeError, SyntaxError):
                found[s.target.id] = ast.literal_eval(value)
    return found


def split(kwargs: Mapping[str, Any], devices: int = 1) -> tuple[dict[str, Any], Knobs]:
    """(TrainingArguments kwargs, Knobs) from one trial's training settings; ``lr_scaling`` counts ``devices``.

    >>> args, knobs = split({"learning_rate": 1e-3, "optimizer": "sgd", "lr_scheduler_type": "step"})
    >>> args, knobs.optimizer, knobs.schedule
    ({'learning_rate': 0.001, 'lr_scheduler_type': 'constant'}, 'sgd', 'step')

    Raises:
        pydantic.ValidationError: a bad value of one of hpo's knobs.
    """
    args = {k: v for k, v in kwargs.items() if k not in NAMES}
    own = {k: v for k, v in kwargs.items() if k in NAMES}
    if args.get("lr_scheduler_type") in OWN_SCHEDULES:
        own["schedule"] = args["lr_scheduler_type"]
        args["lr_scheduler_type"] = "constant"
        if own["schedule"] == "reduce_lr_on_plateau":
            args["metric_for_best_model"] = "loss"  # Trainer steps a plateau schedule with this metric
    knobs = Knobs(**own)
    if knobs.lr_scaling == "linear":
        batch = training_value(args, "per_device_train_batch_size")
        batch *= training_value(args, "gradient_accumulation_steps")
        args["learning_rate"] = training_value(args, "learning_rate") * batch * devices / knobs.lr_base_batch_size
    return args, knobs


def device_count() -> int:
    """The devices a trial trains on, as ``lr_scaling`` counts them: the visible CUDA devices, or 1."""
    import torch

    return max(1, torch.cuda.device_count())


def head_modules(missing_keys: Iterable[str]) -> list[str]:
    """The modules the checkpoint lacked weights for: ``["classifier"]`` from ``classifier.weight``."""
    return sorted({k.rsplit(".", 1)[0] for k in missing_keys if "." in k})


def is_head(name: str, heads: Iterable[str]) -> bool:
    """Whether parameter ``name`` (possibly wrapped by PEFT) belongs to one of the ``heads``."""
    dotted = f".{name}"
    return any(f".{h}." in dotted for h in heads)


def init_heads(model, heads: Iterable[str], knobs: Knobs) -> None:
    """Initialise the new heads' linear layers explicitly: weights normal or xavier, biases zero."""
    import torch

    std = knobs.head_init_std or getattr(model.config, "initializer_range", 0.02)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and is_head(f"{name}.weight", heads):
            if knobs.head_init == "xavier":
                torch.nn.init.xavier_uniform_(module.weight)
            else:
                torch.nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
