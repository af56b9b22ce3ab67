"""A trial plan: what one trial runs with, computed once from the study file and the trial's parameters.

The trial trains with it, the artifacts (``config.json``, ``training_arguments.json``), ``hpo best`` and
``hpo train --best`` export it: what is saved is what ran.

>>> plan = make_plan(cfg, {"learning_rate": 1e-4, "target_modules": "query, value"})  # doctest: +SKIP
>>> plan.lora["target_modules"], plan.training_arguments["learning_rate"]  # doctest: +SKIP
(['query', 'value'], 0.0001)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hpo import knobs
from hpo.config import LoraSettings, Quantization, StudyConfig
from hpo.config.compose import CREDENTIALS
from hpo.space import split_params, training_arguments

DEFAULT_BATCH = knobs.training_default("per_device_train_batch_size")


def repeat_seeds(seed: int, repeats: int) -> range:
    """The seeds a configuration trains with under ``repeats``: ``seed``, ``seed + 1``, ... Validation checks the
    first and the last against the seed's range, so that no trial fails on its last seed (torch and numpy take
    0..2**32-1)."""
    return range(seed, seed + repeats)


@dataclass(frozen=True)
class TrialPlan:
    training_arguments: dict[str, Any]  # TrainingArguments kwargs: ``train:`` with the trial's values over it
    knobs: knobs.Knobs  # hpo's own knobs (optimizer, step/plateau schedules, head rates)
    model_params: dict[str, Any]  # model config changes, e.g. {"dropout": 0.1}
    lora: dict[str, Any] | None  # LoraConfig kwargs (target_modules as a list of names), None for a full fine-tune
    devices: int | None = None  # the devices lr_scaling counted (None: no lr_scaling); a trial stores it
    quantization: dict[str, Any] | None = None  # Quantization fields (bits, type, ...), None: full-precision weights

    def exported(self, cfg: StudyConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """(TrainingArguments kwargs, the rest: task, model, model_params, lora, knobs, data), secrets masked.

        The first loads with ``TrainingArguments(**kwargs)``; credentials are left out (the hub reads the
        token from HF_TOKEN when pushing).
        """
        args = {k: v for k, v in self.training_arguments.items() if k not in CREDENTIALS}
        rest = {
            "task": cfg.task,
            "model": cfg.model.label,
            "model_params": self.model_params,
            "lora": self.lora,
            **({"quantization": self.quantization} if self.quantization else {}),
            "knobs": self.knobs.model_dump(exclude_defaults=True),
            "data": cfg.data.model_dump(mode="json", exclude_none=True),
        }
        return cfg.masked_data(args), cfg.masked_data(rest)


def make_plan(cfg: StudyConfig, params: Mapping[str, Any], devices: int | None = None) -> TrialPlan:
    """The plan of a trial with sampled and derived ``params``.

    ``devices``: what ``lr_scaling`` counts; by default, the trial's processes (``processes_per_trial``) when
    over 1, else the devices of this machine. An export passes the
    number the trial ran with (a trial on one GPU of four, exported on the four, scaled by one).

    Raises:
        pydantic.ValidationError: a bad value of one of hpo's knobs (validation checks the space's corners).
    """
    training, model_params, lora_params = split_params(params)
    quantization = None
    if cfg.quantized:
        quantization = (cfg.model.quantization or Quantization()).model_dump()
        if "bits" in model_params:
            quantization["bits"] = model_params.pop("bits")
    settings = training_arguments({**cfg.train, **training})
    if settings.get("lr_scaling") == "linear" and devices is None:
        per_trial = cfg.resources.ranks  # the ranks of one trial, each a device: the global batch
        devices = per_trial if per_trial > 1 else knobs.device_count()
    args, own = knobs.split(settings, devices or 1)
    lora = None
    if cfg.is_lora:
        lora = {**(cfg.model.lora or LoraSettings()).model_dump(), **lora_params}
        if lora["target_modules"] is not None and lora["target_modules"] != "all-linear":
            lora["target_modules"] = lora_target_list(lora["target_modules"])
    return TrialPlan(args, own, model_params, lora, devices if own.lr_scaling else None, quantization)


def lora_target_list(target_modules: Any) -> list[str]:
    """LoRA ``target_modules`` as module names: ``"q,v"`` → ``["q", "v"]``; ``all-linear`` and None name none."""
    if target_modules is None or target_modules == "all-linear":
        return []
    if isinstance(target_modules, str):
        return [m.strip() for m in target_modules.split(",") if m.strip()]
    return list(target_modules)
