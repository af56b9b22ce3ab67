"""Stage 2, compose: a study file's layers → one document (``extends:``, an environment, overrides, ``${VAR}``).

``extends:`` chains deep-merge (the extending file wins), ``search_space: FILE`` is inlined and relative
paths resolve against the file that wrote them (:func:`read_layers`); then the chosen ``environments:``
overlay, ``${VAR}`` from the environment or ``.env``, and the command line's dotted overrides go on top
(:func:`overlay`). Secret-looking variables' values are kept, for :func:`mask`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from sqlalchemy.engine import make_url

from hpo.config.parse import read_yaml
from hpo.errors import ConfigError, KeyPath, Problem, SourceMap, hidden

#: Keys that hold paths; a relative one resolves against the file that wrote it.
PATH_KEYS = (("data", "train"), ("data", "eval"), ("data", "test"), ("output_dir",))
#: Top-level keys a study file may give as one value, and the key that value stands for: ``model: NAME`` is
#: ``{name: NAME}``, ``eval_every: 0.25`` is ``{epochs: 0.25}``. An override or environment that sets a key inside
#: one adds to it (:func:`overlay`; the models read them as well) instead of dropping the value.
SHORTHANDS = {"model": "name", "eval_every": "epochs", "checkpoint_every": "epochs"}
#: TrainingArguments fields that hold a credential: never exported, masked wherever saved (``masked_data``).
CREDENTIALS = ("hub_token",)
#: The only keys a secret-looking ``${VAR}`` may fill: what a library takes as a credential and hpo masks wherever
#: it prints or saves it (in ``storage``, only the URL's password). Anywhere else the value would become a name, a
#: path, a URL or a setting that is stored, printed, logged by libraries or sent to the hub: it is refused.
SECRET_KEYS = (("storage",), *(("train", name) for name in CREDENTIALS))
#: Keys of which a mapping holds one: setting one in an override or environment drops the others.
ONE_OF = {"eval_every": ("epochs", "examples"), "checkpoint_every": ("epochs", "examples")}


def read_layers(
    path: Path,
    seen: tuple[Path, ...],
    document: tuple[Any, SourceMap] | None = None,
) -> tuple[dict[str, Any], SourceMap]:
    """One study file (or ``document``, a dict parsed as if it were the file ``path``) with its ``extends:``
    chain merged under it: (data, source map).

    A ``search_space: FILE`` is inlined, and relative paths (data files, ``output_dir``, a SQLite
    ``storage``) are made absolute against the file that wrote them, before layers merge.

    Raises:
        ConfigError: a file that cannot be read or parsed, a missing base, files that extend each other.
    """
    raw, source = document or read_yaml(path)  # first: it refuses a symlink loop, which resolve() raises on
    if path.resolve() in seen:
        chain = " → ".join(p.name for p in (*seen, path.resolve()))
        raise ConfigError([Problem(str(path), None, "extends", f"files extend each other in a cycle: {chain}")])
    if not isinstance(raw, dict):
        raise ConfigError([source.problem((), "a study file is a YAML mapping of keys")])
    if isinstance(raw.get("search_space"), str):
        _inline_search_space(raw, source, path.parent)
    for layer in (raw, *(v for v in (raw.get("environments") or {}).values() if isinstance(v, dict))):
        _absolute_paths(layer, path.parent.absolute())
        if seen:  # an extends: base's model folder is beside the base (the study's own resolves beside it anyway)
            _absolute_model(layer, path.parent.absolute())
    base = raw.pop("extends", None)
    if base is None:
        return raw, source
    base_path = Path(os.path.normpath(path.parent / str(base)))
    if not isinstance(base, str) or not base_path.is_file():
        raise source.error(("extends",), f"file not found: {base_path}")
    base_raw, merged_source = read_layers(base_path, (*seen, path.resolve()))
    merged_source.update(source)  # the extending file's lines win
    return _deep_merge(base_raw, raw), merged_source


def overlay(
    path: Path,
    layers: dict[str, Any],
    source: SourceMap,
    env: str | None,
    overrides: Mapping[str, Any],
    strict_variables: bool = True,
    overrides_label: str = "<command line>",
) -> tuple[dict[str, Any], SourceMap, frozenset[str]]:
    """The environment ``env`` and the dotted ``overrides`` over the merged ``layers``, ``${VAR}`` expanded.

    Returns the composed document, its source map (overrides point at ``overrides_label``) and the values
    of secret-looking variables, to mask. ``layers`` and ``source`` are left as they were. Not
    ``strict_variables``: an unset variable's value is left out (another run sets it, and checks it).

    Raises:
        ConfigError: an unknown or malformed environment, an unset variable, a secret naming the study,
            an override of ``extends``/``environments``.
    """
    raw, source = copy.deepcopy(layers), source.copy()
    if env is not None:
        environments = raw.get("environments")
        defined = ", ".join(environments) if isinstance(environments, dict) and environments else "none"
        if not isinstance(environments, dict) or env not in environments:
            raise source.error(("environments",), f"no environment {env!r} (defined: {defined})")
        if not isinstance(environments[env], dict):
            raise source.error(("environments", env), "an environment is a mapping of study keys")
        if "extends" in environments[env]:
            raise source.error(
                ("environments", env, "extends"), "extends: belongs at the top of a study file, not in an environment"
            )
        raw = _deep_merge(raw, environments[env])
        source.update(source.subtree(("environments", env)))
    raw, secrets = _expand_variables(raw, path.parent / ".env", source, strict_variables)
    for key, value in overrides.items():
        if key.split(".")[0] in ("extends", "environments"):
            raise ConfigError(
                [
                    Problem(
                        overrides_label,
                        None,
                        key,
                        f"cannot be set from {_where(overrides_label)} (write it in the study file)",
                    )
                ]
            )
        *parents, leaf = key.split(".")
        node = raw
        if parents:  # model.lora.r=4 adds to `model: NAME`, eval_every.subsample=1 to `eval_every: 0.25`
            raw[parents[0]] = _widened(parents[0], raw.get(parents[0]), [(parents[1:] or [leaf])[0]])
        for k in parents:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[leaf] = value
        source.add((*parents, leaf), overrides_label, None)
    return raw, source, secrets


def _where(label: str) -> str:
    return "the command line" if label == "<command line>" else "hpo.run's arguments"


def mask(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret, as written or as JSON and ``repr`` escape it, replaced by ``***``.

    >>> mask("postgresql://hpo:hunter2@db/hpo", {"hunter2"})
    'postgresql://hpo:***@db/hpo'
    """
    for secret in secrets:
        for spelling in {
            secret,
            json.dumps(secret)[1:-1],
            json.dumps(secret, ensure_ascii=False)[1:-1],
            repr(secret)[1:-1],
        }:
            text = text.replace(spelling, "***")
    return text


