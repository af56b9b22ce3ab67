"""The trial loop: create or resume the study, run trials until it holds ``n_trials``, and when to stop.

Each trial is :func:`hpo.study.objective.make_objective`'s; Ctrl-C and SIGTERM stop the loop between trials
(:mod:`hpo.trial.interrupts`)."""

from __future__ import annotations

import contextlib
import gc
import sqlite3
import time
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.markup import escape

from hpo import knobs, optuna_private
from hpo.attrs import FAIL_REASON, OUT_OF_MEMORY, REJECTIONS
from hpo.config import StudyConfig
from hpo.errors import StorageLost, TrialsFailed
from hpo.study import ordered, outputs, revisions
from hpo.study.faults import DISK_FULL, StorageWatch, full_disk_reason, storage_problem
from hpo.study.objective import make_objective
from hpo.study.progress import Progress, print_summary
from hpo.study.storage import FINISHED, count_finished, open_study
from hpo.trial import interrupts, memory, pack, trackers
from hpo.trial.workbench import Workbench, prepare, quiet

MAX_REJECTED_IN_A_ROW = 100  # constraints that leave almost no feasible space
MAX_OUT_OF_MEMORY_IN_A_ROW = 10  # trials that fit at no micro-batch: the space needs more memory than the device has
WAIT_POLL_S = 1.0  # how often a worker waiting for trials running elsewhere looks again (two small queries)


def start_study(
    cfg: StudyConfig,
    worker: int | None = None,
    bench: Workbench | None = None,
    allow_changes: bool = False,
    workers: int = 1,
) -> tuple[optuna.Study, Workbench]:
    """Check the model and data, then create or load the study; nothing is created if the check fails.

    ``bench``: the model and data already checked (by :func:`hpo.run`, or the parent of ``hpo run --workers``).
    ``allow_changes``: record a changed study file as a new revision instead of refusing it. ``workers``: how
    many run the study (``hpo run --workers``), the batch of :mod:`hpo.study.ordered`.

    Raises:
        ConfigError: the model, the data or the storage cannot be loaded, or the study file changed what
            the study's trials mean (see :mod:`hpo.study.revisions`).
    """
    bench = bench or prepare(cfg)
    outputs.check_paths(cfg)
    n_train = len(bench.train_rows)
    # The run's length in examples, when every trial has the same (else Hyperband estimates it).
    varies = {"num_train_epochs", "max_steps"} & set(cfg.search_space) or "max_steps" in cfg.train
    last_step = None if varies else round(float(knobs.training_value(cfg.train, "num_train_epochs")) * n_train)
    try:
        fp = revisions.fingerprint(cfg, bench.data_files, (bench.model_path, bench.tokenizer_path))
    except OSError as e:
        raise cfg.error(("model",), f"cannot read the model's files to fingerprint them: {e.strerror or e}") from None
    first_step = round(cfg.eval_every.examples_between(n_train))
    study = open_study(cfg, first_step, last_step, worker, fp, allow_changes, workers)
    outputs.prepare(cfg, study, resolved=worker is None)  # under hpo run --workers, the parent wrote resolved.yaml
    return study, bench


def run_study(
    cfg: StudyConfig,
    console: Console | None = None,
    worker: int | None = None,
    bench: Workbench | None = None,
    allow_changes: bool = False,
    workers: int = 1,
) -> optuna.Study:
    """Run trials until the study holds ``cfg.n_trials`` finished (complete or pruned) trials.

    Trials that other processes run on the same storage count too: when the rest of the target is
    running elsewhere, this process waits for it (and retries any whose worker died). ``worker`` is
    this process's index under ``hpo run --workers`` (it prefixes the output lines), ``bench`` the model
    and data already checked, ``allow_changes`` and ``workers`` as in :func:`start_study`. Returns the study.

    Raises:
        ConfigError: the model, the data or the storage cannot be loaded, or the study file changed.
        TrialsFailed: the run stopped after ``max_failures_in_a_row`` failed trials, or 100 rejected samples,
            in a row.
        StorageLost: the storage's SQLite file was deleted or replaced, the study deleted, or its disk filled up.
    """
    console = console or Console()
    study, bench = start_study(cfg, worker, bench, allow_changes, workers)
    watch = StorageWatch(cfg, study)
    memory.cap_cuda(cfg.resources.max_memory_gb)
    revision = revisions.current_revision(study)
    done = count_finished(study)
    if worker is None:
        console.print(
            f"[bold]{escape(cfg.study)}[/]: {done} finished trial(s) in {cfg.storage_label}; "
            f"target {cfg.n_trials}" + (f"; revision {revision}" if revision else "")
        )
    progress = Progress(console, cfg, worker)
    stop = StopRule(cfg.max_failures_in_a_row)
    tracking = trackers.Tracking(cfg)  # MLflow, W&B: each call bounded, off the thread a signal lands on
    if cfg.n_trials > done:
        objective = make_objective(bench, progress, revision, tracking)
        deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
        with interrupts.Guard(), tracking, _frozen_heap(), progress:
            if (k := _pack_size(cfg, study, bench, console)) > 1:
                _optimize_packed(k, bench, study, objective, progress, stop, cfg, watch, deadline)
            _optimize(study, objective, progress, stop, cfg, watch, deadline)
            interrupts.stop_if_asked()  # a signal after the last trial's last safe point still stops the run
    if worker is None:
        print_summary(console, cfg, study, tracking)
    if stop.gave_up:
        raise TrialsFailed(stop.gave_up, study)
    return study


