"""Create or resume the Optuna study and run trials until it holds ``n_trials``."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from sqlalchemy.engine import make_url

from hpo import samplers, space
from hpo.config import StudyConfig
from hpo.best import trial_config
from hpo.dashboard import artifact_store, save_study_note, upload_json
from hpo.trial import Workbench, prepare, release, run_trial, save_model

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 3  # stop burning compute on a study that cannot train
MAX_REJECTED_IN_A_ROW = 100  # constraints that leave almost no feasible space
SQLITE_TIMEOUT_S = 60  # wait this long for another writer's lock instead of "database is locked"


def mask_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` → ``postgresql://u:***@h/db``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_study(cfg: StudyConfig, first_step: int = 1, last_step: int | None = None) -> optuna.Study:
    """Create the study in its storage, or load it if it exists (safe when several workers race)."""
    url = cfg.storage_url
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else None
    # Heartbeats: a trial whose worker died (kill -9, OOM killer, preemption) goes stale; the next worker
    # to start a trial marks it FAIL and queues a retry with the same params.
    with warnings.catch_warnings():  # heartbeats have been "experimental" since optuna 2.8; hpo relies on them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
        )
    return optuna.create_study(
        storage=storage,
        study_name=cfg.study,
        direction=cfg.objective.direction,
        sampler=samplers.make_sampler(cfg.sampler.name, cfg.sampler.args, cfg.distributions),
        pruner=samplers.make_pruner(cfg.pruner.name, cfg.pruner.args, first_step, last_step),
        load_if_exists=True,
    )


def load_existing(cfg: StudyConfig) -> optuna.Study:
    """The study as ``hpo run`` left it; never creates a storage or a study.

    Raises:
        ConfigError: no such storage or study yet.
    """
    url = cfg.storage_url
    hint = f"run `hpo run {cfg.file}` first"
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise cfg.error(("storage",), f"no storage at {mask_url(url)}: {hint}")
    try:
        return optuna.load_study(study_name=cfg.study, storage=url)
    except KeyError:
        raise cfg.error(("study",), f"no study {cfg.study!r} in {mask_url(url)}: {hint}") from None


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def resolved_config(cfg: StudyConfig) -> dict[str, Any]:
    """The study file as hpo understood it: defaults filled, paths absolute, storage masked."""
    data = cfg.model_dump(mode="json", exclude_none=True, exclude={"extends", "environments"})
    data["storage"] = mask_url(cfg.storage_url)
    if cfg.environment:
        data["environment"] = cfg.environment
    return json.loads(cfg.masked(json.dumps(data)))


def run_study(cfg: StudyConfig, console: Console | None = None) -> optuna.Study:
    """Run trials until the study holds ``cfg.n_trials`` finished (complete or pruned) trials.

    Everything that can fail on the user's input (model, data) is checked
    before the storage is touched. Returns the study.

    Raises:
        ConfigError: the model or data cannot be loaded.
    """
    console = console or Console()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # hpo prints its own lines per trial
    bench = prepare(cfg)
    n_train = len(bench.train_rows)
    # The run's length in examples, when every trial has the same (else Hyperband estimates it).
    varies = {"num_train_epochs", "max_steps"} & set(cfg.search_space) or "max_steps" in cfg.train
    last_step = None if varies else round(float(cfg.train.get("num_train_epochs", 3)) * n_train)
    study = open_study(cfg, round(cfg.eval_every.examples_between(n_train)), last_step)
    cfg.output_path.mkdir(parents=True, exist_ok=True)
    if "config" not in study.user_attrs:
        study.set_user_attr("config", resolved_config(cfg))
        save_study_note(study, resolved_config(cfg))
    for params in cfg.enqueue:  # a configuration already queued or tried is not queued again
        study.enqueue_trial(params, skip_if_exists=True)
    (cfg.output_path / "resolved.yaml").write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))

    done = count_finished(study)
    todo = cfg.n_trials - done
    console.print(f"[bold]{cfg.study}[/]: {done} finished trial(s) in {mask_url(cfg.storage_url)}; target {cfg.n_trials}")
    if todo > 0:
        progress = _Progress(console, cfg)
        with _sigterm_interrupts():
            _optimize(study, bench, progress, cfg)
    _summary(console, cfg, study)
    return study


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's stop, a preemption notice) ends the run like Ctrl-C: the trial ends FAIL, never RUNNING."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _optimize(study: optuna.Study, bench: Workbench, progress: _Progress, cfg: StudyConfig) -> None:
    study.optimize(
        _objective(bench, progress),
        timeout=cfg.timeout,
        catch=(Exception,),
        callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=FINISHED), progress.trial_done],
    )


class ConstraintViolation(Exception):
    """The sampled parameters break a ``constraints:`` entry: the trial ends FAIL before training."""


def _objective(bench: Workbench, progress: _Progress):
    cfg = bench.cfg
    store = artifact_store(cfg)

    def objective(trial: optuna.Trial) -> float:
        sampled, derived = space.sample(trial, cfg.search_space, cfg.distributions, cfg.train)
        params = {**sampled, **derived}
        if derived:
            trial.set_user_attr("derived_params", derived)
        broken = [c.source for c in cfg.constraint_expressions if not c.evaluate({**cfg.train, **params})]
        if broken:
            trial.set_user_attr("rejected_by_constraint", broken[0])
            raise ConstraintViolation(f"constraint not met: {broken[0]}")
        progress.trial_start(trial.number, params)
        args, rest = trial_config(cfg, params, trial.number, None)
        upload_json(store, trial, "config.json", {"training_arguments": args, **rest})
        result = None
        try:
            result = run_trial(bench, params, trial, on_eval=progress.evaluated)
            for key, value in result.attrs.items():
                trial.set_user_attr(key, value)
            upload_json(store, trial, "metrics.json", {"evaluations": result.history, **result.attrs})
            if result.pruned:
                raise optuna.TrialPruned(f"pruned at step {result.attrs['pruned_at_step']}")
            if _beats_best(trial.study, result.value):
                save_model(bench, result, params, trial.number)
                trial.set_user_attr("saved_model", True)
                upload_json(store, trial, "best.json", args)  # TrainingArguments(**json.load(f))
            return result.value
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL and re-raises
            trial.set_user_attr("fail_reason", "interrupted")
            trial.study.enqueue_trial(sampled, user_attrs={"retry_of": trial.number})  # the rerun starts with it
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:1000])
            trial.set_user_attr("fail_traceback", traceback.format_exc()[-4000:])
            raise
        finally:
            release(result)

    return objective


def _beats_best(study: optuna.Study, value: float) -> bool:
    try:
        best = study.best_value
    except ValueError:  # no complete trial yet
        return True
    return value < best if study.direction == optuna.study.StudyDirection.MINIMIZE else value > best


class _Progress:
    """One line per finished trial, and the running trial's last evaluation."""

    def __init__(self, console: Console, cfg: StudyConfig):
        self.console, self.metric = console, cfg.objective.metric
        self.failures_in_a_row = 0
        self.rejected_in_a_row = 0
        self.best = ""  # " (best so far 0.1234)" once a trial completed
        self.status = console.status("")
        self.number = -1

    def trial_start(self, number: int, params: dict[str, Any]) -> None:
        self.number = number
        self.status.start()
        self.status.update(f"trial {number}: training…")

    def evaluated(self, step: int, value: float) -> None:
        self.status.update(f"trial {self.number}: {self.metric} {value:.4f} after {step} examples{self.best}")

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.status.stop()
        if "rejected_by_constraint" in trial.user_attrs:
            self.rejected_in_a_row += 1
            self.console.print(f"trial {trial.number:3d} [dim]rejected before training: "
                               f"{trial.user_attrs['rejected_by_constraint']} is false[/]")
            if self.rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
                self.console.print(f"[red]stopping: the constraints rejected {self.rejected_in_a_row} samples in a row[/]")
                study.stop()
            return
        self.rejected_in_a_row = 0
        counts = {s: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        for t in study.get_trials(deepcopy=False, states=tuple(counts)):
            counts[t.state] += 1
        tally = f"[dim]{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed[/]"
        secs = trial.user_attrs.get("train_seconds", 0)
        params = _fmt_params(trial.params)
        if trial.state == TrialState.COMPLETE:
            best = " [green]★ best[/]" if study.best_trial.number == trial.number else ""
            self.console.print(f"trial {trial.number:3d} [green]complete[/] {self.metric}={trial.value:.4f}{best} "
                               f"({secs:.0f}s)  {tally}\n    [dim]{params}[/]")
        elif trial.state == TrialState.PRUNED:
            at = trial.user_attrs.get("pruned_at_step", "?")
            self.console.print(f"trial {trial.number:3d} [yellow]pruned[/] at {at} examples ({secs:.0f}s)  {tally}\n    [dim]{params}[/]")
        else:
            reason = trial.user_attrs.get("fail_reason", "interrupted")
            self.console.print(f"trial {trial.number:3d} [red]failed[/]: {reason}  {tally}")
        if trial.state == TrialState.COMPLETE:
            self.best = f" (best so far {study.best_value:.4f})"
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            self.console.print(f"[red]stopping: {self.failures_in_a_row} trials failed in a row[/] "
                               "(see fail_reason / fail_traceback in the trials' user attrs)")
            study.stop()


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _summary(console: Console, cfg: StudyConfig, study: optuna.Study) -> None:
    try:
        best = study.best_trial
    except ValueError:
        console.print("[red]no trial completed[/]")
        return
    console.print(f"\n[bold]best[/] trial {best.number}: {cfg.objective.metric}={best.value:.4f}")
    console.print(json.dumps(best.params, indent=2))
    console.print(f"storage:    {mask_url(cfg.storage_url)}")
    console.print(f"outputs:    {cfg.output_path}")
    console.print(f"dashboard:  hpo dashboard {cfg.file}")
    console.print(f"tensorboard: tensorboard --logdir {cfg.output_path / 'tensorboard'}")
