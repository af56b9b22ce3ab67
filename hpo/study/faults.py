"""Storage faults: what a storage error says, a full disk whichever layer raised it, and a storage that went away
while the study ran (docs/faults.md)."""

from __future__ import annotations

import errno
import os
import sqlite3
import urllib.parse

import optuna
import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

from hpo import optuna_private
from hpo.config import StudyConfig
from hpo.errors import StorageLost


def storage_error(e: BaseException, label: str = "") -> str:
    """``Type: message``; for a storage error, its cause (Optuna's own text blames "invalid data"); for a full
    disk, ``the disk is full: cannot write FILE`` (or the storage ``label``), whatever raised it."""
    if full := full_disk_reason(e, label or "of the study"):
        return full
    if isinstance(e, StorageInternalError) and e.__cause__ is not None:
        cause = str(getattr(e.__cause__, "orig", None) or e.__cause__).strip().splitlines()
        return f"storage error: {cause[0] if cause else type(e.__cause__).__name__}"
    return f"{type(e).__name__}: {e}"


DISK_FULL = "the disk is full"  # how a fail_reason, and the line that stops the run, begin when one is
SQLSTATE_DISK_FULL = "53100"  # PostgreSQL's disk_full


def disk_full(e: BaseException | None) -> tuple[str, str | None] | None:
    """When ``e`` (or an error it was raised from or during) is a full disk: the low-level error's text, and the
    file it names (an ``OSError``'s; None for a database's). None when it is not. Recognized: ``OSError`` ENOSPC
    or EDQUOT, SQLite's SQLITE_FULL ("database or disk is full"), PostgreSQL's ``disk_full``.

    Optuna wraps the driver's error in ``StorageInternalError`` (whose own text blames "max length"), and
    may raise ``AssertionError`` while handling it: the cause is found through ``__cause__``/``__context__``.
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for x in (e, getattr(e, "orig", None)):  # SQLAlchemy's DBAPIError holds the driver's in .orig
            if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
                return x.strerror or str(x), x.filename and str(x.filename)
            if isinstance(x, sqlite3.Error) and (
                getattr(x, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(x)
            ):
                return str(x), None
            if SQLSTATE_DISK_FULL in (getattr(x, "sqlstate", None), getattr(x, "pgcode", None)):
                return str(x).strip().splitlines()[0], None
        e = e.__cause__ or e.__context__
    return None


def full_disk_reason(e: BaseException, label: str) -> str | None:
    """``the disk is full: ...`` naming what could not be written (a file, else the storage ``label``); None when
    ``e`` is not a full disk."""
    if (full := disk_full(e)) is None:
        return None
    text, filename = full
    return f"{DISK_FULL}: cannot write {filename or f'the storage {label}'} ({text})"


def storage_problem(e: BaseException) -> BaseException | None:
    """The storage error in ``e``'s chain (Optuna's tell raises ``AssertionError`` while handling one), or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageInternalError | sqlalchemy.exc.SQLAlchemyError | sqlite3.Error):
            return e
        e = e.__cause__ or e.__context__
    return None


class StorageWatch:
    """Whether the study's storage is still the one the run opened, asked at each trial boundary.

    A SQLite file deleted or replaced while the run holds it open is not an error to SQLite: the open connections
    go on writing into the deleted file, and every trial would print complete and be lost. So the run records
    the file's identity (``st_dev``, ``st_ino``) once open, and at each boundary compares the path's; and it reads
    the study (and the trial just written) back through a new connection, which sees what the path or the
    server holds now: a study deleted from its storage, or tables dropped, show there. Only positive evidence
    counts: a server that does not answer for a moment is not a storage that is gone.
    """

    def __init__(self, cfg: StudyConfig, study: optuna.Study):
        self.cfg, self.name, self.study_id = cfg, study.study_name, optuna_private.study_id(study)
        url = make_url(cfg.storage_url)
        self.path = url.database if url.get_backend_name() == "sqlite" and url.database else None
        self.identity = _identity(self.path) if self.path else None

    def check(self, told: FrozenTrial | None = None) -> None:
        """Raise :class:`~hpo.errors.StorageLost` if the storage is not the one opened; ``told``: the trial just
        written (then named as lost with it).

        Raises:
            StorageLost: the SQLite file was deleted or replaced, or the study or ``told`` is not in the storage.
        """
        n = told.number if told is not None else None
        if self.path is not None:
            now = _identity(self.path)
            if now is None:
                among = f", trial {n} (finished since) among them" if n is not None else ""
                raise StorageLost(
                    f"the SQLite file {self.path} was deleted while the study ran: its trials went with it{among}; "
                    "nothing more is written (restore the file from a copy, or start a new study)"
                )
            if now != self.identity:
                lost = f": trial {n}, finished since, went to the old file and is lost" if n is not None else ""
                raise StorageLost(
                    f"the SQLite file {self.path} was replaced by another file while the study ran{lost}; "
                    "nothing more is written to either"
                )
        found = self._read_back(told)
        if found:
            lost = f": trial {n}, finished since, is lost" if n is not None else ""
            raise StorageLost(f"{found} in {self.cfg.storage_label} while the study ran{lost}; nothing more is written")

    def _read_back(self, told: FrozenTrial | None) -> str:
        """What is missing from the storage as a new connection sees it ("" when all is there, or it cannot tell)."""
        if self.path is not None:
            uri = f"file:{urllib.parse.quote(self.path)}?mode=ro"  # read-only: never creates a file
            engine = sqlalchemy.create_engine(
                "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=sqlalchemy.pool.NullPool
            )
        else:
            engine = sqlalchemy.create_engine(self.cfg.storage_url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                ids = conn.execute(
                    sqlalchemy.text("SELECT study_id FROM studies WHERE study_name = :name"), {"name": self.name}
                ).scalars()
                if self.study_id not in list(ids):
                    return f"the study {self.name!r} was deleted"
                if told is None:
                    return ""
                states = conn.execute(
                    sqlalchemy.text("SELECT state FROM trials WHERE study_id = :id AND number = :number"),
                    {"id": self.study_id, "number": told.number},
                ).scalars()
                if told.state.name not in list(states):
                    return f"trial {told.number} was not found as written ({told.state.name})"
                return ""
        except sqlalchemy.exc.ProgrammingError:  # PostgreSQL: the tables were dropped
            return "Optuna's tables were dropped"
        except sqlalchemy.exc.OperationalError as e:
            return "Optuna's tables were dropped" if "no such table" in str(e) else ""  # else: cannot tell now
        finally:
            engine.dispose()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
