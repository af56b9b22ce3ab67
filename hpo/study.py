"""Create or resume the Optuna study and run trials until it holds ``n_trials``."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import make_url

from hpo import revisions, samplers, space
from hpo.config import StudyConfig
from hpo.errors import ConfigError
from hpo.best import best_trial
from hpo.plan import make_plan
from hpo.dashboard import artifact_store, save_study_note, upload_json
from hpo.trial import TrialResult, Workbench, prepare, release, replace_folder, run_trial, save_model

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SAVE_ERROR = "save_error"  # trial user attr: why a winning trial's model was not saved
REJECTED_DUPLICATE = "rejected_duplicate"  # trial user attr: the finished trial whose parameters it repeated
MAX_REJECTED_IN_A_ROW = 100  # constraints that leave almost no feasible space
SQLITE_TIMEOUT_S = 60  # wait this long for another writer's lock instead of "database is locked"
WAIT_POLL_S = 1.0  # how often a worker waiting for trials running elsewhere looks again (two small queries)
SETUP_LOCK_KEY = 0x68706F  # "hpo": the PostgreSQL advisory lock around storage and study setup


def open_study(cfg: StudyConfig, first_step: int = 1, last_step: int | None = None,
               worker: int | None = None, fingerprint: dict[str, Any] | None = None,
               allow_changes: bool = False) -> optuna.Study:
    """Create the study in its storage, or load it if it exists, and queue the file's ``enqueue:`` entries.

    Safe when workers on one machine or many start at once: see :func:`_setup_lock`. ``fingerprint``
    (:func:`hpo.revisions.fingerprint`) is checked against the study's: a study file that changed what
    its trials mean is refused, or with ``allow_changes`` recorded as a new revision.

    The sampler's seed is ``sampler.seed`` for the first process of a new study; worker ``k`` of
    ``hpo run --workers`` and a resumed study get a seed derived from it, the worker and the trials
    already in the study: the same seed everywhere would have every worker sample the same
    configurations, and a resumed study replay the ones it ran first.

    Raises:
        ConfigError: the storage cannot be opened (server unreachable, no driver, no such folder), or the
            study file changed what the study's trials mean.
    """
    url = cfg.storage_url
    try:
        with _setup_lock(url):
            study = optuna.create_study(
                storage=_storage(cfg),
                study_name=cfg.study,
                direction=cfg.objective.direction,
                sampler=optuna.samplers.RandomSampler(),  # replaced below, once the trials already run are known
                pruner=samplers.make_pruner(cfg.pruner.name, cfg.pruner.args, first_step, last_step),
                load_if_exists=True,
            )
            n_before = len(study.get_trials(deepcopy=False))
            before = study.user_attrs.get(revisions.REVISIONS)
            if fingerprint is not None:
                revisions.check(study, cfg, fingerprint, allow_changes)
            if "config" not in study.user_attrs or study.user_attrs.get(revisions.REVISIONS) != before:
                # the resolved file of the latest revision: what the report and the dashboard note show
                resolved = resolved_config(cfg)
                study.set_user_attr("config", resolved)
                save_study_note(study, resolved)
            # A configuration already queued or tried is not queued again. The grid sampler runs every grid
            # point anyway, and would not count an enqueued one as visited: it would run twice.
            for params in cfg.enqueue if cfg.sampler.name != "grid" else ():
                study.enqueue_trial(params, skip_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError, sqlite3.Error) as e:
        raise _cannot_open(cfg, e) from None
    sampler_args = dict(cfg.sampler.args)
    if sampler_args.get("seed") is not None and (worker or n_before):
        sampler_args["seed"] = int(np.random.SeedSequence([sampler_args["seed"], worker or 0, n_before])
                                   .generate_state(1)[0])
    study.sampler = samplers.make_sampler(cfg.sampler.name, sampler_args, cfg.distributions)
    return study


def _cannot_open(cfg: StudyConfig, e: Exception) -> ConfigError:
    reason = cfg.masked(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return cfg.error(("storage",), f"cannot open {cfg.storage_label}: {reason}")


def _storage(cfg: StudyConfig) -> optuna.storages.RDBStorage:
    url = cfg.storage_url
    # A pooled connection that the server dropped while it sat idle (a restart, an idle timeout, a failover)
    # is replaced when it is next checked out, instead of failing the trial that happened to use it.
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if make_url(url).get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        if database := make_url(url).database:
            # WAL lets readers (the dashboard, hpo report) and N local workers share the file: readers no
            # longer block the writer, and a commit is one append. The mode is stored in the file.
            with contextlib.closing(sqlite3.connect(database, timeout=SQLITE_TIMEOUT_S)) as db:
                db.execute("PRAGMA journal_mode=WAL")
    # Heartbeats: a trial whose worker died (kill -9, OOM killer, preemption) goes stale; the next worker
    # to start a trial marks it FAIL and queues a retry with the same params.
    with warnings.catch_warnings():  # heartbeats have been "experimental" since optuna 2.8; hpo relies on them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
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
    hint = f"run `hpo run {cfg.file}` first"
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
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


def resolved_config(cfg: StudyConfig) -> dict[str, Any]:
    """The study file as hpo understood it: defaults filled, paths absolute, storage masked."""
    data = cfg.model_dump(mode="json", exclude_none=True, exclude={"extends", "environments"})
    data["storage"] = cfg.storage_label
    if cfg.environment:
        data["environment"] = cfg.environment
    return cfg.masked_data(data)


def _check_paths(cfg: StudyConfig) -> None:
    """Where the study writes must be writable, checked before anything is created there.

    Raises:
        ConfigError: the SQLite file's folder is missing, or the output folder cannot be created.
    """
    problems = []
    url = make_url(cfg.storage_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        folder = Path(url.database).parent
        if not folder.is_dir():
            problems.append(cfg.problem(("storage",), f"folder not found for the SQLite file: {folder}"))
        elif Path(url.database).is_dir():
            problems.append(cfg.problem(("storage",), f"{url.database} is a folder, not a SQLite file"))
    owner = _owner(cfg.output_path)
    if owner is not None and owner != _ownership(cfg):
        problems.append(cfg.problem(("output_dir",), f"{cfg.output_path} holds the outputs of study "
                                    f"{owner.get('study')!r} in {owner.get('storage')}; this study is in "
                                    f"{cfg.storage_label}: set output_dir, or use another study name"))
    existing = cfg.output_path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problems.append(cfg.problem(("output_dir",), f"cannot create {cfg.output_path}: {existing} is not a folder"))
    elif not os.access(existing, os.W_OK | os.X_OK):
        problems.append(cfg.problem(("output_dir",), f"cannot create {cfg.output_path}: {existing} is not writable"))
    if problems:
        raise ConfigError(problems)


OWNER_FILE = "hpo_study.json"  # in the output folder: the study and storage whose outputs it holds


def _ownership(cfg: StudyConfig) -> dict[str, str]:
    return {"study": cfg.study, "storage": cfg.storage_label}


def _owner(folder: Path) -> dict[str, Any] | None:
    """Which study and storage an output folder belongs to: two studies of one name in two storages (two
    study files, the default SQLite beside each) would otherwise mix their models and logs in one folder."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def start_study(cfg: StudyConfig, worker: int | None = None, bench: Workbench | None = None,
                allow_changes: bool = False) -> tuple[optuna.Study, Workbench]:
    """Check the model and data, then create or load the study; nothing is created if the check fails.

    ``bench``: the model and data already checked (by the CLI, or the parent of ``hpo run --workers``).
    ``allow_changes``: record a changed study file as a new revision instead of refusing it.

    Raises:
        ConfigError: the model, the data or the storage cannot be loaded, or the study file changed what
            the study's trials mean (see :mod:`hpo.revisions`).
    """
    bench = bench or prepare(cfg)
    _check_paths(cfg)
    n_train = len(bench.train_rows)
    # The run's length in examples, when every trial has the same (else Hyperband estimates it).
    varies = {"num_train_epochs", "max_steps"} & set(cfg.search_space) or "max_steps" in cfg.train
    last_step = None if varies else round(float(cfg.train.get("num_train_epochs", 3)) * n_train)
    try:
        fp = revisions.fingerprint(cfg, bench.data_files, (bench.model_path, bench.tokenizer_path))
    except OSError as e:
        raise cfg.error(("model",), f"cannot read the model's files to fingerprint them: {e.strerror or e}") from None
    study = open_study(cfg, round(cfg.eval_every.examples_between(n_train)), last_step, worker, fp,
                       allow_changes)
    try:
        cfg.output_path.mkdir(parents=True, exist_ok=True)
        if _owner(cfg.output_path) is None:
            (cfg.output_path / OWNER_FILE).write_text(json.dumps(_ownership(cfg), indent=2) + "\n")
        if worker is None:  # under hpo run --workers, the parent process wrote it
            (cfg.output_path / "resolved.yaml").write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))
        with _output_lock(cfg.output_path):
            _install_staged_best(cfg, study)
    except OSError as e:
        raise cfg.error(("output_dir",), f"cannot write {cfg.output_path}: {e.strerror or e}") from None
    return study, bench


