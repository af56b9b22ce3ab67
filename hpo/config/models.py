"""The typed study file: pydantic models of every section, with a description on every field.

The JSON Schemas under ``schemas/`` are generated from these models (``hpo schema``), so each
description shows as help on hover in an editor. The search-space entry, ``Param``, lives in
:mod:`hpo.space` beside its compiler. Nine models and their field descriptions make this module over 400
lines; split, the description of one study file would be spread over several.
"""

from __future__ import annotations

import importlib.util
import shlex
import unicodedata
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from optuna.distributions import BaseDistribution
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from hpo import samplers, space
from hpo.config.compose import CREDENTIALS, control_character, hidden_character, mask, sqlite_quote
from hpo.errors import ConfigError, KeyPath, Problem, SourceMap, did_you_mean, hidden
from hpo.expr import Expression
from hpo.space import Condition, Param, SearchName, no_boolean_numbers
from hpo.tasks import COST_METRICS, HIGHER_IS_BETTER, TASKS

DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".conll")


def _training_arg(name: str) -> str:
    if name not in space.training_names():
        raise ValueError(f"not a TrainingArguments field: {name!r}{did_you_mean(name, space.training_names())}")
    if name in space.RESERVED_TRAINING_ARGS:
        raise ValueError(
            f"{name!r} is set by hpo for every trial ({_RESERVED_WHY.get(name, 'see eval_every and output_dir')})"
        )
    return name


_RESERVED_WHY = {
    "label_names": "the data gives every task its labels column",
    "auto_find_batch_size": "a trial that runs out of memory trains again at half the per-device batch and twice "
    "the accumulation, keeping the effective batch; the Trainer's own search would halve it",
}

