"""The trial loop: create or resume the study, run trials until it holds ``n_trials``, and when to stop."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import socket
import sqlite3
import statistics
import time
import traceback
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.markup import escape

from hpo import knobs, optuna_private, space
from hpo.attrs import (
    DERIVED_PARAMS,
    DEVICES,
    EVAL_BATCH,
    FAIL_REASON,
    FAIL_TRACEBACK,
    MEMORY,
    MICRO_BATCH,
    OOM_AT,
    OOM_RETRIES,
    OUT_OF_MEMORY,
    REJECTED_BY_CONSTRAINT,
    REJECTED_DUPLICATE,
    REJECTED_ENQUEUED,
    REJECTIONS,
    RETRY_OF,
    REVISION,
    TEST_METRICS,
    TEST_TOP_K,
    WORKER,
)
from hpo.config import StudyConfig
from hpo.errors import StorageLost, TrialsFailed
from hpo.study import distributed, ordered, outputs, revisions
from hpo.study.artifacts import artifact_store, upload_json
from hpo.study.faults import DISK_FULL, StorageWatch, full_disk_reason, storage_error, storage_problem
from hpo.study.progress import Progress, print_summary
from hpo.study.storage import FINISHED, count_finished, open_study, orientation
from hpo.trial import checkpoints, interrupts, memory, trackers
from hpo.trial.finetune import evaluate_test, objective_values, run_trial
from hpo.trial.memory import release
from hpo.trial.plan import make_plan, repeat_seeds
from hpo.trial.workbench import Workbench, prepare

MAX_REJECTED_IN_A_ROW = 100  # constraints that leave almost no feasible space
MAX_OUT_OF_MEMORY_IN_A_ROW = 10  # trials that fit at no micro-batch: the space needs more memory than the device has
ORDERED_WAIT_MIN_S = 600  # under hpo.study.ordered, the least a trial waits for an earlier one before going on
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
        objective = _objective(bench, progress, revision, tracking)
        with interrupts.Guard(objective), tracking, _frozen_heap(), progress:
            _optimize(study, objective, progress, stop, cfg, watch)
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


def _optimize(
    study: optuna.Study, objective, progress: Progress, stop: StopRule, cfg: StudyConfig, watch: StorageWatch
) -> None:
    # One study.optimize call per trial, so that this worker starts a trial only while finished plus
    # running trials (on every worker) fall short of n_trials: N workers then overshoot the target only
    # when two of them start within the same instant, instead of by up to N-1 trials at the end.
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout

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
            return
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
            continue
        # The rest of the target runs on other workers. Wait: one may fail (then this worker runs another)
        # or its worker may die (then its trial goes stale, and this worker retries it).
        progress.waiting(running)
        time.sleep(WAIT_POLL_S)
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


class Rejected(Exception):
    """The sampled parameters break a ``constraints:`` entry, or repeat a finished trial: FAIL before training."""


def _objective(bench: Workbench, progress: Progress, revision: int, tracking: trackers.Tracking):
    cfg = bench.cfg
    store = artifact_store(cfg)
    size = space.finite_size(cfg.search_space, cfg.distributions, cfg.train)

    def objective(trial: optuna.Trial) -> float:
        # Everything a trial does is inside this try, from sampling to saving: whatever fails, the trial
        # ends FAIL with its cause in fail_reason and fail_traceback ("interrupted" only after a signal).
        result = sampled = saved = run = None
        state, reason = "FAIL", None  # how the trial ended, for its tracker run
        progress.number = trial.number
        try:
            interrupts.stop_if_asked()  # a signal that came in Optuna's ask, before this trial began
            # Optuna's Trial does not expose system attrs; optuna-integration reads them from the storage too.
            if isinstance(trial.study.sampler, ordered.OrderedSampler):  # queued ones too: the pruner's past
                _wait_in_order(trial, progress)
            system = optuna_private.system_attrs(trial)
            fixed = system.get(optuna_private.FIXED_PARAMS)
            # A retry: Optuna failed a trial whose heartbeat stopped, and queued it.
            if history := system.get(optuna_private.RETRY_HISTORY):
                # That FAIL cannot take a fail_reason afterwards (a finished trial is read-only): its retry says it.
                trial.set_user_attr(RETRY_OF, history[-1])
                progress.print(
                    f"trial {trial.number:3d} [dim]retries trial {history[-1]}, whose worker stopped sending "
                    "heartbeats (killed, out of memory, or its machine went away)[/]"
                )
            outside = _outside(fixed, cfg.distributions)
            if outside:  # queued under an earlier revision of the study file, or by hand
                trial.set_user_attr(REJECTED_ENQUEUED, outside)
                raise Rejected(f"queued parameters outside the search space: {outside}")
            sampled, derived = space.sample(trial, cfg.search_space, cfg.distributions, cfg.train)
            params = {**sampled, **derived}
            ordered.mark_sampled(trial)
            trial.set_user_attr(REVISION, revision)
            if derived:
                trial.set_user_attr(DERIVED_PARAMS, derived)
            broken = space.broken_constraint(cfg.constraint_expressions, {**cfg.train, **params})
            if broken:
                trial.set_user_attr(REJECTED_BY_CONSTRAINT, broken)
                raise Rejected(f"constraint not met: {broken}")
            twin = None if fixed is not None else _finished_twin(trial, sampled, size)
            if twin is not None:
                trial.set_user_attr(REJECTED_DUPLICATE, twin)
                raise Rejected(f"the same parameters as trial {twin}, which finished")
            progress.trial_start(trial.number, params)
            run = tracking.start(trial.number, params)
            trial.set_user_attr(
                WORKER,
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                },
            )
            plan = make_plan(cfg, params)
            if plan.devices is not None:
                trial.set_user_attr(DEVICES, plan.devices)
            args, rest = plan.exported(cfg)
            upload_json(
                store,
                trial,
                "config.json",
                {
                    "study": cfg.study,
                    "trial": trial.number,
                    "metric": cfg.objective.metric,
                    "training_arguments": args,
                    **rest,
                },
            )
            upload_json(store, trial, "training_arguments.json", args)  # TrainingArguments(**json.load(f))
            saved = _checkpoints(trial, cfg, params, revision, len(bench.train_rows)) if cfg.checkpoint_every else None
            result = _fitting(bench, plan, trial, params, progress, revision, saved, _also_to(run, cfg, progress))
            if cfg.repeats > 1 and not result.pruned:
                _repeat(bench, plan, trial, result, progress)
            if "resumed_from_step" in result.attrs and not cfg.objectives:  # the best of the whole curve
                values = optuna_private.intermediate_values(trial).values()
                pick = min if cfg.objective.direction == "minimize" else max
                result.attrs[f"best_{cfg.objective.metric}"] = pick(values)
            for key, value in result.attrs.items():
                trial.set_user_attr(key, value)
            upload_json(store, trial, "metrics.json", {"evaluations": result.history, **result.attrs})
            if result.pruned:
                state = "PRUNED"
                raise optuna.TrialPruned(f"pruned at step {result.attrs['pruned_at_step']}")
            if bench.test_rows is not None and result.model is not None and _may_be_top(trial, result.value):
                try:
                    trial.set_user_attr(TEST_METRICS, evaluate_test(bench, result.model))  # shown, never chosen on
                except Exception as e:  # noqa: BLE001 - the trial trained and was evaluated: it stays COMPLETE
                    trial.set_user_attr(TEST_METRICS, {"error": cfg.masked(storage_error(e))[:500]})
            outputs.stage_if_best(bench, result, params, trial)
            state = "COMPLETE"
            return objective_values(cfg, result) if cfg.objectives else result.value
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL and re-raises
            saved = None  # kept: the rerun resumes from it
            state = reason = "interrupted"
            trial.set_user_attr(FAIL_REASON, "interrupted")
            if sampled is None:  # stopped before sampling: a queued trial's parameters are queued again
                sampled = optuna_private.system_attrs(trial).get(optuna_private.FIXED_PARAMS)
            if sampled is not None:
                trial.study.enqueue_trial(sampled, user_attrs={RETRY_OF: trial.number})  # the rerun starts with it
            raise
        except Exception as e:
            reason = cfg.masked(storage_error(e, cfg.storage_label))[:1000]
            if reason.startswith(DISK_FULL):  # the fewest bytes: the storage may be on that disk
                with contextlib.suppress(Exception):  # the run stops on it either way (hpo.study.loop._optimize)
                    trial.set_user_attr(FAIL_REASON, reason)
                raise
            for key, value in memory.failure_attrs(e).items():
                trial.set_user_attr(key, value)
            trial.set_user_attr(FAIL_REASON, reason)
            trial.set_user_attr(FAIL_TRACEBACK, cfg.masked(traceback.format_exc())[-4000:])
            raise
        finally:
            if run is not None:
                run.end(state, result.history if result else [], result.attrs if result else {}, reason)
            release(result)
            checkpoints.remove(saved)  # the trial ended: its retry, if any, starts afresh

    return objective


def _wait_in_order(trial: optuna.Trial, progress: Progress) -> None:
    """Wait for the trials before this one that hpo.study.ordered says it must; say so if it gave up waiting."""
    done = trial.study.get_trials(deepcopy=False, states=FINISHED)
    longest = max((t.duration.total_seconds() for t in done if t.duration is not None), default=0.0)
    cap = max(ORDERED_WAIT_MIN_S, 2 * longest)  # a live trial ends within about the longest one's time
    pending = ordered.wait_for_predecessors(trial.study, trial.number, trial.study.sampler.lag, cap)
    if pending:
        progress.print(
            f"trial {trial.number:3d} [yellow]waited {cap:.0f} s[/] for trial(s) {pending}, still running without a "
            "stale heartbeat; it goes on, and this run's trials now depend on timing"
        )


def _checkpoints(trial: optuna.Trial, cfg: StudyConfig, params: dict[str, Any], revision: int, n_train: int):
    """The trial's checkpoint folder (keyed by its parameters and the revision), claimed for it; None when
    another running trial with the same parameters holds it (this one then runs without checkpoints).

    A retry (Optuna's ``retry_history`` after a dead worker, hpo's ``retry_of`` after a signal) resumes from the
    folder's newest checkpoint: what the trial it retries reported up to there is reported again, so the pruner
    sees one curve. Any other trial starts afresh: what the folder holds is a leftover.
    """
    folder = checkpoints.folder(cfg, params, revision)
    trials = trial.study.get_trials(deepcopy=False)
    if not checkpoints.claim(folder, trial.number, lambda n: trials[n].state == TrialState.RUNNING):
        return None
    history = optuna_private.system_attrs(trial).get(optuna_private.RETRY_HISTORY)
    before = history[-1] if history else optuna_private.stored_user_attrs(trial).get(RETRY_OF)
    checkpoint = checkpoints.latest(folder)
    if before is None or checkpoint is None:
        checkpoints.clear(folder)
        return folder
    seen = checkpoints.examples_seen(checkpoint, n_train)
    for step, value in sorted(trials[before].intermediate_values.items()):  # none with several objectives
        if step <= seen:
            trial.report(value, step)
    trial.set_user_attr("resumed_from_trial", before)
    return folder


def _also_to(run, cfg: StudyConfig, progress: Progress):
    """What each evaluation is told to: the status line, and the trial's tracker run if it has one."""
    if run is None:
        return progress.evaluated

    def evaluated(step: int, value: float) -> None:
        progress.evaluated(step, value)
        run.evaluated(cfg.objective.metric, step, value)

    return evaluated


