"""The pipeline: parse → compose → validate, for the chosen environment and, for their own lines, every other."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import yaml

from hpo.config import validate
from hpo.config.compose import absolute_sqlite, overlay, read_layers
from hpo.config.models import StudyConfig
from hpo.config.parse import parse_yaml
from hpo.errors import ConfigError, Problem, SourceMap

#: How problems name a study given as a dict (``hpo.run({...})``): there is no file or line to point at.
DICT = "<dict>"


def load_study(
    study: str | Path | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    env: str | None = None,
    overrides_label: str = "<command line>",
) -> StudyConfig:
    """Read, compose and validate a study file, or a dict shaped like one.

    Composition, in order: ``extends:`` base files (deep merge, the extending
    file wins), then the environment ``env`` from ``environments:``, then
    ``overrides`` — dotted key paths (``{"train.num_train_epochs": 1}``; a relative SQLite path in ``storage``
    is relative to the current folder, as ``hpo run --storage`` is).
    ``${VAR}`` comes from the environment, else from ``.env`` beside the study
    file. Relative paths resolve against the file that wrote them. A dict is read like a file in the
    current folder: its relative paths and ``.env`` are found there, its default storage is
    ``<study>.db`` there, and its problems name ``<dict>`` and the key. Problems in ``overrides`` name
    ``overrides_label``.

    Raises:
        ConfigError: with every problem found, each naming file, line and key.
    """
    overrides = dict(overrides or {})
    if isinstance(overrides.get("storage"), str):  # as --storage: a relative SQLite path names a file here
        overrides["storage"] = absolute_sqlite(overrides["storage"], Path.cwd())
    if isinstance(study, Mapping):
        path, document = Path(DICT), _document(study)  # its folder, ".", is made absolute at validation
    else:
        path, document = Path(study), None
    layers, source = read_layers(path, (), document)
    problems = []
    try:
        cfg = _build(path, layers, source, env, overrides or {}, overrides_label=overrides_label)
    except ConfigError as e:
        problems = list(e.problems)
    # The environments not chosen are checked too: a typo in prod should not wait for the prod run.
    environments = layers.get("environments")
    for name in environments if isinstance(environments, dict) else ():
        if name == env:
            continue
        overlay_lines = {source.locate(p) for p in source.paths_under(("environments", name))}
        try:
            _build(path, layers, source, name, overrides or {}, False, overrides_label)
        except ConfigError as e:
            problems += [
                Problem(
                    p.file,
                    p.line,
                    p.key if p.key.startswith(f"environments.{name}") else f"environments.{name}.{p.key}",
                    p.message,
                )
                for p in e.problems
                if (p.file, p.line) in overlay_lines
            ]
    if problems:  # a key every build validates (an environment's name) is reported once
        raise ConfigError(list(dict.fromkeys(problems)))
    return cfg


def plain(value: Any, label: str = DICT) -> Any:
    """``value`` as YAML could have written it: a ``Path`` becomes its text, a NumPy number or array its Python
    value or list; anything else that is not JSON-like (bytes, sets, objects) is refused.

    Raises:
        ConfigError: a value of another type, or a structure that contains itself (named ``label``).
    """

    def default(o: Any) -> Any:
        if isinstance(o, PurePath):
            return str(o)
        if type(o).__module__ == "numpy" and hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} {o!r:.60} is not a value a study file can hold")

    try:
        return json.loads(json.dumps(value, default=default))
    except (TypeError, ValueError, RecursionError) as e:  # ValueError: a circular reference
        raise ConfigError([Problem(label, None, "", f"not a study's value: {e}")]) from None


def _build(
    path: Path,
    layers: dict[str, Any],
    source: SourceMap,
    env: str | None,
    overrides: Mapping[str, Any],
    strict_variables: bool = True,
    overrides_label: str = "<command line>",
) -> StudyConfig:
    """Compose one environment and the overrides over the merged layers, and validate the result."""
    raw, source, secrets = overlay(path, layers, source, env, overrides, strict_variables, overrides_label)
    return validate.build(raw, source, path, env, secrets)


def _document(study: Mapping[str, Any]) -> tuple[Any, SourceMap]:
    """A dict as the parsed document of a file: the same limits as YAML (nesting, size; duplicate keys cannot
    happen), plain values only (see :func:`plain`), and a source map with no lines."""
    try:
        raw, lines = parse_yaml(yaml.safe_dump(plain(study), sort_keys=False), DICT)
    except ConfigError as e:  # the lines are the dump's, not the user's
        raise ConfigError([Problem(DICT, None, p.key, p.message) for p in e.problems]) from None
    source = SourceMap()
    source.default_file = DICT
    for key in lines.paths_under(()):
        source.add(key, DICT, None)
    return raw, source