TrainingArgName = Annotated[str, AfterValidator(_training_arg)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _no_boolean_numbers = field_validator("*", mode="before")(no_boolean_numbers)


def _study_name(name: str) -> str:
    # The name is a folder under outputs/: it must stay one folder there.
    if name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{name!r} names the study's output folder: no '/', '\\', control characters, '.' or '..'")
    if name != name.strip() or len(name.encode()) > 200:
        raise ValueError(f"{name[:60]!r}: at most 200 bytes, without leading or trailing spaces")
    return plain_name(name, "a study name")


def plain_name(name: str, what: str) -> str:
    """``name``, if it prints as what it is: one name cannot look exactly like another.

    Refuses :func:`hpo.errors.hidden` characters (controls, format characters such as a right-to-left override
    or a zero-width space, private use, spaces other than U+0020) and text not in NFC (``e`` + a combining accent
    looks like ``é``).

    Raises:
        ValueError: naming the first such character by its code point and Unicode name.
    """
    for c in name:
        if hidden(c):
            label = unicodedata.name(c, unicodedata.category(c))
            raise ValueError(f"{name[:60]!r}: {what} cannot hold U+{ord(c):04X} {label}: it prints like another name")
    if unicodedata.normalize("NFC", name) != name:
        raise ValueError(f"{name[:60]!r}: {what} must be in Unicode NFC form (an accent composed with its letter)")
    return name


def _environment_name(name: str) -> str:
    return plain_name(name, "an environment name")


class LoraSettings(_Strict):
    """Fixed LoRA settings (PEFT ``LoraConfig`` names); the search space may override any."""

    r: PositiveInt = Field(
        8, description="Rank of each adapter: its capacity, memory and time grow with it. 8 is PEFT's default."
    )
    lora_alpha: PositiveFloat = Field(
        16,
        description="Scale of the adapter's update (multiplied by lora_alpha / r); "
        "16 is twice the default r, a common start.",
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on each adapter's input, in [0, 1).")
    target_modules: list[str] | str | None = Field(
        None,
        description="The modules that get adapters, by name: a list (e.g. [query, value]), a comma-separated "
        "string, or all-linear; "
        "default: PEFT's choice for the architecture.",
    )


class Quantization(_Strict):
    """4- or 8-bit weights through bitsandbytes (QLoRA); the adapters train in ``compute_dtype``."""

    bits: Literal[4, 8] = Field(
        4,
        description="Bits per frozen weight: 4 (QLoRA) or 8; searchable as bits: {type: categorical, choices: [4, 8]}.",
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="The 4-bit data type: nf4 (QLoRA's normal float) or fp4.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too: ~0.4 bits per weight less.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="The dtype the layers compute in; bfloat16 needs an Ampere or newer GPU."
    )


class Resources(_Strict):
    """What a trial may use on this machine."""

    max_memory_gb: PositiveFloat | None = Field(
        None,
        description="The memory one trial may take (GB): on CUDA the allocator's cap, on CPU the trial's peak "
        "resident memory above the process's before it. A trial that runs out trains again at half the "
        "per-device batch and twice the accumulation. Default: the device's.",
    )
    processes_per_trial: PositiveInt = Field(
        1,
        description="Each trial runs as a torch.distributed job of this many processes on this machine (gloo on "
        "CPU, NCCL on GPU, one GPU each); the global batch is the per-device batch × accumulation × processes. "
        "hpo run --workers N needs N × this many GPUs (on CPU: cores).",
    )


class ModelConfig(_Strict):
    """A pretrained model (``name``), or a small random-init one built from ``config`` (demos, tests)."""

    name: str | None = Field(
        None,
        min_length=1,
        description="A local folder (relative to the study file) or a Hugging Face hub id, found in the cache first.",
    )
    config: dict[str, Any] | None = Field(
        None,
        description="Instead of name: AutoConfig.for_model arguments for a small random-init model, "
        "e.g. {architecture: gpt2, n_layer: 2}; needs a tokenizer.",
    )
    tokenizer: str | None = Field(
        None, min_length=1, description="A tokenizer folder or hub id; default: the model's own."
    )
    lora: LoraSettings | None = Field(
        None,
        description="Fine-tune LoRA adapters with these settings instead of "
        "every weight (LoRA names in the search space do so too).",
    )
    quantization: Quantization | None = Field(
        None,
        description="Load the frozen weights in 4 or 8 bits (bitsandbytes, CUDA) and train LoRA adapters over "
        "them (QLoRA): {bits: 4, type: nf4, double_quant: true, compute_dtype: bfloat16}.",
    )

    @model_validator(mode="after")
    def _name_or_config(self) -> ModelConfig:
        if (self.name is None) == (self.config is None):
            raise ValueError("give a model name (hub id or folder), or a config: {architecture: ...} with a tokenizer")
        if self.config is not None and not isinstance(self.config.get("architecture"), str):
            raise ValueError("config needs architecture: a transformers model type such as gpt2, bert or llama")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a model built from a config needs a tokenizer (folder or hub id)")
        return self

    @property
    def label(self) -> str:
        """How the model is named in reports and model cards."""
        return self.name or f"{self.config['architecture']} built from a config"


class DataConfig(_Strict):
    """The train and eval files, and the columns the task reads."""

    train: Path = Field(description="Training rows: .csv, .jsonl, .json or .conll, relative to the study file.")
    eval: Path = Field(
        description="Evaluation rows, which every metric and the objective are measured on; the same formats as train."
    )
    test: Path | None = Field(
        None,
        description="Held-out rows never used to choose: the top trials (by eval) are evaluated on them once, "
        "when they finish, and hpo report and hpo best show it beside eval. The same formats as train.",
    )
    text_column: str = Field(
        "text", description="The input text (sequence-classification; causal-lm without prompt_column)."
    )
    label_column: str = Field("label", description="The class label (sequence-classification).")
    tokens_column: str = Field(
        "tokens",
        description="The list of tokens (token-classification, JSON Lines; .conll files have token and tag columns).",
    )
    tags_column: str = Field("tags", description="One tag per token, IOB2: B-PER, I-PER, O (token-classification).")
    prompt_column: str | None = Field(
        None,
        description="causal-lm: the prompt; with response_column, the loss "
        "is on the response only. Default: on the whole text.",
    )
    response_column: str | None = Field(
        None, description="causal-lm: the response to learn, after prompt_column; the two go together."
    )
    max_length: int = Field(
        128, gt=0, le=2**20, description="Tokens per row; longer rows are truncated. At most the model's positions."
    )
    max_train_rows: PositiveInt | None = Field(
        None,
        description="Train on a random slice of this many rows "
        "(seed 0), for quick runs, e.g. in a dev "
        "environment; default: every row.",
    )
    max_eval_rows: PositiveInt | None = Field(
        None, description="Evaluate on a random slice of this many rows (seed 0); default: every row."
    )

    @field_validator("train", "eval", "test")
    @classmethod
    def _exists(cls, p: Path | None, info: ValidationInfo) -> Path | None:
        if p is None:
            return None
        p = (info.context or {}).get("root", Path.cwd()) / p
        if p.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"{p.name}: data files are {', '.join(DATA_SUFFIXES)}")
        if not p.is_file():
            raise ValueError(f"file not found: {p}")
        return p


class EvalEvery(_Strict):
    """Distance between evaluations (= pruning points): a fraction of an epoch, or examples."""

    epochs: PositiveFloat | None = Field(
        None, description="Epochs between evaluations: 0.25 evaluates four times per epoch."
    )
    examples: PositiveInt | None = Field(None, description="Training examples seen between evaluations.")

    @model_validator(mode="before")
    @classmethod
    def _number_is_epochs(cls, v: Any) -> Any:
        return {"epochs": v} if isinstance(v, int | float) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _one_of(self) -> EvalEvery:
        if (self.epochs is None) == (self.examples is None):
            raise ValueError("give a number of epochs (e.g. 0.25) or {examples: N}")
        return self

    def examples_between(self, n_train: int) -> float:
        """Examples seen between two evaluations."""
        return self.examples if self.examples is not None else self.epochs * n_train


class EvalGrid(EvalEvery):
    """``eval_every``: the distance between evaluations, and how many eval rows the ones before the last use."""

    subsample: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of the eval rows (a fixed sample, stratified by label) that the evaluations before the "
        "last one use: a pruning point needs a ranking, not a precise number. The last evaluation, whose value "
        "is the trial's, always uses every row. 1: every row at every point. Not used with objective.at: best, "
        "early_stopping or objectives, whose earlier evaluations can be the value.",
    )
    subsample_min_rows: PositiveInt = Field(
        100, description="The subsample has at least this many rows (every row, when the eval set has fewer)."
    )


