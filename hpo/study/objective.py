"""The per-trial objective: sample (or take a queued trial's parameters), check them, train with the memory
retries and repeats, and record what the trial did; whatever fails ends the trial FAIL with its cause."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import statistics
import traceback
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.markup import escape

from hpo import distributions, knobs, optuna_private
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
    REJECTED_BY_CONSTRAINT,
    REJECTED_DUPLICATE,
    REJECTED_ENQUEUED,
    RETRY_OF,
    REVISION,
    WORKER,
)
from hpo.config import StudyConfig
from hpo.study import distributed, held_out, ordered, outputs
from hpo.study.artifacts import artifact_store, upload_json
from hpo.study.faults import DISK_FULL, storage_error
from hpo.study.progress import Progress
from hpo.study.storage import FINISHED
from hpo.trial import checkpoints, interrupts, memory, pack, trackers
from hpo.trial.finetune import TrialResult, objective_values, run_trial
from hpo.trial.memory import release
from hpo.trial.plan import TrialPlan, make_plan, repeat_seeds
from hpo.trial.workbench import Workbench

ORDERED_WAIT_MIN_S = 600  # under hpo.study.ordered, the least a trial waits for an earlier one before going on


class Rejected(Exception):
    """The sampled parameters break a ``constraints:`` entry, or repeat a finished trial: FAIL before training."""


@dataclasses.dataclass
class _Ending:
    """What one trial has got to, for the code that ends it: its result, parameters, checkpoints, tracker run."""

    result: TrialResult | None = None
    sampled: dict[str, Any] | None = None
    saved: Any = None  # the checkpoint folder, removed when the trial ends (kept when it was interrupted)
    run: Any = None  # the trial's tracker run
    state: str = "FAIL"  # how the trial ended, for its tracker run
    reason: str | None = None


def make_objective(bench: Workbench, progress: Progress, revision: int, tracking: trackers.Tracking):
    """The function Optuna calls for each trial of this run: returns its value (values, with ``objectives``).

    Raises:
        optuna.TrialPruned: the pruner stopped it.
        KeyboardInterrupt: Ctrl-C or SIGTERM (:mod:`hpo.trial.interrupts`): the trial ends ``interrupted``.
        Exception: whatever failed, once its ``fail_reason`` and ``fail_traceback`` are recorded.
    """
    cfg = bench.cfg
    store = artifact_store(cfg)
    size = distributions.finite_size(cfg.search_space, cfg.distributions, cfg.train)

    def objective(trial: optuna.Trial) -> float:
        # Everything a trial does is inside this try, from sampling to saving: whatever fails, the trial
        # ends FAIL with its cause in fail_reason and fail_traceback ("interrupted" only after a signal).
        now = _Ending()
        progress.number = trial.number
        try:
            interrupts.stop_if_asked()  # a signal that came in Optuna's ask, before this trial began
            params = _parameters(trial, now, cfg, revision, size, progress)
            progress.trial_start(trial.number, params)
            now.run = tracking.start(trial.number, params)
            plan = _started(trial, cfg, store, params)
            if cfg.checkpoint_every:
                now.saved = _checkpoints(trial, cfg, params, revision, len(bench.train_rows), progress)
            now.result = _fitting(
                bench, plan, trial, params, progress, revision, now.saved, _also_to(now.run, cfg, progress)
            )
            return _finished(bench, plan, trial, params, now, progress, store)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL and re-raises
            now.saved = None  # kept: the rerun resumes from it
            now.state = now.reason = "interrupted"
            _interrupted(trial, now.sampled)
            raise
        except Exception as e:
            now.reason = cfg.masked(storage_error(e, cfg.storage_label))[:1000]
            _failed(trial, cfg, e, now.reason)
            raise
        finally:
            result = now.result
            if now.run is not None:
                now.run.end(now.state, result.history if result else [], result.attrs if result else {}, now.reason)
            release(result)
            checkpoints.remove(now.saved)  # the trial ended: its retry, if any, starts afresh

    return objective


def _parameters(
    trial: optuna.Trial, now: _Ending, cfg: StudyConfig, revision: int, size: int | None, progress: Progress
) -> dict[str, Any]:
    """The trial's parameters, derived ones included (the sampled ones in ``now``); raises :class:`Rejected`
    for queued parameters outside the space, a broken constraint, or a repeat of a finished trial."""
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
    now.sampled, derived = distributions.sample(trial, cfg.search_space, cfg.distributions, cfg.train)
    sampled, params = now.sampled, {**now.sampled, **derived}
    ordered.mark_sampled(trial)
    trial.set_user_attr(REVISION, revision)
    if derived:
        trial.set_user_attr(DERIVED_PARAMS, derived)
    broken = distributions.broken_constraint(cfg.constraint_expressions, {**cfg.train, **params})
    if broken:
        trial.set_user_attr(REJECTED_BY_CONSTRAINT, broken)
        raise Rejected(f"constraint not met: {broken}")
    twin = None if fixed is not None else _finished_twin(trial, sampled, size)
    if twin is not None:
        trial.set_user_attr(REJECTED_DUPLICATE, twin)
        raise Rejected(f"the same parameters as trial {twin}, which finished")
    return params


def _started(trial: optuna.Trial, cfg: StudyConfig, store, params: dict[str, Any]) -> TrialPlan:
    """Record where the trial runs and what it trains with (the artifact store's ``config.json``); its plan."""
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    if job := os.environ.get("HPO_JOB"):  # the cluster job that runs this worker (hpo submit sets it)
        where["job"] = job
    trial.set_user_attr(WORKER, {**where, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    plan = make_plan(cfg, params)
    if plan.devices is not None:
        trial.set_user_attr(DEVICES, plan.devices)
    args, rest = plan.exported(cfg)
    about = {"study": cfg.study, "trial": trial.number, "metric": cfg.objective.metric, "training_arguments": args}
    upload_json(store, trial, "config.json", {**about, **rest})
    upload_json(store, trial, "training_arguments.json", args)  # TrainingArguments(**json.load(f))
    return plan


def _finished(
    bench: Workbench, plan, trial: optuna.Trial, params: dict, now: _Ending, progress: Progress, store
) -> float:
    """After training: the repeats, the measurements, the test set and the staged model; the trial's value.
    Raises ``optuna.TrialPruned`` for a pruned trial."""
    cfg, result = bench.cfg, now.result
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
        now.state = "PRUNED"
        raise optuna.TrialPruned(f"pruned at step {result.attrs['pruned_at_step']}")
    if result.model is not None:
        held_out.score_if_top(bench, trial, result, int(knobs.training_value(plan.training_arguments, "seed")))
    outputs.stage_if_best(bench, result, params, trial)
    now.state = "COMPLETE"
    return objective_values(cfg, result) if cfg.objectives else result.value


def _interrupted(trial: optuna.Trial, sampled: dict[str, Any] | None) -> None:
    """Mark the trial ``interrupted`` and queue its parameters again, so that the rerun starts with them."""
    trial.set_user_attr(FAIL_REASON, "interrupted")
    if sampled is None:  # stopped before sampling: a queued trial's parameters are queued again
        sampled = optuna_private.system_attrs(trial).get(optuna_private.FIXED_PARAMS)
    if sampled is not None:
        trial.study.enqueue_trial(sampled, user_attrs={RETRY_OF: trial.number})  # the rerun starts with it


def _failed(trial: optuna.Trial, cfg: StudyConfig, e: Exception, reason: str) -> None:
    """Record why the trial failed: ``fail_reason``, ``fail_traceback``, and what memory it ran out of."""
    if reason.startswith(DISK_FULL):  # the fewest bytes: the storage may be on that disk
        with contextlib.suppress(Exception):  # the run stops on it either way (hpo.study.loop._optimize)
            trial.set_user_attr(FAIL_REASON, reason)
        return
    for key, value in memory.failure_attrs(e).items():
        trial.set_user_attr(key, value)
    trial.set_user_attr(FAIL_REASON, reason)
    trial.set_user_attr(FAIL_TRACEBACK, cfg.masked(traceback.format_exc())[-4000:])


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


def _checkpoints(trial: optuna.Trial, cfg: StudyConfig, params: dict[str, Any], revision: int, n_train: int, progress):
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
    progress.print(f"trial {trial.number:3d} resumes trial {before} from its checkpoint at {seen} examples")
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
    mine = memory.signature(bench.device, bench.cfg.resources.max_memory_gb, revision, pack.current() is not None)
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


def _repeat(bench: Workbench, plan, trial: optuna.Trial, result, progress: Progress) -> None:
    """Train ``plan`` again with the other seeds of ``repeats`` (no reports: the pruner saw the first seed's
    curve) and make ``result`` their mean, with the spread, the seeds' values, and their training time summed."""
    cfg = bench.cfg
    seeds = repeat_seeds(int(knobs.training_value(plan.training_arguments, "seed")), cfg.repeats)
    micro = optuna_private.stored_user_attrs(trial).get(MICRO_BATCH)
    values, seconds = [result.value], result.attrs["train_seconds"]
    others = bench.aside()  # a base model of their own: the first seed's model is saved after them
    for seed in seeds[1:]:
        again = dataclasses.replace(plan, training_arguments={**plan.training_arguments, "seed": seed})
        other, *_ = memory.fit(
            again,
            lambda p, meter, seed=seed: run_trial(
                others, p, trial, meter=meter, run_name=f"trial-{trial.number:04d}-seed{seed}", report=False
            ),
            bench.device,
            micro,
        )
        values.append(other.value)
        seconds += other.attrs["train_seconds"]
        progress.print(f"trial {trial.number:3d} [dim]seed {seed}: {cfg.objective.metric}={other.value:.4f}[/]")
        release(other)
    others.resident.forget()
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
