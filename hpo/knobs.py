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
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import math
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
def _literal_training_defaults() -> dict[str, Any]:
    spec = importlib.util.find_spec("transformers")
    source = Path(next(iter(spec.submodule_search_locations))) / "training_args.py"
    found: dict[str, Any] = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            for s in node.body:
                if not (isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None):
                    continue
                value = s.value  # ``x: int = 8`` or ``x: int = field(default=8, metadata=...)``
                if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
                    value = next((k.value for k in value.keywords if k.arg == "default"), None)
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


def fastest_kernel(cls: type, params: list) -> dict[str, bool]:
    """``fused=True`` where torch has a fused kernel for ``cls`` on the parameters' device, else ``foreach=True``
    where it has that; ``{}`` otherwise.

    torch picks neither for CPU tensors by default: a fused AdamW step on 29M parameters took 0.067 s against
    0.407 s for the default one on a 2-core CPU (TrainingArguments' own default optim is already the fused one).
    """
    import inspect

    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    accepted = inspect.signature(cls).parameters
    devices = {p.device.type for p in params}
    floating = all(p.is_floating_point() for p in params)
    if "fused" in accepted and floating and devices <= set(_get_fused_kernels_supported_devices()):
        return {"fused": True}
    return {"foreach": True} if "foreach" in accepted and floating else {}


def make_trainer_class():
    """``Trainer`` with hpo's optimizer and schedules (built lazily: it imports transformers)."""
    import torch
    from transformers import Trainer
    from transformers.optimization import Adafactor

    optimizers = {
        "adamw": torch.optim.AdamW,
        "adam": torch.optim.Adam,
        "sgd": torch.optim.SGD,
        "rmsprop": torch.optim.RMSprop,
        "adafactor": Adafactor,
    }

    class KnobsTrainer(Trainer):
        """Param groups (decay × head/body), the optimizer by name, and the step and plateau schedules."""

        def __init__(self, *args, knobs: Knobs, heads: list[str], eval_subset: list[int] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.knobs, self.heads, self.eval_subset = knobs, heads, eval_subset

        def evaluate(self, eval_dataset=None, *args, **kwargs):
            # Before the last optimizer step (a pruning point), the study's fixed subsample of the eval rows.
            if eval_dataset is None and self.eval_subset is not None and self.state.global_step < self.state.max_steps:
                eval_dataset = [self.eval_dataset[i] for i in self.eval_subset]
            # Looking leaves the training as it was: each eval DataLoader draws its base seed from torch's global
            # generator, which then gives the training's dropout masks and the next epoch's shuffle. Without this,
            # one configuration ended at eval loss 1.383 evaluated 4 times and 1.365 evaluated once (MiniLM, same
            # seed): its value depended on how often the study looked at it.
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=cuda):
                return super().evaluate(eval_dataset, *args, **kwargs)

        def _save_checkpoint(self, model, trial):
            # A checkpoint that cannot be written (a full disk) is a warning, not a failed trial: hpo.trial.checkpoints
            from pathlib import Path

            from hpo.trial.checkpoints import CheckpointCallback

            save = super()._save_checkpoint
            saver = next((c for c in self.callback_handler.callbacks if isinstance(c, CheckpointCallback)), None)
            if saver is None:
                return save(model, trial)
            where = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            saver.write(lambda: save(model, trial), where, self.state.global_step)

        def _save(self, output_dir=None, state_dict=None):
            # The Trainer pickles self.args into every checkpoint (training_args.bin): a credential (hub_token)
            # would lie there in clear, in a folder an interrupted trial keeps. Saved without it.
            import copy

            from hpo.config.compose import CREDENTIALS

            args = self.args
            if not any(getattr(args, name, None) for name in CREDENTIALS):
                return super()._save(output_dir, state_dict)
            self.args = copy.copy(args)
            for name in CREDENTIALS:
                setattr(self.args, name, None)
            try:
                return super()._save(output_dir, state_dict)
            finally:
                self.args = args

        def create_optimizer(self, model=None):
            if self.optimizer is not None or not self.knobs.own_optimizer:
                return super().create_optimizer(model)
            model = model or self.model
            a, r = self.args, self.knobs
            head_lr = r.head_learning_rate or a.learning_rate * (r.head_lr_multiplier or 1.0)
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[bool, bool], list] = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    groups.setdefault((is_head(name, self.heads), name in decay), []).append(p)
            param_groups = [
                {
                    "params": ps,
                    "lr": head_lr if head else a.learning_rate,
                    "head": head,
                    "weight_decay": a.weight_decay if decays else 0.0,
                }
                for (head, decays), ps in sorted(groups.items())
            ]
            if r.optimizer is None:  # layer-wise rates with TrainingArguments' own optim
                cls, kwargs = self.get_optimizer_cls_and_kwargs(a, model)
            else:
                cls, kwargs = optimizers[r.optimizer], {"lr": a.learning_rate}
                if r.optimizer in ("sgd", "rmsprop"):
                    kwargs["momentum"] = r.momentum
                elif r.optimizer == "adafactor":
                    kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
                else:
                    kwargs.update(betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
            kwargs.pop("lr", None)  # each group has its own
            if r.optimizer is not None:
                kwargs.update(fastest_kernel(cls, [p for g in param_groups for p in g["params"]]))
            self.optimizer = cls(param_groups, **kwargs)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            r = self.knobs
            if self.lr_scheduler is not None or r.schedule is None:
                return super().create_scheduler(num_training_steps, optimizer)
            optimizer = optimizer or self.optimizer
            for group in optimizer.param_groups:  # LambdaLR sets it; ReduceLROnPlateau does not
                group.setdefault("initial_lr", group["lr"])
            if r.schedule == "reduce_lr_on_plateau":
                self.lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                    optimizer, mode="min", factor=r.lr_plateau_factor, patience=r.lr_plateau_patience
                )
            else:
                warmup = self.args.get_warmup_steps(num_training_steps)
                size = r.lr_step_size or 1 / 3
                size = max(1, math.ceil(size * num_training_steps) if size < 1 else int(size))

                def factor(step: int) -> float:
                    if step < warmup:
                        return step / warmup  # linear warmup, as transformers' schedules do
                    return r.lr_gamma ** ((step - warmup) // size)

                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            self._created_lr_scheduler = True
            return self.lr_scheduler

        # Evaluation under several processes: every rank evaluates every eval row, and nothing is gathered.
        # The Trainer's own way shards the rows and pads each rank's last batch by cycling through the data, then
        # averages per-batch means: with 6 eval rows and 2 ranks the eval loss was 0.3% off the true one (a
        # re-evaluation of the saved model), the same for every trial but not the number hpo reports. Exact is
        # worth the idle ranks: the evaluation is not split, but every rank runs the same forwards (FSDP needs it).
        def get_eval_dataloader(self, eval_dataset=None):
            loader = super().get_eval_dataloader(eval_dataset)
            shard = loader.batch_sampler  # accelerate's BatchSamplerShard: the whole set, no batch padded by cycling
            if self.args.world_size > 1 and hasattr(shard, "num_processes"):
                shard.num_processes, shard.process_index, shard.even_batches = 1, 0, False
            return loader

        def evaluation_loop(self, *args, **kwargs):
            if self.args.world_size > 1:
                self.gather_function = lambda tensors: tensors  # every rank has them all; the loop resets it
            return super().evaluation_loop(*args, **kwargs)

    return KnobsTrainer