class TrialsFailed(RuntimeError):
    """The run gave up: ``max_failures_in_a_row`` trials failed, or 100 samples were rejected, in a row."""

    def __init__(self, message: str, study: optuna.Study):
        super().__init__(message)
        self.study = study


def run_study(cfg: StudyConfig, console: Console | None = None, worker: int | None = None,
              bench: Workbench | None = None, allow_changes: bool = False) -> optuna.Study:
    """Run trials until the study holds ``cfg.n_trials`` finished (complete or pruned) trials.

    Trials that other processes run on the same storage count too: when the rest of the target is
    running elsewhere, this process waits for it (and retries any whose worker died). ``worker`` is
    this process's index under ``hpo run --workers`` (it prefixes the output lines), ``bench`` the model
    and data already checked, ``allow_changes`` as in :func:`start_study`. Returns the study.

    Raises:
        ConfigError: the model, the data or the storage cannot be loaded, or the study file changed.
        TrialsFailed: the run stopped after ``max_failures_in_a_row`` failed trials, or 100 rejected samples,
            in a row.
    """
    console = console or Console()
    study, bench = start_study(cfg, worker, bench, allow_changes)
    revision = study.user_attrs.get(revisions.REVISIONS, [{}])[-1].get("revision", 0)
    done = count_finished(study)
    if worker is None:
        console.print(f"[bold]{escape(cfg.study)}[/]: {done} finished trial(s) in {cfg.storage_label}; "
                      f"target {cfg.n_trials}" + (f"; revision {revision}" if revision else ""))
    progress = _Progress(console, cfg, worker)
    if cfg.n_trials > done:
        with sigterm_interrupts(), _frozen_heap():
            _optimize(study, _objective(bench, progress, revision), progress, cfg)
    if worker is None:
        print_summary(console, cfg, study)
    if progress.gave_up:
        raise TrialsFailed(progress.gave_up, study)
    return study