class Objective(_Strict):
    """The metric that ranks trials, and which way is better."""

    metric: str = Field(
        "eval_loss",
        description="A metric the task reports (eval_loss, eval_accuracy, "
        "eval_f1, ...); eval_loss, because every task reports it.",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None,
        description="Default: the metric's own (minimize eval_loss and eval_perplexity, maximize accuracy, "
        "F1, precision and recall).",
    )
    at: Literal["last", "best"] = Field(
        "last",
        description="The trial's value: the metric at its last evaluation (the model it ends with), or at its "
        "best one, whose model is kept (in memory) and saved as the trial's.",
    )

    @model_validator(mode="after")
    def _infer_direction(self) -> Objective:
        known = self.metric in HIGHER_IS_BETTER or self.metric in COST_METRICS
        higher = HIGHER_IS_BETTER.get(self.metric, not self.metric.endswith("loss"))
        own = "maximize" if higher and self.metric not in COST_METRICS else "minimize"
        if self.direction is None:
            self.direction = own
        elif known and self.direction != own:  # "best" would be the worst model
            better = "higher" if own == "maximize" else "lower"
            raise ValueError(f"direction: {better} is better for {self.metric}: {own} it, or leave direction out")
        return self


class EarlyStopping(_Strict):
    """End a trial that stopped improving: COMPLETE with ``stopped_early``, at its best evaluation's value."""

    patience: PositiveInt = Field(description="Evaluations in a row without improvement before the trial stops.")
    min_delta: float = Field(
        0.0, ge=0, description="What counts as an improvement: better than the best so far by more than this."
    )


