"""What a run prints: a line per finished trial, the running trial's last evaluation, and the summary."""

from __future__ import annotations

import json
import threading
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.markup import escape

from hpo.attrs import (
    CHECKPOINT_ERROR,
    FAIL_REASON,
    REJECTED_BY_CONSTRAINT,
    REJECTED_DUPLICATE,
    REJECTED_ENQUEUED,
    SAVE_ERROR,
)
from hpo.config import StudyConfig
from hpo.distributions import at_edges
from hpo.study.outputs import saved_trial
from hpo.study.revisions import current_revision, trial_revision
from hpo.study.storage import best_trial
from hpo.trial.trackers import Tracking, written


class Progress:
    """One line per finished trial, and the running trial's last evaluation."""

    def __init__(self, console: Console, cfg: StudyConfig, worker: int | None = None):
        self.console, self.cfg, self.metric, self.masked = console, cfg, cfg.objective.metric, cfg.masked
        self.prefix = "" if worker is None else f"w{worker}: "
        self.waiting_for = 0  # trials running elsewhere that this worker last said it waits for
        self.best = ""  # " (best so far 0.1234)" once a trial completed
        # Several workers share one terminal: a live status line each would overwrite the others'.
        self.status = console.status("") if worker is None else None
        self._here = threading.local()  # a pack's slots each run a trial of their own (hpo.study.loop)
        self.number = -1

    @property
    def number(self) -> int:
        """The trial this thread runs: the one a failed storage write belongs to (-1: none begun)."""
        return getattr(self._here, "number", -1)

    @number.setter
    def number(self, value: int) -> None:
        self._here.number = value

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        """The live status line stops however the run ends (Ctrl-C, SIGTERM): it must not keep drawing."""
        if self.status:
            self.status.stop()

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

    def stopping(self, why: str) -> None:
        self.print(f"[red]stopping: {why}[/]")

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.status:
            self.status.stop()
        if why := _rejection(trial.user_attrs):
            self.print(f"trial {trial.number:3d} [dim]rejected before training: {why}[/]")
            return
        counts = dict.fromkeys((TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL), 0)
        for t in study.get_trials(deepcopy=False, states=tuple(counts)):
            counts[t.state] += 1
        tally = f"[dim]{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed[/]"
        secs = trial.user_attrs.get("train_seconds", 0)
        params = _fmt_params(trial.params)
        if trial.state == TrialState.COMPLETE:
            best = " [green]★ best[/]" if best_trial(study).number == trial.number else ""
            if (stopped := trial.user_attrs.get("stopped_early")) is not None:
                best += f" [cyan]stopped early[/] at {stopped} examples"
            if "value_std" in trial.user_attrs:  # repeats: the mean of the seeds, and their spread
                best = f" ± {trial.user_attrs['value_std']:.4f}{best}"
            self.print(
                f"trial {trial.number:3d} [green]complete[/] {_values(self.cfg, trial)}{best} "
                f"({secs:.0f}s)  {tally}\n{' ' * len(self.prefix)}    [dim]{params}[/]"
            )
        elif trial.state == TrialState.PRUNED:
            at = trial.user_attrs.get("pruned_at_step", "?")
            self.print(
                f"trial {trial.number:3d} [yellow]pruned[/] at {at} examples ({secs:.0f}s)  {tally}\n"
                f"{' ' * len(self.prefix)}    [dim]{params}[/]"
            )
        else:
            reason = escape(trial.user_attrs.get(FAIL_REASON, "no reason recorded"))
            self.print(f"trial {trial.number:3d} [red]failed[/]: {reason}  {tally}")
        for warned in (CHECKPOINT_ERROR, SAVE_ERROR):
            if warned in trial.user_attrs:
                self.print(f"    [yellow]warning[/]: {escape(trial.user_attrs[warned])}")
        if trial.state == TrialState.COMPLETE:
            self.best = f" (best so far {best_trial(study).values[0]:.4f})"


def _values(cfg: StudyConfig, trial: FrozenTrial) -> str:
    """``metric=value`` for each objective of a complete trial."""
    metrics = [o.metric for o in cfg.objectives or [cfg.objective]]
    return " ".join(
        f"{m}={v:.4g}" if len(metrics) > 1 else f"{m}={v:.4f}" for m, v in zip(metrics, trial.values, strict=True)
    )