@contextlib.contextmanager
def _frozen_heap():
    """Keep the objects that live through the whole study (torch, transformers, the tokenized data) out of gc.

    Each trial starts (accelerate's ``free_memory``) and ends (hpo's ``release``) with ``gc.collect()``,
    which walks every tracked object: ~0.27 s per call with MiniLM loaded, measured with cProfile.
    ``gc.freeze()`` moves today's objects to a generation collections skip; ``unfreeze`` returns them.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a scheduler's stop, a preemption notice) ends the run like Ctrl-C: the trial ends FAIL, never RUNNING."""
    def interrupt(signum, frame):
        # Once: a second SIGTERM (systemd signalling the whole group, then the parent its workers) would land
        # in the clean-up of the first and leave the trial RUNNING, with no retry queued.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _optimize(study: optuna.Study, objective, progress: _Progress, cfg: StudyConfig) -> None:
    # One study.optimize call per trial, so that this worker starts a trial only while finished plus
    # running trials (on every worker) fall short of n_trials: N workers then overshoot the target only
    # when two of them start within the same instant, instead of by up to N-1 trials at the end.
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    while not progress.stopped and (deadline is None or time.monotonic() < deadline):
        states = [t.state for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))]
        running = states.count(TrialState.RUNNING)
        finished = len(states) - running
        if finished >= cfg.n_trials:
            return
        if finished + running < cfg.n_trials:
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,),
                               callbacks=[functools.partial(_after_tell, cfg), progress.trial_done])
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                if not _taken_over(study, progress):
                    raise
            continue
        # The rest of the target runs on other workers. Wait: one may fail (then this worker runs another)
        # or its worker may die (then its trial goes stale, and this worker retries it).
        progress.waiting(running)
        time.sleep(WAIT_POLL_S)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def _taken_over(study: optuna.Study, progress: _Progress) -> bool:
    """Whether this worker's trial was ended by another one while it ran: its heartbeat went stale (the process
    was paused, swapped out or starved), another worker marked it FAIL and queued a retry, and Optuna now
    refuses this worker's result. Says so in one line."""
    if progress.number < 0:
        return False
    trials = study.get_trials(deepcopy=False)
    if progress.number >= len(trials) or trials[progress.number].state != TrialState.FAIL:
        return False
    progress.print(f"trial {progress.number:3d} [yellow]taken over[/]: another worker found its heartbeat stale "
                   "and queued a retry; this run's result for it is dropped")
    return True