def _absolute_paths(layer: dict[str, Any], folder: Path) -> None:
    for *parents, leaf in PATH_KEYS:
        node = layer
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and not node[leaf].startswith("${"):
            node[leaf] = os.path.normpath(folder / node[leaf])  # a path from ${VAR} resolves against the study file
    if isinstance(layer.get("storage"), str):
        layer["storage"] = absolute_sqlite(layer["storage"], folder)


def _absolute_model(layer: dict[str, Any], folder: Path) -> None:
    """A model or tokenizer named by a folder beside the file: that folder, absolute (else it is a hub id)."""
    model = layer.get("model")
    for node, key in [(layer, "model")] if isinstance(model, str) else [(model, "name"), (model, "tokenizer")]:
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and not value.startswith("${") and (folder / value).is_dir():
            node[key] = os.path.normpath(folder / value)


def absolute_sqlite(url: str, folder: Path) -> str:
    """``sqlite:///x.db`` with ``x.db`` made absolute against ``folder``, and an absolute one normalized
    (``/a//b/../x.db`` → ``/a/x.db``); any other URL as it is.

    A relative SQLite path would otherwise name another file from every folder hpo is run in; and one file
    spelt two ways would be two storages to the output folder's owner check.
    """
    if not url.startswith("sqlite:///") or "${" in url or sqlite_misread(url) or control_character(url):
        return url  # as written: validation names what is wrong with it
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - the storage check reports a malformed URL
        return url
    if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return url
    return parsed.set(database=os.path.normpath(folder.absolute() / parsed.database)).render_as_string(
        hide_password=False
    )


def control_character(text: str) -> str:
    """The first control character of ``text``, quoted (``'\\x00'``, ``'\\n'``); empty when there is none."""
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    return "" if bad is None else f"control character {bad!r}"


def hidden_character(text: str) -> str:
    """The first character of ``text`` that prints as nothing or as another (:func:`hpo.errors.hidden`: a
    right-to-left override, a zero-width or no-break space), by code point and name; empty when there is none."""
    bad = next((c for c in text if hidden(c)), None)
    return "" if bad is None else f"U+{ord(bad):04X} {unicodedata.name(bad, unicodedata.category(bad))}"


def sqlite_misread(url: str) -> str:
    """Why SQLAlchemy (or another reader of URLs) would read the SQLite URL ``url`` as another file than written;
    empty when it would not.

    ``?`` starts the options (``sqlite:///a?b.db`` is the file ``a``), ``%XX`` is an escape (``a%41.db`` is
    ``aA.db``; SQLAlchemy's own escaping, ``100%25``, is read back as written), and ``#`` starts a fragment to
    every other reader of URLs.
    """
    if not url.startswith("sqlite"):
        return ""
    path, question, query = url.partition("://")[2].partition("?")
    path = path.removeprefix("/")
    if "#" in path:
        return "'#' in the SQLite path: a URL reads it as the start of a fragment; rename the file or folder"
    try:
        database = make_url(url).database or ""
    except Exception:  # noqa: BLE001 - not a URL: the storage check says so
        return ""
    if path not in (database, sqlite_quote(database), urllib.parse.quote(database, safe=" +/")):
        return f"'%' in the SQLite path is an escape: SQLAlchemy reads the file {database!r}; rename the file or folder"
    if question and any("=" not in item for item in query.split("&")):
        return f"'?' starts the URL's options, and {query!r} is not name=value options: a SQLite path cannot hold '?'"
    return ""


