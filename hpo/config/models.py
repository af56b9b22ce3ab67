"""Study file (YAML) → typed, validated ``StudyConfig``.

Everything a study file can get wrong is found here, before any compute, and
reported all at once as ``FILE:LINE: key.path: message`` lines (``ConfigError``).
Nothing below this module reads raw dicts.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import math
import os
import re
import stat
import typing
import urllib.parse
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from dotenv import dotenv_values
from sqlalchemy.engine import make_url
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hpo import samplers, space
from hpo.errors import ConfigError, KeyPath, Problem, SourceMap, format_path
from hpo.expr import Expression
from hpo.tasks import TASKS

DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".conll")


def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _searchable(name: str) -> str:
    if name not in space.searchable_names():
        if name in space.RESERVED_TRAINING_ARGS:
            raise ValueError(f"{name!r} is set by hpo and cannot be searched")
        raise ValueError(f"unknown parameter {name!r}{_closest(name, space.searchable_names())}")
    return name


def _training_arg(name: str) -> str:
    if name not in space.training_names():
        raise ValueError(f"not a TrainingArguments field: {name!r}{_closest(name, space.training_names())}")
    if name in space.RESERVED_TRAINING_ARGS:
        raise ValueError(f"{name!r} is set by hpo for every trial ({_RESERVED_WHY.get(name, 'see eval_every and output_dir')})")
    return name


_RESERVED_WHY = {"label_names": "the data gives every task its labels column"}

SearchName = Annotated[str, AfterValidator(_searchable)]
TrainingArgName = Annotated[str, AfterValidator(_training_arg)]
Choice = bool | int | float | str | None


def _condition(source: str) -> str:
    Expression(source, condition=True)  # raises ValueError naming what is not allowed
    return source


Condition = Annotated[str, AfterValidator(_condition)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _study_name(name: str) -> str:
    # The name is a folder under outputs/: it must stay one folder there.
    if name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{name!r} names the study's output folder: no '/', '\\', control characters, '.' or '..'")
    if name != name.strip() or len(name.encode()) > 200:
        raise ValueError(f"{name[:60]!r}: at most 200 bytes, without leading or trailing spaces")
    return name


class Param(_Strict):
    """One search-space entry: an Optuna distribution, or a value derived from other parameters.

    ``when`` makes it conditional: it is sampled only when every named parameter
    has the given value (or one of a list of values).
    """

    type: Literal["float", "int", "categorical"] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: PositiveFloat | None = None
    choices: list[Choice] | None = None
    derive: str | None = Field(None, description='arithmetic over other parameters, e.g. "2 * r"')
    when: dict[str, Choice | list[Choice]] | None = Field(None, description="e.g. {optim: sgd}")

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
            kinds = {"number" if isinstance(c, int | float) and not isinstance(c, bool) else type(c).__name__
                     for c in self.choices}
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
        space.to_distribution(self)  # Optuna's own checks, e.g. step not dividing the range
        return self


class LoraSettings(_Strict):
    """Fixed LoRA settings (PEFT ``LoraConfig`` names); the search space may override any."""

    r: PositiveInt = 8
    lora_alpha: PositiveFloat = 16
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = None  # None: PEFT's default for the architecture


class ModelConfig(_Strict):
    """A pretrained model (``name``), or a small random-init one built from ``config`` (demos, tests)."""

    name: str | None = Field(None, min_length=1)  # hub id or local folder
    config: dict[str, Any] | None = None  # {architecture: gpt2, n_layer: 2, ...}: AutoConfig.for_model arguments
    tokenizer: str | None = Field(None, min_length=1)  # a tokenizer folder or hub id; default: the model's
    lora: LoraSettings | None = None

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
    train: Path
    eval: Path
    text_column: str = "text"  # sequence-classification and causal-lm
    label_column: str = "label"  # sequence-classification
    tokens_column: str = "tokens"  # token-classification (JSON Lines; .conll files have token and tag columns)
    tags_column: str = "tags"  # token-classification: one tag per token, IOB2 (B-PER, I-PER, O)
    prompt_column: str | None = None  # causal-lm: with response_column, the loss is on the response only
    response_column: str | None = None
    max_length: int = Field(128, gt=0, le=2**20)  # tokens; longer texts are truncated
    max_train_rows: PositiveInt | None = None  # a random slice (seed 0) for quick runs, e.g. in a dev environment
    max_eval_rows: PositiveInt | None = None

    @field_validator("train", "eval")
    @classmethod
    def _exists(cls, p: Path, info: ValidationInfo) -> Path:
        p = (info.context or {}).get("root", Path.cwd()) / p
        if p.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"{p.name}: data files are {', '.join(DATA_SUFFIXES)}")
        if not p.is_file():
            raise ValueError(f"file not found: {p}")
        return p


class EvalEvery(_Strict):
    """Distance between evaluations (= pruning points): a fraction of an epoch, or examples."""

    epochs: PositiveFloat | None = None
    examples: PositiveInt | None = None

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


class Objective(_Strict):
    metric: str = "eval_loss"
    direction: Literal["minimize", "maximize"] | None = None  # default: minimize losses, maximize the rest

    @model_validator(mode="after")
    def _infer_direction(self) -> Objective:
        if self.direction is None:
            self.direction = "minimize" if self.metric.endswith("loss") else "maximize"
        return self


class SamplerSpec(BaseModel):
    """``name`` plus the sampler's own keyword arguments."""

    model_config = ConfigDict(extra="allow")
    name: Literal[tuple(samplers.SAMPLERS)] = "tpe"  # type: ignore[valid-type]

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrunerSpec(SamplerSpec):
    name: Literal[tuple(samplers.PRUNERS)] = "median"  # type: ignore[valid-type]