def _fitting(
    bench: Workbench,
    plan,
    trial: optuna.Trial,
    params: dict[str, Any],
    progress: Progress,
    revision: int,
    saved=None,
    on_eval=None,
):
    """Run the trial, at smaller micro-batches while it runs out of memory (:func:`hpo.trial.memory.fit`).

    It starts at the largest micro-batch known to fit from earlier trials of no greater demand on the same
    memory (device, cap, revision), and records the micro-batch it ran at and those that ran out
    (``oom_micro_batches``), for the trials after it.
    """
    mine = memory.signature(bench.device, bench.cfg.resources.max_memory_gb, revision)
    trial.set_user_attr(MEMORY, mine)
    same = [
        t
        for t in trial.study.get_trials(deepcopy=False)
        if t.user_attrs.get(MEMORY) == mine and t.number != trial.number
    ]
    earlier = [
        {"params": {**t.params, **t.user_attrs.get(DERIVED_PARAMS, {})}, OOM_AT: t.user_attrs[OOM_AT]}
        for t in same
        if OOM_AT in t.user_attrs
    ]
    eval_start = min((t.user_attrs[EVAL_BATCH] for t in same if EVAL_BATCH in t.user_attrs), default=None)
    batch = plan.training_arguments.get(memory.BATCH, memory.DEFAULT_BATCH)

    train = distributed.run_trial if distributed.needed(bench.cfg) else run_trial
    retries = []

    def retry(ran_out: list[int], message: str) -> None:
        retries.append(message)
        if ran_out:
            trial.set_user_attr(OOM_AT, ran_out)  # at once: workers starting trials now learn from it
        progress.print(f"trial {trial.number:3d} [yellow]out of memory[/] {escape(message)}")

    try:
        result, micro, _, eval_batch = memory.fit(
            plan,
            lambda p, meter: train(
                bench, p, trial, on_eval=on_eval or progress.evaluated, meter=meter, checkpoint_dir=saved
            ),
            bench.device,
            memory.start_micro_batch(params, batch, earlier),
            retry,
            eval_start,
        )
    except memory.OutOfMemory as e:
        if e.ran_out:
            trial.set_user_attr(OOM_AT, e.ran_out)
        raise
    trial.set_user_attr(MICRO_BATCH, micro)
    if eval_batch != plan.training_arguments.get(memory.EVAL_BATCH, memory.EVAL_BATCH_SIZE):
        trial.set_user_attr(EVAL_BATCH, eval_batch)  # the trials after it start there
    trial.set_user_attr(OOM_RETRIES, len(retries))  # restarts, for training or evaluation batches
    return result