def _after_tell(cfg: StudyConfig, study: optuna.Study, trial: FrozenTrial) -> None:
    """Once a trial's value is stored: if its model was staged, install it when it is the study's best.

    Deciding after the value is stored, under the output folder's lock, is what keeps two workers that
    both beat the old best from leaving the worse model in ``best_model/``.
    """
    if _staged(cfg, trial.number).exists():
        with _output_lock(cfg.output_path):
            _install_staged_best(cfg, study)


class Rejected(Exception):
    """The sampled parameters break a ``constraints:`` entry, or repeat a finished trial: FAIL before training."""


def _objective(bench: Workbench, progress: _Progress, revision: int = 0):
    cfg = bench.cfg
    store = artifact_store(cfg)
    size = space.finite_size(cfg.search_space, cfg.distributions, cfg.train)

    def objective(trial: optuna.Trial) -> float:
        # Everything a trial does is inside this try, from sampling to saving: whatever fails, the trial
        # ends FAIL with its cause in fail_reason and fail_traceback ("interrupted" only after a signal).
        result = sampled = None
        try:
            # Optuna's Trial does not expose system attrs; optuna-integration reads them from the storage too.
            fixed = trial.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
            outside = _outside(fixed, cfg.distributions)
            if outside:  # queued under an earlier revision of the study file, or by hand
                trial.set_user_attr("rejected_enqueued", outside)
                raise Rejected(f"queued parameters outside the search space: {outside}")
            sampled, derived = space.sample(trial, cfg.search_space, cfg.distributions, cfg.train)
            params = {**sampled, **derived}
            trial.set_user_attr(revisions.REVISION, revision)
            if derived:
                trial.set_user_attr("derived_params", derived)
            broken = space.broken_constraint(cfg.constraint_expressions, {**cfg.train, **params})
            if broken:
                trial.set_user_attr("rejected_by_constraint", broken)
                raise Rejected(f"constraint not met: {broken}")
            twin = None if fixed is not None else _finished_twin(trial, sampled, size)
            if twin is not None:
                trial.set_user_attr(REJECTED_DUPLICATE, twin)
                raise Rejected(f"the same parameters as trial {twin}, which finished")
            progress.trial_start(trial.number, params)
            trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(),
                                           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
            plan = make_plan(cfg, params)
            args, rest = plan.exported(cfg)
            upload_json(store, trial, "config.json", {"study": cfg.study, "trial": trial.number,
                                                      "metric": cfg.objective.metric, "training_arguments": args, **rest})
            upload_json(store, trial, "training_arguments.json", args)  # TrainingArguments(**json.load(f))
            result = run_trial(bench, plan, trial, on_eval=progress.evaluated)
            for key, value in result.attrs.items():
                trial.set_user_attr(key, value)
            upload_json(store, trial, "metrics.json", {"evaluations": result.history, **result.attrs})
            if result.pruned:
                raise optuna.TrialPruned(f"pruned at step {result.attrs['pruned_at_step']}")
            _stage_if_best(bench, result, params, trial)
            return result.value
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL and re-raises
            trial.set_user_attr("fail_reason", "interrupted")
            if sampled is not None:
                trial.study.enqueue_trial(sampled, user_attrs={"retry_of": trial.number})  # the rerun starts with it
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", cfg.masked(_reason(e))[:1000])
            trial.set_user_attr("fail_traceback", cfg.masked(traceback.format_exc())[-4000:])
            raise
        finally:
            release(result)

    return objective


def _reason(e: BaseException) -> str:
    """``Type: message``; for a storage error, its cause (Optuna's own text blames "invalid data")."""
    if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
        cause = str(getattr(e.__cause__, "orig", None) or e.__cause__).strip().splitlines()
        return f"storage error: {cause[0] if cause else type(e.__cause__).__name__}"
    return f"{type(e).__name__}: {e}"


def _outside(fixed: dict[str, Any] | None, distributions: dict[str, Any]) -> str:
    """The queued parameters that the search space does not hold, as ``name=value`` (empty: none)."""
    bad = []
    for name, value in (fixed or {}).items():
        d = distributions.get(name)
        try:
            ok = d is not None and d._contains(d.to_internal_repr(value))  # Optuna's own membership test
        except (ValueError, TypeError):
            ok = False
        if not ok:
            bad.append(f"{name}={value!r}")
    return ", ".join(bad)