class StudyConfig(_Strict):
    """A validated study file. Build it with :func:`load_study`."""

    study: Annotated[str, AfterValidator(_study_name)] = Field(min_length=1)
    task: Literal[tuple(TASKS)] = "sequence-classification"  # type: ignore[valid-type]
    model: ModelConfig
    data: DataConfig
    train: dict[TrainingArgName, Any] = {}
    eval_every: EvalEvery = EvalEvery(epochs=0.25)
    search_space: dict[SearchName, Param] = Field(min_length=1)
    objective: Objective = Objective()
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    constraints: list[Condition] = []  # conditions every trial's parameters must meet, e.g. "a * b <= 128"
    enqueue: list[dict[str, Any]] = []  # known configurations to try first (warm start)
    n_trials: PositiveInt = 10  # finished (complete + pruned) trials the study should hold
    timeout: PositiveFloat | None = None  # seconds for this run
    heartbeat_interval: int = Field(10, gt=0, le=3600)  # seconds between a running trial's heartbeats
    grace_period: int | None = Field(None, gt=0, le=86400)  # seconds without a heartbeat before a trial is stale (default 2x interval)
    max_retry: int = Field(2, ge=0)  # re-runs of a trial whose worker died (same params)
    max_failures_in_a_row: PositiveInt = 3  # a worker stops after this many failed trials in a row
    storage: str | None = None  # default: sqlite beside the study file
    output_dir: Path | None = None  # default: <study folder>/outputs/<study>
    extends: str | None = Field(None, description="a base study file this one deep-merges over")
    environments: dict[str, dict[str, Any]] = Field({}, description="overlays chosen with --env NAME")

    _file: Path = PrivateAttr(default=Path("study.yaml"))
    _source: SourceMap = PrivateAttr(default_factory=SourceMap)
    _environment: str | None = PrivateAttr(default=None)
    _secrets: frozenset[str] = PrivateAttr(default=frozenset())
    _derived_values: dict[str, list[Any]] = PrivateAttr(default_factory=dict)  # seen at validation's test points

    @field_validator("model", mode="before")
    @classmethod
    def _name_only(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("output_dir")
    @classmethod
    def _relative_to_file(cls, p: Path | None, info: ValidationInfo) -> Path | None:
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
        """:meth:`masked` over every string (keys too) in a JSON-like ``data``."""
        if isinstance(data, dict):
            return {self.masked(str(k)): self.masked_data(v) for k, v in data.items()}
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
        return self._file.parent

    @property
    def storage_url(self) -> str:
        """The storage as a SQLAlchemy URL: ``storage:``, else a SQLite file beside the study file.

        A plain ``postgresql://`` URL names SQLAlchemy's psycopg2 driver; when only psycopg 3 is
        installed (``pip install hpo[postgres]``), it is used instead of failing on the import.
        """
        if self.storage is None:
            return f"sqlite:///{(self.root / (self._file.stem + '.db')).resolve()}"
        url = make_url(self.storage)
        if url.drivername == "postgresql" and not importlib.util.find_spec("psycopg2") \
                and importlib.util.find_spec("psycopg"):
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

    def problem(self, path: KeyPath, message: str) -> Problem:
        """A ``Problem`` pointing at ``path`` in the file it came from, secrets masked."""
        return self._source.problem(path, self.masked(message))

    def error(self, path: KeyPath, message: str) -> ConfigError:
        """A ``ConfigError`` pointing at ``path`` in the file it came from."""
        return ConfigError([self.problem(path, message)])


def load_study(path: str | Path, overrides: Mapping[str, Any] | None = None, env: str | None = None) -> StudyConfig:
    """Read, compose and validate a study file.

    Composition, in order: ``extends:`` base files (deep merge, the extending
    file wins), then the environment ``env`` from ``environments:``, then
    ``overrides`` — dotted key paths (``{"train.num_train_epochs": 1}``).
    ``${VAR}`` comes from the environment, else from ``.env`` beside the study
    file. Relative paths resolve against the file that wrote them.

    Raises:
        ConfigError: with every problem found, each naming file, line and key.
    """
    path = Path(path)
    layers, source = _read_layers(path, ())
    problems = []
    try:
        cfg = _build(path, layers, source, env, overrides or {})
    except ConfigError as e:
        problems = list(e.problems)
    # The environments not chosen are checked too: a typo in prod should not wait for the prod run.
    environments = layers.get("environments")
    for name in environments if isinstance(environments, dict) else ():
        if name == env:
            continue
        overlay_lines = {source.locate(p) for p in source.paths_under(("environments", name))}
        try:
            _build(path, layers, source, name, overrides or {}, strict_variables=False)
        except ConfigError as e:
            problems += [Problem(p.file, p.line, p.key if p.key.startswith(f"environments.{name}")
                                 else f"environments.{name}.{p.key}", p.message)
                         for p in e.problems if (p.file, p.line) in overlay_lines]
    if problems:
        raise ConfigError(problems)
    return cfg


def _build(path: Path, layers: dict[str, Any], source: SourceMap, env: str | None,
           overrides: Mapping[str, Any], strict_variables: bool = True) -> StudyConfig:
    """Compose one environment and the overrides over the merged layers, and validate the result."""
    raw, source = copy.deepcopy(layers), source.copy()
    if env is not None:
        environments = raw.get("environments")
        defined = ", ".join(environments) if isinstance(environments, dict) and environments else "none"
        if not isinstance(environments, dict) or env not in environments:
            raise source.error(("environments",), f"no environment {env!r} (defined: {defined})")
        if not isinstance(environments[env], dict):
            raise source.error(("environments", env), "an environment is a mapping of study keys")
        if "extends" in environments[env]:
            raise source.error(("environments", env, "extends"), "extends: belongs at the top of a study file, "
                                                                 "not in an environment")
        raw = _deep_merge(raw, environments[env])
        source.update(source.subtree(("environments", env)))
    raw, secrets = _expand_variables(raw, path.parent / ".env", source, strict_variables)
    for key, value in overrides.items():
        if key.split(".")[0] in ("extends", "environments"):
            raise ConfigError([Problem("<command line>", None, key, "cannot be set from the command line "
                                                                    "(write it in the study file)")])
        *parents, leaf = key.split(".")
        node = raw
        if parents and parents[0] == "model" and isinstance(raw.get("model"), str):
            raw["model"] = {"name": raw["model"]}  # model: NAME is short for {name: NAME}; model.lora.r=4 adds to it
        for k in parents:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[leaf] = value
        source.add((*parents, leaf), "<command line>", None)

    try:
        problems = _non_finite(raw, source)
        if problems:
            raise ConfigError(problems)
        try:
            cfg = StudyConfig.model_validate(raw, context={"root": path.parent})
        except ValidationError as e:
            raise ConfigError([_problem(err, source) for err in e.errors()]) from None
        cfg._file, cfg._source, cfg._environment, cfg._secrets = path, source, env, secrets
        problems = _cross_checks(cfg)
        if problems:
            raise ConfigError(problems)
    except ConfigError as e:  # a value from ${SECRET} may be quoted in a message: a data path, a bad setting
        raise ConfigError([_mask(p, secrets) for p in e.problems]) from None
    return cfg


def _mask(problem: Problem, secrets: frozenset[str]) -> Problem:
    return Problem(problem.file, problem.line, problem.key, mask(problem.message, secrets))


def mask(text: str, secrets: typing.Iterable[str]) -> str:
    """``text`` with each secret, as written or as JSON and ``repr`` escape it, replaced by ``***``."""
    for secret in secrets:
        for spelling in {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
                         repr(secret)[1:-1]}:
            text = text.replace(spelling, "***")
    return text


def _non_finite(node: Any, source: SourceMap, at: KeyPath = ()) -> list[Problem]:
    """NaN and infinity, anywhere: ``low: .nan`` passes every comparison, and a trial then fails on it."""
    if isinstance(node, float) and not math.isfinite(node):
        return [source.problem(at, f"{node} is not a finite number")]
    if isinstance(node, dict):
        return [p for k, v in node.items() if k != "environments" for p in _non_finite(v, source, at + (str(k),))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _non_finite(v, source, at + (i,))]
    return []


#: Keys that hold paths; a relative one resolves against the file that wrote it.
PATH_KEYS = (("data", "train"), ("data", "eval"), ("output_dir",))


def _read_layers(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], SourceMap]:
    """One study file with its ``extends:`` chain merged under it."""
    raw, source = _read_yaml(path)  # first: it refuses a symlink loop, which resolve() raises on
    if path.resolve() in seen:
        chain = " → ".join(p.name for p in (*seen, path.resolve()))
        raise ConfigError([Problem(str(path), None, "extends", f"files extend each other in a cycle: {chain}")])
    if not isinstance(raw, dict):
        raise ConfigError([source.problem((), "a study file is a YAML mapping of keys")])
    if isinstance(raw.get("search_space"), str):
        _inline_search_space(raw, source, path.parent)
    for layer in (raw, *(v for v in (raw.get("environments") or {}).values() if isinstance(v, dict))):
        _absolute_paths(layer, path.parent.absolute())
    base = raw.pop("extends", None)
    if base is None:
        return raw, source
    base_path = Path(os.path.normpath(path.parent / str(base)))
    if not isinstance(base, str) or not base_path.is_file():
        raise source.error(("extends",), f"file not found: {base_path}")
    base_raw, merged_source = _read_layers(base_path, (*seen, path.resolve()))
    merged_source.update(source)  # the extending file's lines win
    return _deep_merge(base_raw, raw), merged_source


