"""Stage 3, validate: the composed document → ``StudyConfig``, and the checks that span several keys.

pydantic's errors become ``FILE:LINE: key.path: message`` problems (an unknown key with a "did you mean"),
then the cross-checks run (``when:``, ``derive:``, ``constraints:``, ``enqueue:``, storage URL, metric,
sampler and pruner on a test study), and ``derive:``/``constraints:`` are evaluated at the corners of the
space and at random points. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import importlib.util
import math
import re
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from pydantic import BaseModel, ValidationError
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SAWarning

from hpo import optuna_private, samplers, space
from hpo.config.compose import control_character, hidden_character, mask, sqlite_misread
from hpo.config.models import StudyConfig
from hpo.errors import ConfigError, KeyPath, Problem, SourceMap, did_you_mean
from hpo.tasks import COST_METRICS, TASKS
from hpo.trial import trackers


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
                problems.append(
                    src.problem(
                        ("search_space", name, "when", ref), f"{ref!r} must be a parameter defined above {name!r}"
                    )
                )
            elif isinstance(dists.get(ref), CategoricalDistribution):
                unknown = [v for v in (want if isinstance(want, list) else [want]) if v not in dists[ref].choices]
                if unknown:
                    problems.append(
                        src.problem(
                            ("search_space", name, "when", ref),
                            f"{unknown[0]!r} is not one of {ref}'s choices {list(dists[ref].choices)}",
                        )
                    )
            elif ref in dists:  # a number range: only values it can sample, and never a continuous one
                d = dists[ref]
                if getattr(d, "step", None) is None and not isinstance(d, IntDistribution):
                    problems.append(
                        src.problem(
                            ("search_space", name, "when", ref),
                            f"{ref} is continuous: it never equals one value (make it categorical or give it a step)",
                        )
                    )
                else:
                    unknown = [v for v in (want if isinstance(want, list) else [want]) if not _contains(d, v)]
                    if unknown:
                        problems.append(
                            src.problem(
                                ("search_space", name, "when", ref),
                                f"{unknown[0]!r} is not a value {ref} takes ({d.low}..{d.high})",
                            )
                        )
        if p.expression is not None:
            missing = sorted(p.expression.names - defined - set(cfg.train))
            if missing:
                problems.append(
                    src.problem(
                        ("search_space", name, "derive"),
                        f"unknown name {missing[0]!r}: derive reads parameters defined above it, or train: settings",
                    )
                )
        defined.add(name)
    for i, c in enumerate(cfg.constraint_expressions):
        missing = sorted(c.names - set(cfg.search_space) - set(cfg.train))
        if missing:
            problems.append(
                src.problem(
                    ("constraints", i), f"unknown name {missing[0]!r}{did_you_mean(missing[0], cfg.search_space)}"
                )
            )
    seen_entries: dict[str, int] = {}
    for i, entry in enumerate(cfg.enqueue):
        for name, value in entry.items():
            if name in cfg.search_space and name not in dists:
                problems.append(src.problem(("enqueue", i, name), "a derived parameter cannot be enqueued"))
            elif name not in dists:
                problems.append(src.problem(("enqueue", i, name), f"not in search_space{did_you_mean(name, dists)}"))
            elif not _contains(dists[name], value):
                problems.append(src.problem(("enqueue", i, name), f"{value!r} is outside the search space"))
            else:  # the space's own spelling: 8.0 for a choice of 8 would reach TrainingArguments as a float
                entry[name] = dists[name].to_external_repr(dists[name].to_internal_repr(value))
        key = repr(sorted(entry.items()))
        if key in seen_entries:
            problems.append(src.problem(("enqueue", i), f"the same configuration as enqueue[{seen_entries[key]}]"))
        seen_entries.setdefault(key, i)
    problems += _storage_problems(cfg)
    if (cfg.data.prompt_column is None) != (cfg.data.response_column is None):
        problems.append(
            src.problem(
                ("data", "prompt_column" if cfg.data.prompt_column is None else "response_column"),
                "prompt_column and response_column go together",
            )
        )
    metrics = TASKS[cfg.task].metrics
    if cfg.repeats > 1 and cfg.objectives:
        problems.append(src.problem(("repeats",), "repeats with several objectives is not supported yet: one of them"))
    launched = [k for k in ("fsdp", "deepspeed") if cfg.train.get(k)]  # trials run by the launcher, as over 1 process
    if cfg.repeats > 1 and (cfg.resources.processes_per_trial > 1 or launched):
        what = f"train.{launched[0]}" if launched else "processes_per_trial over 1"
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
    sampler = pruner = None
    try:
        sampler = samplers.make_sampler(cfg.sampler.name, cfg.sampler.args, dists)
    except ValueError as e:
        problems.append(_argument(src, "sampler", cfg.sampler.args, str(e)))
    try:
        pruner = samplers.make_pruner(cfg.pruner.name, cfg.pruner.args)
    except ValueError as e:
        problems.append(_argument(src, "pruner", cfg.pruner.args, str(e)))
    if sampler is not None and pruner is not None and not problems:
        try:  # what only shows when the sampler runs: an argument the constructor stores unchecked
            samplers.dry_run(sampler, pruner, dists, cfg.directions)
        except Exception as e:  # noqa: BLE001 - any error here would fail every trial
            problems.append(
                src.problem(
                    ("sampler",),
                    f"{cfg.sampler.name} sampler with {cfg.pruner.name} pruner "
                    f"fails on a test study: {type(e).__name__}: {str(e)[:200]}",
                )
            )
    if not problems:
        problems += _expression_problems(cfg)
    return problems


def _storage_problems(cfg: StudyConfig) -> list[Problem]:
    """``storage:`` as the run will read it: a URL, not in memory, with options its driver takes, and for SQLite
    a path that means one file (what SQLAlchemy would cut off or decode is refused, not silently changed)."""
    src = cfg._source
    if cfg.storage is None:
        return []
    if bad := control_character(cfg.storage):
        return [src.problem(("storage",), f"{bad} in the URL: no file or server is named so")]
    try:
        url = make_url(cfg.storage)
    except Exception:  # noqa: BLE001 - its message would echo the URL, password included
        return [src.problem(("storage",), "not a database URL (e.g. sqlite:///study.db, postgresql://user@host/db)")]
    problems = []
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite and (misread := sqlite_misread(cfg.storage)):
        return [src.problem(("storage",), misread)]
    if sqlite and (bad := hidden_character(url.database or "")):  # a file hpo creates, as outputs/<study> is
        return [src.problem(("storage",), f"{bad} in the SQLite path: it prints like another file's name")]
    # Each connection to it has a database of its own (the heartbeat thread's, every worker's), and the
    # trials are gone when the run ends: nothing a user ran may be lost.
    if sqlite and (url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"):
        problems.append(
            src.problem(
                ("storage",),
                "an in-memory SQLite database loses the study when the run ends: "
                "a file (sqlite:///study.db) or a server",
            )
        )
    try:  # connects to nothing: the driver reads the URL's options (?timeout=abc fails here, not mid-run)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SAWarning)
            engine = create_engine(cfg.storage_url)
            engine.dialect.create_connect_args(engine.url)
            engine.dispose()
    except (ValueError, TypeError, ArgumentError):
        problems.append(
            src.problem(("storage",), "an option in the URL is not valid for its driver (e.g. ?timeout=abc)")
        )
    except ImportError:  # no driver: opening the storage says which package to install
        pass
    else:
        ignored = [w for w in caught if issubclass(w.category, SAWarning) and "not accepted" in str(w.message)]
        if ignored and not problems:  # SQLAlchemy would drop them with a warning, and the run go on without them
            reason = str(ignored[0].message).split(";")[0].split(" (Background")[0]
            problems.append(src.problem(("storage",), f"an option in the URL is ignored: {reason}"))
    return problems


#: Valid values of the model-side and LoRA names, searched or derived (training arguments are checked
#: against TrainingArguments and hpo's own ranges, in :func:`hpo.trial.workbench.check_training_arguments`).
_VALUE_RANGES = {
    "dropout": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "a probability in [0, 1)"),
    "lora_dropout": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "a probability in [0, 1)"),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive whole number (use //)"),
    "lora_alpha": (lambda v: isinstance(v, int | float) and v > 0, "a positive number"),
    "bits": (lambda v: v in (4, 8) and not isinstance(v, bool), "4 or 8"),
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
            sampled, derived = space.walk(
                cfg.search_space, cfg.distributions, lambda name, d, point=point: point[name], cfg.train
            )
        except space.DeriveError as e:
            key, _, message = str(e).partition(": ")
            path = tuple(key.split("."))
            found.setdefault(path, cfg.problem(path, f"{message} at {where}"))
            continue
        for name, value in derived.items():
            seen[name].setdefault(repr(value), value)
            check = _VALUE_RANGES.get(name)
            if check and not check[0](value):
                found.setdefault(
                    ("search_space", name, "derive"),
                    cfg.problem(
                        ("search_space", name, "derive"), f"gives {value!r} at {where}; {name} must be {check[1]}"
                    ),
                )
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
        found[("constraints",)] = cfg.problem(
            ("constraints",),
            "no corner of the space and none of 32 random points meets every constraint: no trial could run",
        )
    for i, entry in enumerate(cfg.enqueue):  # a queued configuration the constraints reject would never run
        try:
            sampled, derived = space.walk(
                cfg.search_space, cfg.distributions, lambda name, d, entry=entry: entry[name], cfg.train
            )
            broken = space.broken_constraint(cfg.constraint_expressions, {**cfg.train, **sampled, **derived})
        except KeyError:  # a partial entry: the sampler picks the rest
            continue
        except ValueError as e:  # a derive or a constraint fails there
            found.setdefault(("enqueue", i), cfg.problem(("enqueue", i), str(e)))
            continue
        if broken:
            found.setdefault(
                ("enqueue", i),
                cfg.problem(("enqueue", i), f"breaks the constraint {broken!r}: it would be rejected, never trained"),
            )
    cfg._derived_values = {name: list(values.values())[:20] for name, values in seen.items()}
    return list(found.values())


def _contains(d: BaseDistribution, value: Any) -> bool:
    return optuna_private.contains(d, value)  # Optuna's own membership test