def _finished_twin(trial: optuna.Trial, sampled: dict[str, Any], size: int | None) -> int | None:
    """The finished trial that ``sampled`` repeats, unless the space is exhausted (queued trials may repeat).

    Samplers repeat configurations (a resumed seeded sampler replays its first draws; TPE on a small
    categorical space proposes its favourite again); a finished one would only be trained again.
    """
    finished = trial.study.get_trials(deepcopy=False, states=FINISHED)
    if size is not None and len({repr(sorted(t.params.items())) for t in finished}) >= size:
        return None
    return next((t.number for t in finished if t.params == sampled), None)


def _stage_if_best(bench: Workbench, result: TrialResult, params: dict[str, Any], trial: optuna.Trial) -> None:
    """Save the model aside if the trial beats every value stored so far; after its value is stored,
    :func:`_install_staged_best` decides, under a lock, whether it is the study's best.

    A trial that does not beat the stored best now can never become the best (later values only add
    rivals), so only possible winners are written. A failed save (a full disk) is a warning on the
    trial, which keeps its value; :func:`hpo.trial.save_model` removes the partial folder.
    """
    study = trial.study
    try:
        best = study.best_value
    except ValueError:  # no complete trial yet
        best = None
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    if best is not None and not (result.value < best if minimize else result.value > best):
        return
    try:
        save_model(bench, result, params, trial.number, _staged(bench.cfg, trial.number))
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error for the same full disk
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        trial.set_user_attr(SAVE_ERROR, bench.cfg.masked(f"the model was not saved: {reason}")[:500])
        with contextlib.suppress(OSError):  # when no other worker stages a model there
            _staged(bench.cfg, trial.number).parent.rmdir()


def _staged(cfg: StudyConfig, number: int) -> Path:
    return cfg.output_path / ".staged" / f"trial-{number:04d}"


