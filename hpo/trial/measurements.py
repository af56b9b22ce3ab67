"""What a finished trial measured, as the user attrs it keeps: the scored evaluation and the best ones, cost figures
(time, throughput, memory, latency), how this run started (a resume, its first step), and the optimizer it used."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import Trainer

from hpo.attrs import PRUNED_AT_STEP
from hpo.tasks import TASKS
from hpo.trial.memory import PeakMeter, rss_mb
from hpo.trial.pruning import PruningCallback
from hpo.trial.workbench import Workbench


def trial_measurements(
    bench: Workbench, trainer: Trainer, callback: PruningCallback, seconds: float, meter: PeakMeter
) -> dict[str, Any]:
    """The trial's evaluations and costs, from its ``trainer`` and pruning ``callback`` after training for
    ``seconds``; values that are None or NaN are left out."""
    metric = bench.cfg.objective.metric
    scored = callback.best if bench.cfg.objective.at == "best" else -1
    scored_step, at = callback.history[scored]  # the evaluation that is the trial's value
    last_step, last = callback.history[-1]
    # Best over evaluations of every eval row: with eval_every.subsample, only the last one of a trial that ran to
    # its end (a pruned trial has none: its subsampled ones, then).
    subsampled = getattr(trainer, "eval_subset", None) is not None
    ended = trainer.state.global_step >= trainer.state.max_steps
    full = callback.history[-1:] if subsampled and ended else callback.history
    losses = [m["eval_loss"] for _, m in full]
    objective = [m[metric] for _, m in full]
    pick = min if bench.cfg.objective.direction == "minimize" else max
    examples = round(trainer.state.epoch * len(bench.train_rows))
    attrs = {
        "best_eval_loss": min(losses),
        "last_eval_loss": last["eval_loss"],
        f"best_{metric}": pick(objective),
        **{m: at.get(m) for m in TASKS[bench.cfg.task].metrics if m != "eval_loss"},  # at the scored evaluation
        "scored_step": scored_step,  # the evaluation the trial's value and model are from (objective.at)
        "optimizer_steps": trainer.state.global_step,
        "planned_steps": trainer.state.max_steps,  # what the full run would take: pruning saves the difference
        "examples_seen": examples,
        "last_step": last_step,
        "train_seconds": round(seconds, 3),
        "samples_per_second": round(examples / seconds, 2) if seconds > 0 else None,
        # inference per example at the scored evaluation, on this device at the eval batch: a cost to trade off
        "eval_latency_ms": round(1000 / at["eval_samples_per_second"], 4)
        if at.get("eval_samples_per_second")
        else None,
        "peak_memory_mb": round(meter.peak_mb, 1),  # the trial's own: above the process's level before it
        "device": bench.device,
        "processes": trainer.args.world_size,  # ranks of a multi-process trial (peak memory: rank 0's)
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    if callback.pruned_at is not None:
        attrs[PRUNED_AT_STEP] = callback.pruned_at
    if callback.stopped_early is not None:
        attrs["stopped_early"] = callback.stopped_early  # COMPLETE: it stopped improving (early_stopping)
    return {k: v for k, v in attrs.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def this_run(
    trainer: Trainer, resume: Path | None, trained: int, seconds: float, first_step: int, startup: float
) -> dict[str, Any]:
    """How this run of the trial went: ``trained`` examples in ``seconds`` after a ``resume`` (the optimizer steps it
    started at), ``startup`` seconds to its ``first_step`` (NaN: none), the sampling, the process's memory now."""
    attrs: dict[str, Any] = {}
    if trainer.eval_subset is not None:
        attrs["eval_subsample_rows"] = len(trainer.eval_subset)  # at the evaluations before the last
    if resume is not None:  # the checkpoint's optimizer step, and the first step this run trained
        attrs["resumed_from_step"], attrs["first_step"] = int(resume.name.split("-")[1]), first_step
        attrs["samples_per_second"] = round(trained / max(seconds, 1e-9), 2)  # by this run
    if not math.isnan(startup):
        attrs["seconds_to_first_step"] = round(startup, 3)  # model, Trainer, first batch: a trial's start-up
    attrs["train_sampling_strategy"] = getattr(trainer.args, "train_sampling_strategy", None)  # how batches were drawn
    if (now := rss_mb()) is not None:
        attrs["rss_mb"] = round(now, 1)  # now, after training: growth across trials is a leak
    return attrs


def optimizer_attrs(trainer: Trainer) -> dict[str, Any]:
    """The optimizer's class, kernel and param groups: the rates as it had them (layer-wise, scaled, scheduled)."""
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {
        "optimizer": type(optimizer).__name__,
        "optimizer_kernel": next((k for k in ("fused", "foreach") if optimizer.defaults.get(k)), "for-loop"),
        "param_groups": [
            {
                "parameters": sum(p.numel() for p in g["params"]),
                "head": g.get("head", False),
                "lr": g.get("initial_lr", g["lr"]),
                "final_lr": g["lr"],
                "weight_decay": g["weight_decay"],
            }
            for g in trainer.optimizer.param_groups
        ],
    }