def _absolute_paths(layer: dict[str, Any], folder: Path) -> None:
    for *parents, leaf in PATH_KEYS:
        node = layer
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and not node[leaf].startswith("${"):
            node[leaf] = os.path.normpath(folder / node[leaf])  # a path from ${VAR} resolves against the study file
    if isinstance(layer.get("storage"), str):
        layer["storage"] = absolute_sqlite(layer["storage"], folder)


def absolute_sqlite(url: str, folder: Path) -> str:
    """``sqlite:///x.db`` with ``x.db`` made absolute against ``folder``; any other URL as it is.

    A relative SQLite path would otherwise name another file from every folder hpo is run in.
    """
    if not url.startswith("sqlite:///") or url.startswith("sqlite:////") or "${" in url:
        return url
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - the storage check reports a malformed URL
        return url
    if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return url
    return parsed.set(database=os.path.normpath(folder.absolute() / parsed.database)).render_as_string(
        hide_password=False)


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = _deep_merge(merged[key], value) if both else value
    return merged


#: Values a study file may hold once aliases are expanded; a real one has a few hundred. Beyond this it is
#: an alias bomb ("billion laughs": 1 KB of nested aliases that expands to 10^9 values) or not a study file.
MAX_NODES = 100_000
MAX_DEPTH = 64  # nesting levels; a study file needs about 6
MAX_FILE_BYTES = 10 * 2**20  # a study file is a few KB; this keeps /dev/zero from filling the memory


