"""The errors hpo raises: configuration problems that point at a file, a line and a key path, and two outcomes."""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a study file: ``FILE:LINE: key.path: message``."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return visible(f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}")


#: Unicode categories that print as nothing or as something else: controls, format characters (right-to-left
#: override, zero-width space), surrogates, private use, line and paragraph separators.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


def hidden(c: str) -> bool:
    """Whether the character ``c`` prints as nothing or as another: :data:`HIDDEN_CATEGORIES`, and a space other
    than U+0020 (a no-break space looks like one)."""
    category = unicodedata.category(c)
    return category in HIDDEN_CATEGORIES or (category == "Zs" and c != " ")


def visible(text: str) -> str:
    """``text`` with each :func:`hidden` character as its escape (``\\u202e``): a line quoting a file's name or key
    prints as one line, in its own order.

    >>> print(visible("study\\u202e: x"))
    study\\u202e: x
    """
    return "".join(c.encode("unicode_escape").decode() if hidden(c) else c for c in text)


class ConfigError(Exception):
    """Raised when a study file is wrong; carries every problem found, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


KeyPath = tuple[str | int, ...]


class SourceMap:
    """Maps key paths of a loaded YAML document to the file and line they came from.

    No YAML library keeps line numbers on the plain data it builds, so hpo walks
    the composed node tree once and remembers where each key stood.
    """

    def __init__(self) -> None:
        self._lines: dict[KeyPath, tuple[str, int | None]] = {}
        self.default_file = "<study>"

    def add(self, path: KeyPath, file: str | Path, line: int | None) -> None:
        self._lines[path] = (str(file), line)

    def update(self, other: SourceMap, prefix: KeyPath = ()) -> None:
        for path, where in other._lines.items():
            self._lines[prefix + path] = where

    def copy(self) -> SourceMap:
        other = SourceMap()
        other._lines, other.default_file = dict(self._lines), self.default_file
        return other

    def paths_under(self, prefix: KeyPath) -> list[KeyPath]:
        return [path for path in self._lines if path[: len(prefix)] == prefix]

    def subtree(self, prefix: KeyPath) -> SourceMap:
        """The entries under ``prefix``, with ``prefix`` taken off their paths."""
        sub = SourceMap()
        n = len(prefix)
        sub._lines = {path[n:]: where for path, where in self._lines.items() if path[:n] == prefix}
        return sub

    def locate(self, path: KeyPath) -> tuple[str, int | None]:
        """The file and line of ``path``, or of its closest ancestor that has one."""
        for end in range(len(path), -1, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        return self.default_file, None

    def problem(self, path: KeyPath, message: str) -> Problem:
        file, line = self.locate(path)
        return Problem(file, line, format_path(path), message)

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError([self.problem(path, message)])


def format_path(path: KeyPath) -> str:
    """``("search_space", "lr", "low")`` → ``search_space.lr.low``; list indexes as ``[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """A hint naming the closest of ``options`` to a misspelt ``name``, or ``""``.

    >>> did_you_mean("lerning_rate", ["learning_rate", "weight_decay"])
    "; did you mean 'learning_rate'?"
    """
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


class NoCompleteTrial(ValueError):
    """The study has no complete trial, so no best one."""


class TrialsFailed(RuntimeError):
    """The run gave up: ``max_failures_in_a_row`` trials failed, or 100 samples were rejected, in a row."""

    def __init__(self, message: str, study: Any):
        super().__init__(message)
        self.study = study  # the optuna.Study, as far as it got


class StorageLost(RuntimeError):
    """The run stopped: the study's storage went away (its SQLite file deleted or replaced, the study deleted) or
    its disk filled up while trials were written to it. The message says which, and what became of the trial."""