def _may_be_top(trial: optuna.Trial, value: float) -> bool:
    """Whether a trial finishing with ``value`` may end among the study's best :data:`TEST_TOP_K` (on the first
    objective): then ``data.test`` evaluates it, once. A trial outside them now can never enter them later."""
    study = trial.study
    sign = orientation(study)
    done = sorted(sign * t.values[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return len(done) < TEST_TOP_K or sign * value < done[TEST_TOP_K - 1]


def _repeat(bench: Workbench, plan, trial: optuna.Trial, result, progress: Progress) -> None:
    """Train ``plan`` again with the other seeds of ``repeats`` (no reports: the pruner saw the first seed's
    curve) and make ``result`` their mean, with the spread, the seeds' values, and their training time summed."""
    cfg = bench.cfg
    seeds = repeat_seeds(int(knobs.training_value(plan.training_arguments, "seed")), cfg.repeats)
    micro = optuna_private.stored_user_attrs(trial).get(MICRO_BATCH)
    values, seconds = [result.value], result.attrs["train_seconds"]
    for seed in seeds[1:]:
        again = dataclasses.replace(plan, training_arguments={**plan.training_arguments, "seed": seed})
        other, *_ = memory.fit(
            again,
            lambda p, meter, seed=seed: run_trial(
                bench, p, trial, meter=meter, run_name=f"trial-{trial.number:04d}-seed{seed}", report=False
            ),
            bench.device,
            micro,
        )
        values.append(other.value)
        seconds += other.attrs["train_seconds"]
        progress.print(f"trial {trial.number:3d} [dim]seed {seed}: {cfg.objective.metric}={other.value:.4f}[/]")
        release(other)
    result.attrs.update(
        repeats=cfg.repeats,
        seeds=list(seeds),
        repeat_values=values,
        value_std=statistics.stdev(values),
        model_value=result.value,  # the saved model is the first seed's
        train_seconds=round(seconds, 3),
    )
    result.value = statistics.fmean(values)


def _outside(fixed: dict[str, Any] | None, distributions: dict[str, Any]) -> str:
    """The queued parameters that the search space does not hold, as ``name=value`` (empty: none)."""
    bad = []
    for name, value in (fixed or {}).items():
        d = distributions.get(name)
        if d is None or not optuna_private.contains(d, value):
            bad.append(f"{name}={value!r}")
    return ", ".join(bad)


def _finished_twin(trial: optuna.Trial, sampled: dict[str, Any], size: int | None) -> int | None:
    """The finished trial that ``sampled`` repeats, unless the space is exhausted (queued trials may repeat).

    Samplers repeat configurations (a resumed seeded sampler replays its first draws; TPE on a small
    categorical space proposes its favourite again); a finished one would only be trained again.
    """
    last = ordered.horizon(trial.study, trial.number)  # under hpo.study.ordered, not what finished in the meantime
    finished = [t for t in trial.study.get_trials(deepcopy=False, states=FINISHED) if t.number <= last]
    if size is not None and len({repr(sorted(t.params.items())) for t in finished}) >= size:
        return None
    return next((t.number for t in finished if t.params == sampled), None)
