"""The typed study file: :class:`StudyConfig`, the root model, with a description on every field.

The JSON Schemas under ``schemas/`` are generated from these models (``hpo schema``), so each
description shows as help on hover in an editor. The sections it holds (``model:``, ``data:``, ...) are the
models of :mod:`hpo.config.sections`; the search-space entry, ``Param``, lives in
:mod:`hpo.space` beside the names it may search.
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
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from hpo import distributions, space
from hpo.config.compose import CREDENTIALS, control_character, hidden_character, mask, sqlite_quote
from hpo.config.finalists import Finalists
from hpo.config.sections import (
    DataConfig,
    EarlyStopping,
    EvalEvery,
    EvalGrid,
    ModelConfig,
    Objective,
    PrunerSpec,
    Resources,
    SamplerSpec,
    Strict,
)
from hpo.errors import ConfigError, KeyPath, Problem, SourceMap, did_you_mean, hidden
from hpo.expr import Expression
from hpo.space import Condition, Param, SearchName
from hpo.tasks import TASKS


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


class StudyConfig(Strict):
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
    finalists: Finalists | None = Field(
        None,
        description="{top: N, generate: {...}, metrics: [...]}: the trials that may end among the best N also "
        "generate on the eval (or test) prompts once, scored by the metrics; hpo best ranks them beside the "
        "objective. Causal LM on prompt/response or chat data. Default: off.",
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
        return distributions.compile_space(self.search_space)

    @cached_property
    def constraint_expressions(self) -> list[Expression]:
        return [Expression(c, condition=True) for c in self.constraints]

    @property
    def is_lora(self) -> bool:
        return self.model.lora is not None or bool(space.LORA_PARAMS & set(self.search_space))

    @property
    def base_varies(self) -> str | None:
        """The searched parameter that builds the base model more than one way (its dropout, bits, precision,
        gradient checkpointing; a model built from a config: its seed, the weights), if any: such trials cannot
        share a pack (``resources.pack``), which then trains one at a time."""
        varied = [k for k in (*space.MODEL_PARAMS, *space.MODEL_SETTINGS) if _varies(self.search_space.get(k))]
        if self.model.config is not None and _varies(self.search_space.get("seed")):
            varied.append("seed")
        return varied[0] if varied else None

    @property
    def quantized(self) -> bool:
        """Whether trials load 4- or 8-bit weights: ``model.quantization``, or ``bits`` searched."""
        return self.model.quantization is not None or "bits" in self.search_space

    def given(self, *keys: str) -> str:
        """`` key=value`` for each of ``keys`` that the command line set, to repeat in a command that reads the
        study (``hpo dashboard``, ``hpo best``); secrets masked, and the storage URL's password (``--storage``,
        ``$HPO_STORAGE``) hidden."""
        out = ""
        for key in keys:
            if self._source.locate((key,))[0] == "<command line>" and (value := getattr(self, key)) is not None:
                shown = self.storage_label if key == "storage" else self.masked(str(value))  # a URL's password too
                out += " " + shlex.quote(f"{key}={shown}")
        return out

    def problem(self, path: KeyPath, message: str) -> Problem:
        """A ``Problem`` pointing at ``path`` in the file it came from, secrets masked."""
        return self._source.problem(path, self.masked(message))

    def error(self, path: KeyPath, message: str) -> ConfigError:
        """A ``ConfigError`` pointing at ``path`` in the file it came from."""
        return ConfigError([self.problem(path, message)])


def _varies(param: Param | None) -> bool:
    """Whether a search-space entry can take more than one value (a categorical of one choice cannot)."""
    return param is not None and not (param.choices is not None and len(param.choices) == 1)