@contextlib.contextmanager
def _frozen_heap():
    """Keep the objects that live through the whole study (torch, transformers, the tokenized data) out of gc.

    Each trial starts (accelerate's ``free_memory``) and ends (hpo's ``release``) with ``gc.collect()``,
    which walks every tracked object: ~0.27 s per call with MiniLM loaded, measured with cProfile.
    ``gc.freeze()`` moves today's objects to a generation collections skip; ``unfreeze`` returns them.
    A caller that froze objects itself keeps them frozen: ``unfreeze`` would return its objects too.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _pack_size(cfg: StudyConfig, study: optuna.Study, bench: Workbench, console: Console) -> int:
    """``resources.pack`` (``auto``: what ``hpo check`` measures here, said once), or 1 (said once) where this run
    cannot pack: trials whose base is built more than one way, or a seeded study's workers, which sample in order,
    each trial waiting for earlier ones (:mod:`hpo.study.ordered`), which a pack's turns cannot do."""
    k = cfg.resources.pack
    if k == 1:
        return 1
    if cfg.base_varies:
        why = f"search_space.{cfg.base_varies} builds the base model more than one way"
    elif isinstance(study.sampler, ordered.OrderedSampler):
        why = "seeded workers sample in order"
    elif k != "auto":
        return k
    elif bench.device != "cuda":
        why = "on the CPU a pack trains no faster (docs/performance.md)"
    else:
        k, why = _measured_pack(cfg, bench)
        console.print(f"resources.pack: auto trains {k} trial(s) at once: {why}", markup=False)
        return k
    console.print(f"resources.pack: {k} falls back to one trial at a time: {why}", markup=False)
    return 1


def _measured_pack(cfg: StudyConfig, bench: Workbench) -> tuple[int, str]:
    """``resources.pack: auto`` on this GPU: ``hpo check``'s hungriest corner measured here (its base stays resident
    for the first trial), or 1 where the check fails (the first trial says why again)."""
    from hpo.trial.preflight import check

    try:
        with quiet():
            report = check(cfg, bench)
    except Exception as e:  # noqa: BLE001 - a corner that cannot train: its trials fail and say why
        return 1, f"hpo check failed ({type(e).__name__}: {str(e).strip()[:200]})"
    return report.pack or 1, report.pack_why


def _optimize_packed(
    k: int, bench: Workbench, study: optuna.Study, objective, progress, stop, cfg, watch, deadline
) -> None:
    """Run trials ``k`` at a time as the lanes of one pack (:mod:`hpo.trial.pack`): each slot runs its next trial
    in a lane, until no trial is left to start here (what other workers still run, :func:`_optimize` waits for)."""
    group = pack.Pack(cfg.task, bench.tokenizer.pad_token_id)
    failed: list[BaseException] = []
    _fail_stale(study)  # a killed run's trials: queued again now, they train in the pack (from their checkpoints)

    def slot() -> None:
        while not failed:
            try:
                with group.lane():  # everything a trial does, in the lane's turns: one trial's code at a time
                    if failed or _optimize(study, objective, progress, stop, cfg, watch, deadline, one=True) != "ran":
                        return
            except BaseException as e:  # noqa: BLE001 - the run's thread raises it, once every slot ended
                failed.append(e)

    try:
        pack.slots(k, slot)
    except BaseException as e:  # a second Ctrl-C: the run ends now
        failed.append(e)  # no slot starts another trial
        raise
    if failed:
        raise failed[0]