def sqlite_quote(path: str) -> str:
    """``path`` as the path of a ``sqlite:///`` URL, read back by SQLAlchemy as it is (see :func:`sqlite_misread`)."""
    return path.replace("%", "%25").replace("?", "%3F").replace("#", "%23")


def _widened(key: str, value: Any, setting: Iterable[str]) -> Any:
    """Top-level ``key``'s ``value`` as a mapping that an overlay setting the keys ``setting`` inside it merges into.

    A shorthand (:data:`SHORTHANDS`) becomes the mapping it stands for, and of keys that
    exclude each other (:data:`ONE_OF`: ``epochs`` or ``examples``) the ones the overlay does
    not set are dropped. Anything else that is not a mapping is left to be replaced, as before.
    """
    if key in SHORTHANDS and value is not None and not isinstance(value, dict | list):
        value = {SHORTHANDS[key]: value}
    if not isinstance(value, dict):
        return value
    setting = set(setting)
    alternatives = ONE_OF.get(key, ())
    if setting & set(alternatives):
        value = {k: v for k, v in value.items() if k not in alternatives or k in setting}
    return value


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any], top: bool = True) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key (a shorthand too, :func:`_widened`), anything else
    is replaced."""
    merged = dict(base)
    for key, value in over.items():
        if top and isinstance(value, dict) and key in merged:
            merged[key] = _widened(key, merged[key], value)
        both = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = _deep_merge(merged[key], value, top=False) if both else value
    return merged


def _inline_search_space(raw: dict[str, Any], source: SourceMap, root: Path) -> None:
    """Replace ``search_space: path.yaml`` by that file's ``search_space`` mapping.

    The file's ``enqueue:`` (its rule-of-thumb starting points) is used when the study has none.
    """
    ref = root / raw["search_space"]
    if not ref.is_file():
        raise source.error(("search_space",), f"file not found: {ref}")
    data, ref_source = read_yaml(ref)
    if not isinstance(data, dict) or not isinstance(data.get("search_space"), dict):
        raise ConfigError([Problem(str(ref), 1, "", "a search-space file holds a 'search_space:' mapping")])
    unknown = sorted(set(data) - {"search_space", "enqueue"})
    if unknown:
        raise ref_source.error((unknown[0],), "unknown key in a search-space file (only 'search_space' and 'enqueue')")
    raw["search_space"] = data["search_space"]
    if "enqueue" in data and "enqueue" not in raw:
        raw["enqueue"] = data["enqueue"]
    source.update(ref_source)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|KEY", re.IGNORECASE)


_ONLY_PASSWORD = "it can only be the URL's password (postgresql://user:${VAR}@host/db)"
#: Why a secret cannot fill a key, by the top-level key.
_NOT_SECRET_WHY = {
    "study": "it cannot name a study",  # the name is a folder and a database key, printed everywhere
    "model": "it cannot name a model (a hub id goes into download URLs and the hub's warnings)",
    "data": "it cannot be in a data path or column name (they are printed and saved)",
    "output_dir": "it cannot be in a path (paths are printed and saved)",
    "search_space": "it cannot be a searched value (values are saved in the study and its reports)",
    "enqueue": "it cannot be a searched value (values are saved in the study and its reports)",
}


def _not_a_credential(at: KeyPath) -> str:
    why = _NOT_SECRET_WHY.get(str(at[0]), "it cannot be a setting (settings are saved, printed and logged)")
    return f"{why}; a secret goes only in {' or '.join(['the storage password', *(f'train.{k}' for k in CREDENTIALS)])}"


def _in_password(template: str, env: Mapping[str, str | None], name: str) -> bool:
    """Whether ``${name}`` in the storage URL ``template`` lies in the URL's password.

    Elsewhere it names a database file, a host or a database: a name, masked or not.
    """
    probe = "hpoSecretProbe"

    def fill(m: re.Match) -> str:
        return probe if m.group(1) == name else env.get(m.group(1)) or m.group(0)

    try:
        url = make_url(_VARIABLE.sub(fill, template))
    except Exception:  # noqa: BLE001 - not a URL: validation reports it, masked
        return True
    return probe not in url.render_as_string(hide_password=True)


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
            if at not in SECRET_KEYS:
                problems.append(source.problem(at, f"${{{m.group(1)}}} is a secret: {_not_a_credential(at)}"))
                return m.group(0)
            if at == ("storage",) and not _in_password(node, env, m.group(1)):
                problems.append(source.problem(at, f"${{{m.group(1)}}} is a secret: in storage, {_ONLY_PASSWORD}"))
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