@contextlib.contextmanager
def _output_lock(folder: Path):
    """``flock`` on the output folder: one process at a time decides and swaps ``best_model/``."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _install_staged_best(cfg: StudyConfig, study: optuna.Study) -> None:
    """Swap the best trial's staged model in as ``best_model/``; drop staged models that lost.

    Runs after each trial's value is stored and when a run starts (a process killed between storing a
    value and installing its model left it staged). Staged models of trials still running stay.
    Call it holding :func:`_output_lock`.
    """
    folder = cfg.output_path / ".staged"
    if not folder.is_dir():
        return
    try:
        best: FrozenTrial | None = best_trial(study)
    except ValueError:
        best = None
    trials = study.get_trials(deepcopy=False)
    for staged in sorted(folder.iterdir()):
        found = re.search(r"trial-(\d+)", staged.name)  # trial-0007, or .trial-0007.tmp.<pid> while being written
        number = int(found.group(1)) if found else -1
        if 0 <= number < len(trials) and trials[number].state == TrialState.RUNNING:
            continue
        if best is not None and number == best.number and staged.name.startswith("trial-"):
            replace_folder(staged, cfg.output_path / "best_model")
        else:
            shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


class _Progress:
    """One line per finished trial, and the running trial's last evaluation; decides when to stop."""

    def __init__(self, console: Console, cfg: StudyConfig, worker: int | None = None):
        self.console, self.metric, self.masked = console, cfg.objective.metric, cfg.masked
        self.max_failures = cfg.max_failures_in_a_row
        self.gave_up = ""  # why the run stopped, when failed or rejected trials in a row stopped it
        self.prefix = "" if worker is None else f"w{worker}: "
        self.failures_in_a_row = 0
        self.rejected_in_a_row = 0
        self.stopped = False
        self.waiting_for = 0  # trials running elsewhere that this worker last said it waits for
        self.best = ""  # " (best so far 0.1234)" once a trial completed
        # Several workers share one terminal: a live status line each would overwrite the others'.
        self.status = console.status("") if worker is None else None
        self.number = -1

    def print(self, line: str) -> None:
        self.console.print(self.masked(self.prefix + line))

    def trial_start(self, number: int, params: dict[str, Any]) -> None:
        self.number, self.waiting_for = number, 0
        if self.status:
            self.status.start()
            self.status.update(f"trial {number}: training…")

    def evaluated(self, step: int, value: float) -> None:
        if self.status:
            self.status.update(f"trial {self.number}: {self.metric} {value:.4f} after {step} examples{self.best}")

    def waiting(self, running: int) -> None:
        if running != self.waiting_for:
            self.print(f"[dim]waiting for {running} trial(s) running on other workers[/]")
            self.waiting_for = running

    def stop(self, why: str) -> None:
        self.print(f"[red]stopping: {why}[/]")
        self.stopped = True

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.status:
            self.status.stop()
        if {"rejected_by_constraint", REJECTED_DUPLICATE, "rejected_enqueued"} & set(trial.user_attrs):
            self.rejected_in_a_row += 1
            why = (f"{escape(trial.user_attrs['rejected_by_constraint'])} is false"
                   if "rejected_by_constraint" in trial.user_attrs
                   else f"repeats trial {trial.user_attrs[REJECTED_DUPLICATE]}" if REJECTED_DUPLICATE in trial.user_attrs
                   else f"queued with {escape(trial.user_attrs['rejected_enqueued'])}, outside the search space")
            self.print(f"trial {trial.number:3d} [dim]rejected before training: {why}[/]")
            if self.rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
                self.gave_up = (f"{self.rejected_in_a_row} samples in a row broke the constraints or repeated "
                                "finished trials: the feasible space looks exhausted")
                self.stop(self.gave_up)
            return
        self.rejected_in_a_row = 0
        counts = {s: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        for t in study.get_trials(deepcopy=False, states=tuple(counts)):
            counts[t.state] += 1
        tally = f"[dim]{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed[/]"
        secs = trial.user_attrs.get("train_seconds", 0)
        params = _fmt_params(trial.params)
        if trial.state == TrialState.COMPLETE:
            best = " [green]★ best[/]" if best_trial(study).number == trial.number else ""
            self.print(f"trial {trial.number:3d} [green]complete[/] {self.metric}={trial.value:.4f}{best} "
                       f"({secs:.0f}s)  {tally}\n{' ' * len(self.prefix)}    [dim]{params}[/]")
        elif trial.state == TrialState.PRUNED:
            at = trial.user_attrs.get("pruned_at_step", "?")
            self.print(f"trial {trial.number:3d} [yellow]pruned[/] at {at} examples ({secs:.0f}s)  {tally}\n"
                       f"{' ' * len(self.prefix)}    [dim]{params}[/]")
        else:
            reason = escape(trial.user_attrs.get("fail_reason", "no reason recorded"))
            self.print(f"trial {trial.number:3d} [red]failed[/]: {reason}  {tally}")
        if SAVE_ERROR in trial.user_attrs:
            self.print(f"    [yellow]warning[/]: {escape(trial.user_attrs[SAVE_ERROR])}")
        if trial.state == TrialState.COMPLETE:
            self.best = f" (best so far {study.best_value:.4f})"
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= self.max_failures:
            self.gave_up = (f"{self.failures_in_a_row} trials failed in a row (max_failures_in_a_row; "
                                        "see fail_reason / fail_traceback in the trials' user attrs)")
            self.stop(self.gave_up)


def saved_trial(cfg: StudyConfig) -> int | None:
    """The trial of this study whose model ``<outputs>/best_model`` holds, from its ``hpo_trial.json``."""
    try:
        info = json.loads((cfg.output_path / "best_model" / "hpo_trial.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("study") != cfg.study or info.get("storage", cfg.storage_label) \
            != cfg.storage_label:
        return None
    return info.get("trial")


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def print_summary(console: Console, cfg: StudyConfig, study: optuna.Study) -> None:
    try:
        best = best_trial(study)
    except ValueError:
        console.print("[red]no trial completed[/]")
        return
    revision = revisions.trial_revision(best)
    under = f" (revision {revision})" if study.user_attrs.get(revisions.REVISIONS, [{}])[-1].get("revision") else ""
    console.print(f"\n[bold]best[/] trial {best.number}{under}: {cfg.objective.metric}={best.value:.4f}")
    console.print(json.dumps(best.params, indent=2))
    saved = saved_trial(cfg)
    if saved != best.number:
        why = escape(best.user_attrs.get(SAVE_ERROR, "it was not saved by this run"))
        held = f"holds trial {saved}'s model" if saved is not None else "is empty"
        console.print(f"[yellow]warning[/]: best_model/ {held}, not trial {best.number}'s: {why}")
    console.print(cfg.masked(f"storage:    {cfg.storage_label}\noutputs:    {cfg.output_path}\n"
                             f"dashboard:  hpo dashboard {cfg.file}\n"
                             f"tensorboard: tensorboard --logdir {cfg.output_path / 'tensorboard'}"), markup=False)
