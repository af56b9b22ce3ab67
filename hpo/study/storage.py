"""Storages: open or create a study in SQLite or PostgreSQL under a cross-process lock, and read it back."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from hpo import samplers, space
from hpo.attrs import CONFIG, REVISIONS
from hpo.config import StudyConfig
from hpo.errors import ConfigError, StorageLost
from hpo.study import ordered, revisions
from hpo.study.artifacts import save_study_note

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SQLITE_TIMEOUT_S = 60  # wait this long for another writer's lock instead of "database is locked"
SETUP_LOCK_KEY = 0x68706F  # "hpo": the PostgreSQL advisory lock around storage and study setup


def open_study(
    cfg: StudyConfig,
    first_step: int = 1,
    last_step: int | None = None,
    worker: int | None = None,
    fingerprint: dict[str, Any] | None = None,
    allow_changes: bool = False,
    workers: int = 1,
) -> optuna.Study:
    """Create the study in its storage, or load it if it exists, and queue the file's ``enqueue:`` entries.

    Safe when workers on one machine or many start at once: see :func:`_setup_lock`. ``fingerprint``
    (:func:`hpo.study.revisions.fingerprint`) is checked against the study's: a study file that changed what
    its trials mean is refused, or with ``allow_changes`` recorded as a new revision.

    The sampler's seed is ``sampler.seed`` for the first process of a new study; worker ``k`` of
    ``hpo run --workers`` and a resumed study get a seed derived from it, the worker and the trials
    already in the study: the same seed everywhere would have every worker sample the same
    configurations, and a resumed study replay the ones it ran first. Under ``workers`` > 1 with a seed, the
    sampler and pruner are :mod:`hpo.study.ordered`'s: the same trials on every run, whatever finishes first.

    Raises:
        ConfigError: the storage cannot be opened (server unreachable, no driver, no such folder), or the
            study file changed what the study's trials mean.
    """
    url = cfg.storage_url
    try:
        with _setup_lock(url):
            study = optuna.create_study(
                storage=rdb_storage(cfg),
                study_name=cfg.study,
                directions=cfg.directions,
                sampler=optuna.samplers.RandomSampler(),  # replaced below, once the trials already run are known
                pruner=samplers.make_pruner(cfg.pruner.name, cfg.pruner.args, first_step, last_step),
                load_if_exists=True,
            )
            n_before = len(study.get_trials(deepcopy=False))
            before = study.user_attrs.get(REVISIONS)
            if fingerprint is not None:
                revisions.check(study, cfg, fingerprint, allow_changes)
            if CONFIG not in study.user_attrs or study.user_attrs.get(REVISIONS) != before:
                # the resolved file of the latest revision: what the report and the dashboard note show
                resolved = resolved_config(cfg)
                study.set_user_attr(CONFIG, resolved)
                save_study_note(study, resolved)
            # A configuration already queued or tried is not queued again. The grid sampler runs every grid
            # point anyway, and would not count an enqueued one as visited: it would run twice.
            for params in cfg.enqueue if cfg.sampler.name != "grid" else ():
                study.enqueue_trial(params, skip_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError, sqlite3.Error) as e:
        raise _cannot_open(cfg, e) from None
    sampler_args = dict(cfg.sampler.args)
    if workers > 1 and sampler_args.get("seed") is not None:  # reproducible in parallel: see hpo.study.ordered
        if cfg.sampler.name == "tpe":
            sampler_args.setdefault("constant_liar", True)  # the trials of a batch apart, not all at TPE's mode

        def make(seed: int) -> optuna.samplers.BaseSampler:
            # grid and qmc walk one seeded sequence (a shuffled grid, a scrambled one): every trial the same seed
            seed = sampler_args["seed"] if cfg.sampler.name in ("grid", "qmc") else seed
            return samplers.make_sampler(cfg.sampler.name, {**sampler_args, "seed": seed}, cfg.distributions)

        def walk(trial: optuna.Trial) -> None:
            space.sample(trial, cfg.search_space, cfg.distributions, cfg.train)

        study.sampler = ordered.OrderedSampler(make, sampler_args["seed"], workers, walk)
        study.pruner = ordered.OrderedPruner(study.pruner, workers)
        return study
    if sampler_args.get("seed") is not None and (worker or n_before):
        sampler_args["seed"] = int(
            np.random.SeedSequence([sampler_args["seed"], worker or 0, n_before]).generate_state(1)[0]
        )
    study.sampler = samplers.make_sampler(cfg.sampler.name, sampler_args, cfg.distributions)
    return study


def _cannot_open(cfg: StudyConfig, e: Exception) -> ConfigError:
    reason = cfg.masked(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return cfg.error(("storage",), f"cannot open {cfg.storage_label}: {reason}")


def rdb_storage(cfg: StudyConfig) -> optuna.storages.RDBStorage:
    url = cfg.storage_url
    # A pooled connection that the server dropped while it sat idle (a restart, an idle timeout, a failover)
    # is replaced when it is next checked out, instead of failing the trial that happened to use it.
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if make_url(url).get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        if database := make_url(url).database:
            _refuse_foreign(cfg, database)
            # WAL lets readers (the dashboard, hpo report) and N local workers share the file: readers no
            # longer block the writer, and a commit is one append. The mode is stored in the file.
            with contextlib.closing(sqlite3.connect(database, timeout=SQLITE_TIMEOUT_S)) as db:
                db.execute("PRAGMA journal_mode=WAL")
    # Heartbeats: a trial whose worker died (kill -9, OOM killer, preemption) goes stale; the next worker
    # to start a trial marks it FAIL and queues a retry with the same params.
    with warnings.catch_warnings():  # heartbeats have been "experimental" since optuna 2.8; hpo relies on them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _Storage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
        )


def check_storage(cfg: StudyConfig) -> None:
    """What opening the storage would refuse, found without creating or writing anything: a SQLite file that is
    not a database or holds another program's tables, a server that cannot be reached, a driver not installed.

    Raises:
        ConfigError: the storage cannot be opened, as :func:`open_study` would say it.
    """
    url = make_url(cfg.storage_url)
    try:
        if url.get_backend_name() == "sqlite":
            if url.database:
                _refuse_foreign(cfg, url.database)
            return
        engine = sqlalchemy.create_engine(cfg.storage_url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError, sqlite3.Error) as e:
        raise _cannot_open(cfg, e) from None


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, whose heartbeat survives a write that fails (a full disk, a server restarting).

    Optuna's heartbeat thread ends at the first error, with a traceback printed over the run's lines; the trial
    then goes stale while it trains, and another worker fails it. A missed beat is retried at the next interval.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
            super().record_heartbeat(trial_id)


def _refuse_foreign(cfg: StudyConfig, database: str) -> None:
    """Refuse a SQLite file that holds another program's tables: Optuna would add its own to it and fail
    on a table of the same name. Read without writing (not even a journal).

    Raises:
        ConfigError: the file has tables and not Optuna's.
    """
    if not Path(database).is_file() or Path(database).stat().st_size == 0:
        return
    with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(database)}?mode=ro", uri=True)) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and not {"studies", "alembic_version"} <= tables:
        shown = ", ".join(sorted(tables)[:5]) + (", …" if len(tables) > 5 else "")
        raise cfg.error(
            ("storage",),
            f"{cfg.storage_label} holds another program's tables ({shown}), not an Optuna storage: name a new file",
        )


@contextlib.contextmanager
def _setup_lock(url: str):
    """Hold a cross-process lock while the storage and the study are set up.

    ``create_study(load_if_exists=True)`` alone is race-free, but two more steps are check-then-act:
    creating the tables of a fresh database (two nodes both try, one fails on a duplicate), and
    ``enqueue_trial(skip_if_exists=True)`` (both queue the same configuration). Optuna has no lock for
    these, so hpo takes one: a PostgreSQL advisory lock, or ``flock`` on the SQLite file's folder.
    Other databases go without.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SETUP_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SETUP_LOCK_KEY})
        finally:
            engine.dispose()
    elif parsed.get_backend_name() == "sqlite" and parsed.database:
        # The folder, not the file: closing any descriptor of the database file drops every POSIX lock
        # the process holds on it, SQLite's included (https://sqlite.org/howtocorrupt.html, 2.2).
        folder = os.open(Path(parsed.database).parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # releases the flock
    else:
        yield


def load_existing(cfg: StudyConfig) -> optuna.Study:
    """The study as ``hpo run`` left it; never creates a storage or a study.

    Raises:
        ConfigError: no such storage or study yet.
    """
    url = cfg.storage_url
    hint = "run hpo.run(study) first" if cfg.from_dict else f"run `hpo run {cfg.file}` first"
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not (parsed.database and Path(parsed.database).is_file()):
        raise cfg.error(("storage",), f"no storage at {cfg.storage_label}: {hint}")
    try:
        # Optuna's storage creates its tables when it opens a database: reading commands must create nothing.
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            found = sqlalchemy.inspect(engine).has_table("studies")
        finally:
            engine.dispose()
        if not found:
            raise KeyError(cfg.study)
        study = optuna.load_study(study_name=cfg.study, storage=url)
        revisions.check_objective(study, cfg)
        return study
    except KeyError:
        raise cfg.error(("study",), f"no study {cfg.study!r} in {cfg.storage_label}: {hint}") from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
        raise _cannot_open(cfg, e) from None


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The study's best complete trial (with several objectives: on the first); among equal values, the earliest.

    Optuna's ``study.best_trial`` returns whichever of several equal values the database lists first:
    the report, ``best_model/`` and ``hpo best`` must all name the same one.

    Raises:
        ValueError: no complete trial.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError("no complete trial")
    return min(complete, key=rank_key(study))


def rank_key(study: optuna.Study):
    """The order of ``study``'s complete trials, best first: the first objective (with several, the Pareto front is
    ``study.best_trials``) oriented by its direction, then the earlier trial among equal values."""
    sign = orientation(study)
    return lambda t: (sign * t.values[0], t.number)


def orientation(study: optuna.Study) -> int:
    """1 when lower is better on the study's first objective, -1 when higher is: ``sign * value``, lower is better."""
    return 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1


def resolved_config(cfg: StudyConfig) -> dict[str, Any]:
    """The study file as hpo understood it: defaults filled, paths absolute, storage masked."""
    data = cfg.model_dump(mode="json", exclude_none=True, exclude={"extends", "environments"})
    data["storage"] = cfg.storage_label
    if cfg.environment:
        data["environment"] = cfg.environment
    return cfg.masked_data(data)


def storage_error(e: BaseException, label: str = "") -> str:
    """``Type: message``; for a storage error, its cause (Optuna's own text blames "invalid data"); for a full
    disk, ``the disk is full: cannot write FILE`` (or the storage ``label``), whatever raised it."""
    if full := full_disk_reason(e, label or "of the study"):
        return full
    if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
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
        if isinstance(e, optuna.exceptions.StorageInternalError | sqlalchemy.exc.SQLAlchemyError | sqlite3.Error):
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
        self.cfg, self.name, self.study_id = cfg, study.study_name, study._study_id
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
