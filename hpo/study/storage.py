"""Storages: open or create a study in SQLite or PostgreSQL under a cross-process lock, and read it back."""

from __future__ import annotations

import contextlib
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

from hpo import distributions, samplers
from hpo.attrs import CONFIG, REVISIONS
from hpo.config import StudyConfig
from hpo.errors import ConfigError
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
            distributions.sample(trial, cfg.search_space, cfg.distributions, cfg.train)

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
