"""Stage 3, validate: the composed document → ``StudyConfig``, and the checks that span several keys.

pydantic's errors become ``FILE:LINE: key.path: message`` problems (an unknown key with a "did you mean"),
then the cross-checks run, grouped by concern: the names keys read from one another (``when:``, ``derive:``,
``constraints:``, ``enqueue:``; :mod:`hpo.config.references`), the storage URL (:mod:`hpo.config.storage_url`),
then here the objectives and metrics, trackers, quantization, sampler and pruner on a test study; last
``derive:``/``constraints:`` are evaluated at the corners of the space and at random points
(:mod:`hpo.config.corners`). Nothing here imports torch or transformers.
"""

from __future__ import annotations

import importlib.util
import math
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from hpo import samplers, space
from hpo.config import finalists
from hpo.config import reporting as trackers
from hpo.config.compose import mask
from hpo.config.corners import expression_problems
from hpo.config.models import StudyConfig
from hpo.config.references import reference_problems
from hpo.config.storage_url import storage_problems
from hpo.errors import ConfigError, KeyPath, Problem, SourceMap, did_you_mean
from hpo.tasks import COST_METRICS, TASKS


def build(raw: dict[str, Any], source: SourceMap, path: Path, env: str | None, secrets: frozenset[str]) -> StudyConfig:
    """The composed document as the ``StudyConfig`` of the study file ``path``.

    Non-finite numbers first, then the models' own checks, then the checks across keys and the
    evaluation of ``derive:`` and ``constraints:``: each step reports all its problems at once, and
    runs only when the steps before it found none. ``secrets`` are masked in every message.

    Raises:
        ConfigError: one problem per defect, each at the key to fix.
    """
    # Absolute now: a relative study path must not follow a later os.chdir (the storage would move with it).
    root = path.parent.absolute()
    try:
        problems = _non_finite(raw, source)
        if problems:
            raise ConfigError(problems)
        try:
            cfg = StudyConfig.model_validate(raw, context={"root": root})
        except ValidationError as e:
            raise ConfigError([_problem(err, source) for err in e.errors()]) from None
        cfg._file, cfg._root, cfg._source, cfg._environment, cfg._secrets = path, root, source, env, secrets
        problems = _cross_checks(cfg)
        if problems:
            raise ConfigError(problems)
    except ConfigError as e:  # a value from ${SECRET} may be quoted in a message: a data path, a bad setting
        raise ConfigError([_mask(p, secrets) for p in e.problems]) from None
    return cfg


def _mask(problem: Problem, secrets: frozenset[str]) -> Problem:
    return Problem(problem.file, problem.line, problem.key, mask(problem.message, secrets))


def _non_finite(node: Any, source: SourceMap, at: KeyPath = ()) -> list[Problem]:
    """NaN and infinity, anywhere: ``low: .nan`` passes every comparison, and a trial then fails on it."""
    if isinstance(node, float) and not math.isfinite(node):
        return [source.problem(at, f"{node} is not a finite number")]
    if isinstance(node, dict):
        return [p for k, v in node.items() if k != "environments" for p in _non_finite(v, source, at + (str(k),))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _non_finite(v, source, at + (i,))]
    return []


def _problem(err: Any, source: SourceMap) -> Problem:
    loc = tuple(p for p in err["loc"] if p != "[key]")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + did_you_mean(str(loc[-1]), _fields_at(loc[:-1]))
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


def _argument(src: SourceMap, section: str, args: Mapping[str, Any], message: str) -> Problem:
    """An error about ``section``'s arguments, at the one argument its message names ("Seed must be …" is
    ``sampler.seed``, wherever it was set: a file, an environment, the command line), else at the section."""
    named = [k for k in args if re.search(rf"\b{re.escape(str(k))}\b", message, re.IGNORECASE)]
    if len(named) != 1:
        return src.problem((section,), message)
    return src.problem((section, named[0]), message.removeprefix(f"{named[0]}: "))


def _cross_checks(cfg: StudyConfig) -> list[Problem]:
    """Checks that span several keys, each reported at the key to fix; the expressions are evaluated only when
    every other check passes."""
    src = cfg._source
    problems = reference_problems(cfg)
    problems += storage_problems(cfg)
    if (cfg.data.prompt_column is None) != (cfg.data.response_column is None):
        problems.append(
            src.problem(
                ("data", "prompt_column" if cfg.data.prompt_column is None else "response_column"),
                "prompt_column and response_column go together",
            )
        )
    problems += _chat_problems(cfg)
    problems += _finalist_problems(cfg)
    problems += _packing_problems(cfg)
    problems += _objective_problems(cfg)
    problems += _tracker_problems(cfg)
    problems += _quantization_problems(cfg)
    problems += _sampler_problems(cfg, dry_run=not problems)
    if not problems:
        problems += expression_problems(cfg)
    return problems