class SamplerSpec(BaseModel):
    """``name`` plus the sampler's own keyword arguments."""

    model_config = ConfigDict(extra="allow")
    name: Literal[tuple(samplers.SAMPLERS)] = Field(  # type: ignore[valid-type]
        "tpe",
        description="The Optuna sampler that picks each trial's parameters; the other keys are its "
        "arguments (e.g. seed). tpe: learns from finished trials, good from ~10 trials on.",
    )

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrunerSpec(SamplerSpec):
    """``name`` plus the pruner's own keyword arguments, and hpo's ``min_optimizer_steps``."""

    name: Literal[tuple(samplers.PRUNERS)] = Field(  # type: ignore[valid-type]
        "median",
        description="The Optuna pruner that stops unpromising trials at an evaluation; the other keys "
        "are its arguments. median: stops a trial worse than the median of earlier ones "
        "at the same step, once 3 trials finished (hpo's default n_startup_trials for median and percentile; "
        "Optuna's is 5); none: never stops one.",
    )
    min_optimizer_steps: NonNegativeInt = Field(
        3,
        description="No trial is pruned before it has made this many optimizer steps (hpo's, not the pruner's "
        "argument). Evaluations compare trials at equal examples seen, where a trial with gradient "
        "accumulation 4 has made a quarter of the steps of one with 1: this keeps the pruner from judging it "
        "on its first few.",
    )


