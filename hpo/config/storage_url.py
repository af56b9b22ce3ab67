"""``storage:`` checked as the run will read it, before anything connects: a database URL, not in memory,
options its driver takes, and for SQLite a path that means one file."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SAWarning

from hpo.config.compose import control_character, hidden_character, sqlite_misread
from hpo.errors import Problem

if TYPE_CHECKING:
    from hpo.config.models import StudyConfig


def storage_problems(cfg: StudyConfig) -> list[Problem]:
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