def _rejection(attrs: dict[str, Any]) -> str:
    if REJECTED_BY_CONSTRAINT in attrs:
        return f"{escape(attrs[REJECTED_BY_CONSTRAINT])} is false"
    if REJECTED_DUPLICATE in attrs:
        return f"repeats trial {attrs[REJECTED_DUPLICATE]}"
    if REJECTED_ENQUEUED in attrs:
        return f"queued with {escape(attrs[REJECTED_ENQUEUED])}, outside the search space"
    return ""


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def pruning_saved(study: optuna.Study) -> str:
    """What pruning saved: optimizer steps run against a full run of every finished trial, and the training
    time the pruned trials would have taken to the end at their own pace (an estimate); "" before any."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.user_attrs.get("planned_steps")
    ]
    if not trials:
        return ""
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    ran = sum(t.user_attrs.get("optimizer_steps", 0) for t in trials)
    planned = sum(t.user_attrs["planned_steps"] for t in trials)
    spent = sum(t.user_attrs.get("train_seconds", 0.0) for t in trials)
    saved = sum(
        t.user_attrs.get("train_seconds", 0.0)
        * (t.user_attrs["planned_steps"] / max(1, t.user_attrs.get("optimizer_steps", 0)) - 1)
        for t in pruned
    )
    return (
        f"pruning: {len(pruned)} of {len(trials)} trials stopped early; the study ran {ran:,} of {planned:,} "
        f"optimizer steps ({ran / planned:.0%}) and saved ~{_duration(saved)} of training "
        f"({saved / max(spent + saved, 1e-9):.0%})"
    )


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours else f"{m} min {s} s" if m else f"{s} s"


def print_summary(console: Console, cfg: StudyConfig, study: optuna.Study, tracking: Tracking | None = None) -> None:
    """The best trial and where to look further; a tracker's command only where its store holds this study
    (``tracking``: the run's, whose trackers that could not be reached are not asked again)."""
    try:
        best = best_trial(study)
    except ValueError:
        console.print("[red]no trial completed[/]")
        return
    under = f" (revision {trial_revision(best)})" if current_revision(study) else ""
    if cfg.objectives:  # no single best: the front, each trial better than every other on some objective
        front = sorted(study.best_trials, key=lambda t: t.number)
        console.print(f"\n[bold]Pareto front[/]: {len(front)} trial(s) (hpo best --pick EXPR chooses one)")
        for t in front:
            console.print(f"  trial {t.number}: {_values(cfg, t)}  [dim]{escape(_fmt_params(t.params))}[/]")
    label = "best" if not cfg.objectives else "best on the first objective (its model is best_model/)"
    spread = (
        f" ± {best.user_attrs['value_std']:.4f} over {best.user_attrs['repeats']} seeds"
        if "value_std" in best.user_attrs
        else ""
    )
    console.print(f"\n[bold]{label}[/] trial {best.number}{under}: {cfg.objective.metric}={best.values[0]:.4f}{spread}")
    console.print(json.dumps(best.params, indent=2))
    for warning in at_edges(best.params, best.distributions):
        console.print(f"[yellow]at the edge[/]: {escape(warning)}")
    if cfg.pruner.name != "none" and (paid := pruning_saved(study)):
        console.print(paid)
    info = saved_trial(cfg) or {}
    saved = info.get("trial")
    if saved != best.number:
        why = escape(best.user_attrs.get(SAVE_ERROR, "it was not saved by this run"))
        held = f"holds trial {saved}'s model" if saved is not None else "is empty"
        console.print(f"[yellow]warning[/]: best_model/ {held}, not trial {best.number}'s: {why}")
    elif info.get("value") != best.values[0]:  # the same number, another study's trial (a storage moved or copied)
        console.print(
            f"[yellow]warning[/]: best_model/ holds a trial {saved} of value {info.get('value')}, not this "
            f"study's trial {saved} ({best.values[0]}): its storage has the same name, not the same trials"
        )
    env = f" --env {cfg.environment}" if cfg.environment else ""  # the study's name and storage may depend on it
    given = cfg.given("study", "storage", "output_dir")  # key=value on the command line: how to find the study again
    dashboard = f"optuna-dashboard {cfg.storage_label}" if cfg.from_dict else f"hpo dashboard {cfg.file}{env}{given}"
    hints = "".join(f"\n{name + ':':<11} {command}" for name, command in written(cfg, tracking).items())
    console.print(
        cfg.masked(f"storage:    {cfg.storage_label}\noutputs:    {cfg.output_path}\ndashboard:  {dashboard}" + hints),
        markup=False,
    )