class StudyConfig(_Strict):
    """A validated study file. Build it with :func:`load_study`."""

    study: Annotated[str, AfterValidator(_study_name)] = Field(
        min_length=1, description="The study's name: its key in the storage and its folder under outputs/."
    )
    task: Literal[tuple(TASKS)] = Field(  # type: ignore[valid-type]
        "sequence-classification", description=f"What the model learns: {', '.join(TASKS)}."
    )
    model: ModelConfig = Field(
        description="The model to fine-tune: a hub id or folder, or a mapping (name or config, tokenizer, lora)."
    )
    data: DataConfig = Field(
        description="The data: train and eval files, their columns, max_length and row limits for quick runs."
    )
    train: dict[TrainingArgName, Any] = Field(
        {},
        description="Fixed settings of every trial: TrainingArguments names (num_train_epochs, "
        "learning_rate, ...) and hpo's own knobs (optimizer, lr_scaling, ...).",
    )
    eval_every: EvalGrid = Field(
        EvalGrid(epochs=0.25),
        description="Evaluate, and let the pruner stop the "
        "trial, every this many epochs (0.25: four "
        "times per epoch), or {examples: N}; subsample: the share of eval rows used before the last evaluation.",
    )
    search_space: dict[SearchName, Param] = Field(
        min_length=1,
        description="The parameters to tune, by TrainingArguments, LoRA or hpo knob name, in order: "
        "when: and derive: read the parameters above them.",
    )
    checkpoint_every: EvalEvery | None = Field(
        None,
        description="Save a Trainer checkpoint every this many epochs, or {examples: N}, and on SIGTERM: the "
        "retry of a trial whose worker died or was stopped resumes from it. Removed when the trial ends. "
        "Default: off.",
    )
    objective: Objective = Field(Objective(), description="The metric to optimize; default: eval_loss, minimized.")
    objectives: list[Objective] | None = Field(
        None,
        min_length=2,
        description="Instead of objective: several, e.g. [{metric: eval_loss}, {metric: eval_latency_ms}]; the "
        "study keeps a Pareto front. Task metrics and cost figures (train_seconds, peak_memory_mb, "
        "trainable_parameters, eval_latency_ms; minimized). The first must be a task metric. Optuna cannot "
        "prune such a study: the pruner defaults to none.",
    )
    repeats: PositiveInt = Field(
        1,
        description="Train each configuration with this many seeds (train.seed, +1, +2, ...): its value is the "
        "mean, its spread value_std. The first seed's run reports the curve the pruner sees, and its model is "
        "the one saved.",
    )
    early_stopping: EarlyStopping | None = Field(
        None,
        description="{patience: N, min_delta: d}: a trial whose objective did not improve by more than d in N "
        "evaluations ends, COMPLETE with stopped_early; needs objective.at: best. Default: off.",
    )
    resources: Resources = Field(Resources(), description="What a trial may use: max_memory_gb.")
    sampler: SamplerSpec = Field(SamplerSpec(), description="How each trial's parameters are chosen; default: tpe.")
    pruner: PrunerSpec = Field(PrunerSpec(), description="Which trials stop early; default: median.")
    constraints: list[Condition] = Field(
        [],
        description="Conditions every trial's parameters must meet, e.g. \"per_device_train_batch_size * "
        'gradient_accumulation_steps <= 128"; a sample that breaks one is rejected, not trained.',
    )
    enqueue: list[dict[str, Any]] = Field(
        [],
        description="Known configurations to try first (warm start), each {parameter: value}; the sampler "
        "picks any parameter left out.",
    )
    n_trials: PositiveInt = Field(
        10,
        description="Finished (complete + pruned) trials the study should hold; "
        "running the study again resumes up to it.",
    )
    timeout: PositiveFloat | None = Field(
        None, description="Seconds for this run: no trial starts after it (a running one finishes). Default: no limit."
    )
    heartbeat_interval: int = Field(
        10, gt=0, le=3600, description="Seconds between a running trial's heartbeats in the storage."
    )
    grace_period: int | None = Field(
        None,
        gt=0,
        le=86400,
        description="Seconds without a heartbeat before a "
        "running trial is stale, its worker taken "
        "for dead (default: 2 x heartbeat_interval).",
    )
    max_retry: int = Field(2, ge=0, description="Re-runs, with the same parameters, of a trial whose worker died.")
    max_failures_in_a_row: PositiveInt = Field(
        3,
        description="A worker stops after this many failed trials in "
        "a row: a setting that fails every trial stops "
        "early.",
    )
    storage: str | None = Field(
        None,
        description="A database URL (sqlite:///study.db, postgresql://user@host/db); "
        "default: a SQLite file beside the study file, named after it.",
    )
    output_dir: Path | None = Field(
        None,
        description="Where trials, the best model and TensorBoard logs go, "
        "relative to the study file; default: outputs/<study>.",
    )
    extends: str | None = Field(None, description="A base study file this one deep-merges over (this file's keys win).")
    environments: dict[Annotated[str, AfterValidator(_environment_name)], dict[str, Any]] = Field(
        {}, description="Overlays chosen with --env NAME, e.g. {dev: {n_trials: 3}}; each deep-merges over the file."
    )

    _file: Path = PrivateAttr(default=Path("study.yaml"))
    _root: Path = PrivateAttr(default_factory=Path.cwd)  # the study file's folder, absolute when loaded
    _source: SourceMap = PrivateAttr(default_factory=SourceMap)
    _environment: str | None = PrivateAttr(default=None)
    _secrets: frozenset[str] = PrivateAttr(default=frozenset())
    _derived_values: dict[str, list[Any]] = PrivateAttr(default_factory=dict)  # seen at validation's test points

    @field_validator("model", mode="before")
    @classmethod
    def _name_only(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _several_objectives(self) -> StudyConfig:
        """With ``objectives``, ``objective`` is the first of them (its curve is the one reported and the model
        kept in best_model/ is the best on it) and the pruner defaults to none (Optuna cannot prune them)."""
        if self.objectives:
            given = set(self.model_fields_set)  # what the file wrote: assigning below would add to it
            if "objective" not in given:
                self.objective = self.objectives[0]
            if "pruner" not in given:
                self.pruner = PrunerSpec(name="none")
            self.__pydantic_fields_set__ = given
        return self

    @property
    def directions(self) -> list[str]:
        """The direction of each objective: one, or one per ``objectives`` entry."""
        return [o.direction for o in self.objectives or [self.objective]]

    @field_validator("output_dir")
    @classmethod
    def _relative_to_file(cls, p: Path | None, info: ValidationInfo) -> Path | None:
        if p is not None and (bad := control_character(str(p))):
            raise ValueError(f"{bad} in a folder name: the run could not create it, or print it as one line")
        if p is not None and (bad := hidden_character(str(p))):  # as a study name (outputs/<study>) is refused
            raise ValueError(f"{bad} in a folder name: it prints like another folder's name")
        return None if p is None else (info.context or {}).get("root", Path.cwd()) / p

    @property
    def file(self) -> Path:
        return self._file

    def masked(self, text: str) -> str:
        """``text`` with every value of a secret-looking ``${VAR}`` (PASSWORD, SECRET, TOKEN, KEY) as ``***``.

        Also the secret as JSON and ``repr`` spell it inside text that quotes it (``\\"``, ``\\u00e9``).
        """
        return mask(text, self._secrets)

    def masked_data(self, data: Any) -> Any:
        """:meth:`masked` over every string (keys too) in a JSON-like ``data``; a credential (``hub_token``) is
        ``***`` whether it came from a ``${VAR}`` or was written in clear."""
        if isinstance(data, dict):
            return {
                self.masked(str(k)): "***" if k in CREDENTIALS and data[k] else self.masked_data(v)
                for k, v in data.items()
            }
        if isinstance(data, list | tuple):
            return [self.masked_data(v) for v in data]
        if isinstance(data, str):
            return self.masked(data)
        if data is None or isinstance(data, bool | int | float):
            return data
        return self.masked(str(data))

    @property
    def derived_values(self) -> dict[str, list[Any]]:
        """Values each derived parameter took at validation's test points (corners and random points)."""
        return self._derived_values

    @property
    def environment(self) -> str | None:
        """The ``--env`` overlay this config was loaded with."""
        return self._environment

    @property
    def root(self) -> Path:
        """The folder relative paths resolve against: the study file's, or for a dict the current one at load."""
        return self._root

    @property
    def from_dict(self) -> bool:
        """Whether this study was given as a dict (``hpo.run({...})``), not as a file."""
        return self._file.name == "<dict>"

    @property
    def storage_url(self) -> str:
        """The storage as a SQLAlchemy URL: ``storage:``, else a SQLite file beside the study file (for a dict,
        ``<study>.db`` in the current folder).

        A plain ``postgresql://`` URL names SQLAlchemy's psycopg2 driver; when only psycopg 3 is
        installed (``pip install hpo[postgres]``), it is used instead of failing on the import.
        """
        if self.storage is None:
            stem = self.study if self.from_dict else self._file.stem
            return f"sqlite:///{sqlite_quote(str((self.root / (stem + '.db')).resolve()))}"
        url = make_url(self.storage)
        if (
            url.drivername == "postgresql"
            and not importlib.util.find_spec("psycopg2")
            and importlib.util.find_spec("psycopg")
        ):
            return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return self.storage

    @property
    def storage_label(self) -> str:
        """The storage URL as printed and saved: password and secrets masked."""
        try:
            url = make_url(self.storage_url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - not a URL: validation reports it
            url = self.storage_url
        return self.masked(url)

    @property
    def output_path(self) -> Path:
        return self.output_dir or self.root / "outputs" / self.study

    @cached_property
    def distributions(self) -> dict[str, BaseDistribution]:
        """The sampled parameters as Optuna distributions, compiled once (derived ones are computed)."""
        return space.compile_space(self.search_space)

    @cached_property
    def constraint_expressions(self) -> list[Expression]:
        return [Expression(c, condition=True) for c in self.constraints]

    @property
    def is_lora(self) -> bool:
        return self.model.lora is not None or bool(space.LORA_PARAMS & set(self.search_space))

    @property
    def quantized(self) -> bool:
        """Whether trials load 4- or 8-bit weights: ``model.quantization``, or ``bits`` searched."""
        return self.model.quantization is not None or "bits" in self.search_space

    def given(self, *keys: str) -> str:
        """`` key=value`` for each of ``keys`` that the command line set, to repeat in a command that reads the
        study (``hpo dashboard``, ``hpo best``); secrets masked."""
        out = ""
        for key in keys:
            if self._source.locate((key,))[0] == "<command line>" and (value := getattr(self, key)) is not None:
                out += " " + shlex.quote(f"{key}={self.masked(str(value))}")
        return out

    def problem(self, path: KeyPath, message: str) -> Problem:
        """A ``Problem`` pointing at ``path`` in the file it came from, secrets masked."""
        return self._source.problem(path, self.masked(message))

    def error(self, path: KeyPath, message: str) -> ConfigError:
        """A ``ConfigError`` pointing at ``path`` in the file it came from."""
        return ConfigError([self.problem(path, message)])