def _optimize(
    study: optuna.Study,
    objective,
    progress: Progress,
    stop: StopRule,
    cfg: StudyConfig,
    watch: StorageWatch,
    deadline: float | None,
    one: bool = False,
) -> str:
    """Run trials until the study holds ``cfg.n_trials`` finished ones ("done"), or the deadline or the stop rule
    ends the run. ``one``: run at most one trial, "ran"; "wait" when the rest of the target runs elsewhere."""

    # One study.optimize call per trial, so that this worker starts a trial only while finished plus
    # running trials (on every worker) fall short of n_trials: N workers then overshoot the target only
    # when two of them start within the same instant, instead of by up to N-1 trials at the end.
    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        watch.check(trial)  # before anything prints it complete, or installs its model
        if trial.state == TrialState.FAIL and (reason := trial.user_attrs.get(FAIL_REASON, "")).startswith(DISK_FULL):
            raise StorageLost(f"{reason}; trial {trial.number} ended FAIL; free space, then run the same command again")
        outputs.install_if_best(cfg, study, trial)
        progress.trial_done(study, trial)
        if why := stop.after(trial):
            progress.stopping(why)

    while not stop.gave_up and (deadline is None or time.monotonic() < deadline):
        interrupts.stop_if_asked()
        states = [t.state for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))]
        running = states.count(TrialState.RUNNING)
        finished = len(states) - running
        if finished >= cfg.n_trials:
            return "done"
        if finished + running < cfg.n_trials:
            watch.check()
            progress.number = -1  # the objective sets it first thing: the trial a failed write belongs to
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after])
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                if not _taken_over(study, progress):
                    watch.check()  # a study deleted mid-trial: its tell found no trial
                    raise
            except StorageLost:
                raise
            except Exception as e:
                # A storage or study that is gone says so, not the error that followed: a study deleted mid-trial
                # failed Optuna's own tell (KeyError, UnboundLocalError), which is no storage error.
                watch.check()
                if (problem := storage_problem(e)) is None:
                    raise
                if reason := full_disk_reason(e, cfg.storage_label):
                    raise StorageLost(f"{reason}; {_end_trial(study, progress.number, reason, watch.path)}") from None
                raise problem from None  # the storage's own error, not Optuna's "Should not reach" raised over it
            if one:
                return "ran"
            continue
        if one:
            return "wait"
        # The rest of the target runs on other workers. Wait: one may fail (then this worker runs another)
        # or its worker may die (then its trial goes stale, and this worker retries it).
        progress.waiting(running)
        time.sleep(WAIT_POLL_S)
        _fail_stale(study)
    return "stopped"


def _fail_stale(study: optuna.Study) -> None:
    """End the trials whose worker died (heartbeat stale) FAIL; Optuna's callback queues each again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _end_trial(study: optuna.Study, number: int, reason: str, sqlite_path: str | None) -> str:
    """End trial ``number``, left RUNNING by a write that found the disk full, as FAIL with ``reason``; says what
    became of it. On SQLite, its write-ahead log is moved into the database first: that frees the room the log
    took (a few MB at most), often enough for the few bytes that end the trial."""
    if number < 0:
        return "no trial was started"
    trials = study.get_trials(deepcopy=False)
    if number >= len(trials) or trials[number].state != TrialState.RUNNING:
        return f"trial {number} ended {trials[number].state.name if number < len(trials) else 'before it began'}"
    if sqlite_path is not None:
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(sqlite_path, timeout=5)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    try:
        optuna_private.trial_by_id(study, optuna_private.trial_id(trials[number])).set_user_attr(FAIL_REASON, reason)
        study.tell(number, state=TrialState.FAIL)
    except Exception as e:  # whatever the storage raises, the line below says the truth
        if storage_problem(e) is None:
            raise
        return (
            f"trial {number} could not be ended and stays RUNNING: once there is room, the next run finds its "
            "heartbeat stale, fails it and retries it"
        )
    return f"trial {number} ended FAIL; free space, then run the same command again"


def _taken_over(study: optuna.Study, progress: Progress) -> bool:
    """Whether this worker's trial was ended by another one while it ran: its heartbeat went stale (the process
    was paused, swapped out or starved), another worker marked it FAIL and queued a retry, and Optuna now
    refuses this worker's result. Says so in one line."""
    if progress.number < 0:
        return False
    trials = study.get_trials(deepcopy=False)
    if progress.number >= len(trials) or trials[progress.number].state != TrialState.FAIL:
        return False
    progress.print(
        f"trial {progress.number:3d} [yellow]taken over[/]: another worker found its heartbeat stale "
        "and queued a retry; this run's result for it is dropped"
    )
    return True


class StopRule:
    """When a run gives up: ``max_failures`` failed trials, or 100 rejected samples, in a row."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.failures_in_a_row = self.rejected_in_a_row = self.out_of_memory_in_a_row = 0
        self.gave_up = ""  # why the run stopped

    def after(self, trial: FrozenTrial) -> str:
        """Count ``trial``, just finished; why the run stops now, or "" to go on."""
        if set(REJECTIONS) & set(trial.user_attrs):
            self.rejected_in_a_row += 1
            if self.rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
                self.gave_up = (
                    f"{self.rejected_in_a_row} samples in a row broke the constraints or repeated "
                    "finished trials: the feasible space looks exhausted"
                )
            return self.gave_up
        self.rejected_in_a_row = 0
        if trial.user_attrs.get(OUT_OF_MEMORY):  # a configuration too big for the device, not a broken worker
            self.out_of_memory_in_a_row += 1
            if self.out_of_memory_in_a_row >= max(MAX_OUT_OF_MEMORY_IN_A_ROW, self.max_failures):
                self.gave_up = (
                    f"{self.out_of_memory_in_a_row} trials in a row ran out of memory at micro-batch 1: the search "
                    "space needs more memory than this device has (hpo check shows where it goes)"
                )
            return self.gave_up
        self.out_of_memory_in_a_row = 0
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= self.max_failures:
            self.gave_up = (
                f"{self.failures_in_a_row} trials failed in a row (max_failures_in_a_row; "
                "see fail_reason / fail_traceback in the trials' user attrs)"
            )
        return self.gave_up