def _chat_problems(cfg: StudyConfig) -> list[Problem]:
    """``data.format: chat`` is causal-lm's, and reads conversations instead of the prompt/response columns."""
    d, src = cfg.data, cfg._source
    if d.format != "chat":
        given = [k for k in ("template", "messages_column") if k in d.model_fields_set]
        return [src.problem(("data", given[0]), f"{given[0]} goes with format: chat")] if given else []
    if cfg.task != "causal-lm":
        return [src.problem(("data", "format"), f"chat data trains a causal-lm; this study's task is {cfg.task}")]
    if d.prompt_column is not None:
        return [src.problem(("data", "prompt_column"), "format: chat learns the assistant turns: no prompt_column")]
    return []


def pack_problems(cfg: StudyConfig) -> list[Problem]:
    """resources.pack over 1 (or auto): LoRA trials of one process each, over a base that stays as loaded, measured
    alone. (A searched parameter that builds the base other ways makes the run train one trial at a time.)"""
    problem = lambda why: [cfg._source.problem(("resources", "pack"), f"{why}, or pack: 1")]
    if not cfg.is_lora:
        return problem("packs train LoRA trials over one base: add model.lora")
    if cfg.resources.ranks > 1:
        return problem("packs train one-process trials: processes_per_trial and nodes_per_trial 1")
    if fixed := [k for k in space.NOT_RESIDENT if cfg.train.get(k) or k in cfg.search_space]:
        return problem(f"a pack's base stays as it is loaded: no {fixed[0]}")
    if cfg.repeats > 1:
        return problem("repeats trains each seed over a base of its own, not in a pack: repeats 1")
    if costs := [o.metric for o in cfg.objectives or [] if o.metric in COST_METRICS]:
        return problem(f"a pack's trials share their memory and time: no objective on {costs[0]}")
    return []


def _finalist_problems(cfg: StudyConfig) -> list[Problem]:
    """What generation needs: a causal LM, prompts with references (prompt/response pairs or chat), the rows named,
    importable scoring functions, and one trial at a time (a packed trial's generation is not written yet)."""
    f = cfg.finalists
    if f is None:
        return []
    problem = lambda key, why: [cfg._source.problem(("finalists", *key), why)]
    if cfg.task != "causal-lm":
        return problem((), f"finalists generate text: task causal-lm, not {cfg.task}")
    if cfg.data.format != "chat" and cfg.data.prompt_column is None:
        return problem((), "finalists generate from prompts: data.prompt_column and response_column, or format: chat")
    if f.split == "test" and cfg.data.test is None:
        return problem(("split",), "needs data.test")
    if cfg.resources.pack != 1:
        return problem((), "finalists do not generate in a pack yet: resources.pack 1")
    if cfg.resources.ranks > 1:
        return problem(
            (), "finalists do not generate in multi-process trials yet: processes_per_trial and nodes_per_trial 1"
        )
    for i, name in enumerate(f.metrics):
        if name not in finalists.BUILTIN:
            try:
                finalists.scorer(name, cfg.root)
            except ValueError as e:
                return problem(("metrics", i), str(e))
    return []


def _packing_problems(cfg: StudyConfig) -> list[Problem]:
    """``packing`` (fixed in train: or searched) flattens a causal LM's training rows: not in a pack (its lanes pad
    theirs), with NEFTune (its noise scales with the row's length) or under DeepSpeed or FSDP (no forward outside
    their engine: the check that the model keeps flattened rows apart cannot run)."""
    fixed = str(cfg.train.get("packing", False)).strip().lower() in ("true", "1", "yes")
    searched = cfg.search_space.get("packing")
    if not fixed and not (searched is not None and any(c is True for c in searched.choices or [])):
        return []
    where = ("train", "packing") if fixed else ("search_space", "packing")
    problem = lambda why: [cfg._source.problem(where, why)]
    if cfg.task != "causal-lm":
        return problem(f"packing flattens a causal LM's rows: task causal-lm, not {cfg.task}")
    if cfg.resources.pack != 1:
        return problem("packing flattens rows, and a pack's trials pad theirs: resources.pack 1")
    if clash := [k for k in ("neftune_noise_alpha", "deepspeed", "fsdp") if cfg.train.get(k) or k in cfg.search_space]:
        if clash[0] == "neftune_noise_alpha":
            return problem("packing with NEFTune, whose noise scales with the row's length: one of them")
        return problem(f"packing is checked on the model before it trains, outside {clash[0]}'s engine: one of them")
    return []