def _read_yaml(path: Path) -> tuple[Any, SourceMap]:
    """Parse one YAML file, refusing what would hang or silently mislead before building any value.

    Refused, each as one ``FILE:LINE`` problem: anything but a regular file under ``MAX_FILE_BYTES``
    (a FIFO, ``/dev/zero``, a symlink loop), bytes that are not UTF-8, and what :func:`parse_yaml`
    refuses.
    """
    file = str(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([Problem(file, None, "", "not a regular file")])
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError([Problem(file, None, "", f"{info.st_size:,} bytes: a study file is at most "
                                                       f"{MAX_FILE_BYTES:,}")])
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise ConfigError([Problem(file, None, "", f"cannot read: {e.strerror or e}")]) from None
    return parse_yaml(_decode(raw_bytes, file), file)


def parse_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """YAML ``text`` (from ``file``) → (data, source map), safely.

    Refused, each as one ``FILE:LINE`` problem: duplicate keys, nesting deeper than ``MAX_DEPTH``,
    recursive aliases, and more than ``MAX_NODES`` values after alias expansion. PyYAML composes
    aliases as shared nodes, so its node graph stays as small as the text; every check walks that
    graph with memoisation, never the expanded tree.

    Raises:
        ConfigError: naming the line.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_graph(node, file)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError([Problem(file, line, "", f"YAML syntax error: {e.problem or e.context}{col}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(file, None, "", f"YAML error: {str(e)[:200]}")]) from None
    except RecursionError:  # PyYAML composes recursively: ~300 levels of [ or { exhaust the stack
        raise ConfigError([Problem(file, loader.get_mark().line + 1, "",
                                   f"nested deeper than {MAX_DEPTH} levels")]) from None
    finally:
        loader.dispose()
    source = SourceMap()
    source.default_file = file
    if node is not None:
        _index(node, (), file, source)
    return data, source


def _decode(raw: bytes, file: str) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) > 1 and b"\x00" in raw[:2]):
        raise ConfigError([Problem(file, None, "", "the file is UTF-16: save it as UTF-8")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError([Problem(file, line, "", f"not UTF-8 (byte 0x{raw[e.start]:02x}): save the file as "
                                                   "UTF-8")]) from None


def _check_graph(root: yaml.Node, file: str) -> None:
    """Duplicate keys, nesting depth, recursive aliases and the expanded size, in one memoised walk."""
    sizes: dict[int, int] = {}  # id(node) → values under it once aliases are expanded
    open_nodes: set[int] = set()  # on the current path: seeing one again is a recursive alias

    def fail(node: yaml.Node, at: KeyPath, message: str) -> ConfigError:
        return ConfigError([Problem(file, node.start_mark.line + 1, format_path(at), message)])

    def size(node: yaml.Node, at: KeyPath, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise fail(node, at, "an alias refers to a value that contains it (recursive alias)")
        if depth > MAX_DEPTH:
            raise fail(node, at, f"nested deeper than {MAX_DEPTH} levels")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):  # two << merge keys too: the second would silently win
                    if key.value in seen:
                        raise fail(key, at + (key.value,), f"duplicate key (first on line {seen[key.value]}); "
                                                           "keep one")
                    seen[key.value] = key.start_mark.line + 1
                total += size(key, at, depth + 1) + size(value, at + (str(key.value),), depth + 1)
                if total > MAX_NODES:
                    raise fail(key, at + (str(key.value),), f"over {MAX_NODES:,} values once aliases are expanded "
                                                            "(an alias bomb?)")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                total += size(item, at + (i,), depth + 1)
                if total > MAX_NODES:
                    raise fail(item, at + (i,), f"over {MAX_NODES:,} values once aliases are expanded "
                                                "(an alias bomb?)")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root, (), 0)


def _index(node: yaml.Node, at: KeyPath, file: str, source: SourceMap) -> None:
    source.add(at, file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _index(value, at + (str(key.value),), file, source)
            source.add(at + (str(key.value),), file, key.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, at + (i,), file, source)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|KEY", re.IGNORECASE)


def _expand_variables(
    raw: dict[str, Any], dotenv: Path, source: SourceMap, strict: bool = True
) -> tuple[dict[str, Any], frozenset[str]]:
    """Replace ``${VAR}`` in string values from the environment, else from ``.env`` beside the study.

    Returns the expanded document and the values of secret-looking variables, to mask.
    Not ``strict``: an unset variable stays as written (and its value unchecked).
    """
    env = {**dotenv_values(dotenv), **os.environ} if dotenv.is_file() else dict(os.environ)
    problems: list[Problem] = []
    secrets: set[str] = set()
    unset: set[KeyPath] = set()

    def expand(node: Any, at: KeyPath) -> Any:
        if isinstance(node, dict):
            return {k: expand(v, at + (str(k),)) for k, v in node.items()}
        if isinstance(node, list):
            return [expand(v, at + (i,)) for i, v in enumerate(node)]
        if not isinstance(node, str):
            return node

        def value(m: re.Match) -> str:
            if env.get(m.group(1)) is None:
                if not strict:
                    unset.add(at)
                    return m.group(0)
                problems.append(source.problem(at, f"${{{m.group(1)}}} is not set in the environment or {dotenv.name}"))
                return m.group(0)
            secret = env[m.group(1)]
            if not (_SECRET_NAME.search(m.group(1)) and secret):
                return secret
            if at[:1] == ("study",):  # the name is a folder and a database key, printed everywhere
                problems.append(source.problem(at, f"${{{m.group(1)}}} is a secret: it cannot name a study"))
                return m.group(0)
            secrets.add(secret)
            if at[:1] == ("storage",):  # a password in a URL is percent-encoded, or an @ in it splits the URL
                secret = urllib.parse.quote(secret, safe="")
                secrets.add(secret)
            return secret

        return _VARIABLE.sub(value, node)

    raw = {k: v if k == "environments" else expand(v, (k,)) for k, v in raw.items()}  # only the chosen one
    for at in unset:  # leave the value out: the run that sets the variable checks it
        node = raw
        for k in at[:-1]:
            node = node[k]
        del node[at[-1]]
    if problems:
        raise ConfigError(problems)
    return raw, frozenset(secrets)


def _inline_search_space(raw: dict[str, Any], source: SourceMap, root: Path) -> None:
    """Replace ``search_space: path.yaml`` by that file's ``search_space`` mapping.

    The file's ``enqueue:`` (its rule-of-thumb starting points) is used when the study has none.
    """
    ref = root / raw["search_space"]
    if not ref.is_file():
        raise source.error(("search_space",), f"file not found: {ref}")
    data, ref_source = _read_yaml(ref)
    if not isinstance(data, dict) or not isinstance(data.get("search_space"), dict):
        raise ConfigError([Problem(str(ref), 1, "", "a search-space file holds a 'search_space:' mapping")])
    unknown = sorted(set(data) - {"search_space", "enqueue"})
    if unknown:
        raise ref_source.error((unknown[0],), "unknown key in a search-space file (only 'search_space' and 'enqueue')")
    raw["search_space"] = data["search_space"]
    if "enqueue" in data and "enqueue" not in raw:
        raw["enqueue"] = data["enqueue"]
    source.update(ref_source)


def _problem(err: Any, source: SourceMap) -> Problem:
    loc = tuple(p for p in err["loc"] if p != "[key]")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _closest(str(loc[-1]), _fields_at(loc[:-1]))
    elif err["type"] == "missing":
        message = "required key is missing"
    return source.problem(loc, message)


def _fields_at(loc: KeyPath) -> list[str]:
    """The keys the model at ``loc`` accepts (for 'did you mean' hints)."""
    ann: Any = StudyConfig
    parts = list(loc)
    while True:
        while origin := typing.get_origin(ann):  # unwrap Optional, Annotated, dict values
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if origin is dict:
                if not parts:
                    return []
                parts.pop(0)
                ann = args[1]
            elif origin is Annotated:
                ann = args[0]
            else:
                models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
                if not models:
                    return []
                ann = models[0]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        if not parts:
            return list(ann.model_fields)
        field = ann.model_fields.get(str(parts.pop(0)))
        if field is None:
            return []
        ann = field.annotation


def _cross_checks(cfg: StudyConfig) -> list[Problem]:
    """Checks that span several keys, each reported at the key to fix."""
    src = cfg._source
    problems = []
    for name in sorted(set(cfg.search_space) & set(cfg.train)):
        problems.append(src.problem(("search_space", name), f"{name!r} is also fixed in train:; keep one"))
    dists = cfg.distributions
    defined: set[str] = set()
    for name, p in cfg.search_space.items():
        for ref, want in (p.when or {}).items():
            if ref not in defined:
                problems.append(src.problem(("search_space", name, "when", ref),
                                            f"{ref!r} must be a parameter defined above {name!r}"))
            elif isinstance(dists.get(ref), CategoricalDistribution):
                unknown = [v for v in (want if isinstance(want, list) else [want]) if v not in dists[ref].choices]
                if unknown:
                    problems.append(src.problem(("search_space", name, "when", ref),
                                                f"{unknown[0]!r} is not one of {ref}'s choices {list(dists[ref].choices)}"))
            elif ref in dists:  # a number range: only values it can sample, and never a continuous one
                d = dists[ref]
                if getattr(d, "step", None) is None and not isinstance(d, IntDistribution):
                    problems.append(src.problem(("search_space", name, "when", ref), f"{ref} is continuous: it never "
                                                "equals one value (make it categorical or give it a step)"))
                else:
                    unknown = [v for v in (want if isinstance(want, list) else [want]) if not _contains(d, v)]
                    if unknown:
                        problems.append(src.problem(("search_space", name, "when", ref),
                                                    f"{unknown[0]!r} is not a value {ref} takes ({d.low}..{d.high})"))
        if p.expression is not None:
            missing = sorted(p.expression.names - defined - set(cfg.train))
            if missing:
                problems.append(src.problem(("search_space", name, "derive"), f"unknown name {missing[0]!r}: "
                                            "derive reads parameters defined above it, or train: settings"))
        defined.add(name)
    for i, c in enumerate(cfg.constraint_expressions):
        missing = sorted(c.names - set(cfg.search_space) - set(cfg.train))
        if missing:
            problems.append(src.problem(("constraints", i), f"unknown name {missing[0]!r}{_closest(missing[0], cfg.search_space)}"))
    seen_entries: dict[str, int] = {}
    for i, entry in enumerate(cfg.enqueue):
        for name, value in entry.items():
            if name in cfg.search_space and name not in dists:
                problems.append(src.problem(("enqueue", i, name), "a derived parameter cannot be enqueued"))
            elif name not in dists:
                problems.append(src.problem(("enqueue", i, name), f"not in search_space{_closest(name, dists)}"))
            elif not _contains(dists[name], value):
                problems.append(src.problem(("enqueue", i, name), f"{value!r} is outside the search space"))
            else:  # the space's own spelling: 8.0 for a choice of 8 would reach TrainingArguments as a float
                entry[name] = dists[name].to_external_repr(dists[name].to_internal_repr(value))
        key = repr(sorted(entry.items()))
        if key in seen_entries:
            problems.append(src.problem(("enqueue", i), f"the same configuration as enqueue[{seen_entries[key]}]"))
        seen_entries.setdefault(key, i)
    if cfg.storage is not None:
        try:
            make_url(cfg.storage)
        except Exception:  # its message would echo the URL, password included
            problems.append(src.problem(("storage",), "not a database URL (e.g. sqlite:///study.db, "
                                        "postgresql://user@host/db)"))
    if (cfg.data.prompt_column is None) != (cfg.data.response_column is None):
        problems.append(src.problem(("data", "prompt_column" if cfg.data.prompt_column is None else "response_column"),
                                    "prompt_column and response_column go together"))
    metrics = TASKS[cfg.task].metrics
    if cfg.objective.metric not in metrics:
        problems.append(src.problem(("objective", "metric"),
                                    f"{cfg.objective.metric!r} is not reported by {cfg.task}; one of {', '.join(metrics)}"))
    report_to = cfg.train.get("report_to")
    if report_to not in (None, "none", "tensorboard", [], ["tensorboard"]):
        problems.append(src.problem(("train", "report_to"), f"{report_to!r}: hpo logs every trial to TensorBoard "
                                    "(outputs/<study>/tensorboard); other trackers are not supported yet, so this "
                                    "would be ignored: remove it"))
    sampler = pruner = None
    try:
        sampler = samplers.make_sampler(cfg.sampler.name, cfg.sampler.args, dists)
    except ValueError as e:
        problems.append(src.problem(("sampler",), str(e)))
    try:
        pruner = samplers.make_pruner(cfg.pruner.name, cfg.pruner.args)
    except ValueError as e:
        problems.append(src.problem(("pruner",), str(e)))
    if sampler is not None and pruner is not None and not problems:
        try:  # what only shows when the sampler runs: an argument the constructor stores unchecked
            samplers.dry_run(sampler, pruner, dists, cfg.objective.direction)
        except Exception as e:  # noqa: BLE001 - any error here would fail every trial
            problems.append(src.problem(("sampler",), f"{cfg.sampler.name} sampler with {cfg.pruner.name} pruner "
                                        f"fails on a test study: {type(e).__name__}: {str(e)[:200]}"))
    if not problems:
        problems += _expression_problems(cfg)
    return problems


#: Valid values of the model-side and LoRA names, searched or derived (training arguments are checked
#: against TrainingArguments and hpo's own ranges, in :func:`hpo.trial.check_training_arguments`).
_VALUE_RANGES = {
    "dropout": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "a probability in [0, 1)"),
    "lora_dropout": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "a probability in [0, 1)"),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive whole number (use //)"),
    "lora_alpha": (lambda v: isinstance(v, int | float) and v > 0, "a positive number"),
}


def _expression_problems(cfg: StudyConfig) -> list[Problem]:
    """Evaluate ``derive:`` and ``constraints:`` at the corners of the space and at random points.

    What fails there would fail trials an hour into the study: division by zero, a result too large, a
    derived value outside its target's valid range. Records the derived values seen, for the
    TrainingArguments checks that need transformers.
    """
    found: dict[KeyPath, Problem] = {}
    for name, d in cfg.distributions.items():  # searched values: each end of the range, or every choice
        check = _VALUE_RANGES.get(name)
        values = list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
        bad = next((v for v in values if check and not check[0](v)), None)
        if bad is not None:
            found[("search_space", name)] = cfg.problem(("search_space", name), f"{bad!r}: {name} must be {check[1]}")
    derives = [name for name, p in cfg.search_space.items() if p.expression is not None]
    if not derives and not cfg.constraints:
        return list(found.values())
    seen: dict[str, dict[str, Any]] = {name: {} for name in derives}
    feasible = False
    for point in space.corners(cfg.distributions):
        where = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())
        try:
            sampled, derived = space.walk(cfg.search_space, cfg.distributions, lambda name, d: point[name], cfg.train)
        except space.DeriveError as e:
            key, _, message = str(e).partition(": ")
            path = tuple(key.split("."))
            found.setdefault(path, cfg.problem(path, f"{message} at {where}"))
            continue
        for name, value in derived.items():
            seen[name].setdefault(repr(value), value)
            check = _VALUE_RANGES.get(name)
            if check and not check[0](value):
                found.setdefault(("search_space", name, "derive"),
                                 cfg.problem(("search_space", name, "derive"),
                                             f"gives {value!r} at {where}; {name} must be {check[1]}"))
        values = {**cfg.train, **sampled, **derived}
        met = True
        for i, c in enumerate(cfg.constraint_expressions):
            try:
                met = c.evaluate(values) is not False and met
            except KeyError:  # reads a parameter inactive here: does not apply
                pass
            except ValueError as e:
                found.setdefault(("constraints", i), cfg.problem(("constraints", i), f"{e} at {where}"))
                met = False
        feasible = feasible or met
    if cfg.constraints and not feasible and not found:
        found[("constraints",)] = cfg.problem(("constraints",), "no corner of the space and none of 32 random "
                                              "points meets every constraint: no trial could run")
    for i, entry in enumerate(cfg.enqueue):  # a queued configuration the constraints reject would never run
        try:
            sampled, derived = space.walk(cfg.search_space, cfg.distributions, lambda name, d: entry[name], cfg.train)
            broken = space.broken_constraint(cfg.constraint_expressions, {**cfg.train, **sampled, **derived})
        except KeyError:  # a partial entry: the sampler picks the rest
            continue
        except ValueError as e:  # a derive or a constraint fails there
            found.setdefault(("enqueue", i), cfg.problem(("enqueue", i), str(e)))
            continue
        if broken:
            found.setdefault(("enqueue", i), cfg.problem(("enqueue", i), f"breaks the constraint {broken!r}: "
                                                                        "it would be rejected, never trained"))
    cfg._derived_values = {name: list(values.values())[:20] for name, values in seen.items()}
    return list(found.values())


def _contains(d: BaseDistribution, value: Any) -> bool:
    try:
        return d._contains(d.to_internal_repr(value))  # Optuna's own membership test
    except (ValueError, TypeError):
        return False