def _objective_problems(cfg: StudyConfig) -> list[Problem]:
    """What a trial's value is: repeats, several objectives, the metric the task reports, early stopping."""
    src = cfg._source
    problems = []
    metrics = TASKS[cfg.task].metrics
    if cfg.repeats > 1 and cfg.objectives:
        problems.append(src.problem(("repeats",), "repeats with several objectives is not supported yet: one of them"))
    launched = [k for k in ("fsdp", "deepspeed") if cfg.train.get(k)]  # trials run by the launcher, as over 1 process
    if cfg.resources.pack != 1:
        problems += pack_problems(cfg)
    if cfg.repeats > 1 and (cfg.resources.ranks > 1 or launched):
        what = f"train.{launched[0]}" if launched else "processes_per_trial or nodes_per_trial over 1"
        problems.append(src.problem(("repeats",), f"repeats with {what} is not supported yet: one of them"))
    if cfg.objectives:
        if "objective" in cfg.model_fields_set:
            problems.append(src.problem(("objectives",), "objective and objectives both set: keep one"))
        for i, o in enumerate(cfg.objectives):
            if i and o.metric not in (*metrics, *COST_METRICS):
                problems.append(
                    src.problem(
                        ("objectives", i, "metric"),
                        f"{o.metric!r} is neither reported by {cfg.task} nor a cost hpo measures; one of "
                        f"{', '.join((*metrics, *COST_METRICS))}",
                    )
                )
            if i and o.at != "last":
                problems.append(src.problem(("objectives", i, "at"), "only the first objective takes at:"))
        if len({o.metric for o in cfg.objectives}) < len(cfg.objectives):
            problems.append(src.problem(("objectives",), "a metric is named twice"))
        if cfg.pruner.name != "none":
            problems.append(
                src.problem(
                    ("pruner",),
                    "Optuna cannot prune a study of several objectives: pruner: {name: none}, or one objective",
                )
            )
        if cfg.sampler.name == "cmaes":
            problems.append(
                src.problem(("sampler", "name"), "cmaes optimizes one objective: tpe, nsga2, gp, random or qmc")
            )
    if cfg.objective.metric not in metrics:
        first = " (the first objective is evaluated as training goes: a task metric)" if cfg.objectives else ""
        problems.append(
            src.problem(
                ("objectives", 0, "metric") if cfg.objectives else ("objective", "metric"),
                f"{cfg.objective.metric!r} is not reported by {cfg.task}{first}; one of {', '.join(metrics)}",
            )
        )
    if cfg.early_stopping is not None and cfg.objective.at != "best":
        problems.append(
            src.problem(
                ("early_stopping",),
                "needs objective.at: best: a trial that stops after its best evaluation would be scored on a "
                "worse, later one",
            )
        )
    return problems


def _tracker_problems(cfg: StudyConfig) -> list[Problem]:
    """``train.report_to``: trackers hpo logs to, installed, and the environment's timeout for them."""
    src = cfg._source
    problems = []
    report_to = cfg.train.get("report_to")
    names = [report_to] if isinstance(report_to, str) else report_to if isinstance(report_to, list) else [report_to]
    for name in names if report_to is not None else []:
        if name not in trackers.SUPPORTED:
            problems.append(
                src.problem(
                    ("train", "report_to"),
                    f"{name!r} is not a tracker hpo logs trials to: one of {', '.join(trackers.SUPPORTED)} "
                    "(TensorBoard is always on)",
                )
            )
        elif name in trackers.EXTRAS and importlib.util.find_spec(name) is None:
            problems.append(
                src.problem(
                    ("train", "report_to"),
                    f"{name} is not installed: pip install 'hpo[{trackers.EXTRAS[name]}]'",
                )
            )
    if trackers.requested(report_to if isinstance(report_to, str | list) else None):
        try:
            trackers.timeout_s()
        except ValueError as e:  # the environment sets how long a tracker may take
            problems.append(src.problem(("train", "report_to"), str(e)))
    return problems


def _quantization_problems(cfg: StudyConfig) -> list[Problem]:
    """Quantized weights train only as LoRA adapters over a pretrained model."""
    src = cfg._source
    problems = []
    if cfg.quantized:
        where = ("model", "quantization") if cfg.model.quantization is not None else ("search_space", "bits")
        if not cfg.is_lora:
            problems.append(
                src.problem(
                    where,
                    "quantized weights cannot be trained directly: add model.lora (or LoRA names such as r to "
                    "search_space) to train adapters over them (QLoRA)",
                )
            )
        if cfg.model.config is not None:
            problems.append(
                src.problem(where, "quantization loads pretrained weights: give model.name, not model.config")
            )
    return problems


def _sampler_problems(cfg: StudyConfig, dry_run: bool) -> list[Problem]:
    """The sampler and pruner built from their arguments, and with ``dry_run`` run on a test study."""
    src = cfg._source
    problems = []
    sampler = pruner = None
    try:
        sampler = samplers.make_sampler(cfg.sampler.name, cfg.sampler.args, cfg.distributions)
    except ValueError as e:
        problems.append(_argument(src, "sampler", cfg.sampler.args, str(e)))
    try:
        pruner = samplers.make_pruner(cfg.pruner.name, cfg.pruner.args)
    except ValueError as e:
        problems.append(_argument(src, "pruner", cfg.pruner.args, str(e)))
    if sampler is not None and pruner is not None and dry_run:
        try:  # what only shows when the sampler runs: an argument the constructor stores unchecked
            samplers.dry_run(sampler, pruner, cfg.distributions, cfg.directions)
        except Exception as e:  # noqa: BLE001 - any error here would fail every trial
            problems.append(
                src.problem(
                    ("sampler",),
                    f"{cfg.sampler.name} sampler with {cfg.pruner.name} pruner "
                    f"fails on a test study: {type(e).__name__}: {str(e)[:200]}",
                )
            )
    return problems
